#!/usr/bin/env bash
# Acceptance check of the GPU lane on one CUDA GPU: one command, one PASS/FAIL/SKIP line per check.
#
#   scripts/gpu_check.sh              # one GPU, PyTorch image without megatron-core or TE (< 10 min)
#   scripts/gpu_check.sh --te-node    # a node with 2+ GPUs in a Transformer Engine container (NGC)
#
# Needs a Python 3.12 with a CUDA build of PyTorch (python3, or $PYTHON). What that Python lacks
# (megatron-core, Hydra) is unpacked from wheelhouse/ beside the checkout ($SAMI_WHEELHOUSE; made
# by scripts/gpu_wheelhouse.sh where PyPI is reachable) into a folder put on PYTHONPATH, with no
# network; the project itself runs from the checkout. Nothing is installed into $PYTHON's own
# environment. Takes about
# 5 minutes on one H200. Logs: $SAMI_GPU_CHECK_LOGS (default /tmp/sami-gpu-check). Exit code: the
# number of failed checks (0: all passed or skipped).
#
# Checks (tests/test_gpu.py and tests/test_te_lane.py, run as one pytest session):
#   environment      the wheels install offline, megatron-core imports, torch sees a GPU
#   forward-backward BF16 forward and backward on CUDA over NCCL, no CPU compatibility layer
#   numerics-*       C x C log-probability matrices on CUDA equal transformers' (pairs, shared prompts)
#   train-*          sami-train in BF16: finite loss, TFLOP/s and (H100/H200/A100/B200) MFU logged
#   bf16-resume      a stopped BF16 run resumes on the same loss curve
#   verify           sami-convert verify with the model on the GPU
#   fp8-refused      precision.fp8 without Transformer Engine is one error line, nothing trained
#   te-keys          the real Transformer Engine spec's checkpoint keys equal the local spec's (needs TE)
#   cpu-lane-*       the lane's CPU checks on this machine (key parity with stand-ins, fork server
#                    without CUDA, a broken TE named, checkpoints across lanes, damaged files)
#
# --te-node (tests/test_te_node.py and the TE key check): a checkpoint converted on the CPU trains
# with the TE spec and FP8 (hybrid, tensorwise scaling) over NCCL, and exports on the CPU to an HF
# model transformers runs:
#   te-fp8-tp2, te-fp8-pp2   tiny Llama at TP=2 and at PP=2
#   te-fp8-ep2, te-fp8-moe-tp2-sp   tiny Mixtral at EP=2 (alltoall dispatcher, grouped GEMM) and TP=2 with SP
#   te-keys          the real TE spec's checkpoint keys equal the local spec's
set -uo pipefail

MODE=one-gpu
case "${1:-}" in
  "") ;;
  --te-node) MODE=te-node ;;
  *) echo "usage: scripts/gpu_check.sh [--te-node]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELHOUSE="${SAMI_WHEELHOUSE:-$ROOT/wheelhouse}"
LOGS="${SAMI_GPU_CHECK_LOGS:-/tmp/sami-gpu-check}"
SITE="$LOGS/site-packages"
if [ "$MODE" = te-node ]; then
  TESTS=(tests/test_te_node.py tests/test_gpu.py -k "te_node or transformer_engine_spec")
  DEFAULT_LIMIT_S=1800
else
  TESTS=(tests/test_gpu.py tests/test_te_lane.py)
  DEFAULT_LIMIT_S=540
fi
TEST_TIME_LIMIT_S="${SAMI_GPU_CHECK_TIME_LIMIT_S:-$DEFAULT_LIMIT_S}"
mkdir -p "$LOGS"

report() {  # report NAME PASS|FAIL|SKIP [DETAIL]
  printf '%-20s %s%s\n' "$1" "$2" "${3:+  $3}"
}

# Use $PY where it already has everything; otherwise add the carried wheels on PYTHONPATH. They
# go into a folder of their own (--target), not into $PY's environment (the image's python3 is
# itself a virtual environment, which a --system-site-packages venv would not see); --no-deps,
# because what they need (torch, numpy, packaging, PyYAML) is the image's, which must stay. The
# import below names anything missing.
setup_environment() {
  CHECK_PY="$PY"
  if "$PY" -c 'import megatron.core, hydra, omegaconf' >"$LOGS/setup.log" 2>&1; then
    return 0
  fi
  if ! compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
    echo "no wheels in $WHEELHOUSE: run scripts/gpu_wheelhouse.sh where PyPI is reachable and carry" \
      "its output here (or set SAMI_WHEELHOUSE)" >>"$LOGS/setup.log"
    return 1
  fi
  rm -rf "$SITE"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$WHEELHOUSE"/*.whl >>"$LOGS/setup.log" 2>&1 || return 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c 'import megatron.core, hydra, omegaconf' >>"$LOGS/setup.log" 2>&1
}

CHECK_PY=""
if ! setup_environment; then
  report environment FAIL "see $LOGS/setup.log"
  exit 1
fi
if ! "$CHECK_PY" -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.__version__, torch.cuda.get_device_name())' \
    >"$LOGS/device.log" 2>&1; then
  report environment FAIL "torch sees no CUDA GPU (see $LOGS/device.log)"
  exit 1
fi
report environment PASS "$(tail -n 1 "$LOGS/device.log")"

cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
timeout "$TEST_TIME_LIMIT_S" "$CHECK_PY" -m pytest "${TESTS[@]}" -p no:cacheprovider -q \
  --junitxml "$LOGS/junit.xml" >"$LOGS/pytest.log" 2>&1
status=$?
if [ "$status" -eq 124 ]; then
  echo "pytest ran past ${TEST_TIME_LIMIT_S} s; checks without a result are reported as FAIL" >>"$LOGS/pytest.log"
fi

# One line per check from pytest's JUnit report: a check passes when all its tests passed, is
# skipped when all were skipped, and fails otherwise (also when it never ran).
"$CHECK_PY" - "$LOGS/junit.xml" "$LOGS/pytest.log" "$MODE" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ElementTree

TE_NODE_CHECKS = [
    ("te-fp8-tp2", r"test_fp8_training_with_the_te_spec.*\[tp2\]"),
    ("te-fp8-pp2", r"test_fp8_training_with_the_te_spec.*\[pp2\]"),
    ("te-fp8-ep2", r"test_fp8_training_with_the_te_spec.*\[ep2\]"),
    ("te-fp8-moe-tp2-sp", r"test_fp8_training_with_the_te_spec.*\[moe-tp2-sp\]"),
    ("te-keys", r"test_transformer_engine_spec_writes"),
]
CHECKS = [
    ("forward-backward", r"test_gpu\.py::test_bf16_forward_backward"),
    ("numerics-pairs", r"test_cxc_matrices_on_cuda_equal_transformers\[pairs\]"),
    ("numerics-shared", r"test_cxc_matrices_on_cuda_equal_transformers\[shared-prompts\]"),
    ("train-pairs", r"test_sami_train_bf16_on_gpu.*\[pairs\]"),
    ("train-shared", r"test_sami_train_bf16_on_gpu.*\[shared-prompts\]"),
    ("bf16-resume", r"test_bf16_run_on_gpu_resumes"),
    ("verify", r"test_verify_on_gpu"),
    ("fp8-refused", r"test_fp8_without_transformer_engine"),
    ("te-keys", r"test_transformer_engine_spec_writes"),
    ("cpu-lane-keys", r"test_te_lane\.py::test_local_and_te_specs"),
    ("cpu-lane-load", r"test_te_lane\.py::test_checkpoints_written|test_te_lane\.py::test_damaged"),
    ("cpu-lane-detect", r"test_te_lane\.py::test_a_(gpu|broken)"),
    ("cpu-lane-fork", r"test_te_lane\.py::test_the_harness_fork_server"),
    ("cpu-lane-verify", r"test_te_lane\.py::test_verify"),
]
junit, log, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "te-node":
    CHECKS = TE_NODE_CHECKS
outcomes = {}
try:
    for case in ElementTree.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}".split("/")[-1]
        kinds = {child.tag for child in case}
        outcome = "FAIL" if kinds & {"failure", "error"} else "SKIP" if "skipped" in kinds else "PASS"
        reason = next((child.get("message", "") for child in case if child.tag in ("failure", "error", "skipped")), "")
        outcomes[name] = (outcome, reason.splitlines()[0][:100] if reason else "")
except (OSError, ElementTree.ParseError):
    pass
failed = 0
for check, pattern in CHECKS:
    found = [value for name, value in outcomes.items() if re.search(pattern, name)]
    kinds = {outcome for outcome, _ in found}
    status = "FAIL" if not found or "FAIL" in kinds else "SKIP" if kinds == {"SKIP"} else "PASS"
    detail = next((reason for outcome, reason in found if outcome == status and reason), "")
    detail = detail or ("no result (see " + log + ")" if not found else f"{len(found)} test(s)")
    print(f"{check:<20} {status}  {detail}")
    failed += status == "FAIL"
sys.exit(min(failed, 100))
EOF
exit $?
