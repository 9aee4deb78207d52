"""Mutual-information evaluation of a model on held-out queries (``sami-eval mi``).

For each evaluation query the model writes one greedy response under every sign pattern of the
query's principles (two principles: both positive, the two mixed, both negative; C = 4), then
scores every response under every constitution with transformers. Two estimators, per query,
then their mean and standard error over queries:

- ``info_nce_bound``: log C - InfoNCE loss, from length-normalised (mean) log-probs, capped at
  log C: the lower bound the training objective raises;
- ``paper_mi``: the paper's uncapped estimator from SUMMED log-probs,
  (1/C) sum_j [S[j, j] - (1/C) sum_k S[k, j]].

Scoring tokenises exactly as training does (:func:`megatron_sami.alignment.data.tokenize_record`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sami.alignment.data import PromptTemplate, SamiRecord, tokenize_record
from megatron_sami.alignment.objective import SamiLossConfig, paper_mi_estimate, sami_loss, sequence_logprobs

MAX_SCORED_LENGTH = 8192


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "se": self.se, "n": self.n}


def mean_and_se(values: list[float]) -> Estimate:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, float("nan"), n)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def token_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """log p(label_t | tokens_<=t) for every position; right padding needs no attention mask (causal)."""
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], chunk):
            logits = model(input_ids=tokens[start:start + chunk].to(device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            rows.append(logp.gather(-1, labels[start:start + chunk].to(device).unsqueeze(-1)).squeeze(-1).cpu())
    return torch.cat(rows)


def score_record(model, tokenizer, template: PromptTemplate, record: SamiRecord) -> dict[str, torch.Tensor]:
    """The C x C matrices S[k, j] = log p(response j | constitution k, query), summed and mean."""
    batch = tokenize_record(record, tokenizer, template, MAX_SCORED_LENGTH)
    length = int(batch["loss_mask"].nonzero()[:, 1].max()) + 1
    tokens, labels, mask = (batch[key][:, :length] for key in ("tokens", "labels", "loss_mask"))
    logp = token_logprobs(model, tokens, labels) * mask
    C = record.num_constitutions
    return {reduction: sequence_logprobs(logp, mask, reduction).view(C, C) for reduction in ("sum", "mean")}


def query_estimates(matrices: dict[str, torch.Tensor]) -> dict[str, float]:
    mean_BCC = matrices["mean"].unsqueeze(0)
    output = sami_loss(mean_BCC, SamiLossConfig())
    return {"info_nce_bound": float(output.mi_bound_nats), "paper_mi": float(paper_mi_estimate(matrices["sum"].unsqueeze(0))[0]),
            "acc_row": float(output.acc_row), "acc_col": float(output.acc_col)}


def evaluate_records(model_dir: str | Path, records: list[SamiRecord], template: PromptTemplate) -> dict:
    """Both estimators (mean, standard error) over the records' queries for the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sami.runtime.quiet import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    per_query = [query_estimates(score_record(model, tokenizer, template, record)) for record in records]
    return {key: mean_and_se([q[key] for q in per_query]).as_dict() for key in per_query[0]} | {
        "num_constitutions": records[0].num_constitutions}


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
    staging = path.with_name(path.stem + ".incomplete.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    staging.replace(path)
