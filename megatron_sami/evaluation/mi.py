"""Mutual-information evaluation of a model on held-out queries (``sami-eval mi``, ``sami-iterate``).

Source: Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information: Learning to
Follow Principles without Preference Labels", arXiv:2404.14313 (the paper below).

For each evaluation query the model writes one greedy response under every sign pattern of the
query's principles (two principles: both positive, the two mixed, both negative; C = 4, as in
the paper), then scores every response under every constitution: S[k, j] = log p(response j | constitution
k, query). Two estimators, per query, then their mean and standard error over queries, in nats:

- ``info_nce_bound``: log C - InfoNCE loss, from length-normalised (mean) log-probs, capped at
  log C: the lower bound on I(Y; C | x) that the training objective raises
  (:func:`megatron_sami.alignment.objective.sami_loss`);
- ``paper_mi``: the uncapped estimator behind the MI values the paper reports, from SUMMED
  log-probs: (1/C) sum_j [S[j, j] - (1/C) sum_k S[k, j]]
  (:func:`megatron_sami.alignment.objective.paper_mi_estimate`).

The matrices come from either of two scorers, tokenising exactly as training does
(:func:`megatron_sami.alignment.data.tokenize_record`), and :func:`estimates` turns them into
both estimators:

- transformers in fp32 on one device (:func:`hf_matrices`; small models, and the tests' reference);
- Megatron at the training layout across the allocation (``sami-score``,
  :mod:`megatron_sami.alignment.scoring`), launched by the caller: :func:`launched_scorer`
  writes the records, runs the launch it is given and reads the matrices back
  (:func:`read_matrices`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sami.alignment.data import PromptTemplate, SamiRecord, parse_record, tokenize_record
from megatron_sami.alignment.objective import SamiLossConfig, paper_mi_estimate, sami_loss, sequence_logprobs
from megatron_sami.errors import DataError, SamiError
from megatron_sami.evaluation.splits import split_label, splits_of
from megatron_sami.io import atomic_output, atomic_write_json, atomic_write_jsonl
from megatron_sami.rollout.constitutions import ConstitutionSet, SamplingConfig, max_constitutions
from megatron_sami.rollout.generation import (
    GenerationConfig,
    GenerationTask,
    make_backend,
    read_shards,
    run_task,
)
from megatron_sami.rollout.queries import Query

MAX_SCORED_LENGTH = 8192  # tokens of one scored (prompt, response) sequence

Matrices = dict[str, torch.Tensor]  # {"sum": S_CC, "mean": S_CC}, fp32, nats
# scorer(split label, records) -> each record's matrices, in the records' order
Scorer = Callable[[str, list[SamiRecord]], list[Matrices]]


@dataclass(frozen=True)
class Estimate:
    """A mean over queries, its standard error (nan for one query) and the number of queries."""

    mean: float
    se: float
    n: int

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return {"mean": self.mean, "se": self.se, "n": self.n}


def mean_and_se(values: list[float]) -> Estimate:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, float("nan"), n)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def token_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """log p(label_t | tokens_<=t) at every position, in nats.

    Args:
        model: an HF causal LM (``model(input_ids=...).logits``).
        tokens: [N, T] int64 token ids, right-padded (a causal model needs no attention mask for that).
        labels: [N, T] int64, the next token of each position.
        chunk: sequences per forward pass.

    Returns:
        [N, T] float32 log-probabilities, on CPU.
    """
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], chunk):
            logits = model(input_ids=tokens[start:start + chunk].to(device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            rows.append(logp.gather(-1, labels[start:start + chunk].to(device).unsqueeze(-1)).squeeze(-1).cpu())
    return torch.cat(rows)


def score_record(model, tokenizer, template: PromptTemplate, record: SamiRecord) -> dict[str, torch.Tensor]:
    """The C x C matrices S[k, j] = log p(response j | constitution k, query) of one record.

    Returns:
        ``{"sum": S_CC, "mean": S_CC}``: [C, C] float32, in nats, the response tokens' log-probs
        summed and averaged per token.

    Raises:
        OverlengthError: a (prompt, response) sequence is longer than ``MAX_SCORED_LENGTH`` tokens.
    """
    batch = tokenize_record(record, tokenizer, template, MAX_SCORED_LENGTH)
    length = int(batch["loss_mask"].nonzero()[:, 1].max()) + 1
    tokens, labels, mask = (batch[key][:, :length] for key in ("tokens", "labels", "loss_mask"))
    logp = token_logprobs(model, tokens, labels) * mask
    C = record.num_constitutions
    return {reduction: sequence_logprobs(logp, mask, reduction).view(C, C) for reduction in ("sum", "mean")}


def query_estimates(matrices: dict[str, torch.Tensor]) -> dict[str, float]:
    """One query's ``info_nce_bound`` and ``paper_mi`` (nats) and the row/column accuracies, from
    :func:`score_record`'s matrices."""
    mean_BCC = matrices["mean"].unsqueeze(0)
    output = sami_loss(mean_BCC, SamiLossConfig())
    return {"info_nce_bound": float(output.mi_bound_nats), "paper_mi": float(paper_mi_estimate(matrices["sum"].unsqueeze(0))[0]),
            "acc_row": float(output.acc_row), "acc_col": float(output.acc_col)}


def estimates(matrices: list[Matrices]) -> dict:
    """Both estimators (and the row/column accuracies) over queries, from each query's matrices
    (:func:`score_record`, or a row of ``sami-score``'s output via :func:`read_matrices`).

    Returns:
        ``{"info_nce_bound", "paper_mi", "acc_row", "acc_col"}``, each ``{"mean", "se", "n"}``
        (estimators in nats), and ``"num_constitutions"`` (C).

    Raises:
        ValueError: no matrices.
    """
    if not matrices:
        raise ValueError("estimates need the matrices of at least one query")
    per_query = [query_estimates(m) for m in matrices]
    return {key: mean_and_se([q[key] for q in per_query]).as_dict() for key in per_query[0]} | {
        "num_constitutions": int(matrices[0]["sum"].shape[0])}


def hf_matrices(model_dir: str | Path, records: list[SamiRecord], template: PromptTemplate) -> list[Matrices]:
    """Each record's matrices (:func:`score_record`) under the HF model in ``model_dir``, with
    transformers in float32 on one device (the GPU when there is one): the whole model in one
    process, so for small models; ``sami-score`` shards large ones.

    Raises:
        OverlengthError: as :func:`score_record`.
        DeviceBudgetError: the whole model is over ``SAMI_DEVICE_BUDGET_PARAMS``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sami.device_budget import check_hf_model
    from megatron_sami.runtime.quiet import quiet_transformers

    quiet_transformers()
    check_hf_model(model_dir, f"MI scoring with transformers (the whole model {model_dir})",
                   "score through Megatron at a sharded layout instead (sami-iterate's evaluation.scorer=megatron, "
                   "sami-score)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    return [score_record(model, tokenizer, template, record) for record in records]


def evaluate_records(model_dir: str | Path, records: list[SamiRecord], template: PromptTemplate) -> dict:
    """Both estimators over the records' queries for the HF model in ``model_dir``
    (:func:`hf_matrices`, then :func:`estimates`, which gives the returned dict).

    Raises:
        OverlengthError: as :func:`score_record`.
    """
    return estimates(hf_matrices(model_dir, records, template))


def read_matrices(path: str | Path) -> list[tuple[str, Matrices]]:
    """The (query id, matrices) of every row of ``sami-score``'s output, in order.

    Raises:
        DataError: the file is missing, or a row is not ``{"id", "sum", "mean"}`` with two C x C
            matrices (C >= 2).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"scores file {path} does not exist; run sami-score first.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                matrices = {key: torch.tensor(row[key], dtype=torch.float32) for key in ("sum", "mean")}
                query_id = str(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path}:{number}: not a row of sami-score's output ({err}); score again.") from err
            C = matrices["sum"].shape[0] if matrices["sum"].dim() == 2 else 0
            if C < 2 or any(m.shape != (C, C) for m in matrices.values()):
                raise DataError(f"{path}:{number}: sum and mean must be C x C matrices with C >= 2; score again.")
            rows.append((query_id, matrices))
    return rows


def write_scoring_records(path: str | Path, records: list[SamiRecord]) -> None:
    """The records as the JSONL ``sami-score`` reads (atomically)."""
    atomic_write_jsonl(path, [{"id": r.id, "query": r.query, "constitutions": r.constitutions,
                               "responses": r.responses, "metadata": r.metadata} for r in records])


def launched_scorer(launch: Callable[[Path, Path], None], work_dir: Callable[[str], Path]) -> Scorer:
    """A scorer that runs ``sami-score`` through the caller's launcher.

    For each split label it writes the records to ``work_dir(label)/scoring-records.jsonl``,
    calls ``launch(records_path, matrices_path)`` (which must run ``sami-score`` to write
    ``work_dir(label)/matrices.jsonl``, e.g. with
    :func:`megatron_sami.alignment.scoring.score_args`) and reads the matrices back.

    Raises (from the scorer):
        DataError: the scores do not belong to the records (other ids, or another order or count).
        Whatever ``launch`` raises.
    """

    def scorer(label: str, records: list[SamiRecord]) -> list[Matrices]:
        directory = work_dir(label)
        directory.mkdir(parents=True, exist_ok=True)
        records_path, matrices_path = directory / "scoring-records.jsonl", directory / "matrices.jsonl"
        write_scoring_records(records_path, records)
        launch(records_path, matrices_path)
        rows = read_matrices(matrices_path)
        if [query_id for query_id, _ in rows] != [r.id for r in records]:
            raise DataError(f"{matrices_path} scores {len(rows)} queries that are not the {len(records)} of "
                            f"{records_path} in order; delete it and score again.")
        return [matrices for _, matrices in rows]

    return scorer


def evaluation_sampling(cset: ConstitutionSet, split: str, principles_per_query: int) -> SamplingConfig:
    """The MI evaluation's draw for one split: P = min(principles_per_query, the split's principles)
    per query and every sign pattern of them, C = 2**P (P = 2: the paper's C = 4).

    Raises:
        ConfigError: ``cset`` has no principle of ``split``.
    """
    count = min(principles_per_query, len(cset.pool(split)))
    return SamplingConfig(num_constitutions=max_constitutions(count), principles_per_query=count, split=split)


def evaluate_model(model_dir: str | Path, queries: list[Query], cset: ConstitutionSet,
                   template: PromptTemplate, generation: GenerationConfig, principles_per_query: int,
                   shard_dir: Callable[[str], Path], seed: int, name: str,
                   backend_factory: Callable | None = None,
                   before_shard: Callable[[], None] | None = None,
                   scorer: Scorer | None = None) -> dict[str, dict]:
    """One model's MI evaluation, per principle split of ``cset`` (``learned``, ``heldout``).

    The model writes a response per query under each constitution of :func:`evaluation_sampling`
    into resumable shards; records with an empty response are left out; ``scorer`` gives the
    rest their matrices and :func:`estimates` the estimators.

    Args:
        generation: used as given (callers pass temperature 0: the paper's greedy responses).
        shard_dir: the shard directory of a split (``train`` or ``heldout``).
        seed: the per-query draw of principles (the same queries and seed give the same draw).
        name: the model in messages, e.g. ``iteration 2``.
        backend_factory: makes the generation backend, only when a shard is missing (default:
            :func:`~megatron_sami.rollout.generation.make_backend` on ``model_dir``).
        before_shard: called before each shard is generated (the driver raises there to stop).
        scorer: ``scorer(split label, records)`` -> their matrices (default: :func:`hf_matrices`
            on ``model_dir``; :func:`launched_scorer` runs ``sami-score`` instead).

    Returns:
        ``{"learned": ..., "heldout": ...}`` (the splits ``cset`` has), each as
        :func:`estimates` returns.

    Raises:
        SamiError: every response of a split was empty (raise ``max_new_tokens``).
        ConfigError: ``model_dir`` is not an HF model directory, or as :func:`evaluation_sampling`.
        EnvironmentSetupError: the generation backend cannot run here.
        OverlengthError: as :func:`score_record`.
        Whatever ``scorer`` raises.
    """
    backend_factory = backend_factory or (lambda: make_backend(model_dir, generation))
    scorer = scorer or (lambda label, records: hf_matrices(model_dir, records, template))
    results = {}
    for task in generation_tasks(cset, principles_per_query, shard_dir, seed):
        shards = run_task(backend_factory, queries, cset, template, task, generation.shard_size,
                          before_shard=before_shard)
        records = [parse_record(json.dumps(row), name) for row in read_shards(shards)
                   if all(r.strip() for r in row["responses"])]
        if not records:
            raise SamiError(f"{name}: every evaluation response was empty; raise max_new_tokens.")
        label = split_label(task.sampling.split)
        results[label] = estimates(scorer(label, records))
    return results


def generation_tasks(cset: ConstitutionSet, principles_per_query: int, shard_dir: Callable[[str], Path],
                     seed: int) -> list[GenerationTask]:
    """The responses :func:`evaluate_model` generates, one task per principle split
    (:func:`evaluation_sampling`, every sign pattern); ``sami-iterate`` runs them beforehand as
    a launched job (``megatron_sami.cli.generate``, one engine per node), and evaluate_model then
    finds every shard written.

    Raises:
        ConfigError: as :func:`evaluation_sampling`.
    """
    return [GenerationTask(str(shard_dir(split)), evaluation_sampling(cset, split, principles_per_query),
                           "evaluation", seed) for split in splits_of(cset)]


def evaluate_models(models: list[tuple[str, Path]], queries: list[Query], cset: ConstitutionSet,
                    template: PromptTemplate, generation: GenerationConfig, principles_per_query: int,
                    out_dir: Path, seed: int) -> list[dict]:
    """:func:`evaluate_model` for each ``(label, HF directory)`` in order, on the same queries.

    Writes the responses under ``out_dir/responses/{label}-{split}/``, the rows to
    ``out_dir/mi.json`` and their plot to ``out_dir/mi.png``.

    Returns:
        One row per model: ``{"label", "model", "mi": {split label: estimates}, "iteration"}``
        (``iteration``: the model's position, the plot's x axis).

    Raises:
        SamiError: as :func:`evaluate_model` (ConfigError and the rest are its subclasses).
    """
    rows = []
    for index, (label, path) in enumerate(models):
        results = evaluate_model(path, queries, cset, template, generation, principles_per_query,
                                 lambda split, label=label: out_dir / "responses" / f"{label}-{split}", seed,
                                 f"model {label}")
        rows.append({"label": label, "model": str(path), "mi": results, "iteration": index})
    atomic_write_json(out_dir / "mi.json", rows)
    plot_mi(rows, out_dir / "mi.png")
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per (iteration or model, principle split) with both estimators and their errors."""
    lines = [f"{'model':<12} {'principles':<10} {'n':>4} {'InfoNCE bound (nats)':>22} "
             f"{'paper MI (nats)':>18}"]
    for row in rows:
        for split, values in row.get("mi", {}).items():
            bound, paper = values["info_nce_bound"], values["paper_mi"]
            lines.append(f"{str(row.get('label', row.get('iteration'))):<12} {split:<10} {bound['n']:>4} "
                         f"{_plus_minus(bound):>22} {_plus_minus(paper):>18}")
    return "\n".join(lines)


def _plus_minus(estimate: dict) -> str:
    se = "nan" if math.isnan(estimate["se"]) else f"{estimate['se']:.3f}"
    return f"{estimate['mean']:.3f} +- {se}"


def plot_mi(summary_rows: list[dict], path: Path) -> None:
    """MI per iteration, both estimators, one line per principle split, standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in ((axes[0], "info_nce_bound", "InfoNCE bound (mean log-probs)"),
                             (axes[1], "paper_mi", "paper estimator (summed log-probs)")):
        for split in ("learned", "heldout"):
            points = [(row["iteration"], row["mi"][split][key]) for row in summary_rows
                      if row.get("mi") and split in row["mi"]]
            if points:
                axis.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                              yerr=[0 if math.isnan(p[1]["se"]) else p[1]["se"] for p in points],
                              marker="o", capsize=3, label=f"{split} principles")
        axis.set_xticks(sorted({row["iteration"] for row in summary_rows}))
        axis.set_xlabel("iteration (0 = base model)")
        axis.set_ylabel("nats")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_output(path) as staging:
        figure.savefig(staging, dpi=110)
    plt.close(figure)
