"""Attention over packed rows that computes only what the mask keeps.

Packed rows (:class:`rmtrain.packing.Rows`) hold many sequences, and with prefix sharing a
segment `[shared prefix][first member's rest][second member's rest]...` whose members all read
the prefix. Which token may attend to which is a function of per-token ids
(:func:`token_layout`): token q attends token k iff both are in the same segment, k is not after
q, k is in the prefix or on q's own branch, and (sliding-window layers) q's position minus k's
is below the window. The kernels below compute exactly that attention; they differ in what they
cost and where they run (`KERNELS`):

* ``segments`` (sdpa / eager, any device; the default for packed training): the attention of
  every sequence is computed on its own tokens only. A sequence that owns its tokens is a square
  causal unit; a member of a shared segment is a rectangular unit, its own tokens as queries
  and the prefix + its own tokens as keys. Units of similar size are gathered from the rows into
  a few padded batches (:func:`segment_plan`) and run through `scaled_dot_product_attention`
  (or the eager formula where soft-capping needs it), and the outputs are scattered back. So no
  work is spent on the cross-sequence blocks of a row, which the dense masks below compute and
  then throw away. It is registered with transformers as the attention implementation
  ``rmtrain_sdpa`` / ``rmtrain_eager`` (:func:`install`); the model receives the plan as the
  ``rmtrain_segments`` keyword, which transformers passes through to every attention call.
* ``dense``: the same mask as a 4D tensor, which transformers' `create_causal_mask` takes as
  is (`_preprocess_mask_arguments`: a 4D mask is "already prepared, or custom"): bool for sdpa,
  additive float for eager, one per layer type (a dict) for models with sliding-window layers.
  O(T^2) per row; the reference the tests compare the others with.
* ``flex``: a FlexAttention `BlockMask` from the same ids: block-sparse, so masked blocks cost
  nothing. torch 2.13 runs FlexAttention's backward only on GPU ("FlexAttention does not
  support backward on CPU"), so on CPU it serves no-grad scoring only.
* ``varlen``: flash-attention's varlen path, which transformers derives from `position_ids` in
  ONE row; it cannot express a shared prefix (a member must see the prefix but not the
  members before it), so prefix sharing refuses it (:func:`check_kernel`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rmtrain.packing import Rows

KERNELS = ("segments", "dense", "flex", "varlen")
SEGMENT_IMPLEMENTATIONS = {"rmtrain_sdpa": "sdpa", "rmtrain_eager": "eager"}
# One gathered batch costs about this much beyond its attention work, in units of one query x
# key score (dispatch, gathers, the scatter back); it decides how finely units are grouped.
GROUP_OVERHEAD = 4096.0
# Queries per piece of a long unit (see segment_plan).
QUERY_CHUNK = 128


def kernel_for(impl: str) -> str:
    """The kernel packed rows use with attention implementation `impl`."""
    impl = SEGMENT_IMPLEMENTATIONS.get(impl, impl)
    if impl in ("sdpa", "eager"):
        return "segments"
    if impl == "flex_attention":
        return "flex"
    if "flash" in impl:
        return "varlen"
    raise ValueError(f"packed rows: no attention kernel for implementation {impl!r}")


def check_kernel(kernel: str, shares_prefixes: bool) -> None:
    """One clear error where a kernel cannot express the mask."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    if shares_prefixes and kernel == "varlen":
        raise ValueError(
            "prefix sharing needs a mask flash-attention's varlen path cannot express (a member "
            "of a segment sees the shared prefix but not the members before it); use "
            "model.attn_implementation=sdpa, eager or flex_attention, or trainer.prefix_sharing"
            "=false"
        )


# ---------------------------------------------------------------------------------------------
# the mask, as per-token ids


@dataclass
class TokenLayout:
    """Per-token ids `[R, T]` that say who attends to whom (see the module docstring)."""

    segment: torch.Tensor  # same segment (a row's padding tokens: a segment each)
    branch: torch.Tensor  # 0: a shared prefix (seen by every member); else its sequence + 1
    position: torch.Tensor  # position id (sliding windows count positions)


def token_layout(rows: Rows) -> TokenLayout:
    """The ids of packed rows: each token's segment, branch and position."""
    assert rows.position_ids is not None, "packed rows are needed"
    n_rows, width = rows.input_ids.shape
    segment = -1 - np.arange(n_rows * width, dtype=np.int64)  # padding: a segment per token
    branch = np.zeros(n_rows * width, dtype=np.int64)
    shared, own = (x.numpy() for x in rows.spans())
    row, start, length = rows.seq_row.numpy(), rows.seq_start.numpy(), rows.seq_len.numpy()
    base = row * width
    for i in range(len(length)):
        own_cols = slice(base[i] + own[i], base[i] + own[i] + length[i] - shared[i])
        segment[own_cols] = base[i] + start[i]
        branch[own_cols] = i + 1
    for j in np.flatnonzero(shared > 0).tolist():  # the prefix its segment's owner computes
        prefix = slice(base[j] + start[j], base[j] + start[j] + shared[j])
        segment[prefix] = base[j] + start[j]
        branch[prefix] = 0
    return TokenLayout(
        torch.from_numpy(segment).view(n_rows, width),
        torch.from_numpy(branch).view(n_rows, width),
        rows.position_ids,
    )


def allowed(ids: TokenLayout, b: Any, q: Any, k: Any, window: int | None = None) -> torch.Tensor:
    """Whether query token q may attend key token k in row b (tensors broadcast): the one rule
    every kernel implements."""
    seg, br, pos = ids.segment, ids.branch, ids.position
    ok = (seg[b, q] == seg[b, k]) & (k <= q) & ((br[b, k] == 0) | (br[b, k] == br[b, q]))
    if window is not None:
        ok = ok & (pos[b, q] - pos[b, k] < window)
    return ok


def dense_mask(ids: TokenLayout, window: int | None = None) -> torch.Tensor:
    """`[R, 1, T, T]` bool: the mask materialised (the dense kernel and the tests' reference)."""
    n_rows, width = ids.segment.shape
    b = torch.arange(n_rows)[:, None, None]
    t = torch.arange(width)
    return allowed(ids, b, t[None, :, None], t[None, None, :], window)[:, None]


def window_masks(config: Any, make: Callable[[int | None], Any]) -> Any:
    """What a decoder takes as a custom `attention_mask`: one mask for all layers, or a dict per
    layer type for models with sliding-window layers (`config.layer_types`)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if "sliding_attention" in layer_types:
        return {"full_attention": make(None), "sliding_attention": make(window)}
    return make(window)  # Mistral-style: every layer slides when sliding_window is set


# ---------------------------------------------------------------------------------------------
# the segments kernel


@dataclass
class UnitBatch:
    """Units of similar size gathered into one padded batch for one attention call."""

    q_index: torch.Tensor  # [g, Sq] flat token index of each query (padding: 0)
    k_index: torch.Tensor  # [g, Sk] flat token index of each key (padding: 0)
    q_pos: torch.Tensor  # [g, Sq] each query's index among its unit's keys (padding: 0)
    k_len: torch.Tensor  # [g] real keys of each unit
    square: bool  # queries == keys (causal); else a member's own tokens vs prefix + own
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, window: int | None) -> torch.Tensor:
        """`[g, 1, Sq, Sk]` bool: causal from each query's place among its keys, real keys
        only, within the window (cached per window: every layer of a forward reuses it)."""
        if window not in self._masks:
            k = torch.arange(self.k_index.size(1), device=self.k_index.device)
            q = self.q_pos[:, :, None]
            ok = (k <= q) & (k < self.k_len[:, None, None])
            if window is not None:
                ok = ok & (q - k < window)
            self._masks[window] = ok[:, None]
        return self._masks[window]

    def to(self, device: torch.device) -> UnitBatch:
        q_index, k_index, q_pos, k_len = (
            x.to(device) for x in (self.q_index, self.k_index, self.q_pos, self.k_len)
        )
        return UnitBatch(q_index, k_index, q_pos, k_len, self.square)


@dataclass
class SegmentPlan:
    """How the segments kernel computes one forward's attention: its unit batches, and for
    every token of the rows where its output is (`out_index` into the batches' queries,
    concatenated, plus one zero row for tokens no sequence owns: row padding)."""

    batches: list[UnitBatch]
    out_index: torch.Tensor  # [R * T]
    shape: tuple[int, int]  # (R, T)
    q_all: torch.Tensor = field(init=False)  # every batch's query index, flattened, in order
    k_all: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        # One gather for all batches (and so one scatter-add in the backward pass), not one per
        # batch: each would zero-fill a gradient the size of the whole rows.
        self.q_all = torch.cat([b.q_index.reshape(-1) for b in self.batches])
        self.k_all = torch.cat([b.k_index.reshape(-1) for b in self.batches])

    def to(self, device: torch.device) -> SegmentPlan:
        if self.out_index.device == device:
            return self
        return SegmentPlan([b.to(device) for b in self.batches], self.out_index.to(device),
                           self.shape)  # fmt: skip

    @property
    def scores(self) -> int:
        """Query x key scores computed per head (padding included): the kernel's work."""
        return sum(b.q_index.numel() * b.k_index.size(1) for b in self.batches)


def _groups(costs_key: list[tuple[int, int]], overhead: float) -> list[tuple[int, int]]:
    """Contiguous groups of units sorted by keys, descending: `costs_key[i]` = (queries, keys);
    a group pays its size x its most queries x its most keys, plus `overhead`. Exact dynamic
    programme over the sorted order (a few dozen units per micro-batch)."""
    n = len(costs_key)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        most_q = 0
        for start in range(end - 1, -1, -1):
            most_q = max(most_q, costs_key[start][0])
            cost = best[start] + (end - start) * most_q * costs_key[start][1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], n
    while end:
        out.append((cut[end], end))
        end = cut[end]
    return out[::-1]


def segment_plan(
    rows: Rows, overhead: float = GROUP_OVERHEAD, chunk: int = QUERY_CHUNK
) -> SegmentPlan:
    """The unit batches of packed rows (see the module docstring). A sequence's own tokens are
    its queries and the prefix it reads plus its own tokens its keys; its queries are cut into
    pieces of about `chunk`, each attending only to the keys up to its last query (so a causal
    unit skips most of its upper triangle: CPU sdpa skips it only in blocks of 512 keys)."""
    n_rows, width = rows.input_ids.shape
    shared, own = (x.numpy() for x in rows.spans())
    row, start, length = rows.seq_row.numpy(), rows.seq_start.numpy(), rows.seq_len.numpy()
    base = row * width
    units: list[tuple[np.ndarray, np.ndarray, int]] = []  # (queries, keys, first query's key)
    for i in range(len(length)):
        mine = base[i] + own[i] + np.arange(length[i] - shared[i])
        keys = np.concatenate([base[i] + start[i] + np.arange(shared[i]), mine])
        first = 0
        while first < len(mine):
            last = len(mine) if len(mine) - first < chunk + chunk // 2 else first + chunk
            units.append((mine[first:last], keys[: shared[i] + last], int(shared[i]) + first))
            first = last

    out_index = np.full(n_rows * width, -1, dtype=np.int64)
    batches: list[UnitBatch] = []
    offset = 0
    for square in (True, False):  # square: plain causal, no mask
        chosen = [u for u in units if (u[2] == 0) == square]
        chosen.sort(key=lambda u: (-len(u[1]), -len(u[0])))
        for lo, hi in _groups([(len(q), len(k)) for q, k, _ in chosen], overhead):
            group = chosen[lo:hi]
            n_q = max(len(q) for q, _, _ in group)
            n_k = max(len(k) for _, k, _ in group)
            q_index = np.zeros((len(group), n_q), dtype=np.int64)
            k_index = np.zeros((len(group), n_k), dtype=np.int64)
            q_pos = np.zeros((len(group), n_q), dtype=np.int64)
            for j, (q, k, first) in enumerate(group):
                q_index[j, : len(q)], k_index[j, : len(k)] = q, k
                q_pos[j, : len(q)] = first + np.arange(len(q))
                out_index[q] = offset + j * n_q + np.arange(len(q))
            k_len = np.array([len(k) for _, k, _ in group], dtype=np.int64)
            q_t, k_t, pos_t, len_t = (torch.from_numpy(x) for x in (q_index, k_index, q_pos, k_len))
            batches.append(UnitBatch(q_t, k_t, pos_t, len_t, square))
            offset += len(group) * n_q
    out_index[out_index < 0] = offset  # the zero row
    return SegmentPlan(batches, torch.from_numpy(out_index), (n_rows, width))


def _math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout: float,
    softcap: float | None,
    training: bool,
) -> torch.Tensor:
    """The eager formula (transformers' `eager_attention_forward`, soft-capping as Gemma 2's),
    with a bool mask: softmax in float32 over the allowed keys."""
    groups = q.size(1) // k.size(1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v)


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    rmtrain_segments: SegmentPlan | None = None,
    math: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (`AttentionInterface`): query `[R, H, T, d]`, key and
    value `[R, KV, T, d]` of packed rows, computed unit batch by unit batch of the plan.
    Returns `[R, T, H, d]` as transformers' own functions do."""
    plan = rmtrain_segments
    if plan is None:
        raise ValueError("segment attention needs the rmtrain_segments plan of the rows")
    for unknown in ("s_aux", "sinks"):
        if kwargs.get(unknown) is not None:
            raise ValueError(f"segment attention does not implement {unknown!r} (attention sinks)")
    n_rows, n_heads, width, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    q = query.transpose(1, 2).reshape(n_rows * width, n_heads, dim)
    k = key.transpose(1, 2).reshape(n_rows * width, key.size(1), dim)
    v = value.transpose(1, 2).reshape(n_rows * width, value.size(1), dim)
    q_all = q.index_select(0, plan.q_all).split([b.q_index.numel() for b in plan.batches])
    k_sizes = [b.k_index.numel() for b in plan.batches]
    k_all = k.index_select(0, plan.k_all).split(k_sizes)
    v_all = v.index_select(0, plan.k_all).split(k_sizes)
    outs = []
    for unit, qu, ku, vu in zip(plan.batches, q_all, k_all, v_all, strict=True):
        qb = qu.view(*unit.q_index.shape, n_heads, dim).transpose(1, 2)  # [g, H, Sq, d]
        kb = ku.view(*unit.k_index.shape, -1, dim).transpose(1, 2)
        vb = vu.view(*unit.k_index.shape, -1, dim).transpose(1, 2)
        causal_only = unit.square and sliding_window is None
        if math or softcap is not None:
            mask = unit.mask(sliding_window)
            out = _math_attention(qb, kb, vb, mask, scaling, dropout, softcap, module.training)
        else:
            out = F.scaled_dot_product_attention(
                qb, kb, vb,
                attn_mask=None if causal_only else unit.mask(sliding_window),
                dropout_p=dropout if module.training else 0.0,
                is_causal=causal_only,
                scale=scaling,
                enable_gqa=kb.size(1) != qb.size(1),
            )  # fmt: skip
        outs.append(out.transpose(1, 2).reshape(-1, n_heads, dim))
    outs.append(q.new_zeros(1, n_heads, dim))
    flat = torch.cat(outs).index_select(0, plan.out_index)
    return flat.view(n_rows, width, n_heads, dim), None


# ---------------------------------------------------------------------------------------------
# transformers integration


def _delegate(base: str) -> Callable[..., Any]:
    """The attention function of implementation `name`: the segments kernel when the call
    carries a plan, else the base implementation on the mask transformers built."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:  # fmt: skip
        if kwargs.get("rmtrain_segments") is not None:
            return segment_attention(module, query, key, value, attention_mask,
                                     math=base == "eager", **kwargs)  # fmt: skip
        kwargs.pop("rmtrain_segments", None)
        if base == "sdpa" and kwargs.get("softcap") is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _eager(module, query, key, value, attention_mask, **kwargs)

    return attention


def _eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention on a transformers-built additive mask (the padded path)."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    groups = query.size(1) // key.size(1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.size(-2)]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    base_masks: dict[str, Callable[..., Any]] = {"sdpa": sdpa_mask, "eager": eager_mask}
    for name, base in SEGMENT_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _delegate(base))
        AttentionMaskInterface.register(name, _mask_or_none(base_masks[base]))


def _mask_or_none(base: Callable[..., Any]) -> Callable[..., Any]:
    """The base implementation's mask builder, except for packed rows, which come with a plan
    and need no mask (no 2-D padding mask means packed rows: the only unpadded input rmtrain
    gives the model), so none is built."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("attention_mask") is None:
            return None
        return base(*args, **kwargs)

    return mask


def install(config: Any) -> None:
    """Make a model whose attention implementation is sdpa or eager use the segments kernel on
    packed rows (and its base implementation, unchanged, on padded ones). The setting lives on
    the model's config object, which every attention layer reads at each call (so gradient
    checkpointing's recomputation uses it too); transformers does not save it with the config."""
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    if impl in SEGMENT_IMPLEMENTATIONS:
        return
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"the segments kernel runs on sdpa or eager attention, not {impl!r}")
    _register()
    config._attn_implementation = f"rmtrain_{impl}"


def base_implementation(config: Any) -> str:
    """The attention implementation a model was built with (before :func:`install`)."""
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    return SEGMENT_IMPLEMENTATIONS.get(impl, impl)


# ---------------------------------------------------------------------------------------------
# what the model's forward receives


@dataclass
class PackedAttention:
    """How the decoder attends on packed rows: the kernel and what it needs, built once per
    micro-batch on the host. `decoder_kwargs` is what the score model adds to its decoder call."""

    kernel: str
    ids: TokenLayout | None = None  # dense / flex
    plan: SegmentPlan | None = None  # segments

    @classmethod
    def build(cls, rows: Rows, kernel: str) -> PackedAttention:
        check_kernel(kernel, rows.shares_prefixes)
        if kernel == "segments":
            return cls(kernel, plan=segment_plan(rows))
        if kernel in ("dense", "flex"):
            return cls(kernel, ids=token_layout(rows))
        if rows.input_ids.size(0) > 1:
            raise ValueError("flash-attention's varlen path sees packed sequences only in ONE row")
        return cls(kernel)

    def to(self, device: torch.device) -> PackedAttention:
        """On `device` (the engine moves every model input there)."""
        if self.plan is not None:
            return PackedAttention(self.kernel, plan=self.plan.to(device))
        if self.ids is not None:
            ids = TokenLayout(*(x.to(device) for x in (self.ids.segment, self.ids.branch,
                                                        self.ids.position)))  # fmt: skip
            return PackedAttention(self.kernel, ids=ids)
        return self

    def decoder_kwargs(
        self, config: Any, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        if self.kernel == "segments":
            assert self.plan is not None
            install(config)  # without it, sdpa would ignore the plan and attend across rows
            return {"attention_mask": None, "rmtrain_segments": self.plan.to(device)}
        if self.kernel == "varlen":
            return {"attention_mask": None}
        assert self.ids is not None
        ids = TokenLayout(*(x.to(device) for x in (self.ids.segment, self.ids.branch,
                                                    self.ids.position)))  # fmt: skip
        if self.kernel == "flex":
            return {"attention_mask": window_masks(config, functools.partial(_block_mask, ids))}
        eager = base_implementation(config) == "eager"

        def make(window: int | None) -> torch.Tensor:
            mask = dense_mask(ids, window)
            if not eager:
                return mask
            zero = torch.zeros((), dtype=dtype, device=device)
            return torch.where(mask, zero, torch.finfo(zero.dtype).min)

        return {"attention_mask": window_masks(config, make)}


def _block_mask(ids: TokenLayout, window: int | None) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return allowed(ids, b, q, k, window)

    n_rows, width = ids.segment.shape
    return create_block_mask(mask_mod, B=n_rows, H=None, Q_LEN=width, KV_LEN=width,
                             device=ids.segment.device)  # fmt: skip
