"""The score model: any decoder backbone with a linear score head (rmtrain.arch lists them).

The score model of an architecture is transformers' own `*ForSequenceClassification` of it
(`LlamaForSequenceClassification`, `Qwen3ForSequenceClassification`, ...) with
:class:`ScoreModelMixin` in front, so its parameters have exactly the names plain transformers
expects (`model.*`, `score.weight`) and an export loads with
`AutoModelForSequenceClassification`. Only `forward` differs: it returns what safe-rlhf's score
model returns (per-token `scores`, `end_scores` at the last real token, the hidden states,
`end_index`) instead of pooled logits. `score_model_class(model_type)` builds that class once per
architecture; `LlamaScoreModel` is LLaMA's.

`AutoModelForScore.from_pretrained(path)` is the safe-rlhf entry point: it loads an rmtrain export
(or any supported `*ForSequenceClassification` checkpoint with one label) and a safe-rlhf
`LlamaForScore` checkpoint (`model.*` + `score_head.weight`/`score_head.bias`, config with
`score_dim` and `bias`), whose `score_head` becomes `score` (with a bias when it has one).

Normalisation is opt-in only: `model(..., normalize=True)` or `model.normalize_scores(x)` use the
`config.rmtrain["score_stats"]` an rmtrain export records; the raw score is the default.

The read-out rule is one function, `end_index_from_mask`: the last position whose attention mask
is 1. It does not look at token ids, so it is right for left and right padding and when the pad
token equals EOS (where "rightmost non-pad id" lands on the token before the EOS).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, LlamaForSequenceClassification, PretrainedConfig
from transformers.utils import ModelOutput

from rmtrain import arch

# safe-rlhf's LlamaForScore keeps the head as `score_head`; transformers calls it `score`.
SAFE_RLHF_KEY_MAPPING = {r"^score_head\.": "score."}
# Which statistics `normalize` uses: the held-out eval set (default) or the training EMA.
NORMALIZE_STATS = ("eval", "running")


@dataclass
class ScoreModelOutput(ModelOutput):
    """Outputs of a score model, named and shaped as in safe-rlhf."""

    scores: torch.Tensor | None = None  # [B, L, 1] score at every position
    end_scores: torch.Tensor | None = None  # [B, 1] score at the last real token
    last_hidden_state: torch.Tensor | None = None  # [B, L, H]
    end_last_hidden_state: torch.Tensor | None = None  # [B, H]
    end_index: torch.Tensor | None = None  # [B] position of the last real token


def end_index_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1, per row (left or right padding)."""
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def score_stats(config: Any, stats: str = "eval") -> tuple[float, float]:
    """(mean, std) recorded in an export's `config.rmtrain["score_stats"]`; error if absent."""
    if stats not in NORMALIZE_STATS:
        raise ValueError(f"normalize stats must be one of {NORMALIZE_STATS}, got {stats!r}")
    meta = getattr(config, "rmtrain", None) or {}
    recorded = meta.get("score_stats") or {}
    mean, std = recorded.get(f"{stats}_mean"), recorded.get(f"{stats}_std")
    if mean is None or std is None:
        raise ValueError(
            f"cannot normalise: config.json has no rmtrain.score_stats.{stats}_mean/{stats}_std "
            f"(only rmtrain exports record them); score without normalisation"
        )
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        raise ValueError(f"cannot normalise: {stats} stats mean={mean} std={std} are unusable")
    return float(mean), float(std)


class ScoreModelMixin:
    """Put in front of a transformers `*ForSequenceClassification` (a decoder `model` and a
    linear `score` head): per-token and end scores instead of pooled logits.

    `config.score_bias=True` gives the head a bias (safe-rlhf checkpoints with `bias: true`);
    the default has none, so an rmtrain export stays the plain transformers layout.
    """

    # safe-rlhf checkpoints may carry their normaliser's buffers; they are not weights.
    _keys_to_ignore_on_load_unexpected: set[str] | list[str] | None = [r"^normalizer\."]  # noqa: RUF012
    # what the transformers class behind the mixin provides
    config: Any
    num_labels: int
    score: Any
    base_model: Any  # the decoder (transformers' `model`)
    dtype: torch.dtype

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        if getattr(config, "score_bias", False):
            hidden = config.get_text_config().hidden_size
            self.score = nn.Linear(hidden, self.num_labels, bias=True)

    def normalize_scores(self, scores: torch.Tensor, stats: str = "eval") -> torch.Tensor:
        """(scores - mean) / std with the statistics recorded at training time."""
        mean, std = score_stats(self.config, stats)
        return (scores - mean) / std

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        normalize: bool | str = False,
        position_ids: torch.Tensor | None = None,
        seq_row: torch.Tensor | None = None,
        seq_end: torch.Tensor | None = None,
        attention: Any = None,
        **kwargs: object,
    ) -> ScoreModelOutput:
        """Scores at every position and at the last real token (attention mask 1).

        Packed (padding-free) input: `position_ids` restarting at 0 for every sequence, no
        `attention_mask`, and each sequence's last token given as (`seq_row`, `seq_end`); then
        `end_scores` is `[N, 1]` in sequence order and `end_index` is `seq_end`. Attention stays
        inside each sequence: as transformers finds it from `position_ids` (see
        `rmtrain.packing`), or as `attention` (an `rmtrain.attention.PackedAttention`) says,
        which also expresses shared prefixes and computes only what the mask keeps.

        `normalize=True` (or "eval" / "running") standardises `scores` and `end_scores` with the
        recorded statistics; off by default.
        """
        packed = position_ids is not None and attention_mask is None
        if packed:
            if seq_row is None or seq_end is None:
                raise ValueError("packed input needs seq_row and seq_end (each sequence's end)")
            impl = str(getattr(self.config, "_attn_implementation", "eager"))
            if "flash" in impl and input_ids.size(0) > 1:
                raise ValueError(f"attention {impl!r} sees packed sequences only in ONE row")
            # attention_mask=None and use_cache=False are both required for transformers to find
            # the sequence boundaries in position_ids (rmtrain.packing's module docstring).
            masks = {"attention_mask": None}
            if attention is not None:
                masks = attention.decoder_kwargs(self.config, input_ids.device, self.dtype)
            hidden = self.base_model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, **masks
            ).last_hidden_state
            rows, end_index = seq_row, seq_end
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state
            end_index = end_index_from_mask(attention_mask)
            rows = torch.arange(hidden.size(0), device=hidden.device)
        scores = self.score(hidden)  # [B, L, 1]
        if normalize:
            scores = self.normalize_scores(scores, "eval" if normalize is True else str(normalize))
        return ScoreModelOutput(
            scores=scores,
            end_scores=scores[rows, end_index],
            last_hidden_state=hidden,
            end_last_hidden_state=hidden[rows, end_index],
            end_index=end_index,
        )


class LlamaScoreModel(ScoreModelMixin, LlamaForSequenceClassification):
    """LLaMA + score head returning per-token and end scores."""


@functools.cache
def score_model_class(model_type: str) -> type[ScoreModelMixin]:
    """The score model class of an architecture: :class:`ScoreModelMixin` in front of its
    transformers `*ForSequenceClassification` (`rmtrain.arch.sequence_classifier`)."""
    if model_type == "llama":
        return LlamaScoreModel
    base = arch.sequence_classifier(model_type)
    name = base.__name__.removesuffix("ForSequenceClassification") + "ScoreModel"
    cls: type[ScoreModelMixin] = type(
        name, (ScoreModelMixin, base), {"__module__": __name__, "__doc__": base.__doc__}
    )
    return cls


def is_safe_rlhf_config(config: Any) -> bool:
    """A safe-rlhf score model config (`LlamaForScore`, `score_dim`)."""
    archs = getattr(config, "architectures", None) or []
    return any(str(a).endswith("ForScore") for a in archs) or hasattr(config, "score_dim")


_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


class AutoModelForScore:
    """safe-rlhf's entry point: `AutoModelForScore.from_pretrained(path, dtype=..., ...)`.

    Returns the architecture's score model (:func:`score_model_class`, in eval mode) whose
    forward gives `ScoreModelOutput`. Loads rmtrain exports, plain `*ForSequenceClassification`
    checkpoints of every architecture `rmtrain.arch` accepts and safe-rlhf `LlamaForScore`
    checkpoints; a score head missing from the checkpoint is an error, never a silent random
    init. The attention implementation defaults to the one the architecture trains with
    (`rmtrain.arch`: eager for Gemma 2, sdpa otherwise).
    """

    def __init__(self) -> None:
        raise TypeError("use AutoModelForScore.from_pretrained(path)")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> Any:
        path = pretrained_model_name_or_path
        config = kwargs.pop("config", None)
        if config is None:
            hub = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
            config = AutoConfig.from_pretrained(path, **hub)
        architecture = arch.resolve(config, where=str(path))
        kwargs.setdefault("attn_implementation", architecture.attention)
        if is_safe_rlhf_config(config):
            config.num_labels = int(getattr(config, "score_dim", 1))
            config.score_bias = bool(getattr(config, "bias", False))
            kwargs.setdefault("key_mapping", SAFE_RLHF_KEY_MAPPING)
        want_info = kwargs.pop("output_loading_info", False)
        model_class: Any = score_model_class(config.model_type)
        loaded: Any = model_class.from_pretrained(
            path, *args, config=config, output_loading_info=True, **kwargs
        )
        model = loaded[0]
        info: dict[str, Any] = loaded[1]
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith("score."))
        if missing:
            raise ValueError(
                f"{path}: the checkpoint has no score head ({', '.join(missing)} missing); "
                f"it is not a reward/score model"
            )
        return (model, info) if want_info else model
