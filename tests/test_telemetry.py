"""Throughput telemetry: FLOPs per token from the config, peaks, MFU only where a peak is known."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rmtrain import telemetry


def test_non_embedding_params_match_the_model() -> None:
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    want = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert telemetry.non_embedding_params(config) == want
    # 6N + 12 * layers * hidden * context (PaLM)
    assert telemetry.flops_per_token(config, 100.0) == 6 * want + 12 * 3 * 64 * 100.0


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
