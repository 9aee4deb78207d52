"""Tiny real models and tokenizers for tests and the embedded default (no hub needed).

Random HF models of each supported family written with ``save_pretrained``, and a byte-level
BPE trained in-process on a small corpus, saved so that ``AutoTokenizer.from_pretrained`` loads it
like any hub tokenizer.
"""

from __future__ import annotations

from pathlib import Path

# Shapes shared by the tiny models: GQA with 4 heads / 2 KV groups, an odd vocabulary (padding).
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=250, rms_norm_eps=1e-5)

VARIANTS = {
    "llama": ("LlamaConfig", dict(max_position_embeddings=256, rope_theta=10000.0)),
    "llama-tied": ("LlamaConfig", dict(max_position_embeddings=256, tie_word_embeddings=True)),
    # Llama 3.1-style band-wise rope scaling and linear interpolation: checked by logits.
    "llama31-rope": ("LlamaConfig", dict(max_position_embeddings=16384, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "llama-linear-rope": ("LlamaConfig", dict(max_position_embeddings=512, rope_scaling={
        "rope_type": "linear", "factor": 4.0})),
    "mistral": ("MistralConfig", dict(max_position_embeddings=256, sliding_window=64)),
    "mixtral": ("MixtralConfig", dict(max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
                                      rope_theta=1e6)),
}


def make_tiny_hf_model(variant: str, directory: Path, seed: int = 0, num_layers: int = 2, **overrides) -> Path:
    """A random HF model of the variant, written with save_pretrained (fp32 safetensors)."""
    import torch
    import transformers

    config_class, extra = VARIANTS[variant]
    config = getattr(transformers, config_class)(**{**COMMON, "num_hidden_layers": num_layers, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so that a swapped norm shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


DEFAULT_CORPUS = [
    "Be helpful: answer the question directly and completely.",
    "Be harmless: refuse to help with anything dangerous.",
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, let it rise, then bake.",
    "Summaries should be concise and comprehensive, covering the main points of the post.",
    "The assistant follows the principles of its constitution in every reply.",
]


def make_tiny_tokenizer(directory: Path, vocab_size: int = 320, corpus: list[str] | None = None):
    """Train a byte-level BPE (with <s>, </s>, <pad>) and save it as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus or DEFAULT_CORPUS, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    wrapped.save_pretrained(directory)
    return wrapped
