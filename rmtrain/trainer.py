"""The training loop: train steps, periodic evaluation, logging and checkpoints.

The trainer owns the loop state (step, running score statistics, last evaluation) and hands it
to the checkpointer through `state_dict` / `load_state_dict`; it never writes files itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from datasets import Dataset

from rmtrain.batching import BatchPlan, MicroBatch, eval_shards
from rmtrain.config import Config, ConfigError
from rmtrain.engine import Engine, all_reduce_sum
from rmtrain.loggers import MetricLogger
from rmtrain.losses import PairScores, TokenScores, compute_loss, needs_token_scores, pair_metrics

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


class DivergenceError(RuntimeError):
    """The loss or the gradient norm became NaN/inf: the run stops, nothing more is written."""


class Saver(Protocol):
    """What the loop needs of a checkpointer (rmtrain.checkpoint.Checkpointer)."""

    def maybe_save(self, step: int, last: bool) -> None: ...


class RunningStats:
    """Exponential moving mean/variance of training end scores (reward normalisation)."""

    def __init__(self, momentum: float = 0.99) -> None:
        self.momentum, self.mean, self.var, self.count = momentum, 0.0, 1.0, 0

    def update(self, mean: float, var: float) -> None:
        m = 0.0 if self.count == 0 else self.momentum
        self.mean = m * self.mean + (1 - m) * mean
        self.var = m * self.var + (1 - m) * var
        self.count += 1

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], int(state["count"])


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        plan: BatchPlan,
        train_pairs: Dataset,
        eval_pairs: Dataset,
        collate: Collate,
        logger: MetricLogger,
    ) -> None:
        self.cfg, self.engine, self.plan, self.collate = cfg, engine, plan, collate
        self.train_pairs, self.eval_pairs, self.logger = train_pairs, eval_pairs, logger
        self.total_steps = plan.total_steps(cfg.trainer.max_steps, cfg.trainer.epochs)
        self.step = 0  # optimizer steps done
        self.score_stats = RunningStats()
        self.last_eval: dict[str, float] = {}
        # (input ids, end score) of this rank's first eval batch: an independent record of what
        # the trained model scores, to check exports against.
        self.eval_samples: list[tuple[list[int], float]] = []
        self.checkpointer: Saver | None = None

    # -- loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        t = self.cfg.trainer
        if t.eval_at_start and self.step == 0:
            self.logger.log(self.evaluate(), 0)
        while self.step < self.total_steps:
            self.step += 1
            last = self.step == self.total_steps
            metrics = self.train_step()
            self._check_finite(metrics)
            if last or (t.eval_every and self.step % t.eval_every == 0):
                self.last_eval = self.evaluate()
                metrics.update(self.last_eval)
            if last or self.step % t.log_every == 0 or "eval/loss" in metrics:
                self.logger.log(metrics, self.step)
            if self.checkpointer is not None:
                self.checkpointer.maybe_save(self.step, last)
        return self.last_eval

    def _check_finite(self, metrics: dict[str, Any]) -> None:
        """The divergence guard: a non-finite loss or gradient norm ends the run at this step,
        before it is checkpointed or exported (the values are the same on every rank)."""
        bad = [
            f"{k.removeprefix('train/')}={metrics[k]}"
            for k in ("train/loss", "train/grad_norm")
            if k in metrics and not math.isfinite(metrics[k])
        ]
        if bad:
            self.logger.log(metrics, self.step)
            raise DivergenceError(
                f"training diverged at step {self.step}: {', '.join(bad)} (trainer.lr="
                f"{self.cfg.trainer.lr}); stopped with no checkpoint or export of these weights"
            )

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loop state a checkpoint keeps (JSON-safe); the data position is in `data_order`."""
        return {
            "step": self.step,
            "data_order": self.plan.data_order(self.step),
            "score_stats": self.score_stats.state_dict(),
            "last_eval": dict(self.last_eval),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        saved, now = state["data_order"], self.plan.data_order(0)
        for key in ("num_pairs", "global_batch", "seed"):
            if saved[key] != now[key]:
                raise ConfigError(
                    f"cannot resume from {source}: its data order had {key}={saved[key]}, this "
                    f"run has {now[key]} (changed data or batch size would not continue the same "
                    "run)"
                )
        self.step = int(state["step"])
        self.score_stats.load_state_dict(state["score_stats"])
        self.last_eval = dict(state["last_eval"])

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        self.engine.train(True)
        start = time.perf_counter()
        micro_batches = self.plan.step(self.step - 1)
        parts = self.engine.env.world_size * len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for mb in micro_batches:
            batch, scores = self._forward(self.train_pairs, mb)
            weights = torch.tensor(mb.weights, dtype=torch.float32, device=scores.chosen.device)
            total, terms = self._loss(batch, scores)
            self.engine.backward((total * weights).sum())
            self.engine.step()
            _add(sums, "loss", (total.detach() * weights).sum() / parts)
            for name, term in terms.items():
                _add(sums, name, (term.detach() * weights).sum() / parts)
            if mb.weights[0] > 0:
                _add(sums, "tokens", batch["attention_mask"].sum())
                for k, v in self._metric_sums(batch, scores).items():
                    _add(sums, k, v)
        # The same keys on every rank (a rank may have had only a zero-weight padding batch).
        term_keys = sorted(k for k in sums if k.startswith("loss_"))
        reduced = _reduce(sums, ["loss", *term_keys, "tokens", *_PAIR_KEYS[self.cfg.objective]])
        elapsed = time.perf_counter() - start
        n = float(reduced["n"])
        chosen_mean, rejected_mean = reduced["chosen_sum"] / n, reduced["rejected_sum"] / n
        mean = float(chosen_mean + rejected_mean) / 2
        var = float(reduced["chosen_sq"] + reduced["rejected_sq"]) / (2 * n) - mean**2
        self.score_stats.update(mean, max(var, 0.0))
        metrics: dict[str, Any] = {
            "train/loss": float(reduced["loss"]),
            "train/accuracy": float(reduced["correct"]) / n,
            "train/lr": self.engine.lr,
            "train/tokens_per_s": float(reduced["tokens"]) / elapsed,
            "train/epoch": (self.step - 1) / self.plan.steps_per_epoch,
        }
        for name in term_keys:
            metrics[f"train/{name}"] = float(reduced[name])
        if (norm := self.engine.grad_norm) is not None:
            metrics["train/grad_norm"] = norm
        return metrics

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.train(False)
        env = self.engine.env
        sums: dict[str, torch.Tensor] = {}
        self.eval_samples = []
        for mb in eval_shards(
            len(self.eval_pairs), self.cfg.trainer.eval_batch_size, env.world_size, env.rank
        ):
            batch, scores = self._forward(self.eval_pairs, mb)
            if mb.weights[0] == 0:
                continue
            if not self.eval_samples:
                self.eval_samples = _samples(batch, scores)
            total, _ = self._loss(batch, scores)
            _add(sums, "loss", total.sum())
            for k, v in self._metric_sums(batch, scores).items():
                _add(sums, k, v)
        r = _reduce(sums, ["loss", *_PAIR_KEYS[self.cfg.objective]])
        n = float(r["n"])
        out = {
            "eval/loss": float(r["loss"]) / n,
            "eval/accuracy": float(r["correct"]) / n,
            "eval/margin": float(r["margin"]) / n,
            "eval/chosen_mean": float(r["chosen_sum"]) / n,
            "eval/chosen_std": _std(r["chosen_sum"], r["chosen_sq"], n),
            "eval/rejected_mean": float(r["rejected_sum"]) / n,
            "eval/rejected_std": _std(r["rejected_sum"], r["rejected_sq"], n),
            "eval/score_mean": float(r["chosen_sum"] + r["rejected_sum"]) / (2 * n),
            "eval/score_std": _std(
                r["chosen_sum"] + r["rejected_sum"], r["chosen_sq"] + r["rejected_sq"], 2 * n
            ),
            "eval/pairs": n,
        }
        if self.cfg.objective == "cost":
            out["eval/sign_accuracy"] = float(r["sign_correct"]) / float(r["sign_n"])
        return out

    # -- pieces ---------------------------------------------------------------------------------
    def _forward(
        self, pairs: Dataset, mb: MicroBatch
    ) -> tuple[dict[str, torch.Tensor], PairScores]:
        batch = self.collate([pairs[i] for i in mb.indices])
        out = self.engine.forward(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        b = len(mb.indices)
        end = out.end_scores.squeeze(-1).float()
        tokens = None
        if needs_token_scores(self.cfg.loss):
            tok = out.scores.squeeze(-1).float()
            ids = batch["input_ids"].to(end.device)
            mask = batch["attention_mask"].to(end.device)
            tokens = TokenScores(tok[:b], tok[b:], ids[:b], ids[b:], mask[:b], mask[b:])
        return batch, PairScores(chosen=end[:b], rejected=end[b:], tokens=tokens)

    def _loss(
        self, batch: dict[str, torch.Tensor], s: PairScores
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dev = s.chosen.device
        # A per-pair margin only when a data column supplies one; otherwise loss.margin applies.
        per_pair = self.cfg.loss.name == "margin" and self.cfg.data.margin_column is not None
        return compute_loss(
            self.cfg.loss,
            self.cfg.objective,
            s,
            margin=batch["margin"].to(dev) if per_pair else None,
            chosen_unsafe=batch["chosen_unsafe"].to(dev),
            rejected_unsafe=batch["rejected_unsafe"].to(dev),
        )

    def _metric_sums(
        self, batch: dict[str, torch.Tensor], s: PairScores
    ) -> dict[str, torch.Tensor]:
        dev = s.chosen.device
        return pair_metrics(
            s.chosen.detach(),
            s.rejected.detach(),
            self.cfg.objective,
            chosen_unsafe=batch["chosen_unsafe"].to(dev),
            rejected_unsafe=batch["rejected_unsafe"].to(dev),
        )


_BASE_KEYS = ["n", "correct", "margin", "chosen_sum", "chosen_sq", "rejected_sum", "rejected_sq"]
_PAIR_KEYS = {"reward": _BASE_KEYS, "cost": [*_BASE_KEYS, "sign_correct", "sign_n"]}


def _reduce(sums: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """Sum the named values over ranks (missing ones count as 0)."""
    local = torch.stack([sums.get(k, torch.zeros(())).float() for k in keys])
    return dict(zip(keys, all_reduce_sum(local), strict=True))


def _samples(batch: dict[str, torch.Tensor], s: PairScores) -> list[tuple[list[int], float]]:
    scores = torch.cat([s.chosen, s.rejected]).tolist()
    out = []
    for ids, mask, score in zip(batch["input_ids"], batch["attention_mask"], scores, strict=True):
        out.append((ids[mask.bool()].tolist(), float(score)))
    return out


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    value = value.detach().float().cpu()
    sums[key] = sums[key] + value if key in sums else value


def _std(total: torch.Tensor, sq: torch.Tensor, n: float) -> float:
    mean = float(total) / n
    return math.sqrt(max(float(sq) / n - mean**2, 0.0))
