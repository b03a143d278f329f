"""Metric sinks. Only rank 0 builds real sinks; the trainer never talks to wandb directly.

`MetricLogger.log(metrics, step)` fans out to the console (a tqdm progress bar plus eval
summaries), `<output_dir>/metrics.jsonl` (one JSON object per logged step) and wandb.
`log_evaluation` hands a whole evaluation (summary, per-pair scores, the worst-ranked pairs) to
the sinks that show more than scalars (wandb: score histograms and a worst-pairs table), and
`log_final` the run's plots and final eval summary (wandb: images and the run summary).
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rmtrain.config import LoggerConfig, WandbConfig
from rmtrain.eval.metrics import EvalSet
from rmtrain.files import read_jsonl, write_jsonl


class Sink:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def log_evaluation(self, result: EvalSet, step: int) -> None:
        """One eval set's full result at `step` (sinks that only show scalars ignore it)."""

    def log_final(self, images: dict[str, Path], summary: dict[str, float]) -> None:
        """The finished run's plots (by caption) and its final eval scalars."""

    def close(self, exit_code: int = 0) -> None:
        pass


# Eval keys the console prints at eval steps (metrics.jsonl and wandb get them all).
_CONSOLE_EVAL = ("loss", "accuracy", "margin", "ece")


class ConsoleSink(Sink):
    def __init__(self, total_steps: int) -> None:
        # Redirected output (SLURM logs, CI) gets an update every 10 s, not one per step.
        interval = 0.2 if sys.stderr.isatty() else 10.0
        self.bar = tqdm(total=total_steps, desc="train", mininterval=interval)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "train/loss" in metrics:
            postfix = {
                "loss": f"{metrics['train/loss']:.4f}",
                "acc": f"{metrics.get('train/accuracy', 0):.3f}",
            }
            if "train/tokens_per_s" in metrics:
                postfix["tok/s"] = f"{metrics['train/tokens_per_s']:.0f}"
            if "train/padded_fraction" in metrics:
                postfix["pad"] = f"{metrics['train/padded_fraction']:.2f}"
            if "train/mfu" in metrics:
                postfix["mfu"] = f"{metrics['train/mfu']:.1%}"
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)
        evals = {
            k: v
            for k, v in metrics.items()
            if k.startswith("eval/")
            and k.rsplit("/", 1)[-1] in _CONSOLE_EVAL
            and k.count("/") <= 2  # eval/<metric>, eval/<set>/<metric>: no breakdowns
        }
        if evals:
            shown = ", ".join(f"{k[5:]}={v:.4g}" for k, v in evals.items() if isinstance(v, float))
            self.bar.write(f"step {step} eval: {shown}")

    def close(self, exit_code: int = 0) -> None:
        self.bar.close()


class JsonlSink(Sink):
    """`<output_dir>/metrics.jsonl`. On a resume from step N, the lines a killed run logged
    after N are dropped first (those steps are run again)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        if resume_step is not None and path.exists():
            rows = read_metrics(path)
            keep = [row for row in rows if row.get("step", 0) <= resume_step]
            if len(keep) != len(rows):
                write_jsonl(path, keep)
        self.file = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self, exit_code: int = 0) -> None:
        self.file.close()


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: WandbConfig) -> tuple[str, str | None]:
    """(mode, note): explicit config, then WANDB_MODE, then online with a key, else offline."""
    if cfg.mode:
        return cfg.mode, None
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if _has_wandb_key():
        return "online", None
    return "offline", "wandb: no API key found, logging offline (sync later with `wandb sync`)"


class WandbSink(Sink):
    def __init__(
        self, cfg: WandbConfig, run_name: str, output_dir: Path, config: dict[str, Any]
    ) -> None:
        import wandb

        mode, note = wandb_mode(cfg)
        if note:
            print(note, flush=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            group=cfg.group,
            tags=list(cfg.tags),
            mode=mode,  # type: ignore[arg-type]
            dir=str(output_dir),
            config=config,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_evaluation(self, result: EvalSet, step: int) -> None:
        import wandb

        flat = [r for r in result.records if "chosen_score" in r]
        data: dict[str, Any] = {}
        for side in ("chosen", "rejected") if flat else ():
            scores = [r[f"{side}_score"] for r in flat]
            data[f"eval/{result.name}/{side}_scores"] = wandb.Histogram(scores)
        if result.worst:
            fields = ["chosen_score", "rejected_score", "chosen_text", "rejected_text", "source",
                      "row"]  # fmt: skip
            rows = [[r["chosen_score"] - r["rejected_score"], *(r.get(f) for f in fields)]
                    for r in result.worst]  # fmt: skip
            columns: list[str | int] = ["margin", *fields]
            data[f"eval/{result.name}/worst_pairs"] = wandb.Table(columns=columns, data=rows)
        if data:
            self.run.log(data, step=step)

    def log_final(self, images: dict[str, Path], summary: dict[str, float]) -> None:
        import wandb

        self.run.log({f"plots/{k}": wandb.Image(str(p), caption=k) for k, p in images.items()})
        self.run.summary.update(summary)

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)  # non-zero: the run shows as failed


class MetricLogger:
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_evaluation(self, result: EvalSet, step: int) -> None:
        for sink in self.sinks:
            sink.log_evaluation(result, step)

    def log_final(self, images: dict[str, Path], summary: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_final(images, summary)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink once (later calls do nothing)."""
        for sink in self.sinks:
            sink.close(exit_code)
        self.sinks = []

    @contextlib.contextmanager
    def closed_on_error(self, exit_codes: dict[type[BaseException], int]) -> Iterator[None]:
        """Close the sinks if the block raises (files released, a wandb run marked failed,
        with `exit_codes[type]` or 1), then re-raise."""
        try:
            yield
        except BaseException as exc:
            self.close(next((c for t, c in exit_codes.items() if isinstance(exc, t)), 1))
            raise


def build_logger(
    cfg: LoggerConfig,
    *,
    is_main: bool,
    output_dir: Path,
    run_name: str,
    total_steps: int,
    config: dict[str, Any],
    resume_step: int | None = None,
) -> MetricLogger:
    if not is_main:
        return MetricLogger([])
    sinks: list[Sink] = []
    if cfg.console:
        sinks.append(ConsoleSink(total_steps))
    if cfg.jsonl:
        sinks.append(JsonlSink(output_dir / "metrics.jsonl", resume_step))
    if cfg.wandb.enabled:
        sinks.append(WandbSink(cfg.wandb, run_name, output_dir, config))
    return MetricLogger(sinks)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none when the JSONL sink is off)."""
    return [row for _, row in read_jsonl(path)] if path.exists() else []


def run_label(run_name: str | None) -> str:
    """The run's name in wandb and its report: `run_name`, else the experiment preset's name,
    then the time this process started the run."""
    from hydra.core.hydra_config import HydraConfig

    name = run_name
    if name is None:
        hc = HydraConfig.get() if HydraConfig.initialized() else None
        name = (hc.runtime.choices.get("experiment") if hc else None) or "rmtrain"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
