"""megatron-sami: SAMI (self-supervised alignment with mutual information) on Megatron-Core.

Importing this package is cheap: it does not import torch or Megatron-Core. It does put the
finder of :mod:`megatron_sami.runtime.megatron_import` on ``sys.meta_path`` first, so that
every later import of Megatron-Core in this process takes the faster CPU path described there.
The megatron-core seam is :mod:`megatron_sami.runtime` (process setup), :mod:`megatron_sami.models`
(model building, checkpoints) and :mod:`megatron_sami.training` (DDP, optimizer, schedule); no other
folder imports megatron-core (``megatron_sami/README.md`` has the map).
"""

from megatron_sami.runtime import megatron_import as _megatron_import

__version__ = "0.1.0"

_megatron_import.install()
