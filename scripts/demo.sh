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
echo "[demo] 1/2 train a tiny Llama GPTModel at tensor parallel size 2 (2 local processes, gloo)"
torchrun --standalone --nproc-per-node 2 -m megatron_sami.demo train --run-dir "$run_dir"
echo "[demo] 2/2 reload the checkpoint at tensor parallel size 1 and compare"
python -m megatron_sami.demo verify --run-dir "$run_dir"
