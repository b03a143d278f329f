"""K responses per prompt (issue 20): ranked and rated rows, trained with `loss.k_way`.

A row of K responses gives every ordered pair (better, worse); with `loss.k_way=all_pairs` the
row's pairs are trained together, its responses (and with prefix sharing its prompt) computed
once. The independent fact: `reference_loop.py` (plain transformers, padded, no rmtrain) trained
on the same rows expanded into pairs, the pairs of a step being all pairs of the rows the
documented seeded row permutation puts in that step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import reference_loop as ref
import torch
from conftest import check_ok, export_weights, read_metrics, run_train

from rmtrain.batching import BatchPlan, k_way_pairs
from rmtrain.config import DataConfig, ModelConfig
from rmtrain.data.formats import raw_pairs
from rmtrain.data.pairs import tokenize_pairs
from rmtrain.errors import DataError

SEED, LR, STEPS, ROWS_PER_STEP, CLIP = 7, 1e-3, 4, 4, 2.0
WORDS = [
    "bread",
    "flour",
    "water",
    "yeast",
    "salt",
    "oven",
    "bake",
    "knead",
    "rise",
    "dough",
    "warm",
    "hour",
    "crust",
]


def ranked_rows(n: int, k: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)

    def text(lo: int, hi: int) -> str:
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        return " ".join(
            WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=gen)
        )

    rows = []
    for _ in range(n):
        ranking = torch.randperm(k, generator=gen).tolist()
        rows.append({"prompt": f"How do I {text(3, 12)}?", "responses": [text(2, 14) for _ in
                     range(k)], "ranking": ranking})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ranked_and_rated_rows_give_every_ordered_pair() -> None:
    cfg = DataConfig(path="x")
    rows = [{"prompt": "p?", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}]
    raw, _ = raw_pairs(list(enumerate(rows, 1)), "r.jsonl", cfg, "reward")
    said = [(c[-1]["content"], r[-1]["content"]) for c, r in zip(raw.chosen, raw.rejected,
                                                                  strict=True)]  # fmt: skip
    assert sorted(said) == sorted([("c", "a"), ("c", "b"), ("a", "b")])
    assert sorted(m["responses"] for m in raw.meta) == [[0, 1], [2, 0], [2, 1]]

    uf = [{"instruction": "q?", "completions": [
        {"response": "x", "fine-grained_score": 4.5, "overall_score": 2.0},
        {"response": "y", "fine-grained_score": 1.5},
        {"response": "z", "overall_score": 4.5},  # no fine-grained score: the overall one
    ]}]  # fmt: skip
    cfg = DataConfig(path="x", margin_from_scores=True)
    raw, _ = raw_pairs(list(enumerate(uf, 1)), "uf.jsonl", cfg, "reward")
    said = [(c[-1]["content"], r[-1]["content"], m) for c, r, m in
            zip(raw.chosen, raw.rejected, raw.margin, strict=True)]  # fmt: skip
    assert sorted(said) == [("x", "y", 3.0), ("z", "y", 3.0)]  # x and z tie: no pair

    bad = [{"prompt": "p?", "responses": ["a", "b"], "ranking": [0, 0]}]
    with pytest.raises(DataError, match=r"r\.jsonl: row 1: field 'ranking': expected each"):
        raw_pairs(list(enumerate(bad, 1)), "r.jsonl", DataConfig(path="x"), "reward")


def tokenized(rows: list[dict[str, Any]]) -> Any:
    from rmtrain.hf import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    raw, _ = raw_pairs(list(enumerate(rows, 1)), "ranked.jsonl", DataConfig(path="x"), "reward")
    table, _, _ = tokenize_pairs(raw, DataConfig(path="x", max_length=96), tok)
    return table, tok


def test_chosen_vs_rest_keeps_each_rows_best_against_the_rest() -> None:
    table, _ = tokenized(ranked_rows(3, k=4))
    assert len(table) == 3 * 6 and table.pair_seqs is not None
    best = k_way_pairs(table, "chosen_vs_rest")
    assert len(best) == 3 * 3
    for members in best.group_members():
        ids = best.sequence_ids(members)
        assert len(set(ids[:, 0].tolist())) == 1 and len(set(ids[:, 1].tolist())) == 3
    assert k_way_pairs(table, "all_pairs") is table


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 2)])
def test_k_way_plan_keeps_rows_together_with_pair_weights(world: int, accum: int) -> None:
    """Rows of 6, 3 and 1 pairs: a micro-batch holds whole rows, and the weights make the step's
    loss the plain mean over its pairs (DeepSpeed divides by accumulation and ranks)."""
    units = [list(range(0, 6)), list(range(6, 9)), [9], list(range(10, 16)), [16, 17, 18]]
    plans = [BatchPlan(19, 1, accum, world, r, SEED, units) for r in range(world)]
    assert plans[0].steps_per_epoch == math.ceil(5 / (world * accum))
    seen = []
    for step in range(plans[0].steps_per_epoch):
        coef: dict[int, float] = {}
        for plan in plans:
            for mb in plan.step(step):
                rows = {next(k for k, u in enumerate(units) if p in u) for p in mb.indices}
                if mb.weights[0]:
                    assert sorted(mb.indices) == sorted(p for r in rows for p in units[r])
                for p, w in zip(mb.indices, mb.weights, strict=True):
                    if w:
                        coef[p] = coef.get(p, 0.0) + w / (world * accum)
        assert sum(coef.values()) == pytest.approx(1.0) and len(set(coef.values())) == 1
        seen += coef
    assert sorted(seen) == list(range(19))


@pytest.mark.slow
def test_k_way_training_equals_its_rows_expanded_into_pairs(tmp_path: Path) -> None:
    """`loss.k_way=all_pairs` with packing and prefix sharing (each row ONE segment: prompt
    once, 4 responses as suffixes; 2 rows per micro-batch, 2 micro-batches per step) trains
    exactly as the reference loop on the rows' 6 pairs each, padded, step by step."""
    rows = ranked_rows(10, k=4)
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    run_dir = tmp_path / "run"
    check_ok(run_train([
        "model=tiny", "logger=none", f"data.path={data}", f"data.eval_path={data}",
        "data.max_length=96", "loss.k_way=all_pairs", "trainer.packing=true",
        "trainer.prefix_sharing=true", "trainer.micro_batch_size=2",
        "trainer.gradient_accumulation_steps=2", "deepspeed=zero2", "deepspeed.optimizer=torch",
        f"trainer.seed={SEED}", f"trainer.lr={LR}", "trainer.warmup_ratio=0",
        "trainer.min_lr_ratio=0", "trainer.weight_decay=0", "trainer.adam_beta2=0.95",
        f"trainer.grad_clip={CLIP}", f"trainer.max_steps={STEPS}", "trainer.eval_every=0",
        "trainer.eval_at_start=false", "trainer.eval_batch_size=8", f"output_dir={run_dir}",
    ]))  # fmt: skip
    metrics = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert all(r["train/shared_fraction"] > 0.5 for r in metrics)  # the prompts, once per row

    table, tok = tokenized(rows)
    members = table.group_members()
    assert [len(m) for m in members] == [6] * 10
    steps = []  # rows of a step: per-epoch seeded permutations of the rows, 4 rows per step
    for step in range(STEPS):
        epoch, within = divmod(step, math.ceil(len(members) / ROWS_PER_STEP))
        perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(SEED + epoch))
        picked = perm.tolist()[within * ROWS_PER_STEP : (within + 1) * ROWS_PER_STEP]
        steps.append([p for r in picked for p in members[r]])
    assert [len(s) for s in steps] == [24, 24, 12, 24]  # 10 rows: a short last step, epoch 2
    config = ref.llama_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    hyper = ref.RefHyper(seed=SEED, lr=LR, grad_clip=CLIP, max_steps=STEPS)
    want = ref.train(table, config, hyper, batches=steps)
    got = [r["train/loss"] for r in metrics]
    assert got == pytest.approx(want.losses, rel=1e-5, abs=1e-6)
    assert [r["train/pairs"] for r in metrics] == [float(len(s)) for s in steps]
    weights = export_weights(run_dir / "export")
    diff = math.sqrt(sum(float((weights[k] - want.state_dict[k]).double().square().sum())
                         for k in want.state_dict))  # fmt: skip
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in want.state_dict.values()))
    assert diff / norm < 1e-5
    assert max(float((weights[k] - v).abs().max()) for k, v in want.state_dict.items()) < LR / 10
