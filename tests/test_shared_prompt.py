"""The shared-prompt layout shows every scored token exactly what its pair sequence shows it.
Pure tensor code, one process."""

from __future__ import annotations

import pytest
import torch

from megatron_sami.alignment.shared_prompt import (
    PAD_SEGMENT,
    block_causal_mask,
    share_microbatches,
    share_prompts,
)

IGNORE_TOKEN = 0


def pair_microbatch(num_queries: int, C: int, seq_length: int, seed: int) -> dict[str, torch.Tensor]:
    """Pairs laid out as alignment.data.tokenize_record lays them out: row q*C*C + k*C + j is prompt
    (q, k) then response (q, j); tokens/labels shifted by one; the mask starts at the prompt's
    last position."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (), generator=generator))
        return torch.randint(1, 500, (length,), generator=generator).tolist()

    tokens = torch.full((num_queries * C * C, seq_length), IGNORE_TOKEN)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros(tokens.shape)
    for q in range(num_queries):
        prompts, responses = [ids(3, 12) for _ in range(C)], [ids(1, 9) for _ in range(C)]
        for k in range(C):
            for j in range(C):
                row, sequence = (q * C + k) * C + j, prompts[k] + responses[j]
                tokens[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
                labels[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
                mask[row, len(prompts[k]) - 1:len(sequence) - 1] = 1
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


@pytest.mark.parametrize(("num_queries", "C", "seed"), [(1, 2, 0), (2, 3, 1), (3, 4, 2)])
def test_every_scored_token_sees_its_pair_tokens_at_their_positions(num_queries, C, seed):
    pairs = pair_microbatch(num_queries, C, 24, seed)
    (shared,), length = share_microbatches([pairs], C, 1, each=True)
    assert shared["tokens"].shape == (num_queries * C, length)
    visible_RSS = ~block_causal_mask(shared["segment_ids"])[:, 0]
    scored = pairs["loss_mask"].bool()
    assert shared["score_index"].shape[0] == int(scored.sum())
    rows, columns = scored.nonzero(as_tuple=True)
    for pair_row, t, flat in zip(rows.tolist(), columns.tolist(), shared["score_index"].tolist(), strict=True):
        row, s = divmod(flat, length)
        assert row == pair_row // C
        seen = {(int(shared["tokens"][row, u]), int(shared["position_ids"][row, u]))
                for u in visible_RSS[row, s].nonzero()[:, 0].tolist()}
        expected = {(int(pairs["tokens"][pair_row, u]), u) for u in range(t + 1)}
        assert seen == expected, (pair_row, t)
        assert visible_RSS[row, s].sum() == t + 1  # no position seen twice


def test_shared_rows_hold_each_prompt_once_and_padding_sees_itself():
    C = 3
    pairs = pair_microbatch(2, C, 24, 5)
    (shared,), length = share_microbatches([pairs], C, 8, each=True)
    assert length % 8 == 0
    used_pairs = int(sum(int(row.nonzero()[-1, 0]) + 1 for row in pairs["loss_mask"]))
    used_shared = int((shared["segment_ids"] != PAD_SEGMENT).sum())
    prompts = [int(row.nonzero()[0, 0]) + 1 for row in pairs["loss_mask"][::C]]
    assert used_pairs - used_shared == (C - 1) * sum(prompts)
    assert (~block_causal_mask(shared["segment_ids"])).any(-1).all()  # no empty mask row (NaN attention)


def test_one_length_per_step_for_pipelines_and_refusals():
    C = 2
    micro = [pair_microbatch(1, C, 24, seed) for seed in range(3)]
    own, longest = share_microbatches(micro, C, 1, each=True)
    same, same_longest = share_microbatches(micro, C, 1, each=False)
    assert {m["tokens"].shape[1] for m in same} == {same_longest} == {longest}
    assert max(m["tokens"].shape[1] for m in own) == longest
    bad = pair_microbatch(1, C, 24, 7)
    bad["tokens"][1, 0] += 1  # pair (0, 1) no longer starts with constitution 0's prompt
    with pytest.raises(ValueError, match="same prompt"):
        share_prompts(bad, C, 64)
    with pytest.raises(ValueError, match="whole C x C blocks"):
        share_prompts({key: value[:3] for key, value in bad.items()}, C, 64)
