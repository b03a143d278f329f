"""Evaluation during training: every eval set scored with the training model, one statistics
pipeline.

Each rank scores a strided share of a set (`batching.eval_shards`); the per-pair scores and
losses are gathered on rank 0, which computes everything from them: the dashboard scalars
(`eval/loss`, `eval/accuracy`, ... for the main set, `eval/<set>/...` for the others) and every
metric of `rmtrain eval` (:func:`rmtrain.eval.metrics.summarize`, the same code), kept per set
for the run's eval/ files and the wandb extras. The scalars are then broadcast, so every rank
returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from rmtrain.batch import Layout, collate, pair_scores
from rmtrain.batching import eval_shards
from rmtrain.data.table import PairTable
from rmtrain.engine import Engine, broadcast_object, gather_object
from rmtrain.eval.metrics import EvalSet, Kind, headline, regroup, summarize
from rmtrain.eval.outputs import worst_pairs
from rmtrain.loggers import MetricLogger
from rmtrain.losses import PairLoss
from rmtrain.objective import oriented_gap

MAIN_EVAL = "main"  # the main eval set's name in eval/ files and wandb panels


class Evaluator:
    def __init__(
        self,
        engine: Engine,
        sets: Mapping[str, PairTable],
        layout: Layout,
        loss: PairLoss,
        batch_size: int,
        logger: MetricLogger,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        """`sets`: the main set first (as MAIN_EVAL), then each extra set by its label."""
        self.engine, self.sets, self.layout, self.loss = engine, dict(sets), layout, loss
        self.batch_size, self.logger, self.decode = batch_size, logger, decode
        self.kind: Kind = "cost" if loss.objective == "cost" else "reward"
        # Rank 0: the last evaluation of every set, by name; what the run writes into eval/.
        self.results: dict[str, EvalSet] = {}
        # (input ids, end score) of rank 0's first main-set batch: an independent record of what
        # the trained model scores, to check exports against.
        self.samples: list[tuple[list[int], float]] = []

    def evaluate(self, step: int) -> dict[str, float]:
        """The main set as eval/*, every other set as eval/<name>/*; the same on every rank."""
        out: dict[str, float] = {}
        for name, table in self.sets.items():
            prefix = "eval/" if name == MAIN_EVAL else f"eval/{name}/"
            out.update(self._evaluate(name, table, prefix, step))
        return dict(broadcast_object(out))

    @torch.no_grad()
    def _evaluate(self, name: str, table: PairTable, prefix: str, step: int) -> dict[str, float]:
        self.engine.train(False)
        env = self.engine.env
        scored: list[tuple[int, float, float, float]] = []  # (pair, chosen, rejected, loss)
        for mb in eval_shards(len(table), self.batch_size, env.world_size, env.rank):
            batch = collate(table, mb.indices, self.layout)
            out = self.engine.forward(**batch.model_inputs())
            if mb.weights[0] == 0:
                continue  # a padding batch: this rank ran out of pairs (ZeRO-3 needs the pass)
            s = pair_scores(batch, out, self.loss.needs_token_scores)
            total, _ = self.loss(s, batch.labels)
            c, r, losses = s.chosen.tolist(), s.rejected.tolist(), total.tolist()
            if name == MAIN_EVAL and env.is_main and not scored:
                seqs = table.sequences(mb.indices)
                self.samples = [(x.tolist(), v) for x, v in zip(seqs, c + r, strict=True)]
            scored += zip(mb.indices, c, r, losses, strict=True)
        every = gather_object(scored)
        if every is None:
            return {}
        rows = sorted(x for part in every for x in part)
        return self._summarize(name, table, rows, prefix, step)

    def _summarize(
        self,
        name: str,
        table: PairTable,
        rows: list[tuple[int, float, float, float]],
        prefix: str,
        step: int,
    ) -> dict[str, float]:
        """Rank 0: the set's scalars (as `<prefix><metric>`) and its full evaluation."""
        index = np.array([i for i, *_ in rows], dtype=np.int64)
        chosen = np.array([c for _, c, _, _ in rows], dtype=np.float64)
        rejected = np.array([r for _, _, r, _ in rows], dtype=np.float64)
        losses = np.array([x for *_, x in rows], dtype=np.float64)
        scalars = eval_scalars(chosen, rejected, losses, self.loss.objective)
        if self.loss.objective == "cost":
            unsafe = (table.label("chosen_unsafe", index), table.label("rejected_unsafe", index))
            scalars["sign_accuracy"] = sign_accuracy(chosen, rejected, *unsafe)

        records = regroup([table.record(int(i), c, r) for i, c, r, _ in rows])
        result = EvalSet(name, summarize(records, kind=self.kind), records,
                         worst_pairs(records, self.kind))  # fmt: skip
        if self.decode is not None:
            for row in result.worst:
                for side in ("chosen", "rejected"):
                    row[f"{side}_text"] = self.decode(table.seq(side, row["index"]).tolist())
        self.results[name] = result
        self.logger.log_evaluation(result, step)
        scalars.update(headline(result.summary))
        return {f"{prefix}{k}": v for k, v in scalars.items()}


def eval_scalars(
    chosen: np.ndarray, rejected: np.ndarray, losses: np.ndarray, objective: str
) -> dict[str, float]:
    """The dashboard numbers of an eval set. Accuracy counts a tie as wrong (a collapsed model
    that scores every pair equal shows 0, not 0.5; `summarize` reports ties separately)."""
    n = len(chosen)
    gap = oriented_gap(objective, chosen, rejected)
    both = np.concatenate([chosen, rejected])
    return {
        "loss": float(losses.sum() / n),
        "accuracy": float((gap > 0).sum() / n),
        "margin": float(gap.sum() / n),
        "chosen_mean": float(chosen.sum() / n),
        "chosen_std": _std(chosen),
        "rejected_mean": float(rejected.sum() / n),
        "rejected_std": _std(rejected),
        "score_mean": float(both.sum() / (2 * n)),
        "score_std": _std(both),
        "pairs": float(n),
    }


def sign_accuracy(
    chosen: np.ndarray, rejected: np.ndarray, chosen_unsafe: np.ndarray, rejected_unsafe: np.ndarray
) -> float:
    """Cost models: how often cost > 0 exactly when the response is unsafe, over both sides."""
    ok = np.concatenate([(chosen > 0) == chosen_unsafe, (rejected > 0) == rejected_unsafe])
    return float(ok.sum() / len(ok))


def _std(x: np.ndarray) -> float:
    mean = x.sum() / len(x)
    return math.sqrt(max(float((x * x).sum() / len(x) - mean**2), 0.0))
