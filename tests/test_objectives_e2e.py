"""End to end through the real CLI for the non-default objectives and losses.

* objective=cost learns the safety of held-out responses from data the test generates, logs its
  two loss terms, and its export states (and obeys) the sign convention cost > 0 ⇒ unsafe.
* reward runs with score / centering regularisers log each term separately.
* loss=bt_tokenwise and loss=margin (data column and constant) train through the CLI.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import check_ok, read_metrics, run_train, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmtrain.text import format_text
from rmtrain.toy.sample_data import generate_rows

# Tiny model, no truncation (the longest generated text is ~130 tokens), one eval at the end.
FAST = [
    "logger=none",
    "data.max_length=144",
    "trainer.micro_batch_size=16",
    "trainer.eval_batch_size=32",
    "trainer.lr=3e-3",
    "trainer.eval_every=0",
    "trainer.export=false",
]
COST_STEPS = 64
N_TRAIN, N_TEST = 384, 64


_write_jsonl = write_jsonl


def _train_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in metrics if "train/loss" in r]


def _terms_sum_to_loss(metrics: list[dict[str, Any]], terms: list[str]) -> None:
    for row in _train_rows(metrics):
        present = sorted(k for k in row if k.startswith("train/loss_"))
        assert present == sorted(f"train/{t}" for t in terms), row
        parts = sum(row[f"train/{t}"] for t in terms)
        assert parts == pytest.approx(row["train/loss"], rel=1e-5), row
        assert all(math.isfinite(row[f"train/{t}"]) and row[f"train/{t}"] >= 0 for t in terms)


# --------------------------------------------------------------------------- cost model


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One cost-model run on generated v1 rows: safety is learnable (unsafe responses carry a
    harmful instruction), the test split asks about topics training never saw, and both-safe /
    both-unsafe pairs are in the mix. One row with contradictory labels is skipped and counted.
    """
    root = tmp_path_factory.mktemp("cost")
    train = generate_rows(N_TRAIN, seed=11, split="train")
    test = generate_rows(N_TEST, seed=12, split="test")
    mixed = next(r for r in train if r["is_response_0_safe"] != r["is_response_1_safe"])
    bad = copy.deepcopy(mixed)
    bad["safer_response_id"] = 0 if not bad["is_response_0_safe"] else 1  # points at the unsafe
    train.insert(3, bad)
    data = root / "data"
    _write_jsonl(data / "train.jsonl", train)
    _write_jsonl(data / "test.jsonl", test)

    run_dir = root / "run"
    proc = run_train(
        [
            *FAST,
            "objective=cost",
            "data.preference=safer",
            "data.inconsistent_labels=skip",
            f"data.path={data}",
            f"output_dir={run_dir}",
            f"trainer.max_steps={COST_STEPS}",
            "trainer.micro_batch_size=8",
            "trainer.export=true",
            "trainer.export_max_shard_size=5GB",
        ]
    )
    check_ok(proc)
    return {"run_dir": run_dir, "train": train, "test": test, "metrics": read_metrics(run_dir)}


def _safety(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    both_safe = sum(r["is_response_0_safe"] and r["is_response_1_safe"] for r in rows)
    both_unsafe = sum(not r["is_response_0_safe"] and not r["is_response_1_safe"] for r in rows)
    return both_safe, both_unsafe, len(rows) - both_safe - both_unsafe


def test_cost_data_mix_and_counts(cost_run: dict[str, Any]) -> None:
    for rows in (cost_run["train"], cost_run["test"]):
        assert all(n > 0 for n in _safety(rows))  # both-safe, both-unsafe and mixed pairs
    data = cost_run["metrics"][0]
    assert data["step"] == 0
    assert data["data/train/rows"] == N_TRAIN + 1
    assert data["data/train/inconsistent_skipped"] == 1
    assert data["data/train/pairs"] == N_TRAIN and data["data/train/truncated"] == 0
    assert data["data/eval/pairs"] == N_TEST


def test_cost_model_learns_signs_on_held_out_rows(cost_run: dict[str, Any]) -> None:
    final = cost_run["metrics"][-1]
    assert final["step"] == COST_STEPS and final["eval/pairs"] == N_TEST
    # Measured 0.99-1.0 over data / init seeds; 0.5 is chance.
    assert final["eval/sign_accuracy"] >= 0.95
    # Pairwise accuracy is capped well below 1: a both-safe pair's safer_response_id is a coin
    # flip (about half the pairs). Measured 0.64-0.75; the ordering of pairs whose safety differs
    # is checked on the export below.
    assert final["eval/accuracy"] > 0.55
    # The less safe (rejected) side costs more on average; safe (chosen) sides sit below 0.
    assert final["eval/rejected_mean"] > final["eval/chosen_mean"]
    assert final["eval/chosen_mean"] < 0


def test_cost_loss_terms_logged_separately(cost_run: dict[str, Any]) -> None:
    rows = _train_rows(cost_run["metrics"])
    assert [r["step"] for r in rows] == list(range(1, COST_STEPS + 1))
    _terms_sum_to_loss(cost_run["metrics"], ["loss_bt", "loss_sign"])
    # Random init: BT ~ log 2 and each of the two sign terms ~ log 2.
    assert rows[0]["train/loss_bt"] == pytest.approx(math.log(2), abs=0.1)
    assert rows[0]["train/loss_sign"] == pytest.approx(2 * math.log(2), abs=0.6)
    late = rows[-5:]
    assert sum(r["train/loss_sign"] for r in late) / 5 < rows[0]["train/loss_sign"] / 2


def test_cost_export_records_sign_convention(cost_run: dict[str, Any]) -> None:
    export = cost_run["run_dir"] / "export"
    meta = json.loads((export / "config.json").read_text())["rmtrain"]
    assert meta["objective"] == "cost"
    assert meta["data"]["preference"] == "safer"
    assert "cost > 0 means unsafe" in meta["sign_convention"]
    card = (export / "README.md").read_text()
    assert "# Cost model" in card
    assert "Sign convention: cost > 0 means unsafe" in card
    assert "eval/sign_accuracy" in card


def test_cost_export_sign_convention_with_plain_transformers(cost_run: dict[str, Any]) -> None:
    """Independent of rmtrain's own metrics: the export, loaded by plain transformers, gives the
    unsafe response of a held-out mixed pair a positive cost and the safe one a negative cost."""
    export = cost_run["run_dir"] / "export"
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert model.num_labels == 1

    test = cost_run["test"]
    texts = [
        format_text(tok, "safe_rlhf", r["prompt"], r[f"response_{k}"]) for r in test for k in (0, 1)
    ]
    with torch.no_grad():
        batch = tok(texts, padding=True, return_tensors="pt")
        costs = model(**batch).logits[:, 0].view(len(test), 2).tolist()
    unsafe = [[not r["is_response_0_safe"], not r["is_response_1_safe"]] for r in test]

    # Held-out pairs with one safe and one unsafe response: unsafe > 0 > safe.
    mixed = [(c, u) for c, u in zip(costs, unsafe, strict=True) if u[0] != u[1]]
    assert len(mixed) >= 10
    separated = sum(c[u.index(True)] > 0 > c[u.index(False)] for c, u in mixed)
    # Measured 1.0 (every held-out mixed pair).
    assert separated / len(mixed) >= 0.9, f"{separated}/{len(mixed)}"

    # Every held-out response on its own, both-safe and both-unsafe pairs included.
    right = sum(
        (x > 0) == y for c, u in zip(costs, unsafe, strict=True) for x, y in zip(c, u, strict=True)
    )
    assert right / (2 * len(test)) >= 0.95, f"{right}/{2 * len(test)}"


# --------------------------------------------------------------------------- reward losses


@pytest.fixture(scope="module")
def reward_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated v1 rows plus a numeric per-pair margin column ``strength`` (1.0 or 1.5)."""
    data = tmp_path_factory.mktemp("reward") / "data"
    for split, n, seed in (("train", 128, 21), ("test", 32, 22)):
        rows = generate_rows(n, seed=seed, split=split)
        for i, r in enumerate(rows):
            r["strength"] = 1.0 + 0.5 * (i % 2)
        _write_jsonl(data / f"{split}.jsonl", rows)
    return data


def _reward_run(data: Path, run_dir: Path, steps: int, extra: list[str]) -> list[dict[str, Any]]:
    proc = run_train(
        [
            *FAST,
            f"data.path={data}",
            f"output_dir={run_dir}",
            f"trainer.max_steps={steps}",
            *extra,
        ]
    )
    check_ok(proc)
    return read_metrics(run_dir)


def test_reward_regularisers_logged_separately(reward_data: Path, tmp_path: Path) -> None:
    metrics = _reward_run(
        reward_data, tmp_path / "run", 4, ["loss.score_reg=0.01", "loss.center_reg=0.01"]
    )
    rows = _train_rows(metrics)
    assert len(rows) == 4
    _terms_sum_to_loss(metrics, ["loss_bt", "loss_center", "loss_reg"])
    assert all(r["train/loss_reg"] > 0 and r["train/loss_center"] > 0 for r in rows)
    # reg = λ·mean(r_c² + r_r²) ≥ λ·mean((r_c + r_r)²) / 2 = center / 2 (same λ).
    assert all(r["train/loss_reg"] >= r["train/loss_center"] / 2 * (1 - 1e-5) for r in rows)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("overrides", "first_loss"),
    [
        # Per-token scores spread more than end scores at init: the mean of softplus(-Δ_t) is
        # at least log 2 (Jensen), measured 0.75.
        (["loss=bt_tokenwise"], (math.log(2) - 0.05, 0.9)),
        # Random init: Δ ≈ 0, so step 1's loss is the mean of softplus(m) over the batch.
        (
            ["loss=margin", "data.margin_column=strength"],
            (_softplus(1.0) - 0.05, _softplus(1.5) + 0.05),
        ),
        (["loss=margin", "loss.margin=0.5"], (_softplus(0.5) - 0.05, _softplus(0.5) + 0.05)),
    ],
    ids=["bt_tokenwise", "margin_column", "margin_constant"],
)
def test_reward_loss_variants_train(
    reward_data: Path, tmp_path: Path, overrides: list[str], first_loss: tuple[float, float]
) -> None:
    steps = 12
    metrics = _reward_run(reward_data, tmp_path / "run", steps, overrides)
    rows = _train_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    losses = [r["train/loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    lo, hi = first_loss
    assert lo < losses[0] < hi
    assert sum(losses[-3:]) / 3 < losses[0]
    assert losses[-1] < losses[0]
    _terms_sum_to_loss(metrics, ["loss_bt"])
    assert math.isfinite(rows[-1]["eval/loss"])
