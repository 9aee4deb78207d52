"""megatron-sami: SAMI (self-supervised alignment with mutual information) on Megatron-Core.

Importing this package is cheap: it does not import torch or megatron-core. The Megatron
seam lives in :mod:`megatron_sami.runtime` (process setup) and :mod:`megatron_sami.models`
(model building, checkpoints).
"""

__version__ = "0.1.0"
