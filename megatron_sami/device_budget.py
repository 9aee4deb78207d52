"""The per-process device budget: the most model parameters one process may materialise.

A rehearsal of a large job on a small machine. ``SAMI_DEVICE_BUDGET_PARAMS=N`` stands for one
GPU's memory, counted in parameters; it is an environment variable so that it reaches every
process a launcher starts (srun and torchrun pass the environment on), and it describes the
machine, not the run, so it is not part of a run's config. Every place that materialises model
weights checks it before it allocates and refuses with
:class:`~megatron_sami.errors.DeviceBudgetError` when its share is larger:

- a Megatron model build (``sami-train``, ``sami-score``, a checkpoint loaded for conversion or
  export): this rank's parameters after the TP / PP / EP split
  (:func:`megatron_sami.models.build.process_parameters`), checked before the build and again on
  the built model;
- a transformers ``from_pretrained`` of a whole model: MI scoring with ``evaluation.scorer=hf``
  and ``sami-convert verify``;
- a streaming export: the largest tensor it holds at once.

Not checked, on purpose:

- a build on the meta device (structure only, nothing allocated; the HF -> Megatron converter
  builds one);
- the ``hf`` generation backend. At scale generation runs on vLLM, which shards the model over
  ``generation.tensor_parallel`` GPUs and refuses on its own a model that its share of GPU memory
  cannot hold; on CPU the ``hf`` backend stands in for that engine and loads the whole model in
  one process. A rehearsal with a budget below the model therefore shows that training, MI
  scoring and export are sharded, not that generation is.

Unset or empty: no budget (the default).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from megatron_sami.errors import ConfigError, DeviceBudgetError

BUDGET_ENV = "SAMI_DEVICE_BUDGET_PARAMS"


def device_budget() -> int | None:
    """The budget in parameters per process (``SAMI_DEVICE_BUDGET_PARAMS``: an integer, ``1e9``
    or ``1_000_000``), or None when unset or empty.

    Raises:
        ConfigError: the value is not a positive number.
    """
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"{BUDGET_ENV}={text!r} is not a parameter count; set it to a positive number such as "
                          f"150000 or 3.5e10, or unset it for no budget.")
    return int(value)


def check_device_budget(num_params: int, what: str, fix: str) -> None:
    """Refuse to materialise ``num_params`` parameters in this process when they exceed the budget.

    Args:
        num_params: what this process would hold (parameters, not bytes).
        what: the holder, for the message ("this rank's part of tiny-llama at TP=1, PP=1, EP=1").
        fix: the change that fits, as the end of a sentence ("set parallel.tensor=2").

    Raises:
        DeviceBudgetError: ``num_params`` is above the budget.
        ConfigError: the budget's value is not a positive number.
    """
    budget = device_budget()
    if budget is not None and num_params > budget:
        raise DeviceBudgetError(f"{what} would hold {num_params:,} parameters in one process, more than the device "
                                f"budget of {budget:,} ({BUDGET_ENV}); {fix}.")


def check_hf_model(model_dir: str | Path, what: str, fix: str) -> None:
    """Refuse a transformers ``from_pretrained(model_dir)`` (the whole model in this process) over
    the budget, before loading: the parameters are counted on a model built from ``config.json``
    on the meta device (structure only, tied weights once, as the load materialises them).

    Raises:
        DeviceBudgetError: the model has more parameters than the budget.
        ConfigError: the budget's value is not a positive number.
    """
    if device_budget() is None:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    check_device_budget(sum(param.numel() for param in model.parameters()), what, fix)
