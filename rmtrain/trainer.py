"""The training loop: train steps, periodic evaluation, logging and checkpoints.

The trainer owns the loop state (step, running score statistics, last evaluation) and hands it
to the checkpointer through `state_dict` / `load_state_dict`; it never writes files itself.

With `trainer.packing` a micro-batch's chosen and rejected sequences are packed into a few rows
(`rmtrain.packing`); end scores are read at each sequence's last token, and the per-token scores
are unpacked into right-padded `[B, L]` views for the token-wise losses, so the losses and
metrics see the same tensors as on the padded path. The pairs datasets are materialised once
(`PairTable`), so a micro-batch is a few tensor slices rather than per-row dataset indexing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import pyarrow as pa
import torch
from datasets import Dataset

from rmtrain import telemetry
from rmtrain.batching import BatchPlan, MicroBatch, TokenBudgetPlan, eval_shards
from rmtrain.config import Config, ConfigError
from rmtrain.engine import Engine, all_reduce_sum, gather_object
from rmtrain.eval.metrics import (
    EvalSet,
    Kind,
    headline,
    regroup_completions,
    regroup_styles,
    summarize,
)
from rmtrain.eval.outputs import worst_pairs
from rmtrain.loggers import MetricLogger
from rmtrain.losses import PairScores, TokenScores, compute_loss, needs_token_scores, pair_metrics
from rmtrain.packing import (
    balanced_row_tokens,
    pack_sequences,
    row_token_cost,
    unpack,
    unpack_index,
)

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


class PairTable:
    """A pairs dataset materialised once: list columns as one flat tensor plus offsets, the other
    columns as Python lists. `rows(indices)` returns what `dataset[i]` would (token ids as lists)
    at the cost of a few slices, without arrow-to-Python conversion per row and micro-batch."""

    def __init__(self, pairs: Dataset) -> None:
        table: pa.Table = pairs.with_format("arrow")[:]  # respects an indices mapping
        self.num_rows = table.num_rows
        self.flat: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self.scalars: dict[str, list[Any]] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                lengths = column.value_lengths().to_numpy(zero_copy_only=False)
                values = torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).copy())
                offsets = [0, *torch.from_numpy(lengths.astype("int64")).cumsum(0).tolist()]
                self.flat[name] = (values.long(), offsets)
            else:
                self.scalars[name] = column.to_pylist()

    def seq(self, name: str, i: int) -> torch.Tensor:
        values, offsets = self.flat[name]
        return values[offsets[i] : offsets[i + 1]]

    def rows(self, indices: list[int]) -> list[dict[str, Any]]:
        out = []
        for i in indices:
            row: dict[str, Any] = {k: v[i] for k, v in self.scalars.items()}
            row.update({k: self.seq(k, i).tolist() for k in self.flat})
            out.append(row)
        return out


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        plan: BatchPlan | TokenBudgetPlan,
        train_pairs: Dataset,
        eval_pairs: Dataset,
        collate: Collate,
        logger: MetricLogger,
        eval_sets: dict[str, Dataset] | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.cfg, self.engine, self.plan, self.collate = cfg, engine, plan, collate
        self.train_pairs, self.eval_pairs, self.logger = train_pairs, eval_pairs, logger
        # More eval sets, logged as eval/<name>/...; the main one keeps the plain eval/* keys.
        self.eval_sets = dict(eval_sets or {})
        self.total_steps = plan.total_steps(cfg.trainer.max_steps, cfg.trainer.epochs)
        self.step = 0  # optimizer steps done
        self.score_stats = RunningStats()
        self.last_eval: dict[str, float] = {}
        # (input ids, end score) of this rank's first eval batch: an independent record of what
        # the trained model scores, to check exports against.
        self.eval_samples: list[tuple[list[int], float]] = []
        # Rank 0: the last evaluation of every set, by set name (MAIN_EVAL for the main set);
        # what the run writes into eval/ at the end.
        self.evaluations: dict[str, EvalSet] = {}
        self.decode = decode  # token ids -> text, for the worst-pairs table
        self.checkpointer: Saver | None = None
        self._tables: dict[int, tuple[Dataset, PairTable]] = {}
        self._first_step_logged = False

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
        # Token-budget runs also record their budget: a resume with another budget (or none)
        # would see other batches. Packing on/off does not change the data order.
        keys = ("num_pairs", "global_batch", "seed", "max_tokens_per_micro_batch", "window")
        for key in keys:
            if saved.get(key) != now.get(key):
                raise ConfigError(
                    f"cannot resume from {source}: its data order had {key}={saved.get(key)}, "
                    f"this run has {now.get(key)} (changed data, batch size or token budget would "
                    "not continue the same run)"
                )
        self.step = int(state["step"])
        self.score_stats.load_state_dict(state["score_stats"])
        self.last_eval = dict(state["last_eval"])

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        self.engine.train(True)
        launch_s = None if self._first_step_logged else telemetry.seconds_since_launch()
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
                lengths = batch["attention_mask"].sum(-1)
                _add(sums, "tokens", lengths.sum())
                _add(sums, "tokens_sq", (lengths.double() ** 2).sum())
                _add(sums, "fed_tokens", batch["fed_tokens"])
                for k, v in self._metric_sums(batch, scores).items():
                    _add(sums, k, v)
        # The same keys on every rank (a rank may have had only a zero-weight padding batch).
        term_keys = sorted(k for k in sums if k.startswith("loss_"))
        keys = ["loss", *term_keys, "tokens", "tokens_sq", "fed_tokens"]
        reduced = _reduce(sums, [*keys, *_PAIR_KEYS[self.cfg.objective]])
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
            "train/epoch": self.plan.epoch_position(self.step - 1),
            "train/pairs": n,
        }
        for name in term_keys:
            metrics[f"train/{name}"] = float(reduced[name])
        if (norm := self.engine.grad_norm) is not None:
            metrics["train/grad_norm"] = norm
        metrics.update(self._throughput(reduced, elapsed))
        if launch_s is not None:
            metrics["time/launch_to_first_step_s"] = launch_s
            self._first_step_logged = True
        return metrics

    def _throughput(self, reduced: dict[str, torch.Tensor], elapsed: float) -> dict[str, float]:
        """Real tokens/s, padded fraction, step time, FLOPs per real token, MFU, peak memory."""
        tokens, fed = float(reduced["tokens"]), float(reduced["fed_tokens"])
        per_token = telemetry.flops_per_token(
            self.engine.module.config, float(reduced["tokens_sq"]) / tokens
        )
        out = {
            "train/tokens_per_s": tokens / elapsed,
            "train/padded_fraction": 1.0 - tokens / fed,
            "train/step_time_s": elapsed,
            "train/flops_per_token": per_token,
        }
        env = self.engine.env
        peak = telemetry.device_peak_tflops(env.device, self.cfg.trainer.peak_tflops)
        if peak is not None:
            out["train/mfu"] = per_token * tokens / elapsed / (peak * 1e12 * env.world_size)
        if (memory := telemetry.peak_memory_gib(env.device)) is not None:
            out["train/peak_memory_gib"] = memory
        return out

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The main eval set as eval/*, then every extra set as eval/<name>/*."""
        out = self._evaluate(self.eval_pairs, "eval/", MAIN_EVAL, keep_samples=True)
        for name, pairs in self.eval_sets.items():
            out.update(self._evaluate(pairs, f"eval/{name}/", name))
        return out

    @torch.no_grad()
    def _evaluate(
        self, pairs: Dataset, p: str, name: str, keep_samples: bool = False
    ) -> dict[str, float]:
        self.engine.train(False)
        env = self.engine.env
        sums: dict[str, torch.Tensor] = {}
        scored: list[tuple[int, float, float]] = []  # (pair index, chosen, rejected score)
        if keep_samples:
            self.eval_samples = []
        for mb in eval_shards(
            len(pairs), self.cfg.trainer.eval_batch_size, env.world_size, env.rank
        ):
            batch, scores = self._forward(pairs, mb)
            if mb.weights[0] == 0:
                continue
            if keep_samples and not self.eval_samples:
                self.eval_samples = _samples(batch, scores)
            total, _ = self._loss(batch, scores)
            _add(sums, "loss", total.sum())
            for k, v in self._metric_sums(batch, scores).items():
                _add(sums, k, v)
            chosen, rejected = scores.chosen.tolist(), scores.rejected.tolist()
            scored += zip(mb.indices, chosen, rejected, strict=True)
        every = gather_object(scored)  # rank 0: every rank's pairs
        full = {}
        if every is not None:
            full = self._summarize(pairs, [x for part in every for x in part], name, p)
        r = _reduce(sums, ["loss", *_PAIR_KEYS[self.cfg.objective]])
        n = float(r["n"])
        out = {
            **full,
            f"{p}loss": float(r["loss"]) / n,
            f"{p}accuracy": float(r["correct"]) / n,
            f"{p}margin": float(r["margin"]) / n,
            f"{p}chosen_mean": float(r["chosen_sum"]) / n,
            f"{p}chosen_std": _std(r["chosen_sum"], r["chosen_sq"], n),
            f"{p}rejected_mean": float(r["rejected_sum"]) / n,
            f"{p}rejected_std": _std(r["rejected_sum"], r["rejected_sq"], n),
            f"{p}score_mean": float(r["chosen_sum"] + r["rejected_sum"]) / (2 * n),
            f"{p}score_std": _std(
                r["chosen_sum"] + r["rejected_sum"], r["chosen_sq"] + r["rejected_sq"], 2 * n
            ),
            f"{p}pairs": n,
        }
        if self.cfg.objective == "cost":
            out[f"{p}sign_accuracy"] = float(r["sign_correct"]) / float(r["sign_n"])
        return out

    def _summarize(
        self, pairs: Dataset, scored: list[tuple[int, float, float]], name: str, p: str
    ) -> dict[str, float]:
        """Rank 0: every metric of `rmtrain eval` on this set (kept for the run's eval/ files
        and the wandb extras); returns the dashboard scalars as `<p><metric>`."""
        table = self._table(pairs)
        records = [_record(table, i, c, r) for i, c, r in sorted(scored)]
        kind: Kind = "cost" if self.cfg.objective == "cost" else "reward"
        if records and all("style" in rec for rec in records):
            records = regroup_styles(records)
        elif records and all("completion" in rec for rec in records):  # RewardBench 2
            records = regroup_completions(records)
        result = EvalSet(name, summarize(records, kind=kind), records, worst_pairs(records, kind))
        if self.decode is not None:
            for row in result.worst:
                for side in ("chosen", "rejected"):
                    row[f"{side}_text"] = self.decode(
                        table.seq(f"{side}_input_ids", row["index"]).tolist()
                    )
        self.evaluations[name] = result
        self.logger.log_evaluation(result, self.step)
        return {f"{p}{k}": v for k, v in headline(result.summary).items()}

    # -- pieces ---------------------------------------------------------------------------------
    def _table(self, pairs: Dataset) -> PairTable:
        """The materialised `pairs` (built on first use; the dataset is kept so ids stay valid)."""
        if id(pairs) not in self._tables:
            self._tables[id(pairs)] = (pairs, PairTable(pairs))
        return self._tables[id(pairs)][1]

    def _forward(
        self, pairs: Dataset, mb: MicroBatch
    ) -> tuple[dict[str, torch.Tensor], PairScores]:
        rows = self._table(pairs).rows(mb.indices)
        batch = self.collate(rows)
        if self.cfg.trainer.packing:
            return self._forward_packed(batch, rows)
        batch["fed_tokens"] = torch.tensor(batch["input_ids"].numel())
        out = self.engine.forward(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return batch, self._pair_scores(batch, out.end_scores, out.scores)

    def _forward_packed(
        self, batch: dict[str, torch.Tensor], rows: list[dict[str, Any]]
    ) -> tuple[dict[str, torch.Tensor], PairScores]:
        """The micro-batch's 2B sequences packed into rows (one row for flash-attention's varlen
        path, else nearly equally full rows of the cheapest width, `balanced_row_tokens`)."""
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        config = self.engine.module.config
        one_row = "flash" in self.cfg.model.attn_implementation
        cost = row_token_cost(config)
        width = None if one_row else balanced_row_tokens([len(x) for x in seqs], cost)
        pad_id = getattr(config, "pad_token_id", None) or 0
        packed = pack_sequences(seqs, max_row_tokens=width, pad_token_id=pad_id)
        out = self.engine.forward(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            seq_row=packed["seq_row"],
            seq_end=packed["end_index"],
        )
        # Right-padded [2B, L] ids and mask of the same sequences, for the metrics, the eval
        # samples and the token-wise losses (which see exactly the padded path's tensors).
        index, mask = unpack_index(packed)
        batch["input_ids"] = unpack(packed["input_ids"], index, mask)
        batch["attention_mask"] = mask.long()
        batch["fed_tokens"] = torch.tensor(packed["input_ids"].numel())
        tokens = unpack(out.scores, index, mask) if needs_token_scores(self.cfg.loss) else None
        return batch, self._pair_scores(batch, out.end_scores, tokens)

    def _pair_scores(
        self, batch: dict[str, torch.Tensor], end_scores: torch.Tensor, scores: torch.Tensor | None
    ) -> PairScores:
        """Chosen rows first, then rejected; per-token scores only for the losses that read them."""
        b = batch["input_ids"].size(0) // 2
        end = end_scores.squeeze(-1).float()
        tokens = None
        if scores is not None and needs_token_scores(self.cfg.loss):
            tok = scores.squeeze(-1).float()
            ids = batch["input_ids"].to(end.device)
            mask = batch["attention_mask"].to(end.device)
            tokens = TokenScores(tok[:b], tok[b:], ids[:b], ids[b:], mask[:b], mask[b:])
        return PairScores(chosen=end[:b], rejected=end[b:], tokens=tokens)

    def _loss(
        self, batch: dict[str, torch.Tensor], s: PairScores
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dev = s.chosen.device
        # A per-pair margin only when a data column supplies one; otherwise loss.margin applies.
        d = self.cfg.data
        per_pair = self.cfg.loss.name == "margin" and (
            d.margin_column is not None or d.margin_from_scores
        )
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
    """Sum the named values over ranks (missing ones count as 0). The values stay on their
    device until here: one device-to-host copy per step, not one per micro-batch and metric."""
    dev = next(iter(sums.values())).device if sums else torch.device("cpu")
    zero = torch.zeros((), device=dev)
    local = torch.stack([sums[k].to(dev).double() if k in sums else zero.double() for k in keys])
    return dict(zip(keys, all_reduce_sum(local), strict=True))


def _samples(batch: dict[str, torch.Tensor], s: PairScores) -> list[tuple[list[int], float]]:
    scores = torch.cat([s.chosen, s.rejected]).tolist()
    out = []
    for ids, mask, score in zip(batch["input_ids"], batch["attention_mask"], scores, strict=True):
        out.append((ids[mask.bool()].tolist(), float(score)))
    return out


MAIN_EVAL = "main"  # the main eval set's name in eval/ files and wandb panels


def _record(table: PairTable, i: int, chosen: float, rejected: float) -> dict[str, Any]:
    """One scored eval pair as `rmtrain.eval.metrics` reads it: the scores, the response
    lengths in tokens (after the prompt both sides share) and the labels in the pair's meta."""
    c, r = table.seq("chosen_input_ids", i), table.seq("rejected_input_ids", i)
    n = min(len(c), len(r))
    differ = (c[:n] != r[:n]).nonzero()
    shared = int(differ[0]) if len(differ) else n
    meta = json.loads(table.scalars["meta"][i]) if "meta" in table.scalars else {}
    return {"index": i, "chosen_score": chosen, "rejected_score": rejected,
            "chosen_len": len(c) - shared, "rejected_len": len(r) - shared, **meta}  # fmt: skip


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    value = value.detach().double()  # stays on its device (no sync per micro-batch)
    if key in sums:
        sums[key] = sums[key] + value.to(sums[key].device)
    else:
        sums[key] = value


def _std(total: torch.Tensor, sq: torch.Tensor, n: float) -> float:
    mean = float(total) / n
    return math.sqrt(max(float(sq) / n - mean**2, 0.0))
