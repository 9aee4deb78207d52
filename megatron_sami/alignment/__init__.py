"""The alignment stage: SAMI's objective and batching (pure tensors), its Megatron-Core forward
step, and the ``sami-train`` loop.
"""
