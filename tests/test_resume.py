"""Checkpoints, exact resume after a real SIGKILL, `rmtrain export`, and Hydra re-runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    SMALL,
    assert_same_weights,
    check_export,
    check_ok,
    cli_env,
    read_metrics,
    run_train,
    run_train_many,
    train_in_process,
)

from rmtrain.checkpoint import MARKER, find_resume_point

ZERO3_2RANKS = [
    *SMALL,
    "deepspeed=zero3",
    "deepspeed.stage3_param_persistence_threshold=0",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=16",
    "trainer.save_every=4",
    "trainer.keep_last=2",
    "trainer.eval_every=8",
]


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; after a resume the re-run steps overwrite the killed run's lines."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


LORA = [*ZERO3_2RANKS, "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16"]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted runs (2 ranks, ZeRO-3, checkpoints every 4 steps), plain and LoRA, in
    one 2-rank launch."""
    root = tmp_path_factory.mktemp("ref")
    runs = {"plain": ZERO3_2RANKS, "lora": LORA}
    check_ok(run_train_many([[*o, f"output_dir={root / k}"] for k, o in runs.items()], nproc=2))
    return {k: root / k for k in runs}


@pytest.fixture(scope="module")
def reference_run(references: dict[str, Path]) -> Path:
    return references["plain"]


def kill_then_resume(overrides: list[str], run_dir: Path, kill_from: int, steps: int) -> None:
    """Run on 2 ranks, SIGKILL launcher and ranks once step `kill_from` is logged, resume with
    trainer.resume=auto to the end."""
    env = cli_env()
    env.update(NPROC="2")
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "cpu.sh"), *overrides, f"output_dir={run_dir}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and max(
                losses(run_dir), default=0
            ) >= kill_from:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        # The launcher and both ranks are the session's process group: SIGKILL all of them at
        # once, mid-training (or whatever is left of them if the run ended early).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = max(losses(run_dir))
    assert kill_from <= killed_at < steps
    assert not (run_dir / "export").exists()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob(f"step_*/{MARKER}"))
    assert ckpts  # at least one checkpoint completed before the kill

    proc2 = run_train([*overrides, f"output_dir={run_dir}", "trainer.resume=auto"], nproc=2)
    check_ok(proc2)
    assert "resumed from" in proc2.stdout


def assert_same_run(reference: Path, resumed: Path, steps: int) -> None:
    ref, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-9), step
    assert_same_weights(reference / "export", resumed / "export")


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    kill_then_resume(ZERO3_2RANKS, run_dir, kill_from=10, steps=16)
    assert_same_run(reference_run, run_dir, 16)


@pytest.mark.slow
def test_lora_sigkill_then_resume_matches_uninterrupted_run(
    references: dict[str, Path], tmp_path: Path
) -> None:
    reference = references["lora"]
    check_export(reference)  # a merged plain model that scores what the LoRA model scored
    run_dir = tmp_path / "killed"
    kill_then_resume(LORA, run_dir, kill_from=10, steps=16)
    assert_same_run(reference, run_dir, 16)


@pytest.mark.slow
def test_keeps_last_k_complete_checkpoints(reference_run: Path) -> None:
    names = sorted(p.name for p in (reference_run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000012", "step_00000016"]
    marker = json.loads((reference_run / "checkpoints" / "step_00000016" / MARKER).read_text())
    assert marker["step"] == 16 and marker["layout"] == {"zero_stage": 3, "world_size": 2}
    assert marker["architecture"]["hidden_size"] == 64
    assert marker["architecture"]["model_type"] == "llama"
    # 256 pairs, global batch 8 (4 per rank x 2 ranks): step 16 is batch 16 of epoch 0
    assert marker["states"]["trainer"]["data_order"] == {
        "num_pairs": 256, "global_batch": 8, "seed": 42, "epoch": 0, "batch_in_epoch": 16,
    }  # fmt: skip


@pytest.mark.slow
def test_export_command_from_a_zero3_checkpoint(reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmtrain.cli",
            "export",
            str(reference_run),
            "--out",
            str(out),
            "--max-shard-size",
            "100KB",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_ok(proc)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_same_weights(reference_run / "export", out)  # the final checkpoint == final weights
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["rmtrain"]["score_stats"]["eval_mean"] is not None


@pytest.mark.slow
def test_partial_checkpoint_is_never_resumed(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run_dir / "checkpoints")
    # a checkpoint cut off by a kill: every file but the completion marker
    partial = run_dir / "checkpoints" / "step_00000020"
    shutil.copytree(run_dir / "checkpoints" / "step_00000016", partial)
    (partial / MARKER).unlink()
    assert find_resume_point("auto", run_dir) == run_dir / "checkpoints" / "step_00000016"


@pytest.mark.slow
def test_resume_with_a_different_model_shape_fails_clearly(
    reference_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = train_in_process(  # an error path: in this process
        [
            *ZERO3_2RANKS,
            f"output_dir={reference_run}",
            "trainer.resume=auto",
            "model.toy.hidden_size=32",
        ],
        capsys,
        monkeypatch,
    )
    assert code != 0
    assert "the model's hidden_size was 64 there, 32 now" in err


def test_refuses_to_write_into_an_existing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    # an error path: in this process (a subprocess would prove nothing more)
    code, err = train_in_process(
        [*SMALL, f"output_dir={run_dir}", "trainer.max_steps=1"], capsys, monkeypatch
    )
    assert code != 0 and "already holds a run" in err


def test_saved_config_reruns_the_same_experiment(tmp_path: Path) -> None:
    first = tmp_path / "first"
    check_ok(
        run_train(
            [
                *SMALL,
                f"output_dir={first}",
                "trainer.max_steps=3",
                "trainer.lr=2e-3",
                "trainer.export=false",
            ]
        )
    )
    second = tmp_path / "second"
    check_ok(
        run_train(["--config-path", str(first), "--config-name", "config", f"output_dir={second}"])
    )
    assert losses(second) == losses(first)
    assert (second / "config.yaml").exists()


def test_hydra_multirun_sweeps_single_process_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_train(
        [
            "-m",
            *SMALL,
            "trainer.max_steps=2",
            "trainer.export=false",
            "trainer.lr=1e-3,5e-3",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    check_ok(proc)
    jobs = [losses(sweep / str(i)) for i in range(2)]
    assert jobs[0][1] == pytest.approx(jobs[1][1])  # same init and first batch
    assert jobs[0][2] != jobs[1][2]  # different learning rates after one step
    assert read_metrics(sweep / "0")[0]["step"] == 0  # data counts logged first


PACKED_BUDGET = [
    *SMALL,
    "model=tiny",
    "data=sample",
    "deepspeed=zero2",
    "trainer.packing=true",
    "trainer.max_tokens_per_micro_batch=700",
    "trainer.gradient_accumulation_steps=2",
    "trainer.max_steps=6",
    "trainer.save_every=3",
    "trainer.eval_every=0",
    "trainer.export=false",
]


@pytest.mark.slow
def test_packed_token_budget_resume_is_exact_and_needs_the_same_budget(tmp_path: Path) -> None:
    """Token-budget batches are a function of the seed and the budget: a resume from step 3
    continues with the uninterrupted run's steps 4-6; another budget is refused."""
    full = tmp_path / "full"
    check_ok(run_train([*PACKED_BUDGET, f"output_dir={full}"]))
    ckpt = full / "checkpoints" / "step_00000003"
    order = json.loads((ckpt / MARKER).read_text())["states"]["trainer"]["data_order"]
    assert order["max_tokens_per_micro_batch"] == 700 and order["batch_in_epoch"] == 3
    resumed = tmp_path / "resumed"
    check_ok(run_train([*PACKED_BUDGET, f"output_dir={resumed}", f"trainer.resume={ckpt}"]))
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-9), step
    other = tmp_path / "other"
    proc = run_train(
        [*PACKED_BUDGET, "trainer.max_tokens_per_micro_batch=800", f"output_dir={other}",
         f"trainer.resume={ckpt}"]
    )  # fmt: skip
    assert proc.returncode != 0 and "cannot resume" in proc.stdout + proc.stderr
