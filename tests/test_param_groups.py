"""Weight decay applies to weight matrices only, as in transformers' Trainer and TRL (issue 10)."""

from __future__ import annotations

from conftest import tiny_score_config

from rmtrain.engine import param_groups
from rmtrain.model import LlamaScoreModel


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
