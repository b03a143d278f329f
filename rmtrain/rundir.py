"""The run directory: one per run, agreed by every rank, locked while the run lives.

- :func:`agree_output_dir`: every rank uses rank 0's directory (each rank's own `${now:}` may
  differ by a second; a Hydra multirun job uses its sweep subdirectory);
- :func:`run_lock`: rank 0 holds an exclusive flock on `<output_dir>/.rmtrain.lock` for the run's
  life, so a second run on the same directory fails at once naming the holder;
- :func:`save_config`: the resolved config as a Hydra config that re-runs the experiment;
- :func:`warn_disk_space`: a warning up front when checkpoints and the export will not fit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from rmtrain import engine
from rmtrain.errors import ConfigError

LOCK = ".rmtrain.lock"


def agree_output_dir(requested: str, env: engine.DistEnv) -> Path:
    """One run directory for all ranks: rank 0's (a per-rank `${now:}` may differ by a second).

    In a Hydra multirun each job writes to its own sweep subdirectory.
    """
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        requested = hc.runtime.output_dir
    agreed = Path(engine.broadcast_object(str(Path(requested).absolute())))
    own = Path(requested).absolute()
    if own != agreed and own.is_dir() and not any(own.iterdir()):
        own.rmdir()  # the empty directory Hydra made from this rank's own timestamp
    if env.is_main:
        agreed.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    return agreed


@contextlib.contextmanager
def run_lock(output_dir: Path, env: engine.DistEnv) -> Iterator[None]:
    """One run per directory: rank 0 holds an exclusive flock on <output_dir>/.rmtrain.lock for
    the run's life (released by the kernel however the process ends). A run that leaves
    nothing else in the directory removes it (a run that failed before writing anything)."""
    holder = None
    error = None
    if env.is_main:
        holder = (output_dir / LOCK).open("a+")
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.seek(0)
            holder.truncate()
            holder.write(f"{os.getpid()}\n")
            holder.flush()
        except BlockingIOError:
            holder.seek(0)
            pid = holder.read().strip() or "?"
            holder.close()
            holder = None
            error = f"output_dir={output_dir} is in use by another run (pid {pid}); wait for it"
    error = engine.broadcast_object(error)
    if error:
        raise ConfigError(error)
    try:
        yield
    finally:
        if holder is not None:
            lock = output_dir / LOCK
            if [p.name for p in output_dir.iterdir()] == [lock.name]:
                lock.unlink()
                with contextlib.suppress(OSError):
                    output_dir.rmdir()
            holder.close()


def save_config(config: dict[str, Any], path: Path) -> None:
    """The resolved config as a primary Hydra config that re-runs the same experiment:
    `rmtrain train --config-path <run dir> --config-name config output_dir=<new dir>`."""
    rerun = {
        "defaults": ["rmtrain_schema", "_self_"],
        **config,
        "hydra": {"run": {"dir": "${output_dir}"}, "output_subdir": None},
    }
    OmegaConf.save(OmegaConf.create(rerun), path)


def warn_disk_space(params: int, output_dir: Path, keep_last: int) -> None:
    """Warn up front when the disk cannot hold the checkpoints (about 16 bytes per parameter:
    weights, fp32 master copy and two Adam moments) plus an export."""
    need = params * (16 * (keep_last + 1) + 4)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        print(
            f"rmtrain: warning: {_size(free)} free at {output_dir}, checkpoints and export "
            f"need about {_size(need)}",
            file=sys.stderr,
            flush=True,
        )


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
