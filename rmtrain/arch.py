"""Per-architecture facts, in one place: which decoder backbones rmtrain trains and how.

rmtrain's score model is the architecture's own transformers ``*ForSequenceClassification``
(backbone ``model``, head ``score``) with rmtrain's forward (:mod:`rmtrain.model`), so an export
is that class with ``num_labels=1``. What differs between architectures is collected here:

- the **attention implementation** transformers recommends for it (``model.attn_implementation=
  auto``): ``sdpa`` everywhere except Gemma 2, whose attention-logit soft-capping sdpa cannot
  apply (``Gemma2PreTrainedModel._supports_sdpa = False``), so ``eager`` (``flex_attention`` and
  flash-attention also soft-cap);
- the **LoRA target modules** (Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into
  ``gate_up_proj``);
- whether **packing** (padding-free rows, :mod:`rmtrain.packing`) is verified: every
  ``VERIFIED`` architecture builds its masks with ``transformers.masking_utils``, which finds the
  sequence boundaries in ``position_ids`` for full and sliding-window layers alike
  (``find_packed_sequence_indices``; the sliding window is applied to the per-sequence positions
  by ``remap_positions_for_packed_sequence``), with sdpa, eager (soft-capping included) and flex
  masks; ``tests/test_architectures.py`` proves packed == padded for each;

Any other decoder that transformers loads as a ``GenericForSequenceClassification`` subclass
(OLMo-2, SmolLM3, ...) trains padded (its ``attention_mask`` path is transformers' own) but
without packing, which rmtrain has not verified for it. Mixture-of-experts backbones are refused:
their ``*ForSequenceClassification`` drops the router's load-balancing loss
(``output_router_logits``), and training a router without it lets the experts collapse. A model
type transformers cannot load as a sequence classifier is refused naming it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from rmtrain.errors import ConfigError

AUTO = "auto"
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ArchitectureError(ConfigError):
    """A backbone rmtrain cannot train, or a setting its architecture does not support."""


@dataclass(frozen=True)
class Architecture:
    model_type: str
    examples: str  # checkpoints of this architecture, for the README and error messages
    attention: str  # the default attention implementation (transformers' recommendation)
    lora_targets: tuple[str, ...] = _LLAMA_LORA
    # attention implementations that give wrong results for this architecture, with why
    unsupported_attention: tuple[tuple[str, str], ...] = ()
    packing: bool = True  # padding-free rows verified (packed == padded)
    verified: bool = True

    def check_attention(self, impl: str) -> str:
        """The implementation to build with: `impl`, or the default for `auto`."""
        if impl == AUTO:
            return self.attention
        for name, why in self.unsupported_attention:
            if impl == name:
                raise ArchitectureError(
                    f"model.attn_implementation={impl}: {self.model_type} does not support it "
                    f"({why}); use auto (= {self.attention})"
                )
        return impl


VERIFIED: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "LLaMA 1-3.x, SmolLM2, TinyLlama, FsfairX/Skywork Llama RMs", "sdpa"),
        Architecture("mistral", "Mistral-7B v0.1-v0.3 (sliding window in v0.1)", "sdpa"),
        Architecture("qwen2", "Qwen2, Qwen2.5 (optional sliding window)", "sdpa"),
        Architecture("qwen3", "Qwen3 dense, Skywork-Reward-V2-Qwen3 (head_dim 128)", "sdpa"),
        Architecture(
            "gemma2",
            "Gemma 2 (alternating sliding-window layers, attention-logit soft-capping)",
            "eager",
            unsupported_attention=(
                ("sdpa", "sdpa cannot apply Gemma 2's attention-logit soft-capping"),
            ),
        ),
        Architecture(
            "gemma3_text", "Gemma 3 text-only: 270M, 1B (5 sliding-window : 1 global)", "sdpa"
        ),
        Architecture(
            "phi3",
            "Phi-3, Phi-3.5-mini, Phi-4-mini (fused qkv_proj / gate_up_proj)",
            "sdpa",
            lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        ),
    )
}

# Config attributes that mark a mixture-of-experts backbone (Mixtral, Qwen2/3-MoE, ...).
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def sequence_classifier_name(model_type: str) -> str | None:
    """transformers' `*ForSequenceClassification` class name for `model_type`, if it has one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES,
    )

    name = NAMES.get(model_type)
    return name if isinstance(name, str) else None


@functools.cache
def sequence_classifier(model_type: str) -> type:
    """The transformers class an export of `model_type` is (see :func:`resolve`)."""
    import transformers

    name = sequence_classifier_name(model_type)
    if name is None:
        raise ArchitectureError(_unsupported(model_type, "transformers has no sequence classifier"))
    cls: type = getattr(transformers, name)
    return cls


def resolve(config: Any, where: str = "model.name_or_path") -> Architecture:
    """The architecture of a transformers config, or one `ArchitectureError` saying why not."""
    model_type = str(getattr(config, "model_type", None))
    if model_type in VERIFIED:
        return VERIFIED[model_type]
    if sequence_classifier_name(model_type) is None:
        raise ArchitectureError(
            f"{where}: model_type {model_type!r} cannot be trained: transformers has no "
            f"sequence-classification class for it (AutoModelForSequenceClassification cannot "
            f"load it). {_supported()}"
        )
    experts = next((k for k in _EXPERT_KEYS if (getattr(config, k, 0) or 0) > 1), None)
    if experts is not None:
        raise ArchitectureError(
            f"{where}: model_type {model_type!r} is a mixture of experts ({experts}="
            f"{getattr(config, experts)}): its sequence classifier drops the router's "
            f"load-balancing loss, without which the router collapses onto a few experts; "
            f"rmtrain does not train MoE backbones. {_supported()}"
        )
    from transformers.modeling_layers import GenericForSequenceClassification

    cls = sequence_classifier(model_type)
    if not issubclass(cls, GenericForSequenceClassification):
        raise ArchitectureError(
            f"{where}: model_type {model_type!r} ({cls.__name__}) is not a decoder with a "
            f"`score` head over a `model` backbone, which rmtrain's score model needs. "
            f"{_supported()}"
        )
    attention = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    return Architecture(model_type, cls.__name__, attention, packing=False, verified=False)


def check_training(arch: Architecture, attn_implementation: str, packing: bool) -> str:
    """The attention implementation a run builds with; errors for a setting the architecture
    does not support (called before training starts)."""
    impl = arch.check_attention(attn_implementation)
    if packing and not arch.packing:
        raise ArchitectureError(
            f"trainer.packing=true: padding-free rows are verified only for "
            f"{', '.join(VERIFIED)}; {arch.model_type} trains padded (trainer.packing=false)"
        )
    return impl


def _unsupported(model_type: str, why: str) -> str:
    return f"model_type {model_type!r}: {why}. {_supported()}"


def _supported() -> str:
    return (
        f"Verified architectures: {', '.join(VERIFIED)}; other decoders with a transformers "
        f"*ForSequenceClassification train without packing"
    )
