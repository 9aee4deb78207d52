"""Inputs of the tiny expert-iteration runs shared by the sami-iterate and Slurm tests."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_sami.models.catalogue import config_dir
from megatron_sami.rollout.constitutions import load_constitution_set
from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer

RECIPE = "tiny-llama"  # what slurm/sami_tiny.sh names; test_iterate.py runs it with --config-name
QUERIES = [f"How do I fix problem number {i} at home?" for i in range(24)]


def make_inputs(root: Path) -> Path:
    """A tiny random HF Llama (tokenizer trained on the prompts' own words) and a queries file."""
    template = (config_dir() / "template" / "dialogue.yaml").read_text()
    principles = [text for p in load_constitution_set("dialogue").principles for text in (p.definition, p.antithesis)]
    tokenizer = make_tiny_tokenizer(root / "hf", vocab_size=600, corpus=(QUERIES + [template] + principles) * 8)
    make_tiny_hf_model("llama", root / "hf", vocab_size=len(tokenizer), max_position_embeddings=512)
    with (root / "queries.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"id": f"q{i}", "query": q}) + "\n" for i, q in enumerate(QUERIES))
    return root


def overrides(root: Path) -> list[str]:
    """The tests' own queries on top of the tiny CPU recipe (configs/recipe/tiny-llama.yaml: two short
    iterations, filters relaxed because a random model writes no sentences, checkpoints every step)."""
    return ["queries.source=jsonl", f"queries.path={root / 'queries.jsonl'}"]
