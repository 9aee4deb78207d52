"""Rank bodies for the Transformer Engine lane's checkpoint tests, run where TE is not installed.

The TE lane's model is built from megatron-core's own TE layer spec
(``get_gpt_layer_with_transformer_engine_spec``, called through the project's ``layer_spec``)
with megatron-core's TE wrapper classes replaced by CPU stand-ins. What these tests trust:

- megatron-core itself decides the structure: which module sits where in the TE spec (the
  norms fused into ``linear_qkv`` / ``linear_fc1`` of dense layers, the separate
  ``pre_mlp_layernorm`` of MoE layers, ``input_layernorm`` absent), the layers' key maps and
  the ``sharded_state_dict`` of ``TransformerLayer``, ``TransformerBlock``, ``MoELayer``,
  ``SequentialMLP`` and ``GPTModel``; the final norm is ``TransformerBlock``'s
  ``LayerNormImpl``, which megatron-core makes ``TENorm`` wherever TE imports.
- the stand-ins reproduce what each TE module contributes to a checkpoint, read from
  megatron-core 0.19.2 ``extensions/transformer_engine.py`` and Transformer Engine 2.x:
  ``TELayerNormColumnParallelLinear`` holds ``layer_norm_weight`` (RMSNorm: no bias),
  ``weight`` and ``_extra_state`` and shards ``weight``/``bias`` on axis 0;
  ``TEColumnParallelLinear`` / ``TERowParallelLinear`` hold ``weight`` and ``_extra_state``
  (axis 0 / axis 1); ``TENorm`` (TE >= 1.13: an ops-based module with ``get_extra_state``)
  holds ``weight`` and ``_extra_state`` and has no ``sharded_state_dict`` of its own;
  ``TEDotProductAttention``'s sharded state dict is empty (it holds only a learnable softmax
  offset, unused here).
- grouped expert GEMMs (``TEGroupedMLP``, the GPU default) are stood in for by
  ``SequentialMLP`` with TE linears, relying on megatron-core's statement that
  ``TEGroupedMLP.sharded_state_dict`` "is interchangeable with SequentialMLP's"
  (``transformer/moe/experts.py``).

The same comparison against the real TE modules runs in ``tests/test_gpu.py`` where TE imports.
"""

import contextlib
from functools import partial
from pathlib import Path

import torch

from megatron_sami.errors import SamiError
from megatron_sami.models import build
from megatron_sami.models.build import Backend, build_gpt_model
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint import load_model, save_model
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.models.sdpa_attention import SDPAttention
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig

LANES = ("local", "te")


def _te_extra_state(module: torch.nn.Module) -> torch.Tensor:
    # TE's modules serialise their FP8 metadata into a byte tensor (empty without FP8).
    return torch.empty(0, dtype=torch.uint8)


def _stand_in_classes() -> dict:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    class StandInTELinear(ColumnParallelLinear):
        get_extra_state = _te_extra_state

        def set_extra_state(self, state) -> None:
            self.loaded_extra_state = state

    class StandInTERowParallelLinear(RowParallelLinear):
        get_extra_state = _te_extra_state

        def set_extra_state(self, state) -> None:
            self.loaded_extra_state = state

    class StandInTELayerNormColumnParallelLinear(StandInTELinear):
        def __init__(self, input_size: int, output_size: int, **kwargs) -> None:
            super().__init__(input_size, output_size, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, device=self.weight.device))

    class StandInTENorm(torch.nn.Module):
        def __init__(self, config, hidden_size: int, eps: float = 1e-5, has_residual: bool = False) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))

        get_extra_state = _te_extra_state

        def set_extra_state(self, state) -> None:
            self.loaded_extra_state = state

    class StandInTEDotProductAttention(SDPAttention):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None) -> dict:
            return {}

    return dict(linear=StandInTELinear, row=StandInTERowParallelLinear,
                layer_norm_linear=StandInTELayerNormColumnParallelLinear, norm=StandInTENorm,
                attention=StandInTEDotProductAttention)


def _stand_in_provider(classes: dict):
    from megatron.core.models.backends import BackendSpecProvider
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    class StandInTESpecProvider(BackendSpecProvider):
        """megatron-core's ``TESpecProvider`` with the stand-ins above."""

        def linear(self):
            return classes["linear"]

        def column_parallel_linear(self):
            return classes["linear"]

        def row_parallel_linear(self):
            return classes["row"]

        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self):
            return classes["layer_norm_linear"]

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
            return classes["norm"]

        def core_attention(self):
            return classes["attention"]

        def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
            return partial(SequentialMLP, submodules=MLPSubmodules(
                linear_fc1=classes["linear"], linear_fc2=classes["row"], activation_func=None))

        def activation_func(self):
            return None

    return StandInTESpecProvider


@contextlib.contextmanager
def te_stand_ins():
    """megatron-core's TE spec provider and TransformerBlock's final norm as the stand-ins; the
    TransformerConfig as the local lane's (the TE lane's fused-kernel flags need TE to validate
    and name no parameter)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block

    classes = _stand_in_classes()
    local = Backend(use_te=False, on_gpu=False)
    real_config = build.transformer_config

    def local_lane_config(*args, **kwargs):
        args = [local if isinstance(arg, Backend) else arg for arg in args]
        kwargs = {key: local if isinstance(value, Backend) else value for key, value in kwargs.items()}
        return real_config(*args, **kwargs)

    saved = gpt_layer_specs.TESpecProvider, transformer_block.LayerNormImpl
    gpt_layer_specs.TESpecProvider = _stand_in_provider(classes)
    transformer_block.LayerNormImpl = classes["norm"]
    build.transformer_config = local_lane_config
    try:
        yield
    finally:
        gpt_layer_specs.TESpecProvider, transformer_block.LayerNormImpl = saved
        build.transformer_config = real_config


def build_on(lane: str, model_name: str, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """The model on one lane ("local" or "te"), fp32, TP1; must run inside the runtime."""
    config = load_model_config(model_name)
    torch.manual_seed(seed)
    with te_stand_ins() if lane == "te" else contextlib.nullcontext(), torch.device(device):
        return build_gpt_model(config, ParallelConfig(), PrecisionConfig(params_dtype="fp32"), 32,
                               backend=Backend(use_te=lane == "te", on_gpu=False),
                               initialize_weights=device != "meta")


def checkpoint_entries(model: torch.nn.Module) -> dict[str, tuple]:
    """{checkpoint key: (kind, global shape)} of the model's sharded state dict; ``_extra_state``
    objects carry kind "extra_state" (their shape is the layer/expert grid)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    entries = {}
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedObject):
            entries[item.key] = ("extra_state" if item.key.endswith("_extra_state") else "object",)
        elif isinstance(item, ShardedTensor):
            entries[item.key] = ("tensor", tuple(item.global_shape))
        else:  # a factory (the gated fc1 of SwiGLU): its key and the parameter behind it
            entries[item.key] = ("factory", tuple(item.data.shape))
    return entries


def catalogue_entries(model_names: list[str]) -> dict:
    """{model: {lane: checkpoint_entries}} for each catalogue model, built on the meta device."""
    result = {}
    with megatron_runtime(ParallelConfig()):
        for name in model_names:
            result[name] = {lane: checkpoint_entries(build_on(lane, name, device="meta")) for lane in LANES}
    return result


def _values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def cross_lane_load(model_name: str, directory: str) -> dict:
    """Save on each lane and load on the other; returns per direction whether every weight the
    checkpoint holds arrived, keyed by the writer's parameter names mapped to the reader's."""
    report = {}
    with megatron_runtime(ParallelConfig(), model=load_model_config(model_name)):
        for writer, reader in (("local", "te"), ("te", "local")):
            written = build_on(writer, model_name, seed=1)
            save_model(written, Path(directory) / f"from-{writer}")
            loaded = build_on(reader, model_name, seed=2)
            load_model(loaded, Path(directory) / f"from-{writer}")
            report[f"{writer}->{reader}"] = different_values(written, loaded)
    return report


def different_values(written: torch.nn.Module, loaded: torch.nn.Module) -> list[str]:
    """Names (in the reader) whose value differs from the writer's weight stored under the same
    checkpoint key; empty when every weight arrived."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    def by_key(model):
        values = {}
        for item in nested_values(model.sharded_state_dict()):
            if not item.key.endswith("_extra_state") and hasattr(item, "data"):
                values.setdefault(item.key, []).append(item.data.detach().clone())
        return values

    source, target = by_key(written), by_key(loaded)
    return sorted(key for key in source
                  if key not in target or any(not torch.equal(a, b) for a, b in zip(source[key], target[key], strict=True)))


def load_error(model_name: str, directory: str, lane: str = "local") -> str:
    """The one-sentence error of loading ``directory`` into ``model_name`` on ``lane``."""
    with megatron_runtime(ParallelConfig(), model=load_model_config(model_name)):
        model = build_on(lane, model_name)
        try:
            load_model(model, directory)
        except SamiError as err:
            return str(err)
    return "loaded"


def save_local(model_name: str, directory: str, legacy_moe_keys: bool = False) -> None:
    """Save a local-lane model; ``legacy_moe_keys``: with the MoE norm under the key the local
    spec gave it before issue 15 (``mlp.linear_fc1.layer_norm_weight``)."""
    real_layer_spec = build.layer_spec

    def legacy_layer_spec(model, backend):
        spec = real_layer_spec(model, backend)
        spec.submodules.sharded_state_dict_keys_map = {
            **spec.submodules.sharded_state_dict_keys_map, "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
        return spec

    build.layer_spec = legacy_layer_spec if legacy_moe_keys else real_layer_spec
    try:
        with megatron_runtime(ParallelConfig(), model=load_model_config(model_name)):
            save_model(build_on("local", model_name), directory)
    finally:
        build.layer_spec = real_layer_spec


def cuda_runtime_calls() -> list[str]:
    """The CUDA runtime device-count calls recorded in this process and, through the fork, in the
    harness's fork server (by the probe's ``sitecustomize`` recorder in ``test_te_lane.py``)."""
    import sitecustomize

    return list(getattr(sitecustomize, "CALLS", ["the recorder was not loaded"]))


def resave_on_the_te_lane(ckpt_dir: str, out_dir: str) -> None:
    """Copy a checkpoint directory with its weights loaded into the TE lane's model (stand-ins) and
    saved from it: the weights as before, each TE module's ``_extra_state`` beside them."""
    import shutil

    from megatron_sami.models.checkpoint_dir import (
        HF_DIR,
        MODEL_FILE,
        RECORD_FILE,
        WEIGHTS_DIR,
        read_checkpoint_model,
    )

    source, out = Path(ckpt_dir), Path(out_dir)
    config, _ = read_checkpoint_model(source)
    with megatron_runtime(ParallelConfig(), model=config), te_stand_ins():
        model = build_gpt_model(config, ParallelConfig(), PrecisionConfig(params_dtype="fp32"), 32,
                                backend=Backend(use_te=True, on_gpu=False))
        load_model(model, source / WEIGHTS_DIR)
        out.mkdir(parents=True)
        for name in (MODEL_FILE, RECORD_FILE):
            shutil.copy(source / name, out / name)
        shutil.copytree(source / HF_DIR, out / HF_DIR)
        save_model(model, out / WEIGHTS_DIR)
