"""DeepSpeed checkpoints that resume exactly.

A checkpoint is `<output_dir>/checkpoints/step_00000010/`:

- DeepSpeed's model and optimizer shards, with the LR-scheduler state and the RNG states as
  client state;
- `hf/`: the model config and tokenizer (with its trained chat template), so that
  `rmtrain export` needs neither the network nor the original model directory;
- `rmtrain_complete.json`, the marker, written by rank 0 only after every rank has finished
  writing: the step, the ZeRO layout, the model architecture, the state of every registered
  object (`state_dict()`, JSON), and the run's :class:`~rmtrain.record.RunRecord` (config, data
  counts). A checkpoint cut off by a kill has no marker and is never taken for a complete one.

The checkpointer imports no trainer: objects with state are handed to it (torchtitan's pattern).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rmtrain.config import ConfigError
from rmtrain.engine import Engine, barrier
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
    """The checkpoint `trainer.resume` names: None, "auto" (latest complete) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = resolve_checkpoint(Path(resume))
    if path is None:
        raise ConfigError(f"trainer.resume={resume}: no complete checkpoint there")
    return path


def resolve_checkpoint(path: Path) -> Path | None:
    """A checkpoint directory itself, or the latest complete one of a run / checkpoints dir."""
    if (path / MARKER).exists():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        found = complete_checkpoints(ckpt_dir)
        if found:
            return found[-1]
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
    """Saves every `every` steps (and at the last step) and keeps the last `keep_last`."""

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

    def maybe_save(self, step: int, last: bool) -> None:
        if self.every and (step % self.every == 0 or last):
            self.save(step)

    def save(self, step: int) -> Path:
        tag = tag_for(step)
        self.engine.save_checkpoint(self.dir, tag, {"rng": _rng_state()})
        barrier()
        path = self.dir / tag
        if self.engine.env.is_main:
            for obj in self.hf_files:
                obj.save_pretrained(path / HF_DIR)
            marker = {
                "step": step,
                "layout": self.layout,
                "architecture": self.architecture,
                "states": {name: obj.state_dict() for name, obj in self.states.items()},
                "run": self.run,
            }
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1))
            tmp.rename(path / MARKER)
            for old in complete_checkpoints(self.dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return path

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
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
