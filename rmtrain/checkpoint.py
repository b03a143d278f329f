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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rmtrain.config import TrainerConfig
from rmtrain.engine import DistEnv, Engine, all_reduce_sum, barrier, broadcast_object
from rmtrain.errors import CheckpointError, ConfigError
from rmtrain.files import no_space, write_atomic
from rmtrain.preemption import StopRequest
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


@dataclass(frozen=True)
class Marker:
    """A complete checkpoint's marker, read once: where it is and everything it records."""

    path: Path  # the checkpoint directory
    step: int
    layout: dict[str, int]  # zero_stage, world_size
    architecture: dict[str, Any]
    states: dict[str, dict[str, Any]]  # each registered object's state_dict()
    run: dict[str, Any]  # config, data, held_out, resumed
    files: dict[str, list[Any]]  # relative path -> [size, blake2b]

    @classmethod
    def read(cls, path: Path) -> Marker:
        m = json.loads((path / MARKER).read_text())
        return cls(path, int(m["step"]), m["layout"], m["architecture"], m["states"], m["run"],
                   m.get("files", {}))  # fmt: skip

    def record(self) -> RunRecord:
        """The run record as of this checkpoint: its run info plus the trainer's state then."""
        trainer = self.states["trainer"]
        return RunRecord(
            config=self.run["config"],
            data=self.run["data"],
            held_out=self.run.get("held_out", {}),
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
        marker = Marker.read(path)
    except (OSError, ValueError, KeyError) as err:
        return f"{path / MARKER}: unreadable marker ({err})"
    for rel, (size, digest) in marker.files.items():
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written"
        if file_digest(file) != digest:
            return f"{file} does not match the checksum recorded when it was written"
    return None


def check_compatible(marker: Marker, architecture: dict[str, Any], layout: dict[str, int]) -> None:
    """Refuse a checkpoint of another model shape or ZeRO layout, naming what differs."""
    path = marker.path
    for key, now in architecture.items():
        was = marker.architecture.get(key)
        if was != now:
            raise ConfigError(
                f"cannot resume from {path}: the model's {key} was {was!r} there, {now!r} now "
                f"(the checkpoint holds a differently shaped model)"
            )
    if marker.layout != layout:
        was, now = marker.layout, layout
        raise ConfigError(
            f"cannot resume from {path}: it was written by ZeRO stage {was['zero_stage']} "
            f"on {was['world_size']} ranks, this run is stage {now['zero_stage']} on "
            f"{now['world_size']}; resume with the same layout (or `rmtrain export` it)"
        )


# Keys that may change when a run is resumed; they take effect from the resumed step (and the
# marker records the change). Any other difference from the checkpoint's config is refused.
RESUME_MAY_CHANGE = (
    "trainer.lr",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.eval_at_start",
    "trainer.save_every",
    "trainer.save_every_minutes",
    "trainer.log_every",
    "trainer.keep_last",
    "trainer.resume",
    "trainer.export",
    "trainer.export_max_shard_size",
    "deepspeed.timeout_s",
    "output_dir",
    "run_name",
    "logger.",
)


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, checked against the run before anything is built,
    and the config keys this resume changes ({key: [was, now]})."""

    marker: Marker
    changes: dict[str, list[Any]]

    def check_data(self, held_out: dict[str, Any]) -> None:
        """Refuse other held-out rows than the checkpoint's (a changed training set is caught by
        the trainer's data-order check)."""
        was = self.marker.run.get("held_out", {})
        if was != held_out:
            raise ConfigError(
                f"cannot resume from {self.marker.path}: its eval set was chosen differently "
                f"({_brief(was)} there, {_brief(held_out)} now)"
            )


def plan_resume(
    resume: str | None,
    output_dir: Path,
    config: dict[str, Any],
    architecture: dict[str, Any],
    env: DistEnv,
    zero_stage: int,
) -> Resume | None:
    """The resume policy, in one place: `trainer.resume` (None, "auto" or a path) resolved and
    verified by rank 0 (every rank gets its answer or its error), the checkpoint's model shape,
    ZeRO layout and config checked against this run's; a new run into a directory that already
    holds one is refused."""
    found: tuple[str | None, str | None] = (None, None)
    if env.is_main:
        try:
            point = find_resume_point(resume, output_dir)
            found = (str(point) if point else None, None)
        except (ConfigError, CheckpointError) as err:
            found = (None, str(err))
    path, error = broadcast_object(found)
    if error:
        raise CheckpointError(error)
    if path is None:
        if broadcast_object((output_dir / "metrics.jsonl").exists()):
            raise ConfigError(
                f"output_dir={output_dir} already holds a run; continue it with "
                "trainer.resume=auto or choose another output_dir"
            )
        return None
    marker = Marker.read(Path(path))
    check_compatible(marker, architecture, {"zero_stage": zero_stage, "world_size": env.world_size})
    return Resume(marker, resume_changes(marker.run["config"], config))


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [was, now]} for the keys allowed to change on resume; ConfigError for any other."""
    was_flat, now_flat = _flatten(saved), _flatten(now)
    changes: dict[str, list[Any]] = {}
    for key in sorted(was_flat.keys() | now_flat.keys()):
        was, new = was_flat.get(key), now_flat.get(key)
        if was == new:
            continue
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE):
            raise ConfigError(
                f"cannot resume with {key}={new!r}: the checkpoint was trained with {was!r}. "
                f"Only {', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)} may change on resume"
            )
        if key not in ("trainer.resume", "output_dir"):
            changes[key] = [was, new]
    return changes


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _brief(held: dict[str, Any]) -> str:
    rows = held.get("rows")
    if rows is not None:
        n = sum(len(v) for v in rows.values())
        return f"eval_fraction={held['eval_fraction']} split_seed={held['split_seed']}, {n} rows"
    return ", ".join(f"{k}={v}" for k, v in held.items()) or "unrecorded"


@dataclass
class RunInfo:
    """What every checkpoint of a run records besides the loop state."""

    output_dir: Path
    run: dict[str, Any]  # the static part of the RunRecord: config, data, held_out (+ resumed)
    architecture: dict[str, Any]  # hf.architecture: the shape a resume must match
    hf_files: tuple[Any, ...]  # objects with save_pretrained (model config, tokenizer) -> hf/


class Checkpointer:
    """Saves every `trainer.save_every` steps (and at the last step), every
    `trainer.save_every_minutes` minutes and on a stop request, and keeps the last
    `trainer.keep_last`. Objects with state are handed over (`states`); it imports none."""

    def __init__(
        self,
        engine: Engine,
        cfg: TrainerConfig,
        info: RunInfo,
        states: dict[str, Stateful],
        stop: StopRequest | None = None,
    ) -> None:
        self.engine, self.every, self.keep_last = engine, cfg.save_every, cfg.keep_last
        self.every_minutes, self.info, self.states, self.stop = (
            cfg.save_every_minutes, info, states, stop
        )  # fmt: skip
        self.dir = info.output_dir / "checkpoints"
        self.layout = {"zero_stage": engine.stage, "world_size": engine.env.world_size}
        self.last_save_time = time.monotonic()

    def maybe_save(self, step: int, last: bool) -> None:
        """Save if due. On a stop request: save, then raise preemption.Stopped (every rank)."""
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
        for obj in self.info.hf_files:
            obj.save_pretrained(path / HF_DIR)
        marker = {
            "step": step,
            "layout": self.layout,
            "architecture": self.info.architecture,
            "states": {name: obj.state_dict() for name, obj in self.states.items()},
            "run": self.info.run,
            "files": checksums(path),
        }
        write_atomic(path / MARKER, json.dumps(marker, indent=1))
        # Only finite checkpoints are ever written, so the kept ones include the last finite one.
        for old in complete_checkpoints(self.dir)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, resume: Resume, lr: float) -> int:
        """Continue from `resume`'s checkpoint: every state, the DeepSpeed shards, the RNG states;
        `lr` becomes the schedule's peak (the loaded scheduler state holds the old one); the keys
        changed on this resume are recorded. Returns the step it holds."""
        marker = resume.marker
        for name, obj in self.states.items():
            obj.load_state_dict(marker.states[name], source=str(marker.path))
        client = self.engine.load_checkpoint(marker.path.parent, marker.path.name)
        _set_rng_state(client["rng"])
        self.engine.set_peak_lr(lr)
        history = list(marker.run.get("resumed", []))
        if resume.changes:
            history.append({"step": marker.step, "changed": resume.changes})
            described = ", ".join(
                f"{k}={new!r} (was {was!r})" for k, (was, new) in resume.changes.items()
            )
            print(f"resume: from step {marker.step} on, {described}", flush=True)
        self.info.run["resumed"] = history
        print(f"resumed from {marker.path} at step {marker.step}", flush=True)
        return marker.step


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
