"""Packed attention that computes only what the mask keeps, and prefix sharing (issue 20).

Independent facts the kernels are checked against: a per-query attention written out from the
sequences alone (which tokens a sequence has, in order); transformers' own padded forward (one
sequence per row, its attention mask); and a hand-written mask of a small layout."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_score_config, varied_labels

from rmtrain import attention
from rmtrain.batch import Layout, collate, pair_scores
from rmtrain.config import ConfigError, LossConfig, TrainerConfig, to_config
from rmtrain.data.table import PairTable
from rmtrain.losses import PairLoss
from rmtrain.model import LlamaScoreModel
from rmtrain.packing import Rows, pack_sequences, pad_sequences

H, KV, D = 4, 2, 8


def rand_ids(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(4, 300, (n,), generator=gen).tolist()


def shared_family(gen: torch.Generator, prefix: int, rests: list[int]) -> list[list[int]]:
    """Sequences with a common prefix of `prefix` tokens and rests of the given lengths."""
    p = rand_ids(prefix, gen)
    return [p + rand_ids(n, gen) for n in rests]


def example_rows(long: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Sequences and the groups that share: a pair, a pair whose chosen side is a strict prefix
    of its rejected side, a group of three, a pair with too little in common to share, and a
    sequence alone."""
    gen = torch.Generator().manual_seed(0)
    scale = 6 if long else 1
    seqs = shared_family(gen, 20 * scale, [7 * scale, 12 * scale])  # 0, 1
    base = rand_ids(18, gen)
    seqs += [base, base + rand_ids(5, gen)]  # 2, 3: 2 is a strict prefix of 3
    seqs += shared_family(gen, 17, [3, 9 * scale, 1])  # 4, 5, 6
    seqs += shared_family(gen, 2, [9, 11])  # 7, 8: 2 tokens in common (below min_shared)
    seqs += [rand_ids(13 * scale, gen)]  # 9
    return seqs, [[0, 1], [2, 3], [4, 5, 6], [7, 8]]


def reference_attention(
    rows: Rows,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention written out query by query from the sequences alone: the j-th token of a
    sequence attends to its tokens 0..j (those within the window), whatever row columns hold
    them. Returns `[R, T, H, D]`; tokens of no sequence stay 0."""
    index, mask = rows.token_index()
    flat_q = q.transpose(1, 2).flatten(0, 1)  # [R*T, H, D]
    flat_k, flat_v = k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1)
    out = torch.zeros_like(flat_q)
    for s in range(index.size(0)):
        tokens = index[s][mask[s]].tolist()
        for j, t in enumerate(tokens):
            seen = [tokens[i] for i in range(j + 1) if window is None or j - i < window]
            for h in range(H):
                scores = flat_k[seen, h // (H // KV)] @ flat_q[t, h] * D**-0.5
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                weights = torch.softmax(scores, dim=0)
                out[t, h] = weights @ flat_v[seen, h // (H // KV)]
    return out.view(rows.input_ids.size(0), -1, H, D)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to fp32 round-off relative to the tensor's scale (gradients summed in another
    order differ by a few ulps of their largest elements, not of each element)."""
    err = float((got - want).abs().max())
    assert err <= 1e-5 * float(want.abs().max()) + 1e-7, f"{what}: max |diff| {err}"


class _Module(torch.nn.Module):
    pass


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize(("math_path", "window", "softcap"),
                         [(False, None, None), (True, None, None), (False, 9, None),
                          (True, 9, 5.0), (False, None, 5.0)])  # fmt: skip
def test_segment_kernel_equals_attention_written_out(
    share: bool, math_path: bool, window: int | None, softcap: float | None
) -> None:
    """The segments kernel (sdpa or the eager formula, sliding windows counting positions,
    Gemma-2-style soft-capping, grouped-query heads, queries cut into pieces) computes exactly
    each sequence's own causal attention, a shared prefix included."""
    seqs, groups = example_rows()
    rows = pack_sequences(seqs, groups=groups if share else (), min_shared=4)
    assert rows.shares_prefixes == share
    n_rows, width = rows.input_ids.shape
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n_rows, H, width, D, generator=gen, requires_grad=True)
    k = torch.randn(n_rows, KV, width, D, generator=gen, requires_grad=True)
    v = torch.randn(n_rows, KV, width, D, generator=gen, requires_grad=True)
    plan = attention.segment_plan(rows, chunk=6)  # pieces of 6 queries: every unit is cut
    assert any(not b.square for b in plan.batches)
    got, _ = attention.segment_attention(_Module(), q, k, v, None, scaling=D**-0.5,
                                         sliding_window=window, softcap=softcap,
                                         rmtrain_segments=plan, math=math_path)  # fmt: skip
    want = reference_attention(rows, q, k, v, window, softcap)
    owned = torch.zeros(n_rows * width, dtype=torch.bool)
    index, mask = rows.token_index()
    owned[index[mask]] = True
    torch.testing.assert_close(got.flatten(0, 1)[owned], want.flatten(0, 1)[owned],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    grads = torch.autograd.grad(got.flatten(0, 1)[owned].square().sum(), (q, k, v))
    refs = torch.autograd.grad(want.flatten(0, 1)[owned].square().sum(), (q, k, v))
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_and_block_masks_are_the_rule_written_by_hand() -> None:
    """Three sequences [5, 6, 7, 8] and [5, 6, 7, 9, 9] sharing [5, 6, 7], then [4, 4]:
    one segment [5 6 7 8 | 9 9] (the second reads the prefix, not the first one's 8) and one of
    its own. The dense mask, FlexAttention's block mask and the per-token ids say the same."""
    rows = pack_sequences([[5, 6, 7, 8], [5, 6, 7, 9, 9], [4, 4]], groups=[[0, 1]], min_shared=2)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 9, 4, 4]]
    assert rows.position_ids is not None
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 0, 1]]
    x = 1
    want = torch.tensor([
        [x, 0, 0, 0, 0, 0, 0, 0],
        [x, x, 0, 0, 0, 0, 0, 0],
        [x, x, x, 0, 0, 0, 0, 0],
        [x, x, x, x, 0, 0, 0, 0],  # the first sequence's own token
        [x, x, x, 0, x, 0, 0, 0],  # the second's: the prefix and itself, not the first's 8
        [x, x, x, 0, x, x, 0, 0],
        [0, 0, 0, 0, 0, 0, x, 0],
        [0, 0, 0, 0, 0, 0, x, x],
    ], dtype=torch.bool)  # fmt: skip
    ids = attention.token_layout(rows)
    assert torch.equal(attention.dense_mask(ids)[0, 0], want)
    window = attention.dense_mask(ids, window=2)[0, 0]
    assert torch.equal(window, want & (rows.position_ids[0][:, None] - rows.position_ids[0] < 2))
    assert window[5].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]  # its positions 3 and 4 only
    from torch.nn.attention.flex_attention import create_mask

    block = attention._block_mask(ids, None)
    assert torch.equal(create_mask(block.mask_mod, 1, None, 8, 8, device="cpu")[0, 0], want)


def tiny_model(impl: str, seed: int = 0) -> LlamaScoreModel:
    torch.manual_seed(seed)
    config = tiny_score_config(320, hidden=64, pad_token_id=0)
    config.num_labels = 1
    config._attn_implementation = impl
    model = LlamaScoreModel(config).float()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores of a useful size
    return model.train()


def padded_reference(
    model: LlamaScoreModel, seqs: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token scores [N, L], end scores [N]) of the sequences right-padded, one per row,
    through transformers' own masked forward."""
    rows = pad_sequences(seqs, 0, "right")
    out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    return out.scores.squeeze(-1), out.end_scores.squeeze(-1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kernel", ["segments", "dense"])
def test_shared_segments_score_like_the_sequences_alone(impl: str, kernel: str) -> None:
    """Per-token and end scores of every sequence of shared segments (and their gradients)
    equal those of the sequences scored alone, padded, by transformers."""
    seqs, groups = example_rows(long=True)
    model = tiny_model(impl)
    want_tokens, want_end = padded_reference(model, seqs)
    real = pad_sequences(seqs, 0, "right").attention_mask.bool()
    (want_end.square().sum() + want_tokens[real].square().sum()).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    layout = Layout(packed=True, pad_token_id=0, kernel=kernel, share_prefixes=True, min_shared=4,
                    token_cost=64.0)  # fmt: skip
    rows = layout.rows(seqs, groups)
    assert rows.computed_tokens < rows.real_tokens == sum(map(len, seqs))
    packed = attention.PackedAttention.build(rows, kernel)
    out = model(**rows.model_inputs(), attention=packed)
    tokens, mask = rows.per_sequence(out.scores.squeeze(-1))
    end = out.end_scores.squeeze(-1)
    torch.testing.assert_close(end, want_end, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, real)
    torch.testing.assert_close(tokens[mask], want_tokens[mask], rtol=1e-5, atol=1e-5)
    (end.square().sum() + tokens[mask].square().sum()).backward()
    for name, p in model.named_parameters():
        assert_close_to_scale(p.grad, want_grads[name], name)


def _table(groups: bool) -> tuple[PairTable, list[int]]:
    """Pairs sharing a prompt, and one row with 3 ranked responses (its 3 ordered pairs)."""
    gen = torch.Generator().manual_seed(5)
    chosen, rejected, rows = [], [], []
    for row in range(4):
        c, r = shared_family(gen, 18 + row, [4 + row, 9])
        chosen.append(c)
        rejected.append(r)
        rows.append(row)
    a, b, c = shared_family(gen, 25, [6, 3, 8])  # ranked a > b > c
    for x, y in ((a, b), (a, c), (b, c)):
        chosen.append(x)
        rejected.append(y)
        rows.append(4)
    n = len(chosen)
    labels = varied_labels(n)
    table = PairTable.from_lists(chosen, rejected, labels, ["{}"] * n, rows if groups else None)
    return table, rows


def test_a_row_of_k_responses_is_stored_once() -> None:
    table, _ = _table(groups=True)
    plain, _ = _table(groups=False)
    assert table.pair_seqs is not None and plain.pair_seqs is None
    assert len(table.offsets) - 1 == 4 * 2 + 3  # the row's 3 responses once, not 6 sequences
    assert [r["chosen_input_ids"] for r in table] == [r["chosen_input_ids"] for r in plain]
    assert table.group_ids().tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert list(table.select([6, 4]).compact()) == list(plain.select([6, 4]))
    both = PairTable.concat([table.select([5, 6]), table.select([0])])
    assert list(both) == [table[5], table[6], table[0]]
    assert both.group_ids().tolist()[0] == both.group_ids().tolist()[1] != both.group_ids()[2]


@pytest.mark.parametrize(
    ("loss", "objective"), [("bt", "reward"), ("bt_tokenwise", "reward"), ("margin", "cost")]
)
def test_shared_batches_give_the_padded_losses_and_gradients(loss: str, objective: str) -> None:
    """The one batch path with prefix sharing: a pair per segment, and a row of 3 responses as
    ONE segment (prompt once, each response once) train exactly as the same pairs padded."""
    grouped, _ = _table(groups=True)
    plain, _ = _table(groups=False)
    indices = [0, 4, 5, 6, 2]
    got = {}
    for name, table, layout in (
        ("padded", plain, Layout(packed=False, pad_token_id=0, padding_side="left")),
        ("shared", grouped, Layout(packed=True, pad_token_id=0, share_prefixes=True,
                                   min_shared=4)),
    ):  # fmt: skip
        model = tiny_model("sdpa")
        pair_loss = PairLoss(LossConfig(name=loss, score_reg=0.01), objective, per_pair_margin=True)
        batch = collate(table, indices, layout)
        if name == "shared":  # the row's 3 pairs: its 3 responses in one segment
            assert len(batch.rows.seq_len) == 2 * 2 + 3
            shared, _ = batch.rows.spans()
            assert int((shared > 0).sum()) == 2 + 2
        out = model(**batch.model_inputs())
        scores = pair_scores(batch, out, pair_loss.needs_token_scores)
        total, terms = pair_loss(scores, batch.labels)
        total.sum().backward()
        got[name] = (
            {"total": total, "chosen": scores.chosen, "rejected": scores.rejected, **terms},
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
        assert int(batch.pair_lengths().sum()) == sum(map(len, plain.sequences(indices)))
    (sv, sg), (pv, pg) = got["shared"], got["padded"]
    for key in pv:
        torch.testing.assert_close(sv[key], pv[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in pg:
        assert_close_to_scale(sg[key], pg[key], key)


def test_kernels_that_cannot_express_the_mask_are_refused() -> None:
    config = tiny_score_config(320)
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prefix sharing needs a mask flash-attention"):
        Layout.for_model(config, packed=True, padding_side="right", share_prefixes=True)
    with pytest.raises(ConfigError, match=r"prefix_sharing=true needs trainer\.packing=true"):
        TrainerConfig(prefix_sharing=True)
    with pytest.raises(ConfigError, match="flash-attention's varlen path cannot"):
        to_config({"model": {"name_or_path": "tiny", "attn_implementation": "flash_attention_2"},
                   "trainer": {"packing": True, "prefix_sharing": True}})  # fmt: skip
    config._attn_implementation = "sdpa"
    layout = Layout.for_model(config, packed=True, padding_side="right", share_prefixes=True)
    assert layout.kernel == "segments" and config._attn_implementation == "rmtrain_sdpa"
    assert "rmtrain_sdpa" not in config.to_json_string()  # exports keep the user's choice


def test_padded_input_on_an_installed_model_is_plain_sdpa() -> None:
    """A model switched to the segments kernel scores padded input exactly as before."""
    seqs, _ = example_rows()
    model = tiny_model("sdpa").eval()
    with torch.no_grad():
        before = padded_reference(model, seqs)[1]
        attention.install(model.config)
        after = padded_reference(model, seqs)[1]
    assert model.config._attn_implementation == "rmtrain_sdpa"
    assert torch.equal(before, after)


def test_pieces_skip_most_of_the_upper_triangle() -> None:
    """What the kernel computes, in query x key scores per head: the sum of the sequences' own
    causal blocks plus the queries of a piece, not a row's [T, T]."""
    lengths = [300, 40, 170, 90]
    rows = pack_sequences([[1] * n for n in lengths])
    plan = attention.segment_plan(rows, overhead=0.0, chunk=32)
    causal = sum(n * (n + 1) / 2 for n in lengths)
    assert causal <= plan.scores < 1.2 * causal
    assert plan.scores < 0.25 * rows.fed_tokens**2
    whole = attention.segment_plan(rows, overhead=0.0, chunk=10**6)
    assert whole.scores == sum(n * n for n in lengths)


def test_min_shared_leaves_short_prefixes_unshared() -> None:
    seqs, groups = example_rows()
    rows = pack_sequences(seqs, groups=groups, min_shared=4)
    shared, _ = rows.spans()
    # the shortest member of a group owns the prefix (2 of [2, 3], 6 of [4, 5, 6]); 7 and 8
    # have only 2 tokens in common
    assert shared.tolist() == [0, 20, 0, 18, 17, 17, 0, 0, 0, 0]
    assert math.isclose(rows.computed_tokens, rows.real_tokens - (20 + 18 + 34))
    unshared = dataclasses.replace(Layout(packed=True, pad_token_id=0), share_prefixes=False)
    assert not unshared.rows(seqs, groups).shares_prefixes
    assert np.array_equal(rows.seq_len.numpy(), [len(s) for s in seqs])


@pytest.mark.slow
def test_flex_attention_block_mask_scores_like_the_sequences_alone() -> None:
    """The GPU kernel's path, run where it runs here (no-grad: torch 2.13's FlexAttention has no
    CPU backward): a BlockMask from segment and branch ids through transformers'
    flex_attention gives the padded scores. ~20 s: transformers compiles flex_attention."""
    seqs, groups = example_rows()
    with torch.no_grad():
        want_end = padded_reference(tiny_model("sdpa").eval(), seqs)[1]
        layout = Layout(packed=True, pad_token_id=0, kernel="flex", share_prefixes=True,
                        min_shared=4)  # fmt: skip
        rows = layout.rows(seqs, groups)
        assert rows.shares_prefixes and rows.input_ids.size(0) == 1
        flex = attention.PackedAttention.build(rows, "flex")
        out = tiny_model("flex_attention").eval()(**rows.model_inputs(), attention=flex)
    torch.testing.assert_close(out.end_scores.squeeze(-1), want_end, rtol=1e-5, atol=1e-5)


def _backbone(kind: str) -> torch.nn.Module:
    """A tiny transformers sequence classifier of an architecture with sliding-window layers
    (Mistral: every layer; Qwen2: the layers above max_window_layers; Gemma 2: every other one,
    plus attention-logit soft-capping, which only its eager attention applies)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )  # fmt: skip

    shape = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "pad_token_id": 0, "num_labels": 1}  # fmt: skip
    torch.manual_seed(0)
    if kind == "mistral":
        model: Any = MistralForSequenceClassification(
            MistralConfig(**shape, sliding_window=12, attn_implementation="sdpa"))  # fmt: skip
    elif kind == "qwen2":
        model = Qwen2ForSequenceClassification(Qwen2Config(
            **shape, use_sliding_window=True, sliding_window=12, max_window_layers=1,
            attn_implementation="sdpa"))  # fmt: skip
    else:
        model = Gemma2ForSequenceClassification(Gemma2Config(
            **shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
            attn_logit_softcapping=2.0, attn_implementation="eager"))  # fmt: skip
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.float().eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma2"])
@pytest.mark.parametrize("kernel", ["segments", "dense"])
def test_sliding_windows_and_soft_capping_with_shared_prefixes(kind: str, kernel: str) -> None:
    """Shared segments on real transformers architectures whose windows (12 positions, far
    below the 100-200-token sequences) and soft-capping really act: the end scores equal those
    of each sequence alone, padded, through the architecture's own masks and attention."""
    from rmtrain.packing import padded_scores

    seqs, groups = example_rows(long=True)
    model = _backbone(kind)
    with torch.no_grad():
        want = padded_scores(model, seqs).end_scores.squeeze(-1)
        config = model.config
        unwindowed = _backbone(kind)
        unwindowed.config.sliding_window = 4096  # above every sequence
        if kind == "gemma2":
            unwindowed.config.attn_logit_softcapping = None
        assert (padded_scores(unwindowed, seqs).end_scores.squeeze(-1) - want).abs().max() > 1e-3
        rows = Layout(packed=True, pad_token_id=0, kernel=kernel, share_prefixes=True,
                      min_shared=4, token_cost=64.0).rows(seqs, groups)  # fmt: skip
        packed = attention.PackedAttention.build(rows, kernel)
        hidden = model.model(input_ids=rows.input_ids, position_ids=rows.position_ids,
                             use_cache=False, **packed.decoder_kwargs(config, torch.device("cpu"),
                                                                      torch.float32))  # fmt: skip
        got = model.score(hidden.last_hidden_state)[rows.seq_row, rows.seq_end].squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
