"""The toy world: a tiny random-init model of any verified architecture, its tokenizer and
generated sample data.

Quickstart and tests train on these without downloading anything. Real runs never touch this
package except through one name: ``model.name_or_path=tiny`` (resolved in :mod:`rmtrain.hf`)
and ``data.path=sample`` (resolved in :mod:`rmtrain.data.sources`).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, LlamaConfig, PretrainedConfig

from rmtrain.config import ToyConfig
from rmtrain.errors import ConfigError

NAME = "tiny"
# head_dim, as a multiple of hidden/heads, where the real checkpoints have a wider head than
# hidden/heads (Qwen3-8B: 128 vs 4096/32; Gemma-3-270M: 256 vs 640/4).
_WIDE_HEADS = {"qwen3": 2, "gemma2": 2, "gemma3_text": 2}


def is_toy(name_or_path: str) -> bool:
    return name_or_path == NAME


def llama_config(shape: ToyConfig, vocab_size: int) -> LlamaConfig:
    """The tiny LLaMA's architecture (untied embeddings, like LLaMA-7B)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
    )


def model_config(shape: ToyConfig, vocab_size: int) -> PretrainedConfig:
    """The tiny model of `shape.model_type`, with the features of that architecture switched on
    at a tiny scale: a sliding window of `shape.sliding_window` tokens (Mistral and Phi-3 in
    every layer; Qwen2/3 after the first layer; Gemma 2/3 alternating with global layers),
    Gemma 2's attention-logit soft-capping (its default 50), wider heads for Qwen3 and Gemma."""
    if shape.model_type == "llama":
        return llama_config(shape, vocab_size)
    layers = shape.num_hidden_layers
    head_dim = shape.head_dim or (
        _WIDE_HEADS.get(shape.model_type, 1) * shape.hidden_size // shape.num_attention_heads
    )
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "sliding_window": shape.sliding_window,
    }
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    extra: dict[str, dict[str, Any]] = {
        "mistral": {"head_dim": head_dim},
        "phi3": {"pad_token_id": None, "eos_token_id": None, "bos_token_id": None},
        "qwen2": {"use_sliding_window": True, "max_window_layers": 1},
        "qwen3": {"use_sliding_window": True, "max_window_layers": 1, "head_dim": head_dim},
        "gemma2": {
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "layer_types": alternating,
        },
        "gemma3_text": {
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "layer_types": alternating,
        },
    }
    if shape.model_type == "phi3" and head_dim * shape.num_attention_heads != shape.hidden_size:
        raise ConfigError("model.toy.head_dim: Phi-3 needs head_dim = hidden_size / heads")
    config: PretrainedConfig = AutoConfig.for_model(
        shape.model_type, **common, **extra.get(shape.model_type, {})
    )
    return config
