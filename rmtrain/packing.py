"""Padding-free ("packed") batches for a decoder score model, and token-budget grouping of pairs.

Packing: the sequences of a micro-batch are concatenated into one row `[1, T]` (or a few rows
`[R, T]`, first-fit decreasing into rows of `max_row_tokens`), with `position_ids` restarting at 0
for every sequence. Each sequence's score is read at its last token (`end_index`).

How attention stays inside each sequence (transformers 5.23, measured on CPU for sdpa and eager):
`LlamaModel.forward(input_ids, position_ids=..., attention_mask=None, use_cache=False)` builds the
mask with `masking_utils.create_causal_mask`, which calls `find_packed_sequence_indices`
(a new sequence starts wherever consecutive positions do not increase by exactly 1) and ANDs the
causal mask with "same sequence" -- a block-diagonal causal mask, materialised as a bool
`[R, 1, T, T]` tensor for sdpa and an additive float one for eager. No hand-written mask is needed.
Sliding-window layers (Mistral, Qwen, Gemma 2/3, Phi-3: `create_sliding_window_causal_mask`) go
through the same detection, and `remap_positions_for_packed_sequence` applies the window to each
sequence's own positions. A row's padding tail is numbered in runs no longer than the longest
sequence, so no position exceeds the padded batch's largest: RoPE variants that choose their
frequencies from it (Phi-3's LongRoPE, "dynamic") see the same batch packed and padded.
Two conditions, both required (violating either silently gives a plain causal mask that attends
across sequences; the test suite checks both):

* `attention_mask` must be None. Any 2-D mask, even all ones, switches detection off.
* `past_key_values` must be None, i.e. `use_cache=False` explicitly. `LlamaConfig.use_cache`
  defaults to True, and `merge_with_config_defaults` then makes `LlamaModel` create a
  `DynamicCache` before the mask is built -- in train mode too (only gradient checkpointing forces
  it off) -- and a cache disables packed-sequence detection.

The sdpa/eager mask is dense: attention still costs O(T^2) per row, with the cross-sequence part
masked rather than skipped. Packing into a few nearly full rows of moderate width
(`balanced_row_tokens`: 1-4x the longest sequence, whichever is cheapest) keeps that cost at or
below the padded batch's. The flash-attention kernels take
the varlen path from `position_ids` only when the batch has ONE row (`_is_packed_sequence` checks
`batch_size == 1`); with several rows they would run plain causal attention, so `packed_forward`
refuses flash implementations with more than one row. `cu_seqlens`/`max_seqlen` are what those
kernels want (`cu_seq_lens_q/k`, `max_length_q/k`).

Token budget: `token_budget_batches` groups pairs into micro-batches of about `max_tokens` real
tokens; `token_budget_steps` cuts them into optimizer steps with the same number of micro-batches
on every rank and exact per-pair loss weights (see their docstrings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn

# Attention implementations that read sequence boundaries from position_ids for any batch shape.
_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


class PackedBatch(TypedDict):
    """Packed sequences. Sequence i is `input_ids[seq_row[i], seq_starts[i]:][:seq_lens[i]]`."""

    input_ids: torch.Tensor  # [R, T] long; row tails hold pad_token_id
    position_ids: torch.Tensor  # [R, T] long; 0.. per sequence and per padding run
    real_mask: torch.Tensor  # [R, T] bool; True on real (sequence) tokens
    seq_row: torch.Tensor  # [N] long; row of each sequence
    seq_starts: torch.Tensor  # [N] long; column of each sequence's first token
    seq_lens: torch.Tensor  # [N] long
    end_index: torch.Tensor  # [N] long; column of each sequence's last token
    cu_seqlens: torch.Tensor  # [S + 1] int32; segment boundaries in the row-major flat layout
    max_seqlen: int  # longest segment (flash-attention varlen argument)
    num_real_tokens: int


def _first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` grouped into bins of at most `capacity` (an item larger than `capacity`
    gets a bin of its own). Deterministic: ties keep index order; each bin lists indices sorted."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return [sorted(b) for b in bins]


def pack_sequences(
    seqs: Sequence[Sequence[int]],
    max_row_tokens: int | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """Concatenate `seqs` into one row (`max_row_tokens=None`) or into rows of at most
    `max(max_row_tokens, longest)` tokens (first-fit decreasing), right-padded to one width
    rounded up to `pad_to_multiple_of`. Outputs keep the order of `seqs` (index i = seqs[i])."""
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence")
    lens = [len(s) for s in seqs]
    if min(lens) == 0:
        raise ValueError("pack_sequences: empty sequence")
    if max_row_tokens is None:
        rows = [list(range(len(seqs)))]
    else:
        rows = _first_fit_decreasing(lens, max(max_row_tokens, max(lens)))
    width = max(sum(lens[i] for i in row) for row in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    seq_row = torch.empty(len(seqs), dtype=torch.long)
    seq_starts = torch.empty(len(seqs), dtype=torch.long)
    segments: list[int] = []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = lens[i]
            input_ids[r, col : col + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            position_ids[r, col : col + n] = torch.arange(n)
            real_mask[r, col : col + n] = True
            seq_row[i], seq_starts[i] = r, col
            segments.append(n)
            col += n
        # The padding run: segments of at most the longest sequence's length, each seeing only
        # itself, so no position exceeds the padded batch's largest (RoPE variants that pick
        # their frequencies from the largest position, Phi-3's LongRoPE and "dynamic", then
        # see the same batch as padded).
        for start in range(col, width, max(lens)):
            run = min(max(lens), width - start)
            position_ids[r, start : start + run] = torch.arange(run)
            segments.append(run)
    seq_lens = torch.as_tensor(lens, dtype=torch.long)
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(segments, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        real_mask=real_mask,
        seq_row=seq_row,
        seq_starts=seq_starts,
        seq_lens=seq_lens,
        end_index=seq_starts + seq_lens - 1,
        cu_seqlens=cu,
        max_seqlen=max(segments),
        num_real_tokens=sum(lens),
    )


def _fitted_width(lengths: Sequence[int], rows: int) -> int:
    """The narrowest width (grown in 1 % steps from total / rows) that first-fit decreasing
    packs into `rows` rows."""
    width = max(max(lengths), math.ceil(sum(lengths) / rows))
    while len(_first_fit_decreasing(lengths, width)) > rows:
        width += max(1, width // 100)
    return width


def balanced_row_tokens(
    lengths: Sequence[int], token_cost: float = 1536.0, min_real_fraction: float = 0.97
) -> int:
    """A `max_row_tokens` for `pack_sequences`: nearly equally full rows, as few or as many as
    make the step cheapest.

    With a dense block-diagonal mask (sdpa/eager) a row of width W costs about W x (token_cost
    + W): `token_cost` is a token's non-attention work in units of one attention column
    (`row_token_cost(config)`, ~6 x hidden for LLaMA shapes). Wide rows waste little on row
    tails but pay for masked attention; narrow rows the reverse. Candidates: rows about
    1-4 x the longest sequence wide, each shrunk to the total divided evenly over its rows (so
    rows come out nearly equally full: on long-tailed PKU-like lengths with 16 pairs per
    micro-batch ~97 % real tokens, against ~93 % for rows of exactly the longest sequence).
    The cheapest candidate with at least `min_real_fraction` real tokens wins; if none has
    that many, the cheapest of all."""
    longest, total = max(lengths), sum(lengths)
    candidates: list[tuple[bool, float, int]] = []
    for factor in (1.0, 1.25, 1.5, 2.0, 3.0, 4.0):
        rows = max(1, math.ceil(total / (factor * longest)))
        width = _fitted_width(lengths, rows)
        fed = len(_first_fit_decreasing(lengths, width)) * width
        candidates.append((total / fed < min_real_fraction, fed * (token_cost + width), width))
        if rows == 1:
            break
    return min(candidates)[2]


def row_token_cost(config: Any) -> float:
    """`balanced_row_tokens`' token_cost for a LLaMA config: per token and layer, the
    projections' and MLP's multiply-adds over the attention's per column (2 x heads x head_dim)."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size
    return float(linear / (2 * q))


def unpack_index(packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [N, L], mask [N, L]) that turn a packed `[R, T, ...]` tensor, flattened to
    `[R * T, ...]`, into right-padded per-sequence views (L = longest sequence), as `unpack`."""
    lens = packed["seq_lens"]
    width = int(lens.max())
    cols = torch.arange(width)
    mask = cols[None, :] < lens[:, None]
    base = packed["seq_row"] * packed["input_ids"].size(1) + packed["seq_starts"]
    index = torch.where(mask, base[:, None] + cols[None, :], torch.zeros((), dtype=torch.long))
    return index, mask


def unpack(values: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Right-padded `[N, L, ...]` view of packed `values` `[R, T, ...]`; padding is 0
    (differentiable: gradients flow back to the packed positions)."""
    flat = values.flatten(0, 1)[index.to(values.device)]
    keep = mask.to(values.device).view(*mask.shape, *([1] * (flat.dim() - 2)))
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))


@dataclass
class PackedScores:
    scores: torch.Tensor  # [R, T, 1] score at every packed position (padding included)
    end_scores: torch.Tensor  # [N, 1] score at each sequence's last token, in `seqs` order
    end_hidden: torch.Tensor  # [N, H]


def sequence_scores(scores: torch.Tensor, packed: PackedBatch) -> list[torch.Tensor]:
    """Per-token scores of each sequence, `[len_i, 1]`, in `seqs` order."""
    out = []
    rows, starts = packed["seq_row"].tolist(), packed["seq_starts"].tolist()
    for r, s, n in zip(rows, starts, packed["seq_lens"].tolist(), strict=True):
        out.append(scores[r, s : s + n])
    return out


def packed_forward(backbone: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Last hidden state `[R, T, H]` of a transformers decoder (`LlamaModel`) on a packed batch,
    attention confined to each sequence (see the module docstring for why these arguments)."""
    impl = str(getattr(backbone.config, "_attn_implementation", "eager"))
    rows = packed["input_ids"].size(0)
    if impl not in _MASK_IMPLEMENTATIONS and not (rows == 1 and "flash" in impl):
        raise ValueError(
            f"packed_forward: attention {impl!r} with {rows} rows would attend across sequences; "
            f"use one of {_MASK_IMPLEMENTATIONS} or a flash implementation with one row"
        )
    device = next(backbone.parameters()).device
    out: Any = backbone(
        input_ids=packed["input_ids"].to(device),
        position_ids=packed["position_ids"].to(device),
        attention_mask=None,  # a 2-D mask (even all ones) disables packed-sequence detection
        use_cache=False,  # a cache (config default use_cache=True) disables it too
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def packed_scores(model: nn.Module, packed: PackedBatch) -> PackedScores:
    """Scores of a `LlamaForSequenceClassification`-shaped model (`model.model`, `model.score`)
    at every packed position and at each sequence's last token."""
    hidden = packed_forward(model.get_submodule("model"), packed)
    scores: torch.Tensor = model.get_submodule("score")(hidden)
    rows = packed["seq_row"].to(hidden.device)
    ends = packed["end_index"].to(hidden.device)
    return PackedScores(scores=scores, end_scores=scores[rows, ends], end_hidden=hidden[rows, ends])


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[N, L]` input ids and attention mask (TRL's layout)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def padded_scores(
    model: nn.Module, seqs: Sequence[Sequence[int]], pad_token_id: int = 0
) -> PackedScores:
    """The padded reference: right-padded `[N, L]` batch with an attention mask, positions counted
    over real tokens, end score at the last real token. `scores` is `[N, L, 1]`."""
    ids, mask = pad_sequences(seqs, pad_token_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out: Any = model.get_submodule("model")(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
    )
    hidden: torch.Tensor = out.last_hidden_state
    scores: torch.Tensor = model.get_submodule("score")(hidden)
    rows = torch.arange(len(seqs), device=device)
    ends = mask.sum(-1) - 1
    return PackedScores(scores=scores, end_scores=scores[rows, ends], end_hidden=hidden[rows, ends])


# ----------------------------------------------------------------------------------------------
# Token-budget grouping of pairs


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    seed: int,
    epoch: int = 0,
    window: int = 1024,
) -> list[list[int]]:
    """Micro-batches (lists of pair indices) of at most `max_tokens` real tokens each, covering
    every pair exactly once; `lengths[i]` is pair i's tokens (len(chosen) + len(rejected)).

    Deterministic in (lengths, max_tokens, seed, epoch, window): the pairs are permuted
    (`torch.randperm` seeded with seed + epoch, as `rmtrain.batching`), cut into consecutive
    windows of `window` pairs, each window is binned first-fit decreasing (so bins are full but
    only pairs of the same window share one), and the bins of the epoch are shuffled with the same
    generator. A pair longer than `max_tokens` is a micro-batch of its own. Indices inside a
    micro-batch are in permutation order.
    """
    if max_tokens <= 0 or window <= 0:
        raise ValueError("max_tokens and window must be positive")
    if any(n <= 0 for n in lengths):
        raise ValueError("every pair needs a positive token count")
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    bins: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        for b in _first_fit_decreasing([lengths[i] for i in chunk], max_tokens):
            bins.append([chunk[j] for j in b])
    order = torch.randperm(len(bins), generator=gen).tolist()
    return [bins[k] for k in order]


def split_by_tokens(indices: Sequence[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """`indices` cut into `parts` groups of near-equal tokens (longest first, each to the lightest
    group; ties to the lower group), for the fixed-pairs-per-step alternative: the G pairs of a
    `BatchPlan` step split into world x accumulation token-balanced micro-batches."""
    if parts <= 0:
        raise ValueError("parts must be positive")
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        g = min(range(parts), key=lambda p: (load[p], p))
        groups[g].append(i)
        load[g] += lengths[i]
    return [sorted(g) for g in groups]


@dataclass(frozen=True)
class WeightedMicroBatch:
    """Same fields as `rmtrain.batching.MicroBatch`: pair indices and per-pair loss weights."""

    indices: list[int]
    weights: list[float]


def token_budget_steps(
    batches: Sequence[Sequence[int]],
    world_size: int,
    accumulation: int,
    rank: int,
) -> list[list[WeightedMicroBatch]]:
    """This rank's micro-batches for every optimizer step of an epoch of `batches`.

    A step takes the next M = world_size x accumulation micro-batches (micro-batch k*world + rank
    is this rank's k-th), so every rank runs exactly `accumulation` forward/backward passes per
    step -- what ZeRO-3's collective parameter gathers and DeepSpeed's fixed
    `gradient_accumulation_steps` need. The last step is filled with empty micro-batches, each a
    single pair of weight 0. Every pair of a step weighs M / n_step (n_step = its pairs): DeepSpeed
    divides by `accumulation` and averages over ranks, so the weighted sums give exactly the mean
    over the step's pairs. The pairs per step vary (about M x max_tokens / mean pair tokens);
    the loss stays an exact mean.
    """
    per_step = world_size * accumulation
    if not 0 <= rank < world_size or accumulation <= 0:
        raise ValueError("need 0 <= rank < world_size and accumulation > 0")
    if not batches:
        return []
    filler = [batches[0][0]]
    steps: list[list[WeightedMicroBatch]] = []
    for start in range(0, len(batches), per_step):
        group = list(batches[start : start + per_step])
        n_step = sum(len(b) for b in group)
        weight = per_step / n_step
        mine: list[WeightedMicroBatch] = []
        for k in range(accumulation):
            j = k * world_size + rank
            if j < len(group):
                mine.append(WeightedMicroBatch(list(group[j]), [weight] * len(group[j])))
            else:
                mine.append(WeightedMicroBatch(filler, [0.0]))
        steps.append(mine)
    return steps
