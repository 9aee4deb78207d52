"""The alignment stage: SAMI's objective and batching (pure tensors), its megatron-core forward
step, and the ``sami-train`` loop.
"""
