"""Per-GPU memory of each phase of a run, estimated before any GPU time (pure: no torch, no megatron).

What ``sami-check-config`` prints and what it refuses a layout on. Bytes, per GPU, of the heaviest
rank; ``GIB = 2**30``.

**Training** (``sami-train``: megatron-core's DDP with fp32 gradient buffers, its mixed-precision
optimizer; Korthikanti et al. 2022, arXiv:2205.05198, and Rajbhandari et al. 2020 (ZeRO),
arXiv:1910.02054, Megatron-LM's distributed-optimizer notes for the per-parameter counts):

- parameters of the heaviest pipeline stage: ``L/PP`` layers, each with attention
  ``h d (2a + 2g)`` and norms ``2h``, a SwiGLU MLP ``3 h f`` (MoE: ``E`` experts of ``3 h f`` and a
  router ``h E``), the vocabulary-parallel embedding ``V h`` on the first stage and the output layer
  ``V h`` (untied) on the last; everything but the norms and the router divided by TP, experts
  further divided by EP (``V`` padded to 128, ``d`` the head size, ``g`` KV groups);
- bytes per parameter, with ``D`` the data-parallel size over which the distributed optimizer
  shards its state (experts: the expert-data-parallel size ``world / (TP x EP x PP)``):

  | params | grads | AdamW | RMSprop | SGD | total, AdamW | total, AdamW + distributed |
  |---|---|---|---|---|---|---|
  | bf16: 2 | fp32: 4 | master 4 + m 4 + v 4 = 12 | master 4 + square avg 4 = 8 | master 4 | 18 | 6 + 12/D |
  | fp32: 4 | fp32: 4 | m 4 + v 4 = 8 | 4 | 0 | 16 | 8 + 8/D |

  (ZeRO's 16 bytes/param of mixed-precision Adam is the first row with 2-byte gradients:
  ``2 + 2 + 12``; a momentum buffer adds 4 to RMSprop and SGD);
- activations per layer and microbatch of ``b`` sequences of ``s`` tokens (2-byte activations), as in
  Korthikanti et al. 2022, whose GPT layer stores ``sbh (34 + 5as/h)`` bytes: 10 sbh of attention
  inputs (QKV input 2, Q 2, K 2, V 2, output-projection input 2) plus 1 of dropout mask, 19 sbh of
  MLP (input 2, GeLU input 8, GeLU output 8, dropout mask 1), 4 sbh of LayerNorm inputs, and
  ``5 a s^2 b`` of attention scores. Adapted here to these models:

  * GQA: K and V hold ``g`` of the ``a`` heads, ``2 sbh g/a`` each (10 -> ``6 + 4g/a``);
  * SwiGLU: input ``2 sbh``, the fused gate/up output (the SwiGLU input, ``2f`` wide) ``4 sbf``,
    the down-projection input ``2 sbf`` (19 -> ``2 + 6f/h``); MoE: ``k`` experts per token, so the
    MLP term and a permuted copy of the input (``2 sbh``) count ``k`` times;
  * no dropout (the Llama family has none): the two masks (2 sbh) are gone;
  * attention through flash / fused kernels (Transformer Engine, SDPA) keeps no ``s x s`` scores:
    the ``5as/h`` term becomes 0; ``attention_scores=True`` counts ``2as/h`` (the softmax output;
    no dropout), for an unfused attention;

  so a layer stores ``sbh (8 + (4 + 4g/a + 6f/h [+ 2as/h]) / TP)`` without sequence parallelism
  (the norms' and block inputs' 8 sbh are replicated over TP, the rest split) and ``sbh (...) / TP``
  with it (the paper's ``sbh (10 + 24/t + 5as/(ht))`` and ``sbh/t (34 + 5as/h)``). ``s`` is divided
  by CP. Recomputation (``recompute_activations``, cheapest first, :data:`RECOMPUTE_MODES`):

  * ``none``: the above;
  * ``selective`` (the paper's selective recomputation, megatron-core's
    ``recompute_granularity=selective`` with its default ``recompute_modules=["core_attn"]``): the
    core attention is recomputed, so the ``2as/h`` score term is not stored. With a flash / fused
    attention (``attention_scores=False``, every GPU lane here) that term is already 0: selective
    then stores as much as ``none`` and costs a little compute;
  * ``full`` (``recompute_granularity=full``, uniform, one layer): only each layer's input,
    ``2 sbh`` (/ TP with SP), plus one layer's full activations while it is recomputed;
- pipeline: the first stage holds the activations of ``min(PP, m)`` microbatches in flight
  (1F1B; ``m`` microbatches per step), the last stage one, and the logits: ``s b V / TP`` at 2 bytes
  plus their fp32 log-softmax at 4 (``6 sbV/TP``).

A SAMI microbatch is ``queries_per_microbatch x C x C`` sequences of at most ``data.seq_length``
tokens (shared prompts make it fewer tokens: this is an upper bound).

**Generation** (vLLM at ``tensor_parallel``): vLLM takes ``gpu_memory_utilization`` of the GPU;
of that, the bf16 weights ``2 N / TP`` and the KV cache ``2 (K, V) x L x ceil(g / TP) x d x 2 bytes``
per token. It fits when the weights and one ``max_model_len``-token sequence of KV cache fit;
the estimate reports how many such sequences the cache holds.

**Scoring** (the MI evaluation, :class:`ScoringSetup`): through Megatron at the training layout,
forward only, the weights and one microbatch's largest layer and logits, a microbatch holding
``queries_per_microbatch x C x C`` sequences with the evaluation's ``C = 2**principles_per_query``
(4 by default, where training's C is usually 2); with ``evaluation.scorer=hf`` the whole model in
fp32 (``4 N`` bytes) on one GPU.

A phase fits when its estimate is at most its budget: the whole GPU (``gpu_memory_gb`` GiB) for
training and scoring, vLLM's share for generation. The estimate is an upper bound (every sequence at
full length, the heaviest stage's weights with the heaviest stage's activations), but it leaves out
the CUDA context, NCCL buffers and allocator fragmentation (1-3 GiB on an 80 GB GPU), so a phase
above ``TIGHT_FRACTION`` of its budget is flagged as tight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_sami.models.config import RECOMPUTE_MODES  # none | selective | full, cheapest first

GIB = 1024**3
TIGHT_FRACTION = 0.9  # above this share of its budget a phase is flagged: context, NCCL, fragmentation
OPTIMIZERS = ("adam", "rmsprop", "sgd")


@dataclass(frozen=True)
class Layout:
    """A parallel layout (sizes in ranks); ``data`` is what the world size leaves over."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    data: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        """TP x PP x CP x DP."""
        return self.tensor * self.pipeline * self.context * self.data


@dataclass(frozen=True)
class TrainingSetup:
    """What training holds per GPU besides the model: precision, optimizer, recomputation, batch."""

    params_dtype: str = "bf16"  # bf16 | fp16 | fp32
    optimizer: str = "adam"  # adam (AdamW) | rmsprop | sgd
    distributed_optimizer: bool = True
    momentum: bool = False  # RMSprop/SGD momentum buffer
    recompute: str = "none"  # none | selective | full (RECOMPUTE_MODES; the module docstring)
    seq_length: int = 1024  # tokens per sequence
    microbatch_sequences: int = 4  # sequences per microbatch (queries_per_microbatch x C x C)
    num_microbatches: int = 1  # per data-parallel rank per step
    attention_scores: bool = False  # True: an attention that materialises the s x s softmax
    grad_bytes: int = 4  # megatron-core DDP with grad_reduce_in_fp32


@dataclass(frozen=True)
class GenerationSetup:
    """A vLLM engine: tensor-parallel size, its share of the GPU, the longest sequence it serves."""

    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 1024


@dataclass(frozen=True)
class PhaseMemory:
    """One phase's estimate per GPU (bytes) and a short note of what was assumed."""

    phase: str
    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    budget: float = 0.0  # what the phase may use: the whole GPU, or vLLM's share
    note: str = ""

    @property
    def total(self) -> float:
        """Everything the phase holds per GPU (bytes)."""
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        """Whether ``total`` is within ``budget``."""
        return self.total <= self.budget

    @property
    def tight(self) -> bool:
        """Whether ``total`` is above ``TIGHT_FRACTION`` of ``budget`` (fitting or not)."""
        return self.total > TIGHT_FRACTION * self.budget


def bytes_per_parameter(params_dtype: str, optimizer: str, distributed: bool, data_parallel: int,
                        momentum: bool = False, grad_bytes: int = 4) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter; see the module table.

    Raises:
        ValueError: an unknown dtype or optimizer.
    """
    if params_dtype not in ("bf16", "fp16", "fp32") or optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown params_dtype {params_dtype!r} or optimizer {optimizer!r}")
    weight = 4 if params_dtype == "fp32" else 2
    master = 0 if params_dtype == "fp32" else 4
    moments = {"adam": 8, "rmsprop": 4 + 4 * momentum, "sgd": 4 * momentum}[optimizer]
    state = master + moments
    return float(weight), float(grad_bytes), state / data_parallel if distributed else float(state)


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, tensor: int = 1, sequence_parallel: bool = False,
                            recompute: bool = False) -> float:
    """Activation bytes of one GPT layer as published (Korthikanti et al. 2022, arXiv:2205.05198,
    Table 2): ``sbh (34 + 5as/h)``; with TP ``t``: ``sbh (10 + 24/t + 5as/(ht))``; with sequence
    parallelism ``sbh/t (34 + 5as/h)``; full recomputation ``2 sbh`` (``/ t`` with SP)."""
    sbh = s * b * h
    if recompute:
        return 2 * sbh / (tensor if sequence_parallel else 1)
    if sequence_parallel:
        return sbh / tensor * (34 + 5 * a * s / h)
    return sbh * (10 + 24 / tensor + 5 * a * s / (h * tensor))


def layer_activation_bytes(model, layout: Layout, setup: TrainingSetup) -> float:
    """Activation bytes one layer stores for one microbatch at ``setup.recompute`` (the adapted
    formula of the module docstring; ``model`` is a :class:`~megatron_sami.models.config.ModelConfig`).

    Raises:
        ValueError: an unknown recompute mode.
    """
    if setup.recompute not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {setup.recompute!r}; use one of {', '.join(RECOMPUTE_MODES)}")
    s, b, h = setup.seq_length / layout.context, setup.microbatch_sequences, model.hidden_size
    a, g, f = model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size
    sbh, t = s * b * h, layout.tensor
    if setup.recompute == "full":
        return 2 * sbh / (t if layout.sequence_parallel else 1)
    topk = model.moe_router_topk if model.is_moe else 1
    mlp_split = topk * 6 * f / h
    replicated = 4 + 2 + 2 * topk  # norm inputs, attention input, MLP input (k permuted copies)
    scores = 2 * a * s / h if setup.attention_scores and setup.recompute == "none" else 0
    split = 4 + 4 * g / a + mlp_split + scores
    if layout.sequence_parallel:
        return sbh * (replicated + split) / t
    return sbh * (replicated + split / t)


def stage_parameters(model, layout: Layout) -> tuple[float, float]:
    """(dense, expert) parameters on one GPU of the heaviest pipeline stage. With TP above the KV
    groups each rank holds one replicated KV group (megatron-core 0.19 ``attention.py``)."""
    h, t = model.hidden_size, layout.tensor
    kv_groups = max(model.num_query_groups / t, 1)
    attention = h * model.kv_channels * (2 * model.num_attention_heads / t + 2 * kv_groups)
    mlp = 3 * h * model.ffn_hidden_size
    layers = math.ceil(model.num_layers / layout.pipeline)
    if model.is_moe:
        dense_layer, expert_layer = attention + 2 * h + h * model.num_experts, \
            model.num_experts * mlp / (layout.expert * t)
    else:
        dense_layer, expert_layer = attention + mlp / t + 2 * h, 0.0
    vocab = model.padded_vocab_size() * h / t
    output = 0.0 if model.tie_word_embeddings and layout.pipeline == 1 else vocab
    first = vocab + (output + h if layout.pipeline == 1 else 0)
    last = output + h
    return layers * dense_layer + max(first, last), layers * expert_layer


def optimizer_shards(layout: Layout) -> tuple[int, int]:
    """Ranks over which the distributed optimizer shards (dense, expert) parameters' state:
    megatron-core's data-parallel group with context parallelism (DP x CP), and the
    expert-data-parallel group ``TP x CP x DP / (expert TP x EP)`` (expert TP = TP). A layout
    with DP = 1 shards nothing: the distributed optimizer then holds what the plain one does."""
    return layout.data * layout.context, max(1, layout.context * layout.data // layout.expert)


def training_memory(model, layout: Layout, setup: TrainingSetup, gpu_memory_gb: float) -> PhaseMemory:
    """The training phase's estimate on the heaviest GPU (see the module docstring)."""
    dense, expert = stage_parameters(model, layout)
    dense_shards, expert_shards = optimizer_shards(layout)
    weight, grad, state = bytes_per_parameter(setup.params_dtype, setup.optimizer, setup.distributed_optimizer,
                                              dense_shards, setup.momentum, setup.grad_bytes)
    _, _, expert_state = bytes_per_parameter(setup.params_dtype, setup.optimizer, setup.distributed_optimizer,
                                             expert_shards, setup.momentum, setup.grad_bytes)
    layers = math.ceil(model.num_layers / layout.pipeline)
    per_layer = layer_activation_bytes(model, layout, setup)
    in_flight = min(layout.pipeline, setup.num_microbatches)
    stored = layers * per_layer * in_flight
    if setup.recompute == "full":  # one layer's full activations while it is recomputed
        stored += layer_activation_bytes(model, layout, replace(setup, recompute="none"))
    tokens = setup.seq_length / layout.context * setup.microbatch_sequences
    logits = 6 * tokens * model.padded_vocab_size() / layout.tensor
    activations = stored + logits if layout.pipeline == 1 else max(stored, layers * per_layer + logits)
    sharded = setup.distributed_optimizer and setup.optimizer == "adam" and dense_shards > 1
    optimizer = ("distributed " if sharded else "") + setup.optimizer
    return PhaseMemory("train", weights=(dense + expert) * weight, gradients=(dense + expert) * grad,
                       optimizer=dense * state + expert * expert_state, activations=activations,
                       budget=gpu_memory_gb * GIB,
                       note=f"{(dense + expert) / 1e9:.2f} B params/GPU, {setup.params_dtype}, {optimizer}, "
                            f"recompute {setup.recompute}, {in_flight} microbatch(es) "
                            f"of {setup.microbatch_sequences} x {setup.seq_length} in flight")


@dataclass(frozen=True)
class ScoringSetup:
    """The MI evaluation's scoring: ``queries_per_microbatch x C x C`` sequences per microbatch with
    C = 2**principles_per_query (evaluation.principles_per_query, not training's C), of at most
    ``seq_length`` tokens; ``scorer`` megatron (sami-score at the training layout) or hf
    (transformers, the whole model in fp32 on one GPU of the driver's node)."""

    microbatch_sequences: int = 16
    seq_length: int = 1024
    scorer: str = "megatron"


def scoring_memory(model, layout: Layout, setup: TrainingSetup, gpu_memory_gb: float,
                   scoring: ScoringSetup | None = None) -> PhaseMemory:
    """MI scoring: through Megatron at the training layout (weights in the training dtype, one
    layer's activations and the logits of one microbatch of ``scoring``'s shape), or with hf: the
    fp32 weights of the whole model and one sequence's fp32 logits and log-softmax on one GPU.
    ``scoring`` None: the training microbatch's shape."""
    scoring = scoring or ScoringSetup(setup.microbatch_sequences, setup.seq_length)
    budget = gpu_memory_gb * GIB
    if scoring.scorer == "hf":
        return PhaseMemory("score", weights=4 * model.num_parameters(),
                           activations=8 * scoring.seq_length * model.padded_vocab_size(), budget=budget,
                           note="evaluation.scorer=hf: the whole model in fp32 on one GPU")
    dense, expert = stage_parameters(model, layout)
    weight = 4 if setup.params_dtype == "fp32" else 2
    shape = replace(setup, recompute="none", microbatch_sequences=scoring.microbatch_sequences,
                    seq_length=scoring.seq_length)
    tokens = shape.seq_length / layout.context * shape.microbatch_sequences
    activations = layer_activation_bytes(model, layout, shape) + 6 * tokens * model.padded_vocab_size() / layout.tensor
    return PhaseMemory("score", weights=(dense + expert) * weight, activations=activations, budget=budget,
                       note=f"forward only, training layout, microbatches of {scoring.microbatch_sequences} x "
                            f"{scoring.seq_length}")


def kv_bytes_per_token(model, tensor_parallel: int) -> float:
    """KV-cache bytes per token on one GPU of a vLLM engine (bf16; KV heads replicated when TP > g)."""
    heads = math.ceil(model.num_query_groups / tensor_parallel)
    return 2 * model.num_layers * heads * model.kv_channels * 2


def generation_memory(model, generation: GenerationSetup, gpu_memory_gb: float) -> PhaseMemory:
    """A vLLM engine's share of one GPU: bf16 weights plus the KV cache of one longest sequence
    (``budget`` is ``gpu_memory_utilization`` of the GPU; the note gives the cache's capacity)."""
    budget = generation.gpu_memory_utilization * gpu_memory_gb * GIB
    weights = 2 * model.num_parameters() / generation.tensor_parallel
    per_token = kv_bytes_per_token(model, generation.tensor_parallel)
    sequences = max(0.0, budget - weights) / (per_token * generation.max_model_len)
    return PhaseMemory("generate", weights=weights, activations=per_token * generation.max_model_len,
                       budget=budget,
                       note=f"vLLM TP {generation.tensor_parallel} at gpu_memory_utilization "
                            f"{generation.gpu_memory_utilization}: KV cache for {sequences:.0f} sequences of "
                            f"{generation.max_model_len} tokens")


def estimate(model, layout: Layout, setup: TrainingSetup, generation: GenerationSetup | None,
             gpu_memory_gb: float, scoring: ScoringSetup | None = None) -> list[PhaseMemory]:
    """Every phase's estimate: training, MI scoring when ``scoring`` is given (the evaluation's
    shape), and generation when it runs on vLLM."""
    phases = [training_memory(model, layout, setup, gpu_memory_gb)]
    if scoring is not None:
        phases.append(scoring_memory(model, layout, setup, gpu_memory_gb, scoring))
    if generation is not None:
        phases.append(generation_memory(model, generation, gpu_memory_gb))
    return phases


def layout_ok(model, layout: Layout) -> bool:
    """Whether megatron-core can build ``model`` at ``layout`` (the rules of
    :meth:`megatron_sami.runtime.layout.ParallelConfig.validate` that a fix can break)."""
    t, g = layout.tensor, model.num_query_groups
    return (model.num_attention_heads % t == 0 and (g % t == 0 or t % g == 0)
            and model.padded_vocab_size() % t == 0 and model.num_layers % layout.pipeline == 0
            and layout.data >= 1 and (not model.is_moe or model.num_experts % layout.expert == 0)
            and (not model.is_moe or t == 1 or layout.sequence_parallel)
            and (layout.context * layout.data) % layout.expert == 0)


def cheapest_recompute(model, layout: Layout, setup: TrainingSetup, gpu_memory_gb: float) -> str | None:
    """The cheapest recompute mode (:data:`RECOMPUTE_MODES`) at which training fits, or None."""
    return next((mode for mode in RECOMPUTE_MODES
                 if training_memory(model, layout, replace(setup, recompute=mode), gpu_memory_gb).fits), None)


def training_fixes(model, layout: Layout, setup: TrainingSetup, gpu_memory_gb: float,
                   prefix: str = "train.") -> list[str]:
    """Single changes after which training fits, cheapest first, each as the exact overrides to
    type (``prefix`` ``train.`` for sami-iterate, empty for sami-train): a more memory-saving
    recompute mode, the distributed optimizer, then TP or PP taken from DP at the same world size
    (each rank then runs more microbatches), then, where that is not enough (always at DP = 1),
    PP or TP multiplied with as many times the GPUs (``... on N GPUs``: more nodes), with more
    recomputation if that alone is not enough. A change that does not lower the estimate is not
    listed."""
    candidates: list[tuple[str, Layout, TrainingSetup]] = []
    for mode in RECOMPUTE_MODES[RECOMPUTE_MODES.index(setup.recompute) + 1:]:
        candidates.append((f"{prefix}recompute_activations={mode}", layout, replace(setup, recompute=mode)))
    if setup.optimizer == "adam" and not setup.distributed_optimizer:
        candidates.append((f"{prefix}optimizer.use_distributed_optimizer=true", layout,
                           replace(setup, distributed_optimizer=True)))
    if setup.optimizer == "rmsprop":
        candidates.append((f"{prefix}optimizer.name=adam {prefix}optimizer.use_distributed_optimizer=true", layout,
                           replace(setup, optimizer="adam", distributed_optimizer=True, momentum=False)))
    for factor in (2, 4, 8):
        if layout.data % factor == 0:
            more = replace(setup, num_microbatches=setup.num_microbatches * factor)
            candidates += [(f"{prefix}parallel.tensor={layout.tensor * factor}",
                            replace(layout, tensor=layout.tensor * factor, data=layout.data // factor), more),
                           (f"{prefix}parallel.pipeline={layout.pipeline * factor}",
                            replace(layout, pipeline=layout.pipeline * factor, data=layout.data // factor), more)]
    current = training_memory(model, layout, setup, gpu_memory_gb).total
    fits = [name for name, changed, changed_setup in candidates if layout_ok(model, changed)
            and _helps(training_memory(model, changed, changed_setup, gpu_memory_gb), current)]
    if fits:
        return fits
    modes = RECOMPUTE_MODES[RECOMPUTE_MODES.index(setup.recompute):]
    for factor, mode in ((factor, mode) for factor in (2, 4, 8) for mode in modes):
        world, recompute = layout.world_size * factor, replace(setup, recompute=mode)
        also = "" if mode == setup.recompute else f"{prefix}recompute_activations={mode} "
        grown = [(f"{also}{prefix}parallel.pipeline={layout.pipeline * factor} on {world} GPUs",
                  replace(layout, pipeline=layout.pipeline * factor)),
                 (f"{also}{prefix}parallel.tensor={layout.tensor * factor} on {world} GPUs",
                  replace(layout, tensor=layout.tensor * factor))]
        fits += [name for name, changed in grown if layout_ok(model, changed)
                 and _helps(training_memory(model, changed, recompute, gpu_memory_gb), current)]
        if fits:
            return fits
    return []


def _helps(changed: PhaseMemory, current_total: float) -> bool:
    """A change is a fix when training then fits and needs less than now (``selective`` stores as
    much as ``none`` with a fused attention: no fix)."""
    return changed.fits and changed.total < current_total
