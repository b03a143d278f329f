"""The training loop: train steps, periodic evaluation, logging and checkpoints.

The trainer owns the loop state (step, running score statistics, last evaluation) and hands it
to its checkpointer through `state_dict` / `load_state_dict`; it never writes files itself.
A step's micro-batches come from the batch plan as pair indices, are collated straight from the
pair table into padded or packed rows (`rmtrain.batch`), and the loss object decides what the
objective needs; evaluation is the :class:`~rmtrain.evaluator.Evaluator`'s.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rmtrain import telemetry
from rmtrain.batch import Layout, collate, pair_scores
from rmtrain.batching import BatchPlan, TokenBudgetPlan, check_same_order
from rmtrain.checkpoint import Checkpointer, Resume, RunInfo
from rmtrain.config import TrainerConfig
from rmtrain.data.table import PairTable
from rmtrain.engine import Engine, all_reduce_sum
from rmtrain.errors import DivergenceError
from rmtrain.evaluator import Evaluator
from rmtrain.loggers import MetricLogger
from rmtrain.losses import PairLoss
from rmtrain.preemption import StopRequest


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


class StepMetrics:
    """A step's sums, kept on their device until one all-reduce at the end of the step (one
    device-to-host copy per step, not one per micro-batch and metric)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value).detach().double()
        if key in self.sums:
            value = self.sums[key] + value.to(self.sums[key].device)
        self.sums[key] = value

    def reduce(self, keys: list[str]) -> dict[str, float]:
        """The named sums over all ranks (missing ones count as 0): the same keys on every rank,
        even one that had only a zero-weight padding micro-batch."""
        dev = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        zero = torch.zeros((), device=dev, dtype=torch.float64)
        local = torch.stack([self.sums[k].to(dev) if k in self.sums else zero for k in keys])
        return {k: float(v) for k, v in zip(keys, all_reduce_sum(local), strict=True)}


_PAIR_KEYS = ["n", "correct", "margin", "chosen_sum", "chosen_sq", "rejected_sum", "rejected_sq"]


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        engine: Engine,
        plan: BatchPlan | TokenBudgetPlan,
        train: PairTable,
        layout: Layout,
        loss: PairLoss,
        evaluator: Evaluator,
        logger: MetricLogger,
        info: RunInfo,
        stop: StopRequest | None = None,
    ) -> None:
        self.cfg, self.engine, self.plan, self.train = cfg, engine, plan, train
        self.layout, self.loss, self.evaluator, self.logger = layout, loss, evaluator, logger
        self.total_steps = plan.total_steps(cfg.max_steps, cfg.epochs)
        self.step = 0  # optimizer steps done
        self.score_stats = RunningStats()
        self.last_eval: dict[str, float] = {}
        self.checkpointer = Checkpointer(engine, cfg, info, states={"trainer": self}, stop=stop)
        self._launch_logged = False

    # -- loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        t = self.cfg
        if t.eval_at_start and self.step == 0:
            self.logger.log(self.evaluator.evaluate(0), 0)
        while self.step < self.total_steps:
            self.step += 1
            last = self.step == self.total_steps
            metrics = self.train_step()
            self._check_finite(metrics)
            if last or (t.eval_every and self.step % t.eval_every == 0):
                self.last_eval = self.evaluator.evaluate(self.step)
                metrics.update(self.last_eval)
            if last or self.step % t.log_every == 0 or "eval/loss" in metrics:
                self.logger.log(metrics, self.step)
            self.checkpointer.maybe_save(self.step, last)
        return self.last_eval

    def resume(self, resume: Resume) -> None:
        self.checkpointer.resume(resume, self.cfg.lr)

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
                f"{self.cfg.lr}); stopped with no checkpoint or export of these weights"
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
        check_same_order(state["data_order"], self.plan.data_order(0), source)
        self.step = int(state["step"])
        self.score_stats.load_state_dict(state["score_stats"])
        self.last_eval = dict(state["last_eval"])

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        self.engine.train(True)
        launch_s = None if self._launch_logged else telemetry.seconds_since_launch()
        start = time.perf_counter()
        micro_batches = self.plan.step(self.step - 1)
        parts = self.engine.env.world_size * len(micro_batches)
        sums = StepMetrics()
        for mb in micro_batches:
            batch = collate(self.train, mb.indices, self.layout)
            out = self.engine.forward(**batch.model_inputs())
            scores = pair_scores(batch, out, self.loss.needs_token_scores)
            weights = torch.tensor(mb.weights, dtype=torch.float32, device=scores.chosen.device)
            total, terms = self.loss(scores, batch.labels)
            self.engine.backward((total * weights).sum())
            self.engine.step()
            sums.add("loss", (total.detach() * weights).sum() / parts)
            for name, term in terms.items():
                sums.add(name, (term.detach() * weights).sum() / parts)
            if mb.weights[0] > 0:  # not a padding micro-batch
                lengths = batch.pair_lengths()  # both sides of every pair, as trained
                sums.add("tokens", lengths.sum())
                # sum n * keys per query (sliding-window layers: at most the window)
                sums.add("attended", telemetry.attended_tokens(self.engine.module.config, lengths))
                sums.add("fed_tokens", batch.rows.fed_tokens)
                sums.add("computed_tokens", batch.rows.computed_tokens)
                for k, v in self.loss.metric_sums(scores, batch.labels).items():
                    sums.add(k, v)
        term_keys = sorted(k for k in sums.sums if k.startswith("loss_"))
        keys = ["loss", *term_keys, "tokens", "attended", "fed_tokens", "computed_tokens",
                *_PAIR_KEYS]  # fmt: skip
        if self.loss.objective == "cost":
            keys += ["sign_correct", "sign_n"]
        r = sums.reduce(keys)
        elapsed = time.perf_counter() - start
        n = r["n"]
        mean = (r["chosen_sum"] + r["rejected_sum"]) / (2 * n)
        var = (r["chosen_sq"] + r["rejected_sq"]) / (2 * n) - mean**2
        self.score_stats.update(mean, max(var, 0.0))
        metrics: dict[str, Any] = {
            "train/loss": r["loss"],
            "train/accuracy": r["correct"] / n,
            "train/lr": self.engine.lr,
            "train/epoch": self.plan.epoch_position(self.step - 1),
            "train/pairs": n,
        }
        metrics.update({f"train/{name}": r[name] for name in term_keys})
        if (norm := self.engine.grad_norm) is not None:
            metrics["train/grad_norm"] = norm
        metrics.update(self._throughput(r, elapsed))
        if launch_s is not None:
            metrics["time/launch_to_first_step_s"] = launch_s
            self._launch_logged = True
        return metrics

    def _throughput(self, r: dict[str, float], elapsed: float) -> dict[str, float]:
        """Real tokens/s, padded fraction, step time, FLOPs per real token, MFU, peak memory.
        Real tokens count both sides of every pair in full, also where prefix sharing computes a
        prefix once (`train/shared_fraction`: the share of them not recomputed); so do the FLOPs
        behind MFU, which is then the unshared model's."""
        tokens, fed, computed = r["tokens"], r["fed_tokens"], r["computed_tokens"]
        per_token = telemetry.flops_per_token(self.engine.module, r["attended"] / tokens)
        out = {
            "train/tokens_per_s": tokens / elapsed,
            "train/padded_fraction": 1.0 - computed / fed,
            "train/step_time_s": elapsed,
            "train/flops_per_token": per_token,
        }
        if self.layout.share_prefixes:
            out["train/shared_fraction"] = 1.0 - computed / tokens
        env = self.engine.env
        peak = telemetry.device_peak_tflops(env.device, self.cfg.peak_tflops)
        if peak is not None:
            out["train/mfu"] = per_token * tokens / elapsed / (peak * 1e12 * env.world_size)
        if (memory := telemetry.peak_memory_gib(env.device)) is not None:
            out["train/peak_memory_gib"] = memory
        return out
