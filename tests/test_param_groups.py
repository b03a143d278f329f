"""Weight decay applies to weight matrices only, as in transformers' Trainer and TRL (issue 10)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_score_config

from rmtrain.model import LlamaScoreModel
from rmtrain.optim import param_groups


def _names(model: LlamaScoreModel, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_norms_biases_and_embeddings_do_not_decay() -> None:
    model = LlamaScoreModel(tiny_score_config(100, num_labels=1, score_bias=True))
    decay, no_decay = param_groups(model, 0.1, decay_embeddings=False)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    decayed, kept = _names(model, decay), _names(model, no_decay)
    assert kept == {
        "model.embed_tokens.weight", "score.bias", "model.norm.weight",
        *(f"model.layers.{i}.{n}.weight" for i in range(2)
          for n in ("input_layernorm", "post_attention_layernorm")),
    }  # fmt: skip
    assert "score.weight" in decayed and "model.layers.0.self_attn.q_proj.weight" in decayed
    assert decayed | kept == {n for n, _ in model.named_parameters()}
    assert not decayed & kept


def test_embeddings_decay_when_asked() -> None:
    model = LlamaScoreModel(tiny_score_config(100, num_labels=1))
    decay, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert "model.embed_tokens.weight" in _names(model, decay)


@pytest.mark.parametrize(
    ("warmup", "total", "min_ratio"), [(0, 10, 0.0), (3, 24, 0.1), (5, 5, 0.0), (2, 7, 0.5)]
)
def test_cosine_schedule_equals_transformers(warmup: int, total: int, min_ratio: float) -> None:
    """rmtrain's schedule (written out to keep peft out of every launch) gives the lr of
    transformers' get_cosine_with_min_lr_schedule_with_warmup at every step."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from rmtrain.optim import cosine_schedule

    def lrs(make: Any) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total + 2):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: cosine_schedule(o, warmup, total, min_ratio))
    theirs = lrs(lambda o: get_cosine_with_min_lr_schedule_with_warmup(
        o, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=min_ratio))  # fmt: skip
    assert ours == pytest.approx(theirs, abs=1e-12)
