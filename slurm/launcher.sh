#!/usr/bin/env bash
# The one launcher behind every slurm/sami_*.sh template: SAMI expert iteration inside an allocation.
#
# The batch script runs sami-iterate (the driver) on the first node; the driver launches each
# training phase and the MI scoring with `srun` over every node, one task per GPU (the runtime reads
# SLURM_PROCID, SLURM_LOCALID and the node list; no torchrun needed), generation with `srun` over
# every node, one task (one engine) per node, and conversion and export on the first node.
# Rerunning or requeueing the same job continues where it stopped
# (state.json in the run directory). The srun options reach the driver as a list and every path
# as a quoted Hydra value, so a run directory or model path may hold spaces, quotes, commas and
# non-ASCII characters; each phase's ranks log to RUN/logs/<phase>-<job>.<attempt>-rank<N>.log.
#
# The template holds the allocation (#SBATCH lines) and the layout, and names a recipe: the
# model's training and generation settings, configs/recipe/<SAMI_RECIPE>.yaml (its header says
# how to launch it by hand).
#
# Settings (environment, the template sets defaults): SAMI_MODEL (catalogue name), SAMI_RECIPE
# (configs/recipe/ name; empty: configs/iterate.yaml alone), SAMI_BASE_HF or SAMI_BASE_CKPT,
# SAMI_RUN_DIR, SAMI_TP, SAMI_PP, SAMI_EP, SAMI_GPUS_PER_NODE (tasks per node), SAMI_PARAMS_DTYPE
# (checked, and passed to training when set), SAMI_ITERATE_ARGS (extra sami-iterate overrides, on
# top of the recipe), SAMI_GPU_MEMORY_GB (GiB per GPU for the memory check, default 80),
# SAMI_CONTAINER_IMAGE (pyxis/enroot: the checkout, run and model directories are mounted, the
# image is imported once per job), SAMI_CONTAINER_MOUNTS (more mounts), SAMI_CONTAINER_PYTHON (the
# container's interpreter, default python3), SAMI_PYTHON (the driver's), SAMI_ROOT. SAMI_DRY_RUN=1 prints the resolved layout and commands without running anything
# (SAMI_NODES sets the node count outside an allocation).
set -euo pipefail

sami_fail() {
  echo "error: $*" >&2
  exit 2
}

sami_root() {
  local root="${SAMI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
  [ -f "$root/slurm/launcher.sh" ] || sami_fail "cannot find the megatron-sami checkout from $root; submit from the checkout or set SAMI_ROOT."
  echo "$root"
}

SAMI_ROOT="$(sami_root)"
SAMI_PYTHON="${SAMI_PYTHON:-$SAMI_ROOT/.venv/bin/python}"
SAMI_NODES="${SLURM_JOB_NUM_NODES:-${SAMI_NODES:-1}}"
SAMI_GPUS_PER_NODE="${SAMI_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}"
SAMI_TP="${SAMI_TP:-1}"
SAMI_PP="${SAMI_PP:-1}"
SAMI_EP="${SAMI_EP:-1}"
SAMI_RUN_DIR="${SAMI_RUN_DIR:-$SAMI_ROOT/runs/${SAMI_MODEL:?set SAMI_MODEL}-${SLURM_JOB_NAME:-sami}}"
SAMI_WORLD_SIZE=$((SAMI_NODES * SAMI_GPUS_PER_NODE))
SAMI_RECIPE="${SAMI_RECIPE:-}"
SAMI_CONFIGS="${SAMI_CONFIG_DIR:-$SAMI_ROOT/configs}"
# The driver reads the configs this launcher checked (not a copy inside an installed wheel).
export SAMI_CONFIG_DIR="$SAMI_CONFIGS"

[ -x "$SAMI_PYTHON" ] || sami_fail "no Python at $SAMI_PYTHON; run 'bash scripts/test.sh --collect-only -q' once to create .venv, or set SAMI_PYTHON."

sami_hydra_quote() {
  # One Hydra value that reaches the program unchanged (spaces, commas, quotes, non-ASCII, ${):
  # single-quoted; Hydra unescapes only the backslashes before a quote or the closing quote.
  local value="${1//\$\{/\\\$\{}" out="" run="" char i
  for ((i = 0; i < ${#value}; i++)); do
    char="${value:i:1}"
    if [ "$char" = "\\" ]; then run+="\\"; continue; fi
    if [ "$char" = "'" ]; then out+="$run$run\\'"; else out+="$run$char"; fi
    run=""
  done
  printf "'%s'" "$out$run$run"
}

sami_hydra_list() {
  # A Hydra list of quoted values: [ 'a', 'b c' ].
  local item out=""
  for item in "$@"; do out+="${out:+,}$(sami_hydra_quote "$item")"; done
  printf '[%s]' "$out"
}

sami_iterate_extra() {
  # SAMI_ITERATE_ARGS as words (each one sami-iterate override), into SAMI_EXTRA.
  SAMI_EXTRA=()
  [ -z "${SAMI_ITERATE_ARGS:-}" ] || read -r -a SAMI_EXTRA <<< "$SAMI_ITERATE_ARGS"
  # The layout check and training must use the same dtype.
  [ -z "${SAMI_PARAMS_DTYPE:-}" ] || SAMI_EXTRA=("train.precision.params_dtype=$SAMI_PARAMS_DTYPE" "${SAMI_EXTRA[@]}")
}

sami_check_layout() {
  # Refuse a layout the model or node count cannot use, or whose phases do not fit the GPU memory
  # (SAMI_GPU_MEMORY_GB, the recipe's settings), before any GPU time is spent.
  local check=("$SAMI_PYTHON" -m megatron_sami.cli.check_config "model=$SAMI_MODEL" "world_size=$SAMI_WORLD_SIZE"
    "parallel.tensor=$SAMI_TP" "parallel.pipeline=$SAMI_PP" "parallel.expert=$SAMI_EP"
    "gpu_memory_gb=${SAMI_GPU_MEMORY_GB:-80}")
  # Unset: the recipe's dtype, which is what the run trains in.
  [ -z "${SAMI_PARAMS_DTYPE:-}" ] || check+=("precision.params_dtype=$SAMI_PARAMS_DTYPE")
  if [ "${1:-iterate}" = iterate ]; then
    sami_iterate_extra
    [ -z "$SAMI_RECIPE" ] || check+=("iterate.recipe=$SAMI_RECIPE")
    check+=("iterate.overrides=$(sami_hydra_list "${SAMI_EXTRA[@]}")")
  fi
  "${check[@]}"
}

sami_recipes() {
  local file names=()
  for file in "$SAMI_CONFIGS"/recipe/*.yaml; do
    [ -f "$file" ] && names+=("$(basename "$file" .yaml)")
  done
  echo "${names[*]}"
}

sami_check_inputs() {
  if [ -n "$SAMI_RECIPE" ] && [ ! -f "$SAMI_CONFIGS/recipe/$SAMI_RECIPE.yaml" ]; then
    sami_fail "no recipe $SAMI_CONFIGS/recipe/$SAMI_RECIPE.yaml; set SAMI_RECIPE to one of: $(sami_recipes)."
  fi
  if [ -n "${SAMI_BASE_CKPT:-}" ]; then
    [ -f "$SAMI_BASE_CKPT/model.yaml" ] || sami_fail "SAMI_BASE_CKPT=$SAMI_BASE_CKPT is not a converted checkpoint (no model.yaml)."
  elif [ -n "${SAMI_BASE_HF:-}" ]; then
    [ -f "$SAMI_BASE_HF/config.json" ] || sami_fail "SAMI_BASE_HF=$SAMI_BASE_HF is not an HF model directory (no config.json)."
  else
    sami_fail "set SAMI_BASE_HF (an HF model directory) or SAMI_BASE_CKPT (a converted checkpoint)."
  fi
  if [ -n "${SAMI_QUERIES_PATH:-}" ] && [ ! -e "$SAMI_QUERIES_PATH" ]; then
    sami_fail "SAMI_QUERIES_PATH=$SAMI_QUERIES_PATH does not exist."
  fi
  if [ -n "${SAMI_CONTAINER_IMAGE:-}" ]; then
    case "$SAMI_CONTAINER_IMAGE" in
      /*|./*) [ -f "$SAMI_CONTAINER_IMAGE" ] || sami_fail "container image $SAMI_CONTAINER_IMAGE does not exist." ;;
    esac
    srun --help 2>/dev/null | grep -q -- "--container-image" || [ "${SAMI_DRY_RUN:-0}" = 1 ] ||
      sami_fail "SAMI_CONTAINER_IMAGE is set but this srun has no --container-image (pyxis is not installed)."
    local path
    for path in "${SAMI_CONTAINER_PATHS[@]}"; do
      case "$path" in
        *,*|*:*) sami_fail "the container mount $path holds a ',' or ':', which --container-mounts cannot take; use a path without them." ;;
      esac
    done
  fi
}

sami_environment() {
  local nodes
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
    MASTER_ADDR="$(echo "$nodes" | head -n1)"
  else
    MASTER_ADDR="$(hostname)"
  fi
  MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  export MASTER_ADDR MASTER_PORT
  # Hopper/NCCL practice: one CUDA stream for TP overlap ordering, async error handling so a
  # failed rank ends the job instead of hanging it, and NVLS/IB left to NCCL's own detection.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export PYTHONUNBUFFERED=1
  # Inside a container the checkout is mounted at the same path; its package comes first.
  [ -z "${SAMI_CONTAINER_IMAGE:-}" ] || export PYTHONPATH="$SAMI_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

sami_container_paths() {
  # The directories a container must see: the checkout, the run directory and the model inputs.
  # (Mounted at the same path, so the driver's paths hold inside; symbolic links are kept.)
  SAMI_CONTAINER_PATHS=("$(realpath -ms "$SAMI_ROOT")" "$(realpath -ms "$SAMI_RUN_DIR")")
  local path
  for path in "${SAMI_BASE_HF:-}" "${SAMI_BASE_CKPT:-}"; do
    [ -z "$path" ] || SAMI_CONTAINER_PATHS+=("$(realpath -ms "$path")")
  done
  for path in "${SAMI_BENCH_RECORDS:-}" "${SAMI_QUERIES_PATH:-}"; do
    [ -z "$path" ] || SAMI_CONTAINER_PATHS+=("$(dirname "$(realpath -ms "$path")")")
  done
}

sami_srun_args() {
  # The srun options of every launched phase, as an array (SAMI_SRUN): one element per argument,
  # so no path is split again. --cpus-per-task and the memory option are passed on because srun
  # does not inherit them from sbatch (Slurm 22.05+ for --cpus-per-task; DefMemPerCPU otherwise).
  SAMI_SRUN=(srun "--nodes=$SAMI_NODES" "--ntasks-per-node=$SAMI_GPUS_PER_NODE" --kill-on-bad-exit=1)
  [ -z "${SLURM_CPUS_PER_TASK:-}" ] || SAMI_SRUN+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
  if [ -n "${SLURM_MEM_PER_CPU:-}" ]; then
    SAMI_SRUN+=("--mem-per-cpu=$SLURM_MEM_PER_CPU")
  elif [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
    SAMI_SRUN+=("--mem=$SLURM_MEM_PER_NODE")
  fi
  if [ -n "${SAMI_CONTAINER_IMAGE:-}" ]; then
    # --container-name: the image is imported by the first step of the job and reused by the
    # others (pyxis keeps named containers until the job ends).
    local mounts="" path
    for path in "${SAMI_CONTAINER_PATHS[@]}"; do mounts+="${mounts:+,}$path:$path"; done
    mounts+="${SAMI_CONTAINER_MOUNTS:+,$SAMI_CONTAINER_MOUNTS}"
    SAMI_SRUN+=("--container-image=$SAMI_CONTAINER_IMAGE" "--container-name=sami-${SAMI_MODEL}"
      "--container-mounts=$mounts" "--container-workdir=$SAMI_ROOT")
  fi
}

sami_task_python() {
  # The interpreter of the launched ranks: the container's (SAMI_CONTAINER_PYTHON) or SAMI_PYTHON.
  if [ -n "${SAMI_CONTAINER_IMAGE:-}" ]; then echo "${SAMI_CONTAINER_PYTHON:-python3}"; else echo "$SAMI_PYTHON"; fi
}

sami_iterate_command() {
  local base
  if [ -n "${SAMI_BASE_CKPT:-}" ]; then base="base.checkpoint=$(sami_hydra_quote "$SAMI_BASE_CKPT")"
  else base="base.hf=$(sami_hydra_quote "$SAMI_BASE_HF")"; fi
  SAMI_COMMAND=("$SAMI_PYTHON" -m megatron_sami.cli.iterate)
  [ -z "$SAMI_RECIPE" ] || SAMI_COMMAND+=(--config-name "recipe/$SAMI_RECIPE")
  # Each training phase logs to RUN/logs/<phase>-<job>.<attempt>-rank<N>.log (appended; see
  # LauncherConfig), so neither a later phase nor a requeue truncates a first attempt's logs.
  SAMI_COMMAND+=("run_dir=$(sami_hydra_quote "$SAMI_RUN_DIR")" "$base"
    "launcher.prefix=$(sami_hydra_list "${SAMI_SRUN[@]}")"
    "launcher.log_dir=$(sami_hydra_quote "$SAMI_RUN_DIR/logs")"
    "train.parallel.tensor=$SAMI_TP" "train.parallel.pipeline=$SAMI_PP" "train.parallel.expert=$SAMI_EP")
  [ -z "${SAMI_CONTAINER_IMAGE:-}" ] || SAMI_COMMAND+=("launcher.python=$(sami_hydra_quote "$(sami_task_python)")")
  sami_iterate_extra
  SAMI_COMMAND+=("${SAMI_EXTRA[@]}")
}

sami_bench_main() {
  # The SAMI training benchmark of the scaling study: sami-train for a fixed number of steps on a
  # fixed records file (SAMI_BENCH_RECORDS) from a converted checkpoint (SAMI_BASE_CKPT).
  [ -f "${SAMI_BASE_CKPT:-}/model.yaml" ] || sami_fail "set SAMI_BASE_CKPT to a converted checkpoint (sami-convert hf-to-megatron)."
  [ -f "${SAMI_BENCH_RECORDS:-}" ] || sami_fail "set SAMI_BENCH_RECORDS to a records JSONL file."
  sami_container_paths
  sami_check_layout bench
  sami_environment
  sami_srun_args
  local extra=() log="${SAMI_RUN_DIR//%/%%}/logs/bench-%j.${SLURM_RESTART_COUNT:-0}-rank%t.log"
  [ -z "${SAMI_TRAIN_ARGS:-}" ] || read -r -a extra <<< "$SAMI_TRAIN_ARGS"
  SAMI_COMMAND=("${SAMI_SRUN[@]}" "--output=$log" --open-mode=append "$(sami_task_python)" -m megatron_sami.cli.train
    "checkpoint=$(sami_hydra_quote "$SAMI_BASE_CKPT")" "data.records=$(sami_hydra_quote "$SAMI_BENCH_RECORDS")"
    "run_dir=$(sami_hydra_quote "$SAMI_RUN_DIR")" "parallel.tensor=$SAMI_TP"
    "parallel.pipeline=$SAMI_PP" "parallel.expert=$SAMI_EP" "${extra[@]}")
  if [ "${SAMI_DRY_RUN:-0}" = 1 ]; then
    printf 'benchmark:'; printf ' %q' "${SAMI_COMMAND[@]}"; echo
    return 0
  fi
  mkdir -p "$SAMI_RUN_DIR/logs"
  "${SAMI_COMMAND[@]}"
}

sami_main() {
  sami_container_paths
  sami_check_inputs
  sami_check_layout
  sami_environment
  sami_srun_args
  sami_iterate_command
  if [ "${SAMI_DRY_RUN:-0}" = 1 ]; then
    echo "nodes: $SAMI_NODES x $SAMI_GPUS_PER_NODE tasks = world size $SAMI_WORLD_SIZE (TP $SAMI_TP, PP $SAMI_PP, EP $SAMI_EP)"
    if [ -n "$SAMI_RECIPE" ]; then echo "recipe: $SAMI_RECIPE ($SAMI_CONFIGS/recipe/$SAMI_RECIPE.yaml)"; else echo "recipe: none ($SAMI_CONFIGS/iterate.yaml)"; fi
    echo "master: $MASTER_ADDR:$MASTER_PORT"
    printf 'train launch:'; printf ' %q' "${SAMI_SRUN[@]}" "$(sami_task_python)"; echo " -m megatron_sami.cli.train ..."
    printf 'driver:'; printf ' %q' "${SAMI_COMMAND[@]}"; echo
    return 0
  fi
  mkdir -p "$SAMI_RUN_DIR/logs"
  echo "[slurm] job ${SLURM_JOB_ID:-?} on $SAMI_NODES node(s) (restart ${SLURM_RESTART_COUNT:-0}): run directory $SAMI_RUN_DIR"
  # The driver runs in the background so this shell can take Slurm's signals. USR1 comes from
  # --signal=B:USR1@T before the time limit: training checkpoints, the driver exits with 75 and
  # the job requeues itself, so the next start resumes. TERM comes from scancel or preemption:
  # training checkpoints and the job ends without requeueing itself (a cancelled job stays
  # cancelled; Slurm requeues preempted --requeue jobs on its own).
  "${SAMI_COMMAND[@]}" &
  SAMI_DRIVER_PID=$!
  SAMI_SIGNAL=""
  trap 'SAMI_SIGNAL=USR1; kill -USR1 "$SAMI_DRIVER_PID" 2>/dev/null || true' USR1
  trap 'SAMI_SIGNAL=TERM; kill -TERM "$SAMI_DRIVER_PID" 2>/dev/null || true' TERM
  local status=0
  while true; do
    wait "$SAMI_DRIVER_PID" && status=0 || status=$?
    # wait returns >128 when a trapped signal interrupts it; the driver is still running then.
    kill -0 "$SAMI_DRIVER_PID" 2>/dev/null || break
  done
  if [ "$status" = 75 ] && [ "$SAMI_SIGNAL" = USR1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[slurm] stopped before the time limit with its progress saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  [ "$status" != 75 ] || echo "[slurm] stopped by SIG$SAMI_SIGNAL with its progress saved; submit the same job again to resume"
  return "$status"
}
