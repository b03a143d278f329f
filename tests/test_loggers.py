"""Logging sinks: metrics.jsonl, and real wandb in offline mode (no API key here)."""

from __future__ import annotations

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
