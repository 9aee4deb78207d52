"""The megatron-core seam, part 1: process setup (torchrun, srun, one process), NCCL or gloo, the CPU
compatibility layer, parallel layouts and megatron-core's import path.
"""
