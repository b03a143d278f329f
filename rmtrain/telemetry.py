"""Throughput telemetry: model FLOPs per token, MFU against the device's peak, peak memory and
the time from launch to the first step. Pure torch; the trainer logs what these return.

FLOPs follow the PaLM appendix-B convention (training = 3 x forward, a multiply-add = 2 FLOPs):
per real token `6 * N + 12 * sum over layers (heads * head_dim * ctx_l)`, with N the parameters
a token passes through and ctx_l the keys its query meets in layer l (a query is counted against
its whole sequence, as PaLM counts it, not the causal half).

- N is counted from the model itself (every parameter but the input embedding, which is a
  lookup; the score head counts), so grouped-query attention, a head_dim that is not
  hidden / heads (Qwen3, Gemma), biases (Qwen2), extra norms (Gemma's four per layer, Qwen3's
  and Gemma 3's q/k norms) and fused projections (Phi-3) are exact for every architecture. A
  score model has no LM head, so tied or untied embeddings change nothing: the embedding is a
  lookup either way. Under ZeRO-3 a parameter's full size is its `ds_numel`.
- ctx_l is the length n of the token's sequence, or min(n, window) in a sliding-window layer
  (Mistral, Phi-3, Qwen with a window, Gemma 2/3's local layers): `attended_tokens` gives
  sum over sequences of n * mean_l ctx_l, and `flops_per_token` takes it divided by the tokens.
  With packing that is each sequence's own length, so padding never counts as useful work, and a
  padded run and a packed run of the same data report the same FLOPs per token.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

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


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of a score model a token passes through: all but the input embedding (also
    under ZeRO-3, where the module's own tensors are empty shards, and under peft LoRA)."""
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}  # type: ignore[operator]
    return int(
        sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in embedding)
    )


def sliding_windows(config: Any) -> list[int | None]:
    """Per decoder layer, the window its attention is limited to (None: the whole sequence).

    `layer_types` (Qwen2/3, Gemma 2/3) names each layer's kind; a config without it but with a
    `sliding_window` (Mistral, Phi-3) slides in every layer."""
    window = getattr(config, "sliding_window", None)
    layers = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    return [window or None] * layers


def attended_tokens(config: Any, lengths: torch.Tensor) -> torch.Tensor:
    """sum over sequences of n * (mean over layers of the keys a query meets: n, or
    min(n, window) in a sliding-window layer); sum n^2 for full attention. A 0-d tensor on
    the device of `lengths` (no host sync)."""
    n = lengths.double()
    spans = [n if w is None else n.clamp(max=w) for w in sliding_windows(config)]
    return (n * torch.stack(spans).mean(0)).sum()


def flops_per_token(model: nn.Module, mean_context: float) -> float:
    """Training FLOPs per real token (see the module docstring); `mean_context` =
    `attended_tokens(config, lengths) / lengths.sum()` over the sequences of the step."""
    config: Any = model.config
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * _head_dim(config)
    return float(6 * non_embedding_params(model) + attention * mean_context)


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
