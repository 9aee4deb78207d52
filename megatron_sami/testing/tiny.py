"""Tiny real tokenizers for tests and the embedded default (no hub needed).

A byte-level BPE trained in-process on a small corpus and saved with ``save_pretrained``, so
that it loads with ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

from pathlib import Path

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
