"""Peak memory of the streaming export at two model sizes, side by side.

    .venv/bin/python benchmarks/export_memory.py [--gb 4] [--small-gb 0.5] [--workdir /tmp/sami-export-bench]

Writes two synthetic bf16 Llama checkpoints (the same layer and vocabulary sizes, so the same
largest tensor; ``--gb`` and ``--small-gb`` of weights), converts each with ``sami-convert
hf-to-megatron`` and then measures ``sami-convert megatron-to-hf`` of each (one process, no
process group): wall seconds, export rate, and the process's peak resident memory. Prints the
big model's peak over the small one's (the ratio, and the difference in units of the largest
tensor). Issue 14's target: the peak does not grow with model size (difference well under one
largest tensor; the in-model export it replaced held the whole model, so its ratio was about
the ratio of the model sizes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from conversion_throughput import timed, write_synthetic_llama


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--small-gb", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sami-export-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    sami_convert = str(Path(sys.executable).parent / "sami-convert")
    results = {}
    for label, gb in (("small", args.small_gb), ("big", args.gb)):
        hf_dir, ckpt, out = (args.workdir / f"{part}-{label}" for part in ("hf", "megatron", "export"))
        total, largest = write_synthetic_llama(hf_dir, gb)
        start = time.perf_counter()
        timed([sami_convert, "hf-to-megatron", str(hf_dir), str(ckpt)])
        shutil.rmtree(hf_dir)
        print(f"{label}: synthetic Llama of {total / 1e9:.2f} GB, largest tensor {largest / 1e9:.3f} GB "
              f"(written and converted in {time.perf_counter() - start:.0f} s)")
        seconds, peak_gb = timed([sami_convert, "megatron-to-hf", str(ckpt), str(out)])
        results[label] = (total, largest, seconds, peak_gb)
        shutil.rmtree(ckpt)
        shutil.rmtree(out)
    print(f"{'export':<8} {'model GB':>9} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>12} {'RSS/largest':>12} "
          f"{'RSS/model':>10}")
    for label, (total, largest, seconds, peak_gb) in results.items():
        print(f"{label:<8} {total / 1e9:9.2f} {seconds:8.1f} {total / 1e9 / seconds:6.2f} {peak_gb:12.2f} "
              f"{peak_gb * 1e9 / largest:12.1f} {peak_gb * 1e9 / total:10.2f}")
    (small_total, _, _, small_peak), (big_total, largest, _, big_peak) = results["small"], results["big"]
    print(f"peak RSS, big over small model: {big_peak / small_peak:.2f} x for {big_total / small_total:.1f} x the "
          f"weights; growth {big_peak - small_peak:+.2f} GB = {(big_peak - small_peak) * 1e9 / largest:+.2f} x the "
          "largest tensor (target: about 1.0 x and well under one largest tensor: independent of model size)")
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
