"""Scoring with an export, as a library: `Scorer(path).score_texts(["...", ...])`.

Texts are built exactly as in training (`rmtrain.text.render` with the chat template the export
was trained with, EOS included) and cut as in training (`rmtrain.data.pairs.encode`); token ids
are scored in length-sorted batches and come back in input order. A score does not depend on
the batch size or the padding side (the read-out is the last position whose attention mask is
1). Normalisation is applied only when asked for. `rmtrain score`, `rmtrain eval` and
`rmtrain serve` all score through this class.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from rmtrain.config import FORMATS, DataConfig
from rmtrain.data.pairs import encode
from rmtrain.errors import UserError
from rmtrain.model import NORMALIZE_STATS, AutoModelForScore, score_stats
from rmtrain.packing import pad_sequences
from rmtrain.text import TEMPLATES, exchange, render, trained_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """How a scoring command reads preference rows: `--format` and `--preference`."""
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="format of the preference rows (default: detected, as `rmtrain train` does)",
    )
    parser.add_argument(
        "--preference",
        choices=("better", "safer"),
        default=None,
        help="PKU-SafeRLHF rows: which id marks the chosen response (default: safer for a cost "
        "model, else better)",
    )


class NonFiniteScores(UserError, ValueError):
    """The model produced NaN/inf: never written as (invalid) JSON."""


# --------------------------------------------------------------------------- scorer


class Scorer:
    """Score texts with an export: ``Scorer(path).score_texts(["...", ...]) -> [float, ...]``.

    ``template``: "auto" (what the export was trained with, ``config.json["rmtrain"]
    ["template"]``; safe_rlhf for checkpoints without rmtrain metadata), "safe_rlhf" or "chat";
    used by `text` / `messages_text`. ``normalize``: False (raw scores, the default), True or
    "eval" (eval-set mean/std recorded in the export) or "running" (training EMA).
    ``max_length``: None (no cut) or cut longer texts from the right keeping EOS, like training
    (the CLI's default is the export's trained max_length).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 8,
        padding_side: str = "right",
        normalize: bool | str = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        template: str = "auto",
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if template not in ("auto", *TEMPLATES):
            raise ValueError(f"template must be auto, safe_rlhf or chat, got {template!r}")
        self.path = Path(path)
        self.batch_size, self.padding_side, self.max_length = batch_size, padding_side, max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForScore.from_pretrained(self.path, **kwargs)
        self.model.to(self.device)  # type: ignore[arg-type]
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{path}: a score model with one output is needed, "
                f"got {self.model.config.num_labels}"
            )
        self.meta: dict[str, Any] = dict(getattr(self.model.config, "rmtrain", None) or {})
        self.template = (
            (self.meta.get("template") or "safe_rlhf") if template == "auto" else template
        )
        self.objective = str(
            self.meta.get("objective") or getattr(self.model.config, "score_type", "reward")
        )
        self.normalize: str | None = None
        if normalize:
            self.normalize = "eval" if normalize is True else str(normalize)
            if self.normalize not in NORMALIZE_STATS:
                raise ValueError(f"normalize must be True, 'eval' or 'running', got {normalize!r}")
            score_stats(self.model.config, self.normalize)  # fail now, not after scoring
        self.chat_template = trained_template(self.tokenizer, self.template)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id  # safe: the read-out uses the mask
        self.truncated = 0  # texts cut to max_length
        # The model's context; longer texts are scored, counted and warned about.
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 10**9)
        self.over_context = 0

    def text(self, prompt: str, response: str) -> str:
        return self.messages_text(exchange(prompt, response))

    def messages_text(self, messages: list[dict[str, str]]) -> str:
        return render(self.tokenizer, messages, self.chat_template)

    def default_preference(self, given: str | None = None) -> str:
        """PKU-SafeRLHF rows: `given`, else "safer" for a cost model and "better" otherwise."""
        return given or ("safer" if self.objective == "cost" else "better")

    def data_config(self, path: str, fmt: str = "auto", preference: str = "better") -> DataConfig:
        """The data settings that read preference rows the way this export was trained: its
        template and max_length (none: no cut), for `rmtrain.data` (`rmtrain eval`, pair rows
        of `rmtrain score`)."""
        return DataConfig(
            path=path,
            format=fmt,
            preference=preference,
            template=self.template,
            max_length=self.max_length or 2**31 - 1,
        )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered texts, cut to `max_length` as in training (counted)."""
        ids, cut = encode(self.tokenizer, list(texts), self.max_length)
        self.truncated += sum(cut)
        return ids

    def score_texts(
        self, texts: Sequence[str], progress: bool = False, desc: str = "scoring"
    ) -> list[float]:
        """End scores of already formatted texts, in input order (length-sorted batches)."""
        return self.score_sequences(self.encode(texts), progress, desc)

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]], length: int | None = None) -> list[float]:
        """Raw end scores (never normalised) of token-id sequences run as ONE batch, right-padded
        to `length` (default: the longest). No truncation: the ids are scored as given.

        Why a fixed `length`: a sequence's score then depends only on its own ids and `length`,
        not on the other rows (`rmtrain serve` pads each sequence to a length bucket of its own,
        so its score is the same whatever it is batched with)."""
        if not seqs:
            return []
        rows = pad_sequences(seqs, self.pad_id, "right", length)
        batch = {k: v.to(self.device) for k, v in rows.model_inputs().items()}
        return [float(x) for x in self.model(**batch).end_scores[:, 0].float().tolist()]

    @torch.inference_mode()
    def score_sequences(
        self,
        seqs: Sequence[Sequence[int] | np.ndarray],
        progress: bool = False,
        desc: str = "scoring",
    ) -> list[float]:
        """End scores of token id sequences, in input order (length-sorted batches); sequences
        longer than the model's context are counted (`over_context`)."""
        if not len(seqs):
            return []
        self.over_context += sum(len(s) > self.context for s in seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        scores: list[float] = [0.0] * len(seqs)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr):
            idx = order[start : start + self.batch_size]
            rows = pad_sequences([seqs[i] for i in idx], self.pad_id, self.padding_side)
            batch = {k: v.to(self.device) for k, v in rows.model_inputs().items()}
            end = self.model(**batch).end_scores[:, 0].float()
            if self.normalize:
                end = self.model.normalize_scores(end, self.normalize)
            for i, value in zip(idx, end.tolist(), strict=True):
                scores[i] = float(value)
        return scores
