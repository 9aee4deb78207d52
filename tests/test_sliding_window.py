"""Sliding-window attention matches transformers' Mistral on both lanes (issue 15, item 7): the
window tuple handed to Transformer Engine, and the project's SDPA attention at any length, with
pairs and with shared prompts; plus SDPA's grouped KV heads (item 10)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.masking_utils import sliding_window_causal_mask_function

import megatron_sami.models.sdpa_attention as sdpa
from megatron_sami.alignment.data import used_lengths
from megatron_sami.alignment.shared_prompt import block_causal_mask
from megatron_sami.models.build import Backend, sliding_window_size, transformer_config
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.layout import ParallelConfig

HEADS, GROUPS, DIM = 4, 2, 8


def transformers_visible(window: int, seq: int) -> torch.Tensor:
    """[seq, seq] True where transformers' Mistral lets query q attend to key k."""
    visible = sliding_window_causal_mask_function(window)
    index = torch.arange(seq)
    return visible(torch.tensor(0), torch.tensor(0), index.unsqueeze(1), index.unsqueeze(0))


def inclusive_window_visible(window_size: tuple[int, int], seq: int) -> torch.Tensor:
    """Transformer Engine's / flash-attn's rule: query q sees keys q - left .. q + right inclusive
    (causal: right = 0)."""
    left, right = window_size
    q, k = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
    return (k >= q - left) & (k <= q + right) & (k <= q)


@pytest.mark.parametrize("window", [1, 4, 4096])
def test_window_tuple_shows_each_query_the_keys_transformers_shows(window):
    model = load_model_config("mistral-7b", sliding_window=window)
    seq = min(window * 3, 40)
    assert torch.equal(inclusive_window_visible(sliding_window_size(model), seq), transformers_visible(window, seq))


def test_both_lanes_get_the_window():
    model = load_model_config("tiny-llama", family="mistral", hf_architecture="MistralForCausalLM", sliding_window=16)
    config = transformer_config(model, ParallelConfig(), PrecisionConfig(params_dtype="fp32"),
                                Backend(use_te=False, on_gpu=False))
    assert config.window_size == (15, 0)


def attention(window: int | None) -> sdpa.SDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                               window_size=None if window is None else (window - 1, 0))
    tp = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return sdpa.SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp).eval()


def reference(query_SBHD, key_SBGD, value_SBGD, visible_SS) -> torch.Tensor:
    """Plain softmax attention under ``visible_SS`` (True = attend), [s, b, heads * dim]."""
    repeat = HEADS // GROUPS
    q = query_SBHD.permute(1, 2, 0, 3)
    k, v = (x.permute(1, 2, 0, 3).repeat_interleave(repeat, dim=1) for x in (key_SBGD, value_SBGD))
    scores = (q @ k.transpose(-1, -2)) / DIM**0.5
    context = scores.masked_fill(~visible_SS, float("-inf")).softmax(-1) @ v
    return context.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], HEADS * DIM)


def qkv(seq: int, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(seq, batch, HEADS, DIM, generator=generator),
            torch.randn(seq, batch, GROUPS, DIM, generator=generator),
            torch.randn(seq, batch, GROUPS, DIM, generator=generator))


@pytest.mark.parametrize(("seq", "window"), [(20, 6), (20, 1), (12, 12), (9, 64)])
def test_sdpa_attention_applies_the_window_at_any_length(seq, window):
    query, key, value = qkv(seq, 2)
    got = attention(window)(query, key, value, None)
    torch.testing.assert_close(got, reference(query, key, value, transformers_visible(window, seq)))


def test_shared_prompt_rows_see_the_window_of_their_own_pair_sequence():
    """A response token of a shared row sees, within the window, exactly the keys it sees in its
    pair sequence (prompt + its response), although other responses sit between them in the row."""
    prompt, responses, window = 5, [4, 6, 3], 6
    generator = torch.Generator().manual_seed(1)
    prompt_qkv = [torch.randn(prompt, 1, n, DIM, generator=generator) for n in (HEADS, GROUPS, GROUPS)]
    response_qkv = [[torch.randn(r, 1, n, DIM, generator=generator) for n in (HEADS, GROUPS, GROUPS)]
                    for r in responses]
    layer = attention(window)
    segments = torch.cat([torch.zeros(prompt, dtype=torch.long)]
                         + [torch.full((r,), j + 1) for j, r in enumerate(responses)]).unsqueeze(0)
    shared = [torch.cat([prompt_qkv[i]] + [resp[i] for resp in response_qkv]) for i in range(3)]
    shared_out = layer(*shared, block_causal_mask(segments))
    start = prompt
    for j, r in enumerate(responses):
        pair = [torch.cat([prompt_qkv[i], response_qkv[j][i]]) for i in range(3)]
        pair_out = layer(*pair, None)
        torch.testing.assert_close(shared_out[start:start + r], pair_out[prompt:])
        torch.testing.assert_close(shared_out[:prompt], pair_out[:prompt])
        start += r


def test_grouped_heads_are_read_natively_in_half_precision(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((args[1].shape[1], kwargs.get("enable_gqa", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", recording)
    query, key, value = (x.bfloat16() for x in qkv(10, 2))
    got = attention(None)(query, key, value, None)
    expected = reference(query.float(), key.float(), value.float(), torch.ones(10, 10, dtype=torch.bool).tril())
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    assert calls == [(GROUPS, True)]  # K/V passed with their 2 groups, not repeated to 4 heads
    attention(None)(*qkv(10, 2), None)  # fp32 (and masked) attention repeats K/V: no math-kernel fallback
    assert calls[-1] == (HEADS, False)


@pytest.mark.slow
def test_tiny_mistral_longer_than_its_window_matches_transformers(tmp_path):
    """Converted tiny Mistral (window 8) on sequences of ~30-50 tokens: logits, and the SAMI C x C
    matrices from pairs and from shared prompts, equal transformers'."""
    import conversion_jobs
    import sami_jobs

    from megatron_sami.testing.multiprocess import run_distributed
    from megatron_sami.testing.tiny import make_tiny_tokenizer

    hf_dir = tmp_path / "hf"
    tokenizer = make_tiny_tokenizer(hf_dir)
    conversion_jobs.make_hf_model("mistral", hf_dir, seed=5, vocab_size=len(tokenizer), sliding_window=8)
    run_distributed(conversion_jobs.to_megatron, 1, str(hf_dir), str(tmp_path / "ckpt"))
    tokens = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(3))
    (logits,) = run_distributed(conversion_jobs.logits_at, 1, str(tmp_path / "ckpt"), tokens, 1, 1, 1)
    torch.testing.assert_close(logits, conversion_jobs.hf_logits(hf_dir, tokens), rtol=0, atol=1e-4)
    items = sami_jobs.tokenized(str(hf_dir), 2, 3)
    assert min(int(item["loss_mask"].sum(1).min()) for item in items) > 1
    assert min(int(used_lengths(item["loss_mask"]).min()) for item in items) > 3 * 8  # well past the window
    expected = sami_jobs.hf_matrices(str(hf_dir), items, 3, "mean")
    for share in (False, True):
        (got,) = run_distributed(sami_jobs.megatron_matrices, 1, str(tmp_path / "ckpt"), str(hf_dir), 2, 3, 1, 1,
                                 "mean", False, share)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_catalogue_mistral_keeps_hf_window():
    assert sliding_window_size(load_model_config("mistral-7b")) == (4095, 0)
    assert sliding_window_size(load_model_config("tiny-llama")) is None
