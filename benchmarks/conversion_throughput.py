"""Conversion throughput and peak memory, measured side by side with a plain copy.

    .venv/bin/python benchmarks/conversion_throughput.py [--gb 4] [--workdir /tmp/sami-bench]

Writes a synthetic bf16 Llama checkpoint of about ``--gb`` GB (sharded safetensors + index),
then measures in one run:
- ``cp`` of the same safetensors files (the reference speed for moving these bytes; fastest of
  three runs), alone and
  followed by ``sync``: the converter makes its files durable (fsync) before renaming the
  checkpoint into place, so ``cp + sync`` moves the same bytes to the same place (the disk);
  plain ``cp`` returns while its bytes are still only in the page cache;
- ``sami-convert hf-to-megatron`` in one process, and split over 2 pipeline stages (torchrun);
and prints throughput as a ratio to the copy, and each run's peak resident memory per process
as a ratio to the largest single tensor and to the whole model. A second, smaller model
(``--small-gb``, same largest tensor) measures the fixed margin (imports, model structure): the
big model's peak minus the small model's is what grows with model size.
Issue 3's targets: at least half the copy speed; peak memory under 2 x the largest tensor plus a
fixed margin, independent of model size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def write_synthetic_llama(directory: Path, target_gb: float) -> tuple[int, int]:
    """A random bf16 Llama of about ``target_gb`` GB; returns (total bytes, largest tensor bytes)."""
    head_dim = HIDDEN // HEADS
    per_layer = {
        "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
        "mlp.gate_proj.weight": (FFN, HIDDEN),
        "mlp.up_proj.weight": (FFN, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FFN),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }
    layer_bytes = 2 * sum(torch.Size(shape).numel() for shape in per_layer.values())
    embedding_bytes = 2 * 2 * VOCAB * HIDDEN
    # An even layer count, so that the 2-stage pipeline run divides it.
    num_layers = 2 * max(1, round((target_gb * 1e9 - embedding_bytes) / layer_bytes / 2))
    directory.mkdir(parents=True)
    weight_map, total, largest = {}, 0, 0
    generator = torch.Generator().manual_seed(0)

    def emit(tensors: dict[str, torch.Tensor], file_name: str) -> None:
        nonlocal total, largest
        save_file(tensors, str(directory / file_name))
        for key, tensor in tensors.items():
            weight_map[key] = file_name
            nbytes = tensor.numel() * tensor.element_size()
            total += nbytes
            largest = max(largest, nbytes)

    def random(shape) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    emit({"model.embed_tokens.weight": random((VOCAB, HIDDEN)), "lm_head.weight": random((VOCAB, HIDDEN)),
          "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}, "model-embeddings.safetensors")
    for layer in range(num_layers):
        emit({f"model.layers.{layer}.{name}": random(shape) for name, shape in per_layer.items()},
             f"model-layer{layer:03d}.safetensors")
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": num_layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    return total, largest


_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "seconds = time.perf_counter() - start\n"
    "sys.stderr.write(result.stderr[-2000:] if result.returncode else '')\n"
    "print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(result.returncode)\n"
)


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and the peak RSS (GB) of the largest single process the command started.

    Each command runs under a fresh helper process, whose RUSAGE_CHILDREN maximum covers exactly
    this command's processes (torchrun workers included).
    """
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    seconds, peak_kb = result.stdout.split()
    return float(seconds), int(peak_kb) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--small-gb", type=float, default=0.5,
                        help="a second, smaller model: its 1-process peak is the fixed margin (imports, "
                             "the model's structure), so the big model's excess over it is what grows with size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sami-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    models = {}
    for label, gb in (("big", args.gb), ("small", args.small_gb)):
        start = time.perf_counter()
        models[label] = write_synthetic_llama(args.workdir / f"hf-{label}", gb)
        total, largest = models[label]
        print(f"synthetic Llama ({label}): {total / 1e9:.2f} GB, largest tensor {largest / 1e9:.3f} GB "
              f"(written in {time.perf_counter() - start:.0f} s)")
    bin_dir = Path(sys.executable).parent

    def convert(label: str, out: Path, pipeline: int = 1) -> list[str]:
        source = str(args.workdir / f"hf-{label}")
        if pipeline == 1:
            return [str(bin_dir / "sami-convert"), "hf-to-megatron", source, str(out)]
        return [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", str(pipeline), "-m",
                "megatron_sami.cli.convert", "hf-to-megatron", source, str(out), "--pipeline", str(pipeline)]

    outputs = {name: args.workdir / name for name in ("copy", "copy-synced", "c1", "c2", "c3")}

    runs = {
        "cp": ("big", outputs["copy"], ["cp", "-r", str(args.workdir / "hf-big"), str(outputs["copy"])]),
        "cp + sync": ("big", outputs["copy-synced"],
                      ["sh", "-c", f"cp -r {args.workdir / 'hf-big'} {outputs['copy-synced']} && sync"]),
        "convert, 1 process": ("big", outputs["c1"], convert("big", outputs["c1"])),
        "convert, PP=2 (2 processes)": ("big", outputs["c2"], convert("big", outputs["c2"], pipeline=2)),
        "convert small, 1 process": ("small", outputs["c3"], convert("small", outputs["c3"])),
    }
    results = {}
    for name, (_, output, command) in runs.items():
        # The copies vary most from run to run (the page cache's write-back): each is measured
        # three times and its fastest kept, which makes the speed ratios conservative.
        measured = []
        for _ in range(3 if name.startswith("cp") else 1):
            os.sync()
            measured.append(timed(command))
            # Each output is deleted once measured, so that every run meets the same page-cache
            # pressure (kept outputs would leave the later runs writing into a fuller cache).
            shutil.rmtree(output)
        results[name] = min(measured)
    copy_seconds, synced_seconds = results["cp"][0], results["cp + sync"][0]
    print(f"{'run':<30} {'seconds':>8} {'GB/s':>7} {'vs cp':>7} {'vs cp+sync':>11} {'peak RSS GB':>12} "
          f"{'RSS/largest':>12} {'RSS/model':>10}")
    for name, (seconds, peak_gb) in results.items():
        total, largest = models[runs[name][0]]
        share = total / models["big"][0]
        print(f"{name:<30} {seconds:8.1f} {total / 1e9 / seconds:7.2f} {copy_seconds / seconds * share:7.2f} "
              f"{synced_seconds / seconds * share:11.2f} {peak_gb:12.2f} {peak_gb * 1e9 / largest:12.1f} "
              f"{peak_gb * 1e9 / total:10.2f}")
    (big_total, largest), (small_total, _) = models["big"], models["small"]
    margin = results["convert small, 1 process"][1]
    excess = results["convert, 1 process"][1] - margin
    print(f"peak RSS growth from the {small_total / 1e9:.2f} GB to the {big_total / 1e9:.2f} GB model: "
          f"{excess:+.2f} GB = {excess * 1e9 / largest:.2f} x the largest tensor "
          f"(target: under 2, independent of size; fixed margin = the small model's peak, {margin:.2f} GB)")
    # At 70B the fixed start-up (imports, process group, model structure) vanishes against the
    # bytes; the rate between the two sizes is the conversion's own speed.
    extra_seconds = results["convert, 1 process"][0] - results["convert small, 1 process"][0]
    rate = (big_total - small_total) / extra_seconds
    print(f"conversion rate between the two sizes (start-up excluded): {rate / 1e9:.2f} GB/s = "
          f"{rate * copy_seconds / big_total:.2f} x cp, {rate * synced_seconds / big_total:.2f} x cp + sync "
          f"(target: at least 0.5); start-up about {results['convert small, 1 process'][0] - small_total / rate:.1f} s")
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
