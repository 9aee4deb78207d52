"""The megatron-core seam, part 2: typed model configs, the catalogue, the ``GPTModel`` builder, the
operations callers run on a built model, distributed checkpoints and the checkpoint-directory
format that conversion, training and export share.
"""
