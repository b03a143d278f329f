"""The optimizer's pieces that are plain torch: AdamW parameter groups and the learning-rate
schedule (DeepSpeed gets both from `rmtrain.engine`)."""

from __future__ import annotations

import math
from typing import Any

import torch


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then a half cosine down to `min_lr_ratio` x the peak: the lr factor
    of transformers' `get_cosine_with_min_lr_schedule_with_warmup` (num_cycles=0.5), step for
    step (a test compares the two). Not imported from there: `transformers.optimization`
    imports `trainer_utils`, which imports peft, about 3 s of every launch that uses no LoRA."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, cosine * (1 - min_lr_ratio) + min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(
    model: torch.nn.Module, weight_decay: float, decay_embeddings: bool
) -> list[dict[str, Any]]:
    """AdamW groups as transformers' Trainer and TRL make them: weight decay on matrices only;
    biases and norm weights (1-D) never decay, embeddings only when asked for. Shapes come from
    `ds_shape` when ZeRO-3 has already partitioned a parameter."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
        if matrix and (decay_embeddings or id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
