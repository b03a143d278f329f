"""An independent reference for rmtrain's training: plain PyTorch + transformers, no DeepSpeed.

Nothing of rmtrain's trainer, engine, batching, losses or model is used here; only the DATA
(tokenizer and tokenized pairs, which are not what the equivalence tests check) comes from
rmtrain. Everything a training step does is written out by hand, from the documented contract:

* model: `transformers.LlamaForSequenceClassification` on a tiny `LlamaConfig` (the values of
  `model=tiny`, written out here), built right after `transformers.set_seed(seed)`;
* batches: epoch e uses `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`,
  cut into consecutive global batches of G pairs (the last one of an epoch is shorter); a global
  batch is one forward pass, chosen rows then rejected rows, RIGHT-padded to its longest row;
* score: the pooled `logits` of `LlamaForSequenceClassification` (rightmost non-pad token, i.e.
  the last real token with right padding and pad != EOS);
* loss: Bradley-Terry `-logsigmoid(chosen - rejected).mean()` over the global batch;
* step: `clip_grad_norm_(params, grad_clip)`, `torch.optim.AdamW`, then a cosine schedule with no
  warmup decaying to 0 over `max_steps` (`get_cosine_with_min_lr_schedule_with_warmup`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    get_cosine_with_min_lr_schedule_with_warmup,
    set_seed,
)


@dataclass(frozen=True)
class RefShape:
    """The tiny LLaMA (`configs/model/tiny.yaml` / `rmtrain.config.ModelConfig` defaults)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class RefHyper:
    seed: int = 42
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    global_batch: int = 8
    max_steps: int = 9


@dataclass
class RefResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step (global-batch mean)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    batch_sizes: list[int] = field(default_factory=list)  # pairs per step
    lrs: list[float] = field(default_factory=list)  # lr used by each step
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # final weights


def llama_config(
    vocab_size: int,
    pad_token_id: int,
    bos_token_id: int | None,
    eos_token_id: int,
    shape: RefShape = RefShape(),
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        num_labels=1,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForSequenceClassification:
    """Random init right after seeding, in fp32 (what a seeded run of rmtrain must reproduce)."""
    set_seed(seed)
    model = LlamaForSequenceClassification(config)
    return model.to(torch.float32)


def global_batches(n: int, global_batch: int, seed: int, steps: int) -> list[list[int]]:
    """Pair indices of each optimizer step: per-epoch permutations cut into global batches."""
    per_epoch = math.ceil(n / global_batch)
    out = []
    for step in range(steps):
        epoch, within = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(perm[within * global_batch : (within + 1) * global_batch])
    return out


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pair_scores(
    model: LlamaForSequenceClassification,
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_right([*chosen, *rejected], pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    return logits[: len(chosen)], logits[len(chosen) :]


def bt_mean(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen - rejected).mean()


def train(
    pairs: Any,
    config: LlamaConfig,
    hyper: RefHyper = RefHyper(),
    batches: list[list[int]] | None = None,
) -> RefResult:
    """Train like rmtrain claims to, with nothing but torch and transformers.

    `pairs`: rows with `chosen_input_ids` / `rejected_input_ids` (a datasets.Dataset or a list).
    `batches`: the pairs of each step, when not the seeded global batches (token-budget runs:
    the pairs per step vary; the loss is still their plain mean).
    """
    model = build_model(config, hyper.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay
    )
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=0, num_training_steps=hyper.max_steps, min_lr_rate=0.0
    )
    result = RefResult()
    pad_id = config.pad_token_id
    if batches is None:
        batches = global_batches(len(pairs), hyper.global_batch, hyper.seed, hyper.max_steps)
    for batch in batches:
        rows = [pairs[i] for i in batch]
        chosen, rejected = pair_scores(
            model,
            [r["chosen_input_ids"] for r in rows],
            [r["rejected_input_ids"] for r in rows],
            pad_id,
        )
        loss = bt_mean(chosen, rejected)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, hyper.grad_clip)
        result.lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        result.losses.append(float(loss.detach()))
        result.grad_norms.append(float(norm))
        result.batch_sizes.append(len(batch))
    result.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result


@torch.no_grad()
def evaluate(
    state_dict: dict[str, torch.Tensor], config: LlamaConfig, pairs: Any, batch_size: int = 4
) -> dict[str, float]:
    """Mean BT loss and accuracy of given weights over all `pairs` (one count per pair)."""
    model = LlamaForSequenceClassification(config).to(torch.float32)
    model.load_state_dict(state_dict)
    model.eval()
    total, correct, n = 0.0, 0, 0
    for start in range(0, len(pairs), batch_size):
        rows = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        c, r = pair_scores(
            model,
            [x["chosen_input_ids"] for x in rows],
            [x["rejected_input_ids"] for x in rows],
            config.pad_token_id,
        )
        total += float(-F.logsigmoid(c - r).sum())
        correct += int((c > r).sum())
        n += len(rows)
    return {"loss": total / n, "accuracy": correct / n, "pairs": float(n)}
