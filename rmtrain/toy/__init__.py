"""The toy world: a tiny random-init LLaMA, its tokenizer and generated sample data.

Quickstart and tests train on these without downloading anything. Real runs never touch this
package except through one name: ``model.name_or_path=tiny`` (resolved in :mod:`rmtrain.hf`)
and ``data.path=sample`` (resolved in :mod:`rmtrain.data.sources`).
"""

from __future__ import annotations

from transformers import LlamaConfig

from rmtrain.config import ToyConfig

NAME = "tiny"


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
