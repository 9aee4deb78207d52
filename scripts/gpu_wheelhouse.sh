#!/usr/bin/env bash
# Makes wheelhouse/: the Python wheels that scripts/gpu_check.sh installs, with no network, on a
# GPU machine whose image already has PyTorch and the usual ML stack (transformers, safetensors,
# tokenizers, numpy, pytest, ...) but not megatron-core or Hydra. Run it where PyPI is reachable,
# then carry wheelhouse/ to the GPU machine beside the checkout.
#
#   scripts/gpu_wheelhouse.sh [OUT_DIR]     (default: wheelhouse/ at the repository's top)
#
# The versions are those of this checkout's CPU environment (.venv, or $PYTHON), so the GPU
# check runs the library code the CPU suite tested. Target: CPython 3.12 on x86-64 Linux.
# Packages that the GPU image lacks go in the list below; scripts/gpu_check.sh stops with pip's
# message naming any other package it would need.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/wheelhouse}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

# What the project imports on the GPU lane that the image does not have, with what those need.
PACKAGES=(megatron-core hydra-core omegaconf antlr4-python3-runtime)
# Published as a source archive only: built into a (pure-Python) wheel here.
SOURCE_ONLY=(antlr4-python3-runtime)

version_of() {
  "$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1"
}

is_source_only() {
  local name
  for name in "${SOURCE_ONLY[@]}"; do
    [ "$name" = "$1" ] && return 0
  done
  return 1
}

mkdir -p "$OUT"
for package in "${PACKAGES[@]}"; do
  pin="$package==$(version_of "$package")"
  if is_source_only "$package"; then
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$pin"
  else
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --abi cp312 --abi abi3 --abi none \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any \
      --dest "$OUT" "$pin"
  fi
  echo "[wheelhouse] $pin"
done
du -sh "$OUT"
