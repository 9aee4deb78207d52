"""Typed model and precision configs, validated where they are defined.

These dataclasses are Hydra structured configs: the YAML files under ``configs/model/``
are merged onto :class:`ModelConfig`, so a misspelt key or a wrong type fails on load.
Value checks run in ``__post_init__``, i.e. whenever OmegaConf turns a config into an
object (:func:`omegaconf.OmegaConf.to_object`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from megatron_sami.errors import ConfigError

FAMILIES = ("llama", "mistral", "mixtral")
ROPE_SCALING_TYPES = ("none", "llama3", "linear")
PARAMS_DTYPES = ("bf16", "fp32")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, as HF's ``rope_scaling`` describes it.

    ``llama3`` is Llama 3.1's band-wise scaling; Megatron implements it with fixed
    low/high frequency factors 1 and 4 and 8192 original positions, so other values are
    refused rather than silently changed. ``linear`` is position interpolation.

    Raises:
        ConfigError: an unknown type, a factor <= 0, or llama3 factors Megatron does not implement.
    """

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"rope_scaling.type '{self.type}' is not supported; use one of {', '.join(ROPE_SCALING_TYPES)}."
            )
        if self.type != "none" and self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be positive, got {self.factor}.")
        if self.type == "llama3":
            megatron_fixed = (1.0, 4.0, 8192)
            given = (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
            if given != megatron_fixed:
                raise ConfigError(
                    "Megatron's llama3 rope scaling assumes low_freq_factor=1, high_freq_factor=4 and "
                    f"original_max_position_embeddings=8192, but this model has {given}; "
                    "such a model cannot be represented exactly, so it is refused."
                )


@dataclass
class ModelConfig:
    """Architecture of one decoder-only model (Llama / Mistral / Mixtral family); sizes in
    elements (heads, channels, tokens).

    Raises:
        ConfigError: an unknown family, a size <= 0, heads not a multiple of the query groups,
            a hidden size heads do not divide (without ``head_dim``), bad MoE expert counts, or
            a sliding window <= 0.
    """

    name: str = MISSING
    family: str = MISSING
    hf_architecture: str = MISSING
    # Where the weights come from by default: a hub id or a local directory.
    hf_source: str | None = None
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING
    head_dim: int | None = None
    vocab_size: int = MISSING
    max_position_embeddings: int = MISSING
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    num_experts: int | None = None
    moe_router_topk: int = 2
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model family '{self.family}' is not supported; use one of {', '.join(FAMILIES)}.")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups})."
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set model.head_dim explicitly."
            )
        if self.is_moe:
            if self.num_experts < 2:
                raise ConfigError(f"model.num_experts must be >= 2 for an MoE model, got {self.num_experts}.")
            if not 1 <= self.moe_router_topk <= self.num_experts:
                raise ConfigError(
                    f"model.moe_router_topk ({self.moe_router_topk}) must be between 1 and "
                    f"num_experts ({self.num_experts})."
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be positive or null, got {self.sliding_window}.")

    @property
    def is_moe(self) -> bool:
        """Whether the MLP is a mixture of ``num_experts`` experts."""
        return self.num_experts is not None

    @property
    def kv_channels(self) -> int:
        """Channels per attention head: ``head_dim``, else hidden_size / num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self) -> int:
        """Vocabulary size padded to a multiple of ``make_vocab_size_divisible_by``.

        Unlike Megatron-LM's default, the padding does not grow with TP: one checkpoint then
        has one embedding shape and loads at every TP size that divides it (checked by the
        layout validation).
        """
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model (embeddings counted once when tied)."""
        attention = self.hidden_size * self.kv_channels * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        mlp_one = 3 * self.hidden_size * self.ffn_hidden_size
        mlp = mlp_one * (self.num_experts or 1) + (self.hidden_size * self.num_experts if self.is_moe else 0)
        per_layer = attention + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size


def transformer_engine_import_error() -> str | None:
    """Why Transformer Engine's PyTorch extension does not import here, or None where it does.

    Detected as megatron-core detects it (``HAVE_TE``: an import, not ``find_spec``), since TE
    can be installed and still fail to load, e.g. built against another torch in a container.
    """
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken extension raises ImportError, OSError or RuntimeError
        return f"{type(err).__name__}: {err}"
    return None


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    return tuple(int(part) for part in version.split(".")[:2]) if version else None


def fp8_refusal(fp8_recipe: str, capability: tuple[int, int], cuda_version: str | None) -> str | None:
    """Why Transformer Engine 2.x refuses ``fp8_recipe`` on this GPU, or None where it runs.

    Mirrors TE's own checks (``transformer_engine/pytorch/quantization.py``,
    ``_compute_fp8_support``, ``_compute_mxfp8_support`` and ``_compute_fp8_block_scaling_support``;
    ``pytorch/fp8.py`` before TE 2.8): per-tensor recipes (delayed, tensorwise) need compute
    capability 9.0, or 8.9 with CUDA >= 12.1 (TE also wants cuBLASLt >= 12.1.3 there, which it
    checks itself); ``blockwise`` needs 9.0 and CUDA >= 12.9 (TE releases before 2.8 also
    refused 10.0+); ``mxfp8`` needs 10.0 and is refused on 12.0+ (consumer Blackwell).

    Args:
        fp8_recipe: one of ``FP8_RECIPES``.
        capability: the GPU's compute capability, ``torch.cuda.get_device_capability()``.
        cuda_version: ``torch.version.cuda`` ("12.8"); None on ROCm builds, where the CUDA
            version rules do not apply.
    """
    cuda = _version_tuple(cuda_version)
    if fp8_recipe == "mxfp8":
        if capability >= (12, 0):
            return "Transformer Engine does not support MXFP8 on compute capability 12.0+ yet"
        return None if capability >= (10, 0) else "MXFP8 needs compute capability 10.0 (Blackwell) or newer"
    if fp8_recipe == "blockwise":
        if capability < (9, 0) or (cuda is not None and cuda < (12, 9)):
            return "FP8 block scaling needs compute capability 9.0+ and CUDA 12.9+"
        return None
    if capability < (8, 9):
        return "FP8 needs compute capability 8.9 (Ada) or 9.0 (Hopper) or newer"
    if capability < (9, 0) and cuda is not None and cuda < (12, 1):
        return "FP8 on compute capability 8.9 needs CUDA 12.1+"
    return None


def _te_fp8_refusal(fp8_recipe: str) -> str | None:
    """Transformer Engine's own answer where the installed TE has the check (``check_*_support``
    in ``transformer_engine.pytorch.quantization``, ``.fp8`` before TE 2.8); None otherwise."""
    import importlib

    name = {"mxfp8": "check_mxfp8_support", "blockwise": "check_fp8_block_scaling_support"}.get(
        fp8_recipe, "check_fp8_support")
    for module_name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            check = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            continue
        if check is not None:
            supported, reason = check()
            return None if supported else reason
    return None


@dataclass
class PrecisionConfig:
    """Parameter dtype, optional FP8 (Transformer Engine on compute capability 8.9+), and the
    GPU peak that MFU is measured against.

    ``fp8_recipe`` defaults to ``tensorwise`` (per-tensor current scaling: each GEMM's scale comes
    from the amax of the tensor being quantised). SAMI fine-tunes for a few optimizer steps;
    with ``delayed`` scaling and megatron-core's defaults (one-entry amax history,
    ``most_recent``) the first microbatch of a run quantises with no history, which can
    saturate e4m3 (max 448), and the first step is a quarter of a 4-step run. Current scaling
    costs an amax reduction per GEMM; ``delayed`` remains available for long runs. Needs
    Transformer Engine >= 2.2 (megatron-core checks it).

    ``peak_tflops`` (dense TFLOP/s per GPU) overrides the table in
    :func:`megatron_sami.training.engine.peak_tflops`, for GPUs it does not name exactly.

    Raises:
        ConfigError: an unsupported ``params_dtype`` (fp16 included), FP8 format or FP8 recipe,
            or a ``peak_tflops`` <= 0.
    """

    params_dtype: str = "bf16"
    fp8: str | None = None
    fp8_recipe: str = "tensorwise"
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.params_dtype not in PARAMS_DTYPES:
            hint = " (fp16 needs loss scaling, which this project does not do; use bf16)" if self.params_dtype == "fp16" else ""
            raise ConfigError(
                f"precision.params_dtype '{self.params_dtype}' is not supported{hint}; use one of {', '.join(PARAMS_DTYPES)}."
            )
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"precision.fp8 '{self.fp8}' is not a format; use one of {', '.join(FP8_FORMATS)} or null.")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"precision.fp8_recipe '{self.fp8_recipe}' is unknown; use one of {', '.join(FP8_RECIPES)}.")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"precision.peak_tflops must be positive (dense TFLOP/s per GPU) or null, got {self.peak_tflops}.")

    def check_hardware(self) -> None:
        """Refuse FP8 where it cannot run, before any model is built (see :func:`fp8_refusal`).

        Raises:
            ConfigError: FP8 where Transformer Engine does not import, without a CUDA GPU, or
                with a recipe that this GPU or CUDA version cannot run.
        """
        if self.fp8 is None:
            return
        te_error = transformer_engine_import_error()
        if te_error is not None:
            raise ConfigError(
                f"precision.fp8 needs Transformer Engine, which does not import here ({te_error}); install the "
                "'gpu' extra on a GPU machine (or use a container with TE) or set precision.fp8=null."
            )
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("precision.fp8 needs a CUDA GPU (compute capability 8.9+) and none is visible; "
                              "set precision.fp8=null.")
        capability = torch.cuda.get_device_capability()
        refusal = fp8_refusal(self.fp8_recipe, capability, torch.version.cuda) or _te_fp8_refusal(self.fp8_recipe)
        if refusal is not None:
            raise ConfigError(
                f"precision.fp8_recipe={self.fp8_recipe} cannot run on this GPU (compute capability "
                f"{capability[0]}.{capability[1]}, CUDA {torch.version.cuda}): {refusal}; choose another "
                "precision.fp8_recipe or set precision.fp8=null."
            )


# Activation recomputation, cheapest in compute (and most memory) first; what each stores:
# megatron_sami/models/memory.py. "selective" is megatron-core's recompute_granularity=selective
# with its default recompute_modules ["core_attn"]; "full" recomputes every layer (uniform, 1 layer).
RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_mode(value: str | bool) -> str:
    """``recompute_activations`` as one of :data:`RECOMPUTE_MODES`; the booleans of older configs
    and checkpoints read as ``full`` (true) and ``none`` (false).

    Raises:
        ConfigError: any other value.
    """
    legacy = {"true": "full", "false": "none"}
    mode = legacy.get(str(value).lower(), str(value))
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute_activations '{value}' is unknown; use one of {', '.join(RECOMPUTE_MODES)} "
                          "(megatron_sami/models/memory.py says which fits).")
    return mode
