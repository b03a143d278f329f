"""Preemption: stop requests a run acts on at a step boundary, and ranks that never outlive their
launcher.

SIGTERM / SIGUSR1 (what SLURM sends before preemption), or this rank's launcher exiting, become a
:class:`StopRequest`; the checkpointer saves at the next step boundary on every rank and raises
:class:`Stopped`, and the run exits with :data:`PREEMPTED_EXIT`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

PREEMPTED_EXIT = 75
"""Exit code of every rank that saved a checkpoint and stopped on SIGTERM / SIGUSR1 (EX_TEMPFAIL:
try again; launch/slurm.sbatch requeues the job on it)."""


class Stopped(Exception):
    """A stop was requested (a signal, or the launcher exited); a checkpoint was saved."""

    def __init__(self, reason: str, step: int, path: Path) -> None:
        super().__init__(
            f"stopped at step {step} ({reason}); checkpoint {path}; continue with "
            "trainer.resume=auto"
        )
        self.step, self.path = step, path


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption), or this rank's launcher exiting,
    become a request the checkpointer acts on at the next step boundary: every rank saves, then
    raises Stopped. A rank whose launcher is gone also ends itself after `grace_s` regardless,
    so ranks never outlive their launcher."""

    def __init__(self, grace_s: float = 120.0) -> None:
        self.reason: str | None = None
        self.grace_s = grace_s
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        launcher = _launcher_pid()
        if launcher is not None:
            _die_with_parent()
            threading.Thread(target=self._watch, args=(launcher,), daemon=True).start()
        return self

    def uninstall(self) -> None:
        """Give the signals back (a run inside a longer-lived process: a multirun, tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def _watch(self, pid: int) -> None:
        while _alive(pid):
            time.sleep(1.0)
        self.reason = self.reason or f"the launcher (pid {pid}) exited"
        time.sleep(self.grace_s)
        print(f"rmtrain: error: {self.reason}; ending this rank", file=sys.stderr, flush=True)
        os._exit(1)

    def stopped(self, step: int, path: Path) -> None:
        raise Stopped(self.reason or "stop requested on another rank", step, path)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _launcher_pid() -> int | None:
    """The outermost launcher process above this rank (deepspeed runner, torchrun), if any."""
    found, pid = None, os.getppid()
    for _ in range(4):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        if not any(k in cmd for k in ("deepspeed", "torchrun", "torch.distributed.run")):
            break
        found, pid = pid, int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent process dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
