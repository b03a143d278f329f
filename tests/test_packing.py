"""Packed (padding-free) scoring equals padded scoring; token-budget grouping of pairs."""

from __future__ import annotations

import pytest
import torch
from conftest import varied_labels
from transformers import LlamaConfig, LlamaForSequenceClassification
from transformers.masking_utils import create_causal_mask

from rmtrain.batching import token_budget_batches, token_budget_steps
from rmtrain.data.table import PairTable
from rmtrain.packing import (
    pack_sequences,
    packed_forward,
    packed_scores,
    padded_scores,
    sequence_scores,
)

IMPLS = ("sdpa", "eager")
LENGTHS = (7, 1, 23, 12, 2, 31, 5, 16)


def tiny_model(impl: str, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        pad_token_id=0,
    )
    config.num_labels = 1
    config._attn_implementation = impl
    model = LlamaForSequenceClassification(config).float()
    # A random head gives scores of a useful size (init std 0.02 makes them tiny).
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.train()


def random_seqs(lengths: tuple[int, ...] = LENGTHS, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1024, (n,), generator=gen).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# layout


def test_pack_one_row_layout() -> None:
    seqs = [[5, 6, 7], [8], [9, 10]]
    p = pack_sequences(seqs)
    assert p.packed and p.attention_mask is None and p.position_ids is not None
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.seq_start.tolist() == [0, 3, 4]
    assert p.seq_end.tolist() == [2, 3, 5]
    assert p.seq_row.tolist() == [0, 0, 0]
    assert p.real_tokens == 6 == p.fed_tokens


def test_pack_rows_first_fit_decreasing_and_padding() -> None:
    seqs = [[1] * 5, [2] * 3, [3] * 4, [4] * 2]
    p = pack_sequences(seqs, max_row_tokens=7, pad_token_id=0, pad_to_multiple_of=4)
    # FFD with capacity 7: [5, 2] and [4, 3]; width 7 rounded up to 8.
    assert p.input_ids.shape == (2, 8) and p.position_ids is not None
    assert p.seq_row.tolist() == [0, 1, 1, 0]
    for i, s in enumerate(seqs):
        r, st, n = (int(x[i]) for x in (p.seq_row, p.seq_start, p.seq_len))
        assert p.input_ids[r, st : st + n].tolist() == s
        assert p.position_ids[r, st : st + n].tolist() == list(range(n))
        assert int(p.seq_end[i]) == st + n - 1
    # Padding tails restart at 0 (their own segment) and are not real tokens.
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 0]
    assert p.position_ids[1].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert p.real_tokens == 14 and p.fed_tokens == 16
    # A sequence longer than max_row_tokens gets a row of its own.
    q = pack_sequences([[1] * 9, [2] * 2], max_row_tokens=4)
    assert q.input_ids.shape == (2, 9) and q.seq_row.tolist() == [0, 1]


def test_pack_rejects_empty() -> None:
    with pytest.raises(ValueError):
        pack_sequences([])
    with pytest.raises(ValueError):
        pack_sequences([[1], []])


# ---------------------------------------------------------------------------------------------
# transformers' own packed-sequence mask


@pytest.mark.parametrize("impl", IMPLS)
def test_transformers_builds_block_diagonal_causal_mask(impl: str) -> None:
    model = tiny_model(impl)
    p = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], max_row_tokens=None)
    embeds = model.model.embed_tokens(p.input_ids)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=None,
        position_ids=p.position_ids,
    )
    assert isinstance(mask, torch.Tensor)
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    expected = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_packing_needs_no_cache_and_no_attention_mask(impl: str) -> None:
    """The pitfalls packed_forward avoids: with the config default use_cache=True (a DynamicCache
    is created) or with an all-ones attention mask, transformers does not detect the packing and
    attention crosses sequences."""
    model = tiny_model(impl).eval()
    seqs = random_seqs((6, 5, 9))
    p = pack_sequences(seqs)
    with torch.no_grad():
        good = packed_forward(model.model, p)
        cached = model.model(input_ids=p.input_ids, position_ids=p.position_ids)
        ones = model.model(
            input_ids=p.input_ids,
            position_ids=p.position_ids,
            attention_mask=torch.ones_like(p.input_ids),
            use_cache=False,
        )
        alone = model.model(input_ids=torch.tensor([seqs[1]]), use_cache=False)
    a, b = 6, 11  # the second sequence
    ref = alone.last_hidden_state[0]
    assert torch.allclose(good[0, a:b], ref, atol=1e-5)
    assert not torch.allclose(cached.last_hidden_state[0, a:b], ref, atol=1e-2)
    assert not torch.allclose(ones.last_hidden_state[0, a:b], ref, atol=1e-2)


def test_flash_with_several_rows_is_refused() -> None:
    model = tiny_model("sdpa")
    model.model.config._attn_implementation = "flash_attention_2"
    p = pack_sequences([[1] * 4, [2] * 4], max_row_tokens=4)
    with pytest.raises(ValueError, match="across sequences"):
        packed_forward(model.model, p)


# ---------------------------------------------------------------------------------------------
# packed == padded (fp32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("max_row_tokens", [None, 40])
def test_packed_scores_equal_padded(impl: str, max_row_tokens: int | None) -> None:
    model = tiny_model(impl)
    seqs = random_seqs()
    packed = pack_sequences(seqs, max_row_tokens=max_row_tokens)
    if max_row_tokens is not None:
        assert packed.input_ids.size(0) > 1
    got = packed_scores(model, packed)
    ref = padded_scores(model, seqs)
    assert got.end_scores.shape == (len(seqs), 1)
    assert torch.allclose(got.end_scores, ref.end_scores, atol=1e-5, rtol=0)
    assert torch.allclose(got.end_hidden, ref.end_hidden, atol=1e-5, rtol=0)
    for i, s in enumerate(sequence_scores(got.scores, packed)):
        assert torch.allclose(s, ref.scores[i, : len(seqs[i])], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_gradients_equal_padded(impl: str) -> None:
    seqs = random_seqs()
    half = len(seqs) // 2

    def grads(packed: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(impl)
        out = (
            packed_scores(model, pack_sequences(seqs, 40)) if packed else padded_scores(model, seqs)
        )
        end = out.end_scores.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(end[:half] - end[half:]).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a, b = grads(True), grads(False)
    assert a.keys() == b.keys() and len(a) == len(list(tiny_model(impl).parameters()))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


# ---------------------------------------------------------------------------------------------
# token budget


def pair_lengths(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(20, 400, (n,), generator=gen) * 2).tolist()


@pytest.mark.parametrize("window", [1024, 37])
def test_token_budget_each_pair_once_within_budget(window: int) -> None:
    lengths = [*pair_lengths(500), 5000, 3000]  # two pairs over the budget
    batches = token_budget_batches(lengths, max_tokens=2048, seed=3, window=window)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        tokens = sum(lengths[i] for i in b)
        assert tokens <= 2048 or len(b) == 1
    assert [500] in batches and [501] in batches
    fill = sum(lengths[:500]) / (2048 * (len(batches) - 2))
    assert fill > 0.9


def test_token_budget_deterministic_and_seeded() -> None:
    lengths = pair_lengths(300)
    a = token_budget_batches(lengths, 1500, seed=7)
    assert a == token_budget_batches(lengths, 1500, seed=7)
    assert a != token_budget_batches(lengths, 1500, seed=8)
    assert a != token_budget_batches(lengths, 1500, seed=7, epoch=1)


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 3), (4, 1)])
def test_token_budget_steps_same_count_and_exact_weights(world: int, accum: int) -> None:
    lengths = pair_lengths(203)
    batches = token_budget_batches(lengths, 1200, seed=0)
    per_rank = [token_budget_steps(batches, world, accum, r) for r in range(world)]
    n_steps = len(per_rank[0])
    assert all(len(s) == n_steps for s in per_rank)
    assert all(len(step) == accum for steps in per_rank for step in steps)
    seen: list[int] = []
    for s in range(n_steps):
        # DeepSpeed: sum of weighted losses / accum, averaged over ranks -> per-pair coefficient.
        coef: dict[int, float] = {}
        for r in range(world):
            for mb in per_rank[r][s]:
                assert len(mb.indices) == len(mb.weights) >= 1
                for i, w in zip(mb.indices, mb.weights, strict=True):
                    if w:
                        coef[i] = coef.get(i, 0.0) + w / (accum * world)
        assert sum(coef.values()) == pytest.approx(1.0)
        assert len(set(coef.values())) == 1  # a plain mean over the step's pairs
        seen += coef
    assert sorted(seen) == list(range(len(lengths)))


# ---------------------------------------------------------------------------------------------
# the trainer's packed path (trainer.packing): same scores, losses and gradients as padded


def _table(n: int = 6, seed: int = 3) -> PairTable:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 40, (2 * n,), generator=gen).tolist()
    seqs = [torch.randint(1, 1024, (k,), generator=gen).tolist() for k in lens]
    labels = varied_labels(n)
    table = PairTable.from_lists(seqs[:n], seqs[n:], labels, ["{}"] * n)
    return table.select([5, 0, 3, 1, 4, 2])  # a selection, as after mixing / shuffling


@pytest.mark.parametrize(
    ("loss", "objective", "impl"),
    [
        ("bt", "reward", "sdpa"),
        ("bt_tokenwise", "reward", "sdpa"),
        ("bt_tokenwise", "reward", "eager"),
        ("bt", "cost", "sdpa"),
        ("margin", "cost", "sdpa"),
    ],
)
def test_packed_batch_gives_the_padded_losses_and_gradients(
    loss: str, objective: str, impl: str
) -> None:
    """The one batch path: collate straight from the pair table into packed rows gives the
    scores, loss terms and gradients of left-padded rows (token-wise loss included)."""
    from rmtrain.batch import Layout, collate, pair_scores
    from rmtrain.config import LossConfig
    from rmtrain.losses import PairLoss
    from rmtrain.model import LlamaScoreModel

    table = _table()
    got: dict[bool, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    for packed in (False, True):
        model = tiny_model(impl)
        score_model = LlamaScoreModel(model.config)
        score_model.load_state_dict(model.state_dict())
        layout = Layout(packed=packed, pad_token_id=0, padding_side="left", token_cost=64.0)
        pair_loss = PairLoss(LossConfig(name=loss, score_reg=0.01), objective, per_pair_margin=True)
        batch = collate(table, [0, 2, 3, 5], layout)
        assert batch.rows.packed == packed
        out = score_model(**batch.rows.model_inputs())
        scores = pair_scores(batch, out, pair_loss.needs_token_scores)
        assert (scores.tokens is not None) == (loss == "bt_tokenwise")
        total, terms = pair_loss(scores, batch.labels)
        total.sum().backward()
        values = {"total": total.detach(), "chosen": scores.chosen, "rejected": scores.rejected}
        values |= {k: v.detach() for k, v in terms.items()}
        grads = {n: p.grad.clone() for n, p in score_model.named_parameters() if p.grad is not None}
        got[packed] = (values, grads)
        assert batch.rows.real_tokens == sum(len(s) for s in table.sequences([0, 2, 3, 5]))
        fed = batch.rows.fed_tokens
        assert fed >= batch.rows.real_tokens and (fed < 1.2 * batch.rows.real_tokens or not packed)
    (pv, pg), (qv, qg) = got[True], got[False]
    assert pv.keys() == qv.keys() and pg.keys() == qg.keys()
    for k in pv:
        assert torch.allclose(pv[k].detach(), qv[k].detach(), atol=1e-5, rtol=1e-5), k
    for k in pg:
        assert torch.allclose(pg[k], qg[k], atol=1e-5, rtol=1e-4), k


def test_per_sequence_views_of_packed_and_padded_rows() -> None:
    from rmtrain.packing import balanced_row_tokens, pad_sequences

    seqs = random_seqs()
    for rows in (
        pack_sequences(seqs, balanced_row_tokens([len(s) for s in seqs])),
        pad_sequences(seqs, 0, "left"),
        pad_sequences(seqs, 0, "right"),
    ):
        ids, mask = rows.per_sequence(rows.input_ids)
        for i, s in enumerate(seqs):
            assert ids[i, : len(s)].tolist() == s and not ids[i, len(s) :].any()
        assert mask.sum(-1).tolist() == [len(s) for s in seqs]


def test_balanced_rows_are_nearly_full() -> None:
    from rmtrain.packing import balanced_row_tokens

    gen = torch.Generator().manual_seed(0)
    lens = (torch.exp(4.86 + 0.5 * torch.randn(32, generator=gen))).round().clamp(46, 454)
    lengths = lens.long().tolist()
    width = balanced_row_tokens(lengths)
    rows = pack_sequences([[1] * n for n in lengths], width)
    assert width >= max(lengths)
    assert rows.real_tokens / rows.fed_tokens > 0.9
