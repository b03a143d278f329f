"""End to end through the real CLI: train, evaluate, export, reload with plain transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    SMALL,
    check_export,
    check_ok,
    png_size_and_variation,
    read_jsonl,
    read_metrics,
    run_train,
    train_in_process,
    write_jsonl,
)
from transformers import AutoModelForSequenceClassification


def check_run(run_dir: Path, steps: int) -> list[dict]:
    rows = read_metrics(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals and evals[-1]["step"] == steps
    assert (run_dir / "config.yaml").exists()
    data = rows[0]
    assert data["step"] == 0 and data["data/train/pairs"] == 256 and "data/train/truncated" in data
    return rows


def test_single_rank_trains_evaluates_and_exports(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            *SMALL,
            f"output_dir={run_dir}",
            "trainer.max_steps=24",
            "trainer.eval_every=12",
            "trainer.export_max_shard_size=100KB",
        ]
    )
    check_ok(proc)
    rows = check_run(run_dir, 24)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]  # quickstart evaluates the untrained model
    assert evals[-1]["eval/accuracy"] > 0.7
    first_train = next(r for r in rows if "train/loss" in r)
    assert first_train["train/loss"] == pytest.approx(0.693, abs=0.05)  # random init: ~log 2
    assert evals[0]["eval/loss"] == pytest.approx(0.693, abs=0.05)
    check_export(run_dir)
    card = (run_dir / "export" / "README.md").read_text()
    assert "Sign convention" in card and "eval/accuracy" in card


@pytest.mark.slow
def test_two_ranks_zero3_through_the_deepspeed_launcher(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            *SMALL,
            f"output_dir={run_dir}",
            "deepspeed=zero3",
            "deepspeed.stage3_param_persistence_threshold=0",
            "trainer.max_steps=12",
            "trainer.micro_batch_size=4",
            "trainer.eval_every=6",
            "trainer.export_max_shard_size=100KB",
        ],
        nproc=2,
    )
    check_ok(proc)
    rows = check_run(run_dir, 12)
    assert [r["eval/pairs"] for r in rows if "eval/pairs" in r] == [64, 64, 64]  # each pair once
    check_export(run_dir)
    # one run directory for both ranks, written by rank 0 only
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".rmtrain.lock") == [
        "config.yaml",
        "curves.png",
        "eval",
        "eval_scores.jsonl",
        "export",
        "metrics.jsonl",
        "report.md",
    ]
    # the full evaluation gathers both ranks' pairs: every eval pair exactly once
    pairs = read_jsonl(run_dir / "eval" / "main.pairs.jsonl")
    assert sorted(p["index"] for p in pairs) == list(range(64))


def test_quickstart_default(tmp_path: Path) -> None:
    """`rmtrain train` as the README runs it (only the output directory differs)."""
    run_dir = tmp_path / "qs"
    proc = run_train([f"output_dir={run_dir}"])
    check_ok(proc)
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and 0.2 < evals[0]["eval/accuracy"] < 0.8  # untrained: chance
    assert evals[-1]["eval/accuracy"] > 0.8
    index = json.loads((run_dir / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    check_run_plots(run_dir)


def check_run_plots(run_dir: Path) -> None:
    """A finished run's plots are real PNGs of the documented size, and its report embeds
    each one (by a relative link that resolves)."""

    from rmtrain.eval.plots import DPI, FIGSIZE

    pngs = ["curves.png", "eval/main/histograms.png", "eval/main/reliability.png",
            "eval/main/categories.png"]  # fmt: skip
    report = (run_dir / "report.md").read_text()
    for name in pngs:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shape, variation = png_size_and_variation(run_dir / name)
        assert shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI)  # rows = height
        assert variation > 0.01  # drawn, not a blank canvas
        assert f"]({name})" in report
    summary = json.loads((run_dir / "eval" / "main.json").read_text())
    rows = read_metrics(run_dir)
    assert summary["n_pairs"] == rows[-1]["eval/pairs"]
    assert summary["calibration"]["ece"] == pytest.approx(rows[-1]["eval/ece"])


def test_malformed_data_file_fails_cleanly(tmp_path: Path, capsys, monkeypatch) -> None:
    from rmtrain.toy.sample_data import generate_rows

    rows = generate_rows(8, seed=0)
    rows[4]["better_response_id"] = 2
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows)
    shutil.copy(data / "train.jsonl", data / "test.jsonl")
    run_dir = tmp_path / "run"
    code, stderr = train_in_process([*SMALL, f"data.path={data}", f"output_dir={run_dir}"],
                                    capsys, monkeypatch)  # fmt: skip
    assert code == 2
    err = stderr.strip().splitlines()
    assert err[-1].startswith("rmtrain: error:")
    assert "train.jsonl" in err[-1] and "row 5" in err[-1] and "better_response_id" in err[-1]
    assert "Traceback" not in stderr
    assert not run_dir.exists()  # nothing left behind


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.lrr=1", "lrr"),
        ("trainer.lr=fast", "trainer.lr"),
        ("trainer.precision=fp16", "trainer.precision"),
        ("model=llama", "model.name_or_path"),
    ],
)
def test_config_mistakes_fail_before_training(
    tmp_path: Path, override: str, needle: str, capsys, monkeypatch
) -> None:
    code, stderr = train_in_process([override, f"output_dir={tmp_path / 'run'}"], capsys,
                                    monkeypatch)  # fmt: skip
    assert code != 0
    assert needle in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bf16_run_exports_bf16_weights_that_score_the_same(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    check_ok(run_train([*SMALL, f"output_dir={run_dir}", "trainer.precision=bf16",
                        "trainer.max_steps=4", "trainer.eval_every=0"]))  # fmt: skip
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    samples = read_jsonl(run_dir / "eval_scores.jsonl")
    with torch.no_grad():
        for s in samples:
            plain = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, 0].float().item()
            # bf16 has 8 mantissa bits: the same weights and ids agree to bf16 rounding
            assert plain == pytest.approx(s["score"], rel=2e-2, abs=2e-2)


def test_missing_model_directory_is_one_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        ["model=llama", f"model.name_or_path={tmp_path}/nope", f"output_dir={run_dir}"]
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rmtrain: error: model.name_or_path={tmp_path}/nope: no such directory"
    )
    assert not run_dir.exists()  # nothing left behind


def test_eval_set_emptied_by_truncation_is_one_clear_error(tmp_path: Path, capsys, monkeypatch):
    """Long prompts cut to data.max_length leave chosen == rejected: the error names the eval
    set's own file, how many rows it had and why they were dropped."""
    prompt = " ".join(["Please read this long question carefully."] * 40)
    rows = [{"prompt": prompt, "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(4)]
    data = write_jsonl(tmp_path / "long_prompts.jsonl", rows)
    run_dir = tmp_path / "run"
    code, stderr = train_in_process(
        [*SMALL, f"data.eval_sets=[{{path:'{data}',label:long}}]", f"output_dir={run_dir}"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"rmtrain: error: {data}: no usable pairs left in eval/long (4 rows;")
    assert "4 pairs identical after tokenization and truncation to data.max_length=96" in last
    assert not run_dir.exists()
