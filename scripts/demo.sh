#!/usr/bin/env bash
# The project's main job on its embedded default (no cluster, no downloads, CPU is enough).
# Creates the environment first if needed. See README.md for what it runs today.
#   bash scripts/demo.sh [RUN_DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$SAMI_ROOT"
run_dir="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
if [ -e "$run_dir" ]; then
  echo "error: $run_dir already exists; pass a new run directory." >&2
  exit 2
fi
echo "[demo] run directory: $run_dir"
echo "[demo] 1/6 train a tiny Llama GPTModel at tensor parallel size 2 (2 local processes, gloo)"
torchrun --standalone --nproc-per-node 2 -m megatron_sami.demo train --run-dir "$run_dir"
echo "[demo] 2/6 reload the checkpoint at tensor parallel size 1 and compare"
python -m megatron_sami.demo verify --run-dir "$run_dir"
echo "[demo] 3/6 write a tiny random HF Llama, its tokenizer and the embedded SAMI records"
python -m megatron_sami.demo sami-setup --run-dir "$run_dir"
echo "[demo] 4/6 sami-convert hf-to-megatron"
sami-convert hf-to-megatron "$run_dir/hf" "$run_dir/megatron"
echo "[demo] 5/6 sami-train: SAMI at tensor parallel size 2"
torchrun --standalone --nproc-per-node 2 -m megatron_sami.cli.train checkpoint="$run_dir/megatron" \
  data.records="$run_dir/records.jsonl" run_dir="$run_dir/sami-run" steps=12 queries_per_step=4 \
  data.seq_length=256 parallel.tensor=2 precision.params_dtype=fp32 optimizer.lr=2e-3
echo "[demo] 6/6 export the trained checkpoint to HF and report"
sami-convert megatron-to-hf "$run_dir/sami-run/checkpoints/$(cat "$run_dir/sami-run/checkpoints/latest")" \
  "$run_dir/hf-export"
python -m megatron_sami.demo sami-report --run-dir "$run_dir"
