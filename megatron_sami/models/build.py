"""Build a Megatron-Core ``GPTModel`` for a catalogue model and a parallel layout.

This is the model half of the seam around megatron-core: the only place that knows how a
:class:`ModelConfig` becomes a ``TransformerConfig``, a layer spec and a ``GPTModel``.

- Transformer Engine layer spec when TE imports and CUDA is present, the local (pure
  megatron-core) spec otherwise. FP8 needs the TE spec.
- MoE: grouped GEMM and the alltoall dispatcher on GPU; SequentialMLP and the allgather
  dispatcher on CPU (alltoall does not work over gloo).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_sami.device_budget import check_device_budget
from megatron_sami.errors import ConfigError
from megatron_sami.models.config import (
    ModelConfig,
    PrecisionConfig,
    recompute_mode,
    transformer_engine_import_error,
)
from megatron_sami.models.local_norm import local_decoder_spec
from megatron_sami.runtime.layout import ParallelConfig

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# TransformerConfig keys per recompute mode (megatron-core 0.19: selective recomputes the modules of
# its default recompute_modules, ["core_attn"]; full recomputes each layer from its input).
_RECOMPUTE = {"none": {}, "selective": {"recompute_granularity": "selective"},
              "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}


@dataclass(frozen=True)
class Backend:
    """Which kernels a model is built with on this machine."""

    use_te: bool
    on_gpu: bool

    @classmethod
    def detect(cls) -> Backend:
        """Transformer Engine where megatron-core can use it and CUDA is present; otherwise the
        local spec. On a GPU without a usable Transformer Engine the first process warns once,
        naming the import that failed (:func:`transformer_engine_problem`)."""
        on_gpu = torch.cuda.is_available()
        problem = transformer_engine_problem() if on_gpu else "no CUDA GPU"
        if on_gpu and problem is not None:
            _warn_local_spec_on_gpu(problem)
        return cls(use_te=problem is None, on_gpu=on_gpu)

    @property
    def moe_dispatcher(self) -> str:
        """alltoall on GPU; allgather on CPU (alltoall does not work over gloo)."""
        return "alltoall" if self.on_gpu else "allgather"

    @property
    def moe_grouped_gemm(self) -> bool:
        """Grouped expert GEMMs, which need Transformer Engine."""
        return self.use_te


@functools.cache
def transformer_engine_problem() -> str | None:
    """Why megatron-core cannot use Transformer Engine in this process, or None where it can.

    Detected as megatron-core 0.19 detects it (``HAVE_TE`` in ``megatron/core/extensions/
    transformer_engine.py``: an actual import, not ``find_spec``): TE can be installed and still
    fail to load, e.g. its torch extension built against another torch in a container. Then
    megatron-core's ``TESpecProvider`` is None and asking it for the TE layer spec dies with
    ``TypeError: 'NoneType' object is not callable``; this names the import that failed instead.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return "Transformer Engine is not installed"
    failure = transformer_engine_import_error()
    if failure is not None:
        return f"Transformer Engine is installed but `import transformer_engine.pytorch` fails ({failure[:300]})"
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not HAVE_TE:
        return ("Transformer Engine imports, but megatron-core's own import of it fails "
                "(`from transformer_engine.pytorch.fp8 import ...` in megatron/core/extensions/transformer_engine.py)")
    return None


@functools.cache
def _warn_local_spec_on_gpu(problem: str) -> None:
    """Say once, on the first process only, that a GPU run uses the local spec and why: the only
    sign of a broken Transformer Engine install (megatron-core's own warning says neither which
    import failed nor that the run is slower, and the project silences it)."""
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).warning(
            "%s: this GPU run builds megatron-core's local layer spec (no FP8, no fused TE kernels); "
            "install Transformer Engine built for this torch (see the README's container install).", problem)


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    backend: Backend,
    recompute_activations: str | bool = "none",
    initialize_weights: bool = True,
):
    """The megatron-core ``TransformerConfig`` for one model under one layout
    (``recompute_activations``: one of :data:`~megatron_sami.models.config.RECOMPUTE_MODES`).

    Raises:
        ConfigError: FP8 without the Transformer Engine spec, or precision the hardware lacks.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    precision.check_hardware()
    if precision.fp8 is not None and not backend.use_te:
        raise ConfigError("precision.fp8 needs the Transformer Engine layer spec (TE + CUDA); set precision.fp8=null.")
    dtype = _DTYPES[precision.params_dtype]
    recompute = _RECOMPUTE[recompute_mode(recompute_activations)]
    return TransformerConfig(
        **_architecture(model),
        **_kernels(model, backend),
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not backend.on_gpu,
        perform_initialization=initialize_weights,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        **_moe(model, backend),
        **recompute,
    )


def _architecture(model: ModelConfig) -> dict:
    """The Llama-family block: RMSNorm, SwiGLU, no biases, no dropout (fine-tuning)."""
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
    )


def sliding_window_size(model: ModelConfig) -> tuple[int, int] | None:
    """megatron-core's ``window_size`` for the model's sliding window: (left, right) keys around
    each query, both bounds INCLUSIVE (flash-attn's and Transformer Engine's convention), so
    HF's ``sliding_window`` W (a query sees itself and the W - 1 keys before it, transformers'
    ``kv_idx > q_idx - W``) is ``(W - 1, 0)``. Applied by TE's attention and by the project's
    SDPA attention alike."""
    return None if model.sliding_window is None else (model.sliding_window - 1, 0)


def _wgrad_fusion_available() -> bool:
    """Whether megatron-core's own linears (the output layer, also on the TE spec) can fuse the
    weight-gradient accumulation: they need Apex's ``fused_weight_gradient_mlp_cuda`` and raise
    at construction without it (megatron-core 0.19 ``tensor_parallel/layers.py``); Megatron-LM
    turns the option off in that case too."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels(model: ModelConfig, backend: Backend) -> dict:
    """Fused kernels where this machine has them (GPU; Transformer Engine), and the sliding
    window (see :func:`sliding_window_size`)."""
    return dict(
        bias_activation_fusion=backend.on_gpu,
        bias_dropout_fusion=backend.on_gpu,
        masked_softmax_fusion=backend.on_gpu,
        apply_rope_fusion=backend.use_te,
        # TE GEMMs write weight gradients straight into DDP's fp32 main_grad buffers.
        gradient_accumulation_fusion=backend.use_te and _wgrad_fusion_available(),
        persist_layer_norm=backend.use_te,
        window_size=sliding_window_size(model),
    )


def _moe(model: ModelConfig, backend: Backend) -> dict:
    """The mixture-of-experts settings (none for a dense model)."""
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.ffn_hidden_size,
        moe_token_dispatcher_type=backend.moe_dispatcher,
        moe_grouped_gemm=backend.moe_grouped_gemm,
        # Routing softmax and top-k in fp32, as HF Mixtral routes (softmax(..., dtype=float)); bf16
        # rounding can pick other experts. megatron-core also runs the gate GEMM and the
        # weighted sum of expert outputs in fp32.
        moe_router_dtype="fp32",
        # Fine-tuning from a pretrained router: no auxiliary loss, no token dropping.
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )


def layer_spec(model: ModelConfig, backend: Backend):
    """The transformer layer's ``ModuleSpec``: Transformer Engine's, or megatron-core's local one
    with the project's SDPA core attention (see :mod:`megatron_sami.models.sdpa_attention`).

    Both write and read one checkpoint key set (``tests/test_te_lane.py``), so a checkpoint
    converted or trained on either lane loads on the other; only Transformer Engine's
    ``_extra_state`` entries differ, which :func:`megatron_sami.models.checkpoint.load_model`
    tolerates.

    Raises:
        ConfigError: the Transformer Engine spec is asked for where megatron-core cannot use TE.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if backend.use_te:
        if specs.TESpecProvider is None:  # megatron-core's HAVE_TE is False
            raise ConfigError(f"the Transformer Engine layer spec needs Transformer Engine, but "
                              f"{transformer_engine_problem()}; fix the install or run without it (CPU, no FP8).")
        # No fp8= argument: megatron-core 0.19 deprecated it (FP8 comes from the TransformerConfig).
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, moe_grouped_gemm=backend.moe_grouped_gemm
        )
    from megatron_sami.models.local_norm import SequenceParallelRMSNorm
    from megatron_sami.models.sdpa_attention import SDPAttention

    spec = specs.get_gpt_layer_local_spec(
        num_experts=model.num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    # torch's fused attention instead of megatron's unfused local one (same math, see the module).
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    # torch's RMSNorm marked for sequence parallelism (megatron's wrapper refuses SP: see the module).
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if model.is_moe:
        # The local map stores each norm under the name of the TE linear it is fused into. TE's
        # MoE layer keeps its pre-MLP norm as a module of its own (no linear_fc1 to fuse into:
        # megatron-core 0.19 gpt_layer_specs.py, pre_mlp_layernorm=backend.layer_norm(...) if
        # num_experts), so the local MoE layer keeps that norm's own name too.
        keys = dict(spec.submodules.sharded_state_dict_keys_map)
        del keys["pre_mlp_layernorm."]
        spec.submodules.sharded_state_dict_keys_map = keys
    return spec


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    seq_length: int,
    recompute_activations: str | bool = "none",
    backend: Backend | None = None,
    initialize_weights: bool = True,
):
    """Build this rank's part of ``GPTModel`` (its pipeline stage, its TP/EP shards).

    Requires :func:`megatron_sami.runtime.distributed.initialize` to have set up the parallel state.
    ``seq_length`` is the longest sequence (tokens) the model will run on.

    Raises:
        ConfigError: ``seq_length`` exceeds the model's positions; FP8 without Transformer
            Engine; precision the hardware lacks.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    backend = backend or Backend.detect()
    if seq_length > model.max_position_embeddings:
        raise ConfigError(
            f"sequence length {seq_length} exceeds {model.name}'s max_position_embeddings "
            f"({model.max_position_embeddings}); shorten the sequences."
        )
    # initialize_weights=False leaves the weights uninitialised (for loading or converting).
    config = transformer_config(model, parallel, precision, backend, recompute_activations, initialize_weights)
    stages = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    allocates = torch.get_default_device().type != "meta"  # a meta build (conversion) holds no weights
    if allocates:
        check_parameter_budget(process_parameters(model, parallel, *stages), model, parallel)
    rope, spec = model.rope_scaling, layer_spec(model, backend)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec if backend.use_te else local_decoder_spec(spec, config),
        vocab_size=model.padded_vocab_size(),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=rope.type == "llama3",
        rope_scaling_factor=rope.factor if rope.type == "llama3" else 8.0,
        seq_len_interpolation_factor=rope.factor if rope.type == "linear" else None,
        parallel_output=True,
    )
    _cast_params(gpt, config.params_dtype)
    if allocates:  # the built model too, in case a module escapes process_parameters' count
        check_parameter_budget(sum(p.numel() for p in gpt.parameters() if not p.is_meta), model, parallel)
    return gpt


def process_parameters(model: ModelConfig, parallel: ParallelConfig, first_stage: bool, last_stage: bool) -> int:
    """The parameters one rank of ``parallel`` builds, counted from the config before anything is
    allocated: its pipeline stage's ``L / PP`` layers (attention and MLP weights split over TP,
    experts over EP and TP, norms and the router whole), the vocabulary-parallel embedding on the
    first stage, the output layer (unless tied within one stage) and the final norm on the last.
    Exact for both layer specs (``tests/test_device_budget.py`` compares it with built models);
    the heaviest stage's count is :func:`megatron_sami.models.memory.stage_parameters`."""
    h, t = model.hidden_size, parallel.tensor
    attention = h * model.kv_channels * (2 * model.num_attention_heads + 2 * model.num_query_groups) // t
    mlp = 3 * h * model.ffn_hidden_size // t
    if model.is_moe:
        mlp = model.num_experts // parallel.expert * mlp + h * model.num_experts  # experts + the router
    layers = model.num_layers // parallel.pipeline * (attention + mlp + 2 * h)
    vocab = model.padded_vocab_size() * h // t
    output = vocab if not (model.tie_word_embeddings and first_stage) else 0
    return layers + (vocab if first_stage else 0) + (output + h if last_stage else 0)


def check_parameter_budget(num_params: int, model: ModelConfig, parallel: ParallelConfig) -> None:
    """Refuse to build ``num_params`` parameters (this rank's share) over the per-process device
    budget (:mod:`megatron_sami.device_budget`), naming a larger model-parallel layout.

    Raises:
        DeviceBudgetError: above ``SAMI_DEVICE_BUDGET_PARAMS``.
    """
    t, p, e = parallel.tensor, parallel.pipeline, parallel.expert
    more = [f"parallel.tensor={2 * t}", f"parallel.pipeline={2 * p}"] + \
        ([f"parallel.expert={2 * e}"] if model.is_moe else [])
    check_device_budget(num_params, f"this rank's part of {model.name} at TP={t}, PP={p}, EP={e}",
                        f"shard the model over more processes (e.g. {' or '.join(more)}) or raise the budget")


def _cast_params(gpt: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every parameter the model's dtype, as megatron's ``Float16Module`` does: the local
    spec's torch norms are created in fp32, and megatron-core's non-distributed BF16 optimizer
    cannot checkpoint a model whose parameters mix dtypes."""
    for param in gpt.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def applies_attention_masks(model: torch.nn.Module) -> bool:
    """Whether every self-attention of ``model`` applies an attention mask passed to its forward
    and takes per-sequence rotary positions: the project's SDPA core attention with megatron's
    unfused RoPE does; Transformer Engine's causal attention ignores the mask."""
    from megatron_sami.models.checkpoint import unwrap
    from megatron_sami.models.sdpa_attention import SDPAttention

    model = unwrap(model)
    cores = [module.core_attention for module in model.modules() if hasattr(module, "core_attention")]
    return bool(cores) and all(isinstance(core, SDPAttention) for core in cores) and not model.config.apply_rope_fusion
