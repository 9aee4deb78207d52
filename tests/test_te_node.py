"""The Transformer Engine node (issue 15's second acceptance part): convert on the CPU, then train
with the TE spec and FP8 at TP=2, PP=2 and EP=2 over NCCL, and export the trained checkpoint on
the CPU (the local lane, no GPU) to an HF model that transformers loads and runs.

Needs two CUDA GPUs and a Transformer Engine that megatron-core can import (an NGC PyTorch
container); skipped visibly elsewhere. ``scripts/gpu_check.sh --te-node`` runs it and prints one
PASS/FAIL/SKIP line per check. Never run on this project's CPU machines or its one-GPU lane.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu(2)

ROOT = Path(__file__).resolve().parents[1]
SEQ_LENGTH = 256  # the tiny models' positions
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module", autouse=True)
def transformer_engine():
    from megatron_sami.models.build import transformer_engine_problem

    problem = transformer_engine_problem()
    if problem is not None:
        pytest.skip(f"needs Transformer Engine: {problem}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """model name -> root with ``hf``, ``ckpt-cpu`` (converted by a process that sees no GPU: the
    local lane, as on a login node) and ``records.jsonl``."""
    import conversion_jobs
    import sami_jobs

    from megatron_sami.alignment.data import SamiRecord
    from megatron_sami.testing.tiny import make_tiny_tokenizer

    roots = {}
    for variant, model_name in (("llama", "tiny-llama"), ("mixtral", "tiny-mixtral")):
        root = tmp_path_factory.mktemp(model_name)
        hf_dir = root / "hf"
        tokenizer = make_tiny_tokenizer(hf_dir)
        conversion_jobs.make_hf_model(variant, hf_dir, seed=5, vocab_size=len(tokenizer))
        converted = subprocess.run([sys.executable, "-m", "megatron_sami.cli.convert", "hf-to-megatron", str(hf_dir),
                                    str(root / "ckpt-cpu")], capture_output=True, text=True, timeout=600,
                                   env=os.environ | CPU_ONLY, cwd=ROOT)
        assert converted.returncode == 0, converted.stderr[-3000:]
        records = [SamiRecord(f"q{i}", sami_jobs.QUERIES[i % 8], sami_jobs.CONSTITUTIONS[:2],
                              [f"Yes, gladly: step {i} is to help.", f"No. I refuse to do {i}."]) for i in range(8)]
        sami_jobs.write_records(root / "records.jsonl", records)
        roots[model_name] = root
    return roots


def checkpoint_keys(checkpoint: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(checkpoint / "weights")).read_metadata().state_dict_metadata)


@pytest.mark.parametrize(("model_name", "layout"), [
    ("tiny-llama", ("parallel.tensor=2",)),
    ("tiny-llama", ("parallel.pipeline=2",)),
    ("tiny-mixtral", ("parallel.expert=2",)),
    ("tiny-mixtral", ("parallel.tensor=2", "parallel.sequence_parallel=true")),
], ids=["tp2", "pp2", "ep2", "moe-tp2-sp"])
def test_fp8_training_with_the_te_spec_over_nccl_exports_on_the_cpu(inputs, tmp_path, model_name, layout):
    root = inputs[model_name]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "megatron_sami.cli.train", f"checkpoint={root / 'ckpt-cpu'}", f"data.records={root / 'records.jsonl'}",
               f"run_dir={run_dir}", "steps=3", "queries_per_step=4", "precision.params_dtype=bf16",
               "precision.fp8=hybrid", f"data.seq_length={SEQ_LENGTH}", *layout]
    trained = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(math.isfinite(row["loss"]) for row in rows), rows
    assert all(row["tflops_per_gpu"] > 0 for row in rows)
    final = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    # The TE spec wrote it: its modules' _extra_state (FP8 scaling state) sits beside the weights.
    assert any("_extra_state" in key for key in checkpoint_keys(final))  # "<key>/shard_<offsets>_<grid>"

    exported = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "megatron_sami.cli.convert", "megatron-to-hf", str(final),
                             str(exported)], capture_output=True, text=True, timeout=600, env=os.environ | CPU_ONLY,
                            cwd=ROOT)
    assert export.returncode == 0, export.stderr[-3000:]
    check = ("import sys, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
             "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); "
             "x = t('Why is the sky blue?', return_tensors='pt'); "
             "assert torch.isfinite(m(**x).logits).all()")
    loaded = subprocess.run([sys.executable, "-c", check, str(exported)], capture_output=True, text=True,
                            timeout=600, env=os.environ | CPU_ONLY)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
