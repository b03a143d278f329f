"""Faults: every one ends with a clear one-line error and a non-zero exit, or a recovered run
equal to an uninterrupted one. Nothing from a file ever runs; no non-finite export is ever
written.

One-rank runs, resumes and error paths run in this process; launchers, several ranks, signals
and stalls run as real processes (`slow`). One small 1-rank run (checkpoints at steps 2, 4, 6
and an export) is shared, each test working on a copy of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import io
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    REPO,
    SMALL,
    assert_same_weights,
    check_ok,
    cli_env,
    export_weights,
    read_marker,
    read_metrics,
    run_train,
    train_in_process,
    write_jsonl,
)

from rmtrain import hf
from rmtrain.checkpoint import MARKER, file_digest, find_resume_point
from rmtrain.errors import CheckpointError
from rmtrain.export import export_checkpoint
from rmtrain.files import no_space
from rmtrain.preemption import PREEMPTED_EXIT
from rmtrain.toy.sample_data import generate_rows

# Tiny and quick: 6 steps of 8 pairs, a checkpoint every 2 steps, all three kept.
FAST = [
    *SMALL,
    "data.sample_train_rows=64",
    "data.sample_eval_rows=16",
    "data.max_length=64",
    "trainer.max_steps=6",
    "trainer.save_every=2",
    "trainer.keep_last=3",
    "trainer.eval_every=0",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("base") / "run"
    check_ok(run_train([*FAST, f"output_dir={run_dir}"]))
    return run_dir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    (dst / ".rmtrain.lock").unlink(missing_ok=True)
    return dst


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def forget_after(run_dir: Path, step: int) -> None:
    """Make the run look killed right after its checkpoint at `step`."""
    for path in (run_dir / "checkpoints").glob("step_*"):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    shutil.rmtree(run_dir / "export")


def restamp(path: Path, rel: str) -> None:
    """Rewrite the marker's checksum of one file (a planted file that also fools the marker)."""
    marker = read_marker(path)
    marker["files"][rel] = [(path / rel).stat().st_size, file_digest(path / rel)]
    (path / MARKER).write_text(json.dumps(marker))


class Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint file would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def plant_payload(path: Path, pwned: Path) -> None:
    file = path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": Payload(f"touch {pwned}")}, file)
    restamp(path, file.name)


# -- a pickle payload in a checkpoint ------------------------------------------------------
def test_export_refuses_a_pickle_payload_in_a_checkpoint(run_copy: Path, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    plant_payload(ckpt(run_copy, 6), pwned)
    with pytest.raises(CheckpointError, match="refused to load"):
        export_checkpoint(run_copy)
    env = cli_env()
    proc = subprocess.run(
        [sys.executable, "-m", "rmtrain.cli", "export", str(run_copy)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "refused to load" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr
    assert not pwned.exists()


@pytest.mark.slow
def test_resume_refuses_a_pickle_payload_in_a_checkpoint(run_copy: Path, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    forget_after(run_copy, 4)
    plant_payload(ckpt(run_copy, 4), pwned)
    proc = run_train([*FAST, f"output_dir={run_copy}", "trainer.resume=auto"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refused to load" in proc.stderr
    assert not pwned.exists()


# -- divergence ----------------------------------------------------------------------------
@pytest.mark.slow
def test_divergence_stops_the_run_without_checkpoint_or_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train([*FAST, "trainer.lr=1e8", "trainer.save_every=1", f"output_dir={run_dir}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rmtrain: error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0], proc.stderr[-2000:]
    assert not (run_dir / "export").exists()
    for path in (run_dir / "checkpoints").glob("step_*"):  # only finite ones were written
        export = export_checkpoint(path, tmp_path / path.name)
        assert all(torch.isfinite(v).all() for v in export_weights(export).values())


def test_export_refuses_non_finite_weights(tmp_path: Path) -> None:
    from conftest import make_export

    good = make_export(tmp_path / "good")
    state = export_weights(good)
    state[next(iter(state))][0] = float("nan")
    model_config = hf.AutoConfig.from_pretrained(good)
    tok = hf.AutoTokenizer.from_pretrained(good)
    with pytest.raises(ValueError, match="NaN/inf"):
        hf.export(state, model_config, tok, tmp_path / "bad", "200KB", {}, "")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_non_finite_lr_is_refused_before_training(capsys: Any, monkeypatch: Any) -> None:
    code, err = train_in_process([*FAST, "trainer.lr=inf"], capsys, monkeypatch)
    assert code == 2 and "trainer.lr=inf" in err


# -- rows 3 and 4: damaged checkpoints ------------------------------------------------------------
def garble(file: Path) -> None:
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = os.urandom(min(4096, len(data) - mid))
    file.write_bytes(bytes(data))


DAMAGE = {
    "garbled": lambda f: garble(f),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "empty": lambda f: f.write_bytes(b""),
    "deleted": lambda f: f.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    run_copy: Path, damage: str, capsys: Any
) -> None:
    file = next(ckpt(run_copy, 6).glob("*optim_states.pt"))
    DAMAGE[damage](file)
    assert find_resume_point("auto", run_copy) == ckpt(run_copy, 4)
    assert f"skipping damaged checkpoint {ckpt(run_copy, 6)}: {file}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=str(file)):
        export_checkpoint(ckpt(run_copy, 6))  # named explicitly: no silent substitute
    for step in (2, 4):
        DAMAGE[damage](next(ckpt(run_copy, step).glob("*optim_states.pt")))
    with pytest.raises(CheckpointError, match="no intact checkpoint left"):
        find_resume_point("auto", run_copy)


@pytest.mark.slow
def test_resume_past_a_garbled_checkpoint_recovers_exactly(base_run: Path, run_copy: Path) -> None:
    garble(next(ckpt(run_copy, 6).glob("*optim_states.pt")))
    shutil.rmtree(run_copy / "export")
    proc = run_train([*FAST, f"output_dir={run_copy}", "trainer.resume=auto"])
    check_ok(proc)
    assert "skipping damaged checkpoint" in proc.stderr
    assert f"resumed from {ckpt(run_copy, 4)}" in proc.stdout
    assert_same_weights(run_copy / "export", base_run / "export")


# -- one run per directory -----------------------------------------------------------------
def test_second_run_on_a_locked_directory_is_refused(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / ".rmtrain.lock").open("a+") as held:  # what rank 0 of a live run holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("12345\n")
        held.flush()
        code, err = train_in_process([*FAST, f"output_dir={run_dir}"], capsys, monkeypatch)
    assert code == 2 and "in use by another run (pid 12345)" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".rmtrain.lock"]


# -- resume semantics ----------------------------------------------------------------------
@pytest.mark.slow
def test_resume_with_a_changed_lr_takes_effect(base_run: Path, run_copy: Path) -> None:
    forget_after(run_copy, 4)
    proc = run_train([*FAST, f"output_dir={run_copy}", "trainer.resume=auto", "trainer.lr=1e-3"])
    check_ok(proc)
    old = {r["step"]: r["train/lr"] for r in read_metrics(base_run) if "train/lr" in r}
    new = [r for r in read_metrics(run_copy) if "train/lr" in r]
    steps = [r["step"] for r in new]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # no duplicate steps
    lr = {r["step"]: r["train/lr"] for r in new}
    for step in (1, 2, 3, 4):
        assert lr[step] == old[step]
    for step in (5, 6):  # the same schedule, scaled to the new peak
        assert lr[step] == pytest.approx(old[step] * 1e-3 / 3e-3, rel=1e-9)
    resumed = read_marker(ckpt(run_copy, 6))["run"]["resumed"]
    assert resumed == [{"step": 4, "changed": {"trainer.lr": [3e-3, 1e-3]}}]


@pytest.mark.parametrize(
    "change",
    ["loss.label_smoothing=0.1", "data.sample_train_rows=128"],  # another objective, other data
)
def test_resume_refuses_other_config_changes(
    run_copy: Path, capsys: Any, monkeypatch: Any, change: str
) -> None:
    forget_after(run_copy, 4)
    args = [*FAST, f"output_dir={run_copy}", "trainer.resume=auto", change]
    code, err = train_in_process(args, capsys, monkeypatch)
    # refused as a config change, before the data order is even compared
    assert code == 2 and f"cannot resume with {change}" in err


# -- a stalled rank ------------------------------------------------------------------------
def start_two_ranks(run_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    """2 ranks under the deepspeed launcher (launch/cpu.sh), training long enough to be hit;
    returns once a few steps are logged."""
    env = {**cli_env(), "NPROC": "2"}
    log = run_dir.parent / "launcher.log"
    args = [*FAST, "trainer.max_steps=400", "trainer.save_every=0", "trainer.export=false", *extra]
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "cpu.sh"), *args, f"output_dir={run_dir}"],
        env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc, log


def rank_pids(launcher: subprocess.Popen[str]) -> list[int]:
    """The training ranks below a launcher process (its descendants that got --local_rank)."""
    import psutil

    ranks = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(a.startswith("--local_rank=") for a in child.cmdline()):
                ranks.append(child.pid)
    return ranks


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not left:
            return []
        time.sleep(0.5)
    return left


STALL_TIMEOUT_S = 8


@pytest.mark.slow
def test_a_stalled_rank_ends_the_run_after_the_timeout(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # short: the stalled collective waits this long (the steps before it take well under 1 s)
    proc, log = start_two_ranks(run_dir, f"deepspeed.timeout_s={STALL_TIMEOUT_S}")
    ranks = rank_pids(proc)  # found while the launcher lives
    try:
        stalled = [pid for pid in ranks
                   if b"--local_rank=1" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
        assert stalled
        os.kill(stalled[0], signal.SIGSTOP)
        start = time.time()
        # the healthy rank ends itself; the launcher then gives the stopped one 30 s of grace
        # before SIGKILL (DeepSpeed's terminate_process_tree), which is not under test
        assert wait_gone([pid for pid in ranks if pid != stalled[0]], 240) == []
        took = time.time() - start
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    want = f"a collective timed out after deepspeed.timeout_s={STALL_TIMEOUT_S} s"
    assert want in text, text[-3000:]
    assert took < 120


# -- SIGTERM to the launcher only ----------------------------------------------------------
@pytest.mark.slow
def test_ranks_save_and_exit_when_their_launcher_is_terminated(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, log = start_two_ranks(run_dir)
    try:
        ranks = rank_pids(proc)
        assert len(ranks) == 2
        proc.send_signal(signal.SIGTERM)  # the launcher only, not its process group
        proc.wait(timeout=30)
        left = wait_gone(ranks, 150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert left == [], "ranks outlived their launcher"
    (saved,) = (run_dir / "checkpoints").glob(f"step_*/{MARKER}")
    assert "rmtrain: stopped at step" in log.read_text()
    assert read_marker(saved.parent)["step"] >= 3
    assert not (run_dir / "export").exists()


# -- SIGTERM to a run ----------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=400", "trainer.save_every=0", "trainer.export=false"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rmtrain.train", *args, f"output_dir={run_dir}"],
        env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 4:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "stopped at step" in err and "SIGTERM" in err
    (saved,) = (run_dir / "checkpoints").glob("step_*")
    step = read_marker(saved)["step"]
    assert 1 <= step < 400
    resumed = run_train([*args, "trainer.max_steps=" + str(step + 2), f"output_dir={run_dir}",
                         "trainer.resume=auto"])  # fmt: skip
    check_ok(resumed)
    assert f"resumed from {saved}" in resumed.stdout


# -- disk full ----------------------------------------------------------------------------
def test_full_disk_error_names_the_path_and_last_checkpoint(
    run_copy: Path, monkeypatch: Any
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "save_torch_state_dict", full)
    out = run_copy / "export2"
    with pytest.raises(OSError, match=f"no space left on device at {out}"):
        export_checkpoint(run_copy, out)
    assert not out.exists() and not out.with_name("export2.tmp").exists()
    err = no_space(OSError(errno.ENOSPC, "x"), out, ckpt(run_copy, 6))
    assert str(err) == f"no space left on device at {out}; the last good checkpoint is " + str(
        ckpt(run_copy, 6)
    )


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_leaves_no_partial_one(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(small)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        proc = run_train([*FAST, f"output_dir={small / 'run'}"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        err = proc.stderr.strip().splitlines()[-1]
        assert err == (
            f"rmtrain: error: no space left on device at {small / 'run' / 'checkpoints'}"
            "/step_00000002; there is no checkpoint"
        )
        assert list((small / "run" / "checkpoints").iterdir()) == []  # no partial checkpoint
    finally:
        # The failed run's files are released: the sinks are closed on the way out, and the
        # half-written shard's writer (held by the ENOSPC traceback's frames) once collected.
        gc.collect()
        umount = subprocess.run(["umount", str(small)], capture_output=True, text=True)
    assert umount.returncode == 0, umount.stderr


# -- values validated before training -----------------------------------------------------
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.export_max_shard_size=banana", "trainer.export_max_shard_size"),
        ("model.attn_implementation=flashy", "model.attn_implementation"),
        ("data.max_length=5000", "data.max_length=5000 exceeds the model's context"),
        ("trainer.grad_clip=-1", "trainer.grad_clip"),
        ("trainer.save_every=-1", "trainer.save_every"),
        ("trainer.eval_every=-2", "trainer.eval_every"),
        ("+deepspeed.extra.zero_optimization.stage=3", "deepspeed.extra.zero_optimization.stage"),
        ("+deepspeed.extra.train_batch_size=64", "deepspeed.extra.train_batch_size"),
    ],
)
def test_bad_config_values_are_refused_before_training(
    override: str, named: str, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    args = [*FAST, override, f"output_dir={tmp_path / 'run'}"]
    code, err = train_in_process(args, capsys, monkeypatch)
    assert code == 2 and named in err, err
    assert err.count("\n") == 1 and err.startswith("rmtrain: error:")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- data errors --------------------------------------------------------------------------
def _data_dir(root: Path, name: str) -> Path:
    d = root / name
    write_jsonl(d / "test.jsonl", generate_rows(8, 1, split="test"))
    return d


def _lines(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _bad_utf8(d: Path) -> str:
    lines = _lines(generate_rows(8, 0)).split(b"\n")
    lines[2] = lines[2].replace(b'"prompt": "', b'"prompt": "\xff\xfe', 1)
    (d / "train.jsonl").write_bytes(b"\n".join(lines))
    return "train.jsonl: row 3: field '<json>': not UTF-8"


def _corrupt_xz(d: Path) -> str:
    data = lzma.compress(_lines(generate_rows(8, 0)))
    (d / "train.jsonl.xz").write_bytes(data[: len(data) // 2] + b"garbage" * 8)
    return "train.jsonl.xz: cannot read it: LZMAError"


def _empty(d: Path) -> str:
    (d / "train.jsonl").write_bytes(b"")
    return "train.jsonl: no rows (empty file)"


def _string_bool(d: Path) -> str:
    rows = generate_rows(8, 0)
    rows[1]["is_response_0_safe"] = "true"
    (d / "train.jsonl").write_bytes(_lines(rows))
    return "train.jsonl: row 2: field 'is_response_0_safe': expected bool, got str 'true'"


def _string_id(d: Path) -> str:
    rows = generate_rows(8, 0)
    rows[1]["better_response_id"] = "1"
    (d / "train.jsonl").write_bytes(_lines(rows))
    return "train.jsonl: row 2: field 'better_response_id'"


@pytest.mark.parametrize("make", [_bad_utf8, _corrupt_xz, _empty, _string_bool, _string_id])
def test_data_errors_name_file_row_and_field(
    make: Any, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    d = _data_dir(tmp_path, make.__name__)
    expected = make(d)
    args = [*FAST, f"data.path={d}", f"output_dir={tmp_path / 'run'}"]
    code, err = train_in_process(args, capsys, monkeypatch)
    assert code == 2 and expected in err, err
    assert "Traceback" not in err


# -- `+key=` additions --------------------------------------------------------------------
def test_a_plus_key_typo_is_refused(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    args = [*FAST, "+trainer.learning_rate=1e-4", f"output_dir={tmp_path / 'run'}"]
    code, err = train_in_process(args, capsys, monkeypatch)
    assert code == 2 and "unknown config key trainer.learning_rate" in err


# -- a sweep under a multi-rank launcher --------------------------------------------------
def test_a_multirun_under_a_launcher_is_refused(tmp_path: Path, monkeypatch: Any) -> None:
    """Each rank of a launch would run every job on its own: refused from what the launcher
    sets (WORLD_SIZE > 1), before Hydra runs anything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["rmtrain train", *FAST, "-m", "trainer.lr=1e-4,3e-4",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])  # fmt: skip
    from rmtrain import train

    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        train.main()
    proc = subprocess.CompletedProcess([], int(exc.value.code or 0), "", err.getvalue())
    assert proc.returncode != 0
    assert "a Hydra multirun (-m) cannot run under a multi-rank launcher" in proc.stderr
    assert not (tmp_path / "sweep").exists()


# -- code in a saved config ---------------------------------------------------------------
def test_a_saved_config_with_code_is_refused(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    pwned = tmp_path / "pwned"
    conf = tmp_path / "saved"
    conf.mkdir()
    (conf / "config.yaml").write_text(
        "defaults: [rmtrain_schema, _self_]\n"
        "model: {name_or_path: tiny}\n"
        "hydra:\n  callbacks:\n    evil:\n      _target_: os.system\n"
        f"      command: touch {pwned}\n"
    )
    args = ["--config-path", str(conf), "--config-name", "config", *FAST]
    code, err = train_in_process(args, capsys, monkeypatch)
    assert code == 2 and "holds code (hydra.callbacks)" in err, err
    assert not pwned.exists()
    code, err = train_in_process([*FAST, "+x._target_=os.system"], capsys, monkeypatch)
    assert code == 2 and "configs hold data, not code" in err


def test_slurm_script_requeues_on_preemption(tmp_path: Path) -> None:
    """USR1 from Slurm (--signal) → SIGTERM to the ranks (via srun) → requeue when they exit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    scripts = {
        "srun": f"trap 'echo \"srun got TERM\" >> {log}; kill $!; exit 75' TERM\nsleep 60 & wait\n",
        "scontrol": f'[[ $1 == show ]] && echo n1 || echo "scontrol $*" >> {log}\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**cli_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}  # fmt: skip
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), f"output_dir={tmp_path / 'out'}"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["srun got TERM", "scontrol requeue 77"]


def test_disk_space_is_estimated_up_front(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    from collections import namedtuple

    from rmtrain import rundir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    rundir.warn_disk_space(100 * 100 + 100, tmp_path, keep_last=2)
    assert f"rmtrain: warning: 0.0 MB free at {tmp_path}" in capsys.readouterr().err
