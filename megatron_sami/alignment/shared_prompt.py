"""One prompt per constitution instead of one per (constitution, response) pair. Pure tensor code.

The C x C pairs of a query repeat each constitution's prompt C times: sequence ``k*C + j`` is
prompt ``k`` followed by response ``j``. Here the C pairs of constitution ``k`` become one row:
prompt ``k`` once, then each response's tokens, each response block attending to the prompt
and to itself only (a block-causal mask) and carrying the positions it has in its own pair
(so rotary embeddings see the same offsets). Every scored token then sees exactly the tokens
and positions it sees in its pair sequence, so its log-probability is the same, while the
model processes ``C * prompt + sum(responses)`` tokens per constitution instead of
``C * (prompt + mean response)``. The first token of every response is predicted from the
prompt's last position, which the C responses share.

A pair microbatch (``tokens``, ``labels``, ``loss_mask`` of shape [N, T], N = queries * C * C,
as :func:`megatron_sami.alignment.data.collate` makes it) becomes a shared one with
- ``tokens``, ``position_ids``, ``segment_ids`` [queries * C, S]: segment 0 is the prompt,
  ``j + 1`` response ``j``, -1 padding;
- ``labels`` and ``loss_mask`` unchanged (the loss still reads one row per pair);
- ``score_index`` [scored tokens]: for each scored pair position, in row-major order, its flat
  index into the shared [queries * C, S] positions.
"""

from __future__ import annotations

import torch

from megatron_sami.alignment.data import microbatch_lengths, used_lengths

PAD_SEGMENT = -1


Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]


def _prompt_length(mask_T: torch.Tensor) -> int:
    """The mask starts at the prompt's last position (which predicts the response's first token)."""
    return int(mask_T.nonzero()[0, 0]) + 1


def _share_row(tokens_CT: torch.Tensor, mask_CT: torch.Tensor) -> Row:
    """The C pairs of one constitution -> (tokens, positions, segments) of one row, and for each
    pair the shared offsets of its scored positions."""
    prompt = _prompt_length(mask_CT[0])
    used_C = used_lengths(mask_CT).long().tolist()
    tokens, positions, segments, offsets = [tokens_CT[0, :prompt]], [torch.arange(prompt)], \
        [torch.zeros(prompt, dtype=torch.long)], []
    start = prompt
    for j, used in enumerate(used_C):
        if _prompt_length(mask_CT[j]) != prompt or not torch.equal(tokens_CT[j, :prompt], tokens_CT[0, :prompt]):
            raise ValueError(f"pair {j} of a constitution does not start with the same prompt as pair 0; "
                             "these sequences cannot share it.")
        tokens.append(tokens_CT[j, prompt:used])
        positions.append(torch.arange(prompt, used))
        segments.append(torch.full((used - prompt,), j + 1, dtype=torch.long))
        # Scored pair positions prompt-1 .. used-1: the prompt's last, then the response block.
        offsets.append(torch.cat([torch.tensor([prompt - 1]), torch.arange(start, start + used - prompt)]))
        start += used - prompt
    return torch.cat(tokens), torch.cat(positions), torch.cat(segments), offsets


def _share_rows(micro: dict[str, torch.Tensor], num_constitutions: int) -> list[Row]:
    C = num_constitutions
    tokens_NT, mask_NT = micro["tokens"], micro["loss_mask"]
    if tokens_NT.shape[0] % (C * C):
        raise ValueError(f"a pair microbatch holds whole C x C blocks; {tokens_NT.shape[0]} rows for C={C}")
    return [_share_row(tokens_NT[row * C:(row + 1) * C], mask_NT[row * C:(row + 1) * C])
            for row in range(tokens_NT.shape[0] // C)]


def _padded(rows: list[Row], micro: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    tokens_RS = torch.zeros(len(rows), length, dtype=micro["tokens"].dtype)
    positions_RS = torch.zeros(len(rows), length, dtype=torch.long)
    segments_RS = torch.full((len(rows), length), PAD_SEGMENT, dtype=torch.long)
    score_index = []
    for row, (tokens, positions, segments, offsets) in enumerate(rows):
        used = tokens.shape[0]
        if used > length:
            raise ValueError(f"a shared row needs {used} positions, more than length={length}")
        tokens_RS[row, :used], positions_RS[row, :used], segments_RS[row, :used] = tokens, positions, segments
        # Padding positions count on from the last real one (their values are never read).
        positions_RS[row, used:] = torch.arange(used, length)
        score_index += [row * length + offset for offset in offsets]
    return {"tokens": tokens_RS, "position_ids": positions_RS, "segment_ids": segments_RS,
            "labels": micro["labels"], "loss_mask": micro["loss_mask"], "score_index": torch.cat(score_index)}


def share_prompts(micro: dict[str, torch.Tensor], num_constitutions: int, length: int) -> dict[str, torch.Tensor]:
    """The shared layout (module docstring) of a pair microbatch ([queries * C * C, T] tensors),
    its [queries * C, length] rows padded to ``length``."""
    return _padded(_share_rows(micro, num_constitutions), micro, length)


def share_microbatches(micro: list[dict[str, torch.Tensor]], num_constitutions: int, multiple: int,
                       each: bool) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Every pair microbatch in the shared layout, rows padded to their longest rounded up to
    ``multiple`` (per microbatch with ``each``, else one length per step: see
    :func:`~megatron_sami.alignment.data.microbatch_lengths`). Returns the microbatches and the
    longest length."""
    rows = [_share_rows(m, num_constitutions) for m in micro]
    lengths = microbatch_lengths([max(row[0].shape[0] for row in batch) for batch in rows], multiple, each)
    return [_padded(batch, m, n) for batch, m, n in zip(rows, micro, lengths, strict=True)], max(lengths)


def block_causal_mask(segments_RS: torch.Tensor) -> torch.Tensor:
    """[R, 1, S, S] attention mask in megatron's convention (True = masked out): position q sees
    position k <= q when k is in the prompt or in q's own segment. A padding position sees the
    prompt and earlier padding, itself included, so no row of the mask is empty (an empty row
    would make attention NaN, and NaN times a zero gradient is still NaN)."""
    same_RSS = segments_RS.unsqueeze(2) == segments_RS.unsqueeze(1)
    visible_RSS = (same_RSS | (segments_RS == 0).unsqueeze(1)).tril()
    return ~visible_RSS.unsqueeze(1)

