"""DeepSpeed checkpoints that resume exactly.

A checkpoint is `<output_dir>/checkpoints/step_00000010/`:

- DeepSpeed's model and optimizer shards, with the LR-scheduler state and the RNG states as
  client state;
- `hf/`: the model config and tokenizer (with its trained chat template), so that
  `rmtrain export` needs neither the network nor the original model directory;
- `rmtrain_complete.json`, the marker, written by rank 0 only after every rank has finished
  writing: the step, the ZeRO layout, the model architecture, the state of every registered
  object (`state_dict()`, JSON), and the run's :class:`~rmtrain.record.RunRecord` (config, data
  counts), and the size and blake2b digest of every file. A checkpoint cut off by a kill has no
  marker and is never taken for a complete one; one whose files no longer match their digests
  (garbled, truncated, deleted) is skipped for the newest intact one, with a warning.

Nothing in a checkpoint can run code: DeepSpeed's files are read with `weights_only=True`
(`engine.weights_only_loads`), the RNG states are plain lists and tensors, the rest is JSON.

The checkpointer also saves on a stop request (SIGTERM / SIGUSR1, or the launcher gone) and
every `save_every_minutes`; both are decided at a step boundary, the same on every rank.

The checkpointer imports no trainer: objects with state are handed to it (torchtitan's pattern).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rmtrain.config import ConfigError
from rmtrain.engine import CheckpointError, Engine, StopRequest, all_reduce_sum, barrier, no_space
from rmtrain.record import RunRecord

MARKER = "rmtrain_complete.json"
HF_DIR = "hf"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any], source: str = ...) -> None: ...


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.parent for p in ckpt_dir.glob(f"step_*/{MARKER}"))


def read_marker(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / MARKER).read_text()))


def record_of(marker: dict[str, Any]) -> RunRecord:
    """The run record as of a checkpoint: its run info plus the trainer's state then."""
    trainer = marker["states"]["trainer"]
    return RunRecord(
        config=marker["run"]["config"],
        data=marker["run"]["data"],
        held_out=marker["run"].get("held_out", {}),
        score_stats=trainer["score_stats"],
        last_eval=trainer["last_eval"],
    )


def find_resume_point(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` names: None, "auto" (newest intact complete one) or a
    path. Raises CheckpointError naming the file when checkpoints exist but none is intact."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_intact(complete_checkpoints(output_dir / "checkpoints"))
    path = resolve_checkpoint(Path(resume))
    if path is None:
        raise ConfigError(f"trainer.resume={resume}: no complete checkpoint there")
    return path


def resolve_checkpoint(path: Path) -> Path | None:
    """A checkpoint directory itself (verified), or the newest intact complete one of a run /
    checkpoints dir."""
    if (path / MARKER).exists():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    for ckpt_dir in (path / "checkpoints", path):
        found = complete_checkpoints(ckpt_dir)
        if found:
            return newest_intact(found)
    return None


def newest_intact(found: list[Path]) -> Path | None:
    """The newest checkpoint of `found` whose files match the marker; warns for each skipped."""
    problems: list[str] = []
    for path in reversed(found):
        problem = verify(path)
        if not problem:
            if problems:
                print(f"rmtrain: warning: using {path} instead", file=sys.stderr, flush=True)
            return path
        problems.append(problem)
        print(f"rmtrain: warning: skipping damaged checkpoint {path}: {problem}", file=sys.stderr)
    if problems:
        raise CheckpointError(f"no intact checkpoint left: {problems[0]}")
    return None


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def checksums(path: Path) -> dict[str, list[Any]]:
    """[size, blake2b] of every file of a checkpoint but the marker, by relative path."""
    out: dict[str, list[Any]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if not rel.startswith(MARKER):
            out[rel] = [file.stat().st_size, file_digest(file)]
    return out


def verify(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: all match the marker)."""
    try:
        marker = read_marker(path)
    except (OSError, ValueError) as err:
        return f"{path / MARKER}: unreadable marker ({err})"
    for rel, (size, digest) in marker.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written"
        if file_digest(file) != digest:
            return f"{file} does not match the checksum recorded when it was written"
    return None


def check_compatible(
    marker: dict[str, Any], architecture: dict[str, Any], layout: dict[str, int], path: Path
) -> None:
    """Refuse a checkpoint of another model shape or ZeRO layout, naming what differs."""
    for key, now in architecture.items():
        was = marker["architecture"].get(key)
        if was != now:
            raise ConfigError(
                f"cannot resume from {path}: the model's {key} was {was!r} there, {now!r} now "
                f"(the checkpoint holds a differently shaped model)"
            )
    if marker["layout"] != layout:
        was, now = marker["layout"], layout
        raise ConfigError(
            f"cannot resume from {path}: it was written by ZeRO stage {was['zero_stage']} "
            f"on {was['world_size']} ranks, this run is stage {now['zero_stage']} on "
            f"{now['world_size']}; resume with the same layout (or `rmtrain export` it)"
        )


class Checkpointer:
    """Saves every `every` steps (and at the last step), every `every_minutes` minutes and on a
    stop request, and keeps the last `keep_last`."""

    def __init__(
        self,
        engine: Engine,
        output_dir: Path,
        *,
        every: int,
        keep_last: int,
        states: dict[str, Stateful],
        run: dict[str, Any],
        architecture: dict[str, Any],
        hf_files: Any,
        every_minutes: float = 0.0,
        stop: StopRequest | None = None,
    ) -> None:
        """`run`: the static part of the RunRecord (config, data); `hf_files`: objects with
        `save_pretrained` (model config, tokenizer) written to each checkpoint's `hf/`."""
        self.engine, self.every, self.keep_last = engine, every, keep_last
        self.states, self.run, self.architecture, self.hf_files = (
            states,
            run,
            architecture,
            hf_files,
        )
        self.dir = output_dir / "checkpoints"
        self.layout = {"zero_stage": engine.stage, "world_size": engine.env.world_size}
        self.every_minutes, self.stop = every_minutes, stop
        self.last_save_time = time.monotonic()

    def maybe_save(self, step: int, last: bool) -> None:
        """Save if due. On a stop request: save, then raise engine.Stopped (every rank)."""
        due = bool(self.every and (step % self.every == 0 or last))
        # One collective decides the time-based save and the stop for every rank alike.
        if self.every_minutes or self.stop is not None:
            late = time.monotonic() - self.last_save_time >= 60 * self.every_minutes > 0
            stopping = self.stop is not None and self.stop.reason is not None
            flags = all_reduce_sum(torch.tensor([float(late), float(stopping)]))
            due = due or bool(flags[0] > 0)
            if flags[1] > 0:
                path = self.save(step)
                assert self.stop is not None
                self.stop.stopped(step, path)
        if due:
            self.save(step)

    def save(self, step: int) -> Path:
        if not self.engine.weights_finite():
            raise CheckpointError(f"step {step}: the weights hold NaN/inf; not checkpointed")
        tag = tag_for(step)
        path = self.dir / tag
        if (path / MARKER).exists():
            return path  # this step is saved already (a stop right after a periodic save)
        try:
            self.engine.save_checkpoint(self.dir, tag, {"rng": _rng_state()})
            barrier()
            if self.engine.env.is_main:
                self._finish(step, path)
        except (OSError, RuntimeError) as err:
            last = complete_checkpoints(self.dir)
            full = no_space(err, path, last[-1] if last else None)
            if full is None:
                raise
            if self.engine.env.is_main:
                shutil.rmtree(path, ignore_errors=True)
            raise full from None
        barrier()
        self.last_save_time = time.monotonic()
        return path

    def _finish(self, step: int, path: Path) -> None:
        for obj in self.hf_files:
            obj.save_pretrained(path / HF_DIR)
        marker = {
            "step": step,
            "layout": self.layout,
            "architecture": self.architecture,
            "states": {name: obj.state_dict() for name, obj in self.states.items()},
            "run": self.run,
            "files": checksums(path),
        }
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=1))
        tmp.rename(path / MARKER)
        # Only finite checkpoints are ever written, so the kept ones include the last finite one.
        for old in complete_checkpoints(self.dir)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> int:
        """Continue from `path` (checked with `check_compatible` before anything was built);
        returns the step it holds."""
        marker = read_marker(path)
        for name, obj in self.states.items():
            obj.load_state_dict(marker["states"][name], source=str(path))
        client = self.engine.load_checkpoint(path.parent, path.name)
        _set_rng_state(client["rng"])
        return int(marker["step"])


def _rng_state() -> dict[str, Any]:
    """Plain lists and tensors only, so that a `weights_only=True` load reads it."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys).tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
