"""Throughput telemetry: model FLOPs per token, MFU against the device's peak, peak memory and
the time from launch to the first step. Pure torch; the trainer logs what these return.

FLOPs follow the PaLM appendix-B convention (training = 3 x forward, a multiply-add = 2 FLOPs):
per real token `6 * N + 12 * layers * (heads * head_dim) * ctx`, with N the parameters a token
passes through (the input embedding is a lookup and does not count; the score head does) and
ctx the length of the sequence the token belongs to, averaged over tokens (sum n_i^2 / sum n_i).
With packing that is each sequence's own length, so padding never counts as useful work, and a
padded run and a packed run of the same data report the same FLOPs per token.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, per device; the first substring of the
# device name that matches wins, so the specific variants come before the generic names.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device: `override` if given, else the table; None on CPU/unknown."""
    if override is not None:
        return override
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16_TFLOPS if key in name), None)


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


def non_embedding_params(config: Any) -> int:
    """Parameters of a LLaMA score model a token passes through, from its config (works under
    ZeRO-3, where the module's own tensors are empty shards)."""
    h, hd = config.hidden_size, _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attention = h * q + 2 * h * kv + q * h
    if getattr(config, "attention_bias", False):
        attention += q + 2 * kv + h
    mlp = 3 * h * config.intermediate_size
    layer = attention + mlp + 2 * h  # two RMSNorms
    return int(config.num_hidden_layers * layer + h + h * getattr(config, "num_labels", 1))


def flops_per_token(config: Any, mean_context: float) -> float:
    """Training FLOPs per real token (see the module docstring); `mean_context` = sum n^2 / sum n
    over the sequences of the step."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * _head_dim(config)
    return float(6 * non_embedding_params(config) + attention * mean_context)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory on a GPU since the start (None on CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def seconds_since_launch() -> float | None:
    """Seconds since `RMTRAIN_LAUNCH_TIME` (Unix time, if a launcher exports it) or else since
    this process started (imports and setup included)."""
    now = time.time()
    if launched := os.environ.get("RMTRAIN_LAUNCH_TIME"):
        try:
            return now - float(launched)
        except ValueError:
            pass
    try:
        import psutil

        return now - float(psutil.Process().create_time())
    except Exception:
        return None
