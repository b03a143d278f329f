"""Logging sinks: metrics.jsonl, and real wandb in offline mode (no API key here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SMALL, check_ok, cli_env, read_metrics

from rmtrain.config import WandbConfig
from rmtrain.loggers import wandb_mode


def test_wandb_mode_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    mode, note = wandb_mode(WandbConfig(enabled=True))
    assert mode == "offline" and note and "no API key" in note
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(WandbConfig(enabled=True)) == ("disabled", None)
    assert wandb_mode(WandbConfig(enabled=True, mode="offline")) == ("offline", None)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbConfig(enabled=True)) == ("online", None)


def test_wandb_runs_offline_without_a_key_and_says_so(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = cli_env()
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY", None)
    env["HOME"] = str(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [o for o in SMALL if not o.startswith("logger=")]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmtrain.train",
            *overrides,
            "logger=wandb",
            "trainer.max_steps=3",
            "trainer.export=false",
            "trainer.peak_tflops=1",  # MFU on CPU only against an explicit peak
            f"output_dir={run_dir}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_ok(proc)
    assert "no API key found, logging offline" in proc.stdout + proc.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    steps = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # throughput telemetry per logged step, in metrics.jsonl and in the wandb run
    keys = ["train/tokens_per_s", "train/padded_fraction", "train/step_time_s", "train/mfu"]
    keys.append("train/flops_per_token")
    assert all(k in r for r in steps for k in keys)
    assert "time/launch_to_first_step_s" in steps[0]
    recorded = runs[0].read_bytes()
    assert all(k.encode() in recorded for k in keys)
    # beyond scalars (issue 12): the run is named after the experiment and its start time; each
    # evaluation logs score histograms and a worst-pairs table with the decoded texts; the end
    # of the run logs the plots as images and the final eval scalars
    assert re.search(rb"quickstart-\d{8}-\d{6}", recorded)
    assert b"eval/main/chosen_scores" in recorded and b"eval/main/rejected_scores" in recorded
    files = runs[0].parent / "files" / "media"
    tables = sorted((files / "table" / "eval" / "main").glob("worst_pairs_*.table.json"))
    assert len(tables) == 2  # step 0 (eval_at_start) and the last step
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:3] == ["margin", "chosen_score", "rejected_score"]
    margins = [row[0] for row in table["data"]]
    assert margins == sorted(margins) and len(margins) == 10
    assert all("ASSISTANT:" in row[3] and "ASSISTANT:" in row[4] for row in table["data"])
    images = {p.name.split("_")[0] for p in (files / "images").rglob("*.png")}
    assert images == {"Training curves", "Scores of chosen vs rejected", "Reliability diagram",
                      "Accuracy per category"}  # fmt: skip
    assert b"eval/accuracy_chosen_longer" in recorded
