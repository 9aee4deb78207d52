"""The megatron-core seam, part 3: DDP, the optimizer, megatron-core's pipeline schedule for one
step, and the optimizer and RNG state a training checkpoint holds.
"""
