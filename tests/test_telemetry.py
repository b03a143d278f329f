"""Throughput telemetry: FLOPs per token from the config, peaks, MFU only where a peak is known."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rmtrain import telemetry


def test_non_embedding_params_match_the_model() -> None:
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    # by hand: q, o 64x64; k, v 64x32 (GQA); MLP 3 x 64x96; 2 norms per layer; final norm; head
    want = 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64) + 64 + 64
    assert telemetry.non_embedding_params(model) == want
    # 6N + 12 * layers * hidden * context (PaLM)
    assert telemetry.flops_per_token(model, 100.0) == 6 * want + 12 * 3 * 64 * 100.0


@pytest.mark.parametrize(
    ("model_type", "shape", "published"),
    [
        # Qwen3-8B's model card: 6.95B non-embedding parameters (head_dim 128 != 4096 / 32, GQA,
        # q/k norms; embedding and LM head excluded); + the score head's 4096
        ("qwen3", {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                   "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "head_dim": 128, "tie_word_embeddings": False}, 6.95e9),
        # Gemma 3 270M: "170M embedding parameters, 100M for the transformer blocks" (Google's
        # announcement); 268,098,176 in all (tests/realmodel.py), 262,144 x 640 of them embedding
        ("gemma3_text", {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                         "num_hidden_layers": 18, "num_attention_heads": 4,
                         "num_key_value_heads": 1, "head_dim": 256}, 268_098_176 - 262144 * 640),
    ],
)  # fmt: skip
def test_non_embedding_params_of_real_shapes(
    model_type: str, shape: dict[str, Any], published: float
) -> None:
    from transformers import AutoConfig

    from rmtrain.model import score_model_class

    config = AutoConfig.for_model(model_type, num_labels=1, **shape)
    with torch.device("meta"):  # no memory: only the shapes are needed
        model = score_model_class(model_type)(config)
    n = telemetry.non_embedding_params(model) - shape["hidden_size"]  # the score head
    assert n == pytest.approx(published, rel=5e-3 if published > 1e9 else 0)


def test_sliding_window_layers_attend_to_at_most_the_window() -> None:
    from transformers import Gemma3TextConfig, MistralConfig

    gemma = Gemma3TextConfig(num_hidden_layers=2, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    assert telemetry.sliding_windows(gemma) == [4, None]
    # per sequence n * mean over layers of min(n, window) or n: 3 * (3 + 3) / 2 + 10 * (4 + 10) / 2
    assert float(telemetry.attended_tokens(gemma, torch.tensor([3, 10]))) == 9 + 70
    mistral = MistralConfig(num_hidden_layers=3, sliding_window=4)  # every layer slides
    assert float(telemetry.attended_tokens(mistral, torch.tensor([3, 10]))) == 9 + 40
    llama = LlamaConfig(num_hidden_layers=2)
    assert float(telemetry.attended_tokens(llama, torch.tensor([3, 10]))) == 9 + 100


def test_peaks() -> None:
    assert telemetry.device_peak_tflops(torch.device("cpu")) is None
    assert telemetry.device_peak_tflops(torch.device("cpu"), 2.5) == 2.5
    table = dict(telemetry.GPU_PEAK_BF16_TFLOPS)
    assert table["H100"] == table["H200"] == 989.0 and table["A100"] == 312.0
    assert telemetry.peak_memory_gib(torch.device("cpu")) is None


def test_seconds_since_launch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time

    monkeypatch.setenv("RMTRAIN_LAUNCH_TIME", str(time.time() - 5))
    assert 5 <= (telemetry.seconds_since_launch() or 0) < 60
    monkeypatch.delenv("RMTRAIN_LAUNCH_TIME")
    assert (telemetry.seconds_since_launch() or 0) > 0
