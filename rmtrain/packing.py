"""How a micro-batch's sequences are laid out for one forward pass: padded or packed rows.

:class:`Rows` is the one layout type. :func:`pad_sequences` gives one row per sequence, padded
on either side, with an attention mask. :func:`pack_sequences` gives padding-free rows: the
sequences concatenated into one row `[1, T]` (or a few rows `[R, T]`, first-fit decreasing into
rows of `max_row_tokens`), with `position_ids` restarting at 0 for every sequence. Unless it
shares a prefix, sequence i is `input_ids[seq_row[i], seq_start[i]:][:seq_len[i]]`, and its
score is read at its last token (`seq_end`); `Rows.token_index` says where the tokens of any
sequence are, shared prefixes included.

How attention stays inside each packed sequence (transformers 5, measured on CPU for sdpa and
eager): `LlamaModel.forward(input_ids, position_ids=..., attention_mask=None, use_cache=False)`
builds the mask with `masking_utils.create_causal_mask`, which calls
`find_packed_sequence_indices` (a new sequence starts wherever consecutive positions do not
increase by exactly 1) and ANDs the causal mask with "same sequence" -- a block-diagonal causal
mask, materialised as a bool `[R, 1, T, T]` tensor for sdpa and an additive float one for eager.
No hand-written mask is needed. Sliding-window layers (Mistral, Qwen, Gemma 2/3, Phi-3:
`create_sliding_window_causal_mask`) go through the same detection, and
`remap_positions_for_packed_sequence` applies the window to each sequence's own positions. A
row's padding tail is numbered in runs no longer than the longest sequence, so no position
exceeds the padded batch's largest: RoPE variants that choose their frequencies from it (Phi-3's
LongRoPE, "dynamic") see the same batch packed and padded. Two conditions, both required
(violating either silently gives a plain causal mask that attends across sequences; the test
suite checks both):

* `attention_mask` must be None. Any 2-D mask, even all ones, switches detection off.
* `past_key_values` must be None, i.e. `use_cache=False` explicitly. `LlamaConfig.use_cache`
  defaults to True, and `merge_with_config_defaults` then makes `LlamaModel` create a
  `DynamicCache` before the mask is built -- in train mode too (only gradient checkpointing forces
  it off) -- and a cache disables packed-sequence detection.

That mask is dense: attention costs O(T^2) per row, the cross-sequence part computed and then
masked away. rmtrain's trainer therefore does not rely on it: `rmtrain.attention` computes each
sequence's attention on its own tokens (the "segments" kernel, all sequences in ONE row, no
padding at all), and lays out shared prefixes (`pack_sequences(groups=...)`), which no
position-run rule can express. `balanced_row_tokens` (rows 1-4x the longest sequence, whichever
is cheapest) serves the dense kernel. The flash-attention kernels take the varlen path from
`position_ids` only when the batch has ONE row (`_is_packed_sequence` checks
`batch_size == 1`); with several rows they would run plain causal attention, so a flash
implementation packs into one row and `packed_forward` refuses it with more.

`packed_forward`, `packed_scores` and `padded_scores` run any `*ForSequenceClassification`-shaped
model (`model.model`, `model.score`) on these layouts: the reference path of the tests and of
`benchmarks/vs_trl.py`, independent of rmtrain's score model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# Attention implementations that read sequence boundaries from position_ids for any batch shape.
_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


@dataclass
class Rows:
    """N sequences laid out in `[R, T]` rows for one forward pass (padded: R == N).

    A sequence is the columns `seq_start .. seq_start + shared_len` of its row (a prefix it
    shares with other sequences of its segment, computed once by the segment's first sequence;
    0 tokens unless prefixes are shared) followed by the `seq_len - shared_len` columns it owns
    from `own_start` on. A sequence that shares nothing owns all of its columns
    (`own_start == seq_start`)."""

    input_ids: torch.Tensor  # [R, T] long; padding holds the pad token id
    seq_row: torch.Tensor  # [N] long; row of each sequence
    seq_start: torch.Tensor  # [N] long; column of each sequence's first token
    seq_len: torch.Tensor  # [N] long; its tokens, the shared prefix included
    attention_mask: torch.Tensor | None = None  # padded: [R, T], 1 on real tokens
    position_ids: torch.Tensor | None = None  # packed: [R, T], 0.. per sequence and padding run
    shared_len: torch.Tensor | None = None  # [N] long; leading tokens read from a shared prefix
    own_start: torch.Tensor | None = None  # [N] long; column of its first own token

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def shares_prefixes(self) -> bool:
        return self.shared_len is not None and bool(self.shared_len.any())

    def spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared_len, own_start) of every sequence, also when nothing is shared."""
        if self.shared_len is None or self.own_start is None:
            return torch.zeros_like(self.seq_len), self.seq_start
        return self.shared_len, self.own_start

    @property
    def seq_end(self) -> torch.Tensor:
        """Column of each sequence's last token (where its score is read)."""
        shared, own = self.spans()
        return own + self.seq_len - shared - 1

    @property
    def fed_tokens(self) -> int:
        """Positions the forward pass computes, padding included."""
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        """Tokens of all sequences, each counted in full (a shared prefix once per sequence)."""
        return int(self.seq_len.sum())

    @property
    def computed_tokens(self) -> int:
        """Real tokens the forward pass computes: a shared prefix counts once."""
        shared, _ = self.spans()
        return int((self.seq_len - shared).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The score model's forward arguments (`rmtrain.model`): ids and mask, or ids,
        position ids and each sequence's end (row, column)."""
        if self.attention_mask is not None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        assert self.position_ids is not None
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "seq_row": self.seq_row,
            "seq_end": self.seq_end,
        }

    def token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(`[N, L]` index of each sequence's tokens into the flattened `[R * T]` rows, right
        -padded with 0; mask `[N, L]`), L the longest sequence."""
        width = int(self.seq_len.max())
        cols = torch.arange(width)
        mask = cols[None, :] < self.seq_len[:, None]
        shared, own = self.spans()
        base = self.seq_row * self.input_ids.size(1)
        col = torch.where(
            cols[None, :] < shared[:, None],
            self.seq_start[:, None] + cols[None, :],
            (own - shared)[:, None] + cols[None, :],
        )
        index = torch.where(mask, base[:, None] + col, torch.zeros((), dtype=torch.long))
        return index, mask

    def per_sequence(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`[N, L, ...]` right-padded per-sequence view of `values` `[R, T, ...]`, padding 0;
        mask `[N, L]`), L the longest sequence; a shared prefix appears in every sequence that
        reads it. Differentiable: gradients flow back to the positions in the rows."""
        index, mask = self.token_index()
        flat = values.flatten(0, 1)[index.to(values.device)]
        keep = mask.to(values.device).view(*mask.shape, *([1] * (flat.dim() - 2)))
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        return torch.where(keep, flat, zero), mask


def _lengths(seqs: Sequence[Sequence[int] | np.ndarray]) -> list[int]:
    if not len(seqs):
        raise ValueError("at least one sequence is needed")
    lens = [len(s) for s in seqs]
    if min(lens) == 0:
        raise ValueError("empty sequence")
    return lens


def pad_sequences(
    seqs: Sequence[Sequence[int] | np.ndarray],
    pad_token_id: int,
    padding_side: str = "right",
    length: int | None = None,
) -> Rows:
    """One row per sequence, padded on `padding_side` to the longest (or to `length`), with an
    attention mask."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lens = _lengths(seqs)
    if length is not None and length < max(lens):
        raise ValueError(f"cannot pad to length {length}: a sequence has {max(lens)} ids")
    width = max(lens) if length is None else length
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    starts = [0 if padding_side == "right" else width - n for n in lens]
    for row, (seq, start, n) in enumerate(zip(seqs, starts, lens, strict=True)):
        input_ids[row, start : start + n] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, start : start + n] = 1
    return Rows(
        input_ids=input_ids,
        seq_row=torch.arange(len(seqs)),
        seq_start=torch.as_tensor(starts, dtype=torch.long),
        seq_len=torch.as_tensor(lens, dtype=torch.long),
        attention_mask=attention_mask,
    )


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
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


def common_prefix(seqs: Sequence[np.ndarray]) -> int:
    """Length of the longest common prefix of token id sequences."""
    n = min(len(s) for s in seqs)
    first = seqs[0][:n]
    for s in seqs[1:]:
        differ = np.flatnonzero(s[:n] != first)
        if len(differ):
            n = int(differ[0])
            first = first[:n]
    return n


def pack_sequences(
    seqs: Sequence[Sequence[int] | np.ndarray],
    max_row_tokens: int | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    groups: Sequence[Sequence[int]] = (),
    min_shared: int = 1,
) -> Rows:
    """Concatenate `seqs` into one row (`max_row_tokens=None`) or into rows of at most
    `max(max_row_tokens, longest segment)` tokens (first-fit decreasing), right-padded to one
    width rounded up to `pad_to_multiple_of`. Outputs keep the order of `seqs` (index i =
    seqs[i]). A row's padding tail is numbered in runs of at most the longest sequence, each
    attending only to itself.

    `groups` (lists of sequence indices, each sequence in at most one) share prefixes: a group
    becomes one segment `[common prefix][first member's rest][second member's rest]...`, the
    prefix being the longest common prefix of the members' token ids. The first member (the one
    with the fewest tokens) owns the prefix; every other member reads it (`shared_len`) and owns
    only its rest, whose positions continue from the prefix length. A group whose common prefix
    is shorter than `min_shared` tokens is laid out unshared. Which tokens attend to which is
    then no longer "same position run": :mod:`rmtrain.attention` builds it from these spans."""
    lens = _lengths(seqs)
    arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
    segments: list[tuple[list[int], int]] = []  # (members, owner first; shared prefix length)
    grouped = np.zeros(len(seqs), dtype=bool)
    for group in groups:
        members = list(group)
        shared = common_prefix([arrays[i] for i in members]) if len(members) > 1 else 0
        if shared < max(min_shared, 1):
            continue
        grouped[members] = True
        owner = min(members, key=lambda i: (lens[i], i))
        segments.append(([owner, *(i for i in members if i != owner)], shared))
    segments += [([i], 0) for i in np.flatnonzero(~grouped).tolist()]
    segments.sort(key=lambda seg: min(seg[0]))
    sizes = [lens[m[0]] + sum(lens[i] - p for i in m[1:]) for m, p in segments]
    if max_row_tokens is None:
        rows = [list(range(len(segments)))]
    else:
        rows = first_fit_decreasing(sizes, max(max_row_tokens, max(sizes)))
    width = max(sum(sizes[k] for k in row) for row in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    seq_row, seq_start, shared_len, own_start = (np.zeros(len(seqs), np.int64) for _ in range(4))
    for r, row in enumerate(rows):
        col = 0
        for k in row:
            members, shared = segments[k]
            start = col
            for j, i in enumerate(members):
                skip = shared if j else 0  # members after the first read the prefix
                n = lens[i] - skip
                input_ids[r, col : col + n] = arrays[i][skip:]
                position_ids[r, col : col + n] = np.arange(skip, lens[i])
                seq_row[i], seq_start[i], shared_len[i], own_start[i] = r, start, skip, col
                col += n
        # The padding tail: runs of at most the longest sequence's length, each seeing only
        # itself, so no position exceeds the padded batch's largest (RoPE variants that pick
        # their frequencies from the largest position, Phi-3's LongRoPE and "dynamic", then
        # see the same batch as padded).
        for start in range(col, width, max(lens)):
            run = min(max(lens), width - start)
            position_ids[r, start : start + run] = np.arange(run)
    out = Rows(
        input_ids=torch.from_numpy(input_ids),
        seq_row=torch.from_numpy(seq_row),
        seq_start=torch.from_numpy(seq_start),
        seq_len=torch.as_tensor(lens, dtype=torch.long),
        position_ids=torch.from_numpy(position_ids),
    )
    if shared_len.any():
        out.shared_len, out.own_start = torch.from_numpy(shared_len), torch.from_numpy(own_start)
    return out


def _fitted_width(lengths: Sequence[int], rows: int) -> int:
    """The narrowest width (grown in 1 % steps from total / rows) that first-fit decreasing
    packs into `rows` rows."""
    width = max(max(lengths), math.ceil(sum(lengths) / rows))
    while len(first_fit_decreasing(lengths, width)) > rows:
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
        fed = len(first_fit_decreasing(lengths, width)) * width
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


@dataclass
class LayoutScores:
    scores: torch.Tensor  # [R, T, 1] score at every position of the rows (padding included)
    end_scores: torch.Tensor  # [N, 1] score at each sequence's last token, in `seqs` order
    end_hidden: torch.Tensor  # [N, H]


def sequence_scores(scores: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
    """Per-token scores of each sequence, `[len_i, 1]`, in `seqs` order (a shared prefix in
    every sequence that reads it)."""
    index, _ = rows.token_index()
    flat = scores.flatten(0, 1)
    return [flat[index[i, :n]] for i, n in enumerate(rows.seq_len.tolist())]


def packed_forward(backbone: nn.Module, rows: Rows) -> torch.Tensor:
    """Last hidden state `[R, T, H]` of a transformers decoder (`LlamaModel`) on packed rows,
    attention confined to each sequence (see the module docstring for why these arguments)."""
    impl = str(getattr(backbone.config, "_attn_implementation", "eager"))
    n_rows = rows.input_ids.size(0)
    if impl not in _MASK_IMPLEMENTATIONS and not (n_rows == 1 and "flash" in impl):
        raise ValueError(
            f"packed_forward: attention {impl!r} with {n_rows} rows would attend across "
            f"sequences; use one of {_MASK_IMPLEMENTATIONS} or a flash implementation with one row"
        )
    assert rows.position_ids is not None, "packed rows are needed"
    device = next(backbone.parameters()).device
    out: Any = backbone(
        input_ids=rows.input_ids.to(device),
        position_ids=rows.position_ids.to(device),
        attention_mask=None,  # a 2-D mask (even all ones) disables packed-sequence detection
        use_cache=False,  # a cache (config default use_cache=True) disables it too
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _scores_at(model: nn.Module, hidden: torch.Tensor, rows: Rows) -> LayoutScores:
    scores: torch.Tensor = model.get_submodule("score")(hidden)
    r, e = rows.seq_row.to(hidden.device), rows.seq_end.to(hidden.device)
    return LayoutScores(scores=scores, end_scores=scores[r, e], end_hidden=hidden[r, e])


def packed_scores(model: nn.Module, rows: Rows) -> LayoutScores:
    """Scores of a `*ForSequenceClassification`-shaped model (`model.model`, `model.score`) at
    every packed position and at each sequence's last token."""
    return _scores_at(model, packed_forward(model.get_submodule("model"), rows), rows)


def padded_scores(
    model: nn.Module, seqs: Sequence[Sequence[int]], pad_token_id: int = 0
) -> LayoutScores:
    """The padded reference: right-padded `[N, L]` batch with an attention mask, positions counted
    over real tokens, end score at the last real token. `scores` is `[N, L, 1]`."""
    rows = pad_sequences(seqs, pad_token_id)
    assert rows.attention_mask is not None
    device = next(model.parameters()).device
    ids, mask = rows.input_ids.to(device), rows.attention_mask.to(device)
    out: Any = model.get_submodule("model")(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
    )
    return _scores_at(model, out.last_hidden_state, rows)
