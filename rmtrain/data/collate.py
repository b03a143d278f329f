"""Token ids → padded tensors: the one padding rule and the one truncation rule, shared by
training batches and `rmtrain score`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# The closing tail kept on truncation: EOS and at most this many tokens after it (ChatML's newline).
_MAX_TAIL = 4


def truncate_keep_eos(ids: list[int], max_length: int, eos_id: int) -> tuple[list[int], bool]:
    """Cut from the right keeping the closing tail (the last EOS and what follows it, e.g.
    ChatML's `<|im_end|>\n`), so the read-out token survives truncation unchanged."""
    if len(ids) <= max_length:
        return ids, False
    tail = [eos_id]
    for k in range(1, min(_MAX_TAIL + 1, len(ids)) + 1):
        if ids[-k] == eos_id:
            tail = ids[-k:]
            break
    return [*ids[: max_length - len(tail)], *tail], True


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_token_id: int, padding_side: str, length: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` [N, longest] (or [N, `length`]), padded on
    `padding_side`."""
    longest = max(len(s) for s in seqs)
    if length is not None and length < longest:
        raise ValueError(f"cannot pad to length {length}: a sequence has {longest} ids")
    length = longest if length is None else length
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_pairs(
    examples: list[dict[str, Any]], pad_token_id: int, padding_side: str
) -> dict[str, torch.Tensor]:
    """B pairs → one [2B, L] batch (chosen rows first, then rejected), padded to the longest.

    One forward pass scores both sides; the padding side does not change scores (tested by the
    model), so it follows the model's convention.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    seqs = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    return {
        **pad_sequences(seqs, pad_token_id, padding_side),
        "chosen_unsafe": torch.tensor([float(e["chosen_unsafe"]) for e in examples]),
        "rejected_unsafe": torch.tensor([float(e["rejected_unsafe"]) for e in examples]),
        "margin": torch.tensor([float(e["margin"]) for e in examples]),
    }
