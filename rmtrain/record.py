"""The run record: what a run was (resolved config, data counts) and how it went (score
statistics, last evaluation). Written once into each checkpoint's completion marker, and handed
to the export and its model card, so that an export made from any checkpoint says the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunRecord:
    config: dict[str, Any]
    """The resolved config, as written to <output_dir>/config.yaml."""
    data: dict[str, dict[str, int]]
    """DataStats counts per split: {"train": {"rows": ..., "pairs": ...}, "eval": {...}}, plus
    "train/<source>" per mixture source and "eval/<set>" per extra eval set."""
    score_stats: dict[str, float] = field(default_factory=dict)
    """Running mean/var of training end scores (Trainer.score_stats)."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the latest evaluation."""
    held_out: dict[str, Any] = field(default_factory=dict)
    """How the main eval set was chosen (assemble.RunData.held_out): with data.eval_fraction,
    the held-out rows per file, so resume and the model card can name them."""

    def data_metrics(self) -> dict[str, int]:
        """Flat `data/<split>/<count>` metrics, logged at step 0."""
        return {f"data/{s}/{k}": v for s, counts in self.data.items() for k, v in counts.items()}
