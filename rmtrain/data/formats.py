"""The accepted row layouts: one adapter per format, all into the same :class:`RawPairs`.

:mod:`rmtrain.data.schemas` has the adapter base and PKU-SafeRLHF; this module has the formats
the field exchanges preference data in (TRL's standard and conversational layouts, HH-RLHF
transcripts, UltraFeedback-binarized, RewardBench, RewardBench 2 and RM-Bench files), the registry
:data:`ADAPTERS` and :func:`resolve`, which detects a file's format from its columns and first
row (or takes the one ``data.format`` forces).

Every conversation ends with the assistant turn being scored; :func:`rmtrain.text.render` turns
it into text with the run's chat template, so the same exchange gives the same token ids in any
format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from rmtrain.config import FORMATS, DataConfig
from rmtrain.data.schemas import (
    Check,
    PkuSafeRLHF,
    RawPairs,
    Schema,
    Skipped,
    check_number,
    check_text,
    column_margins,
)
from rmtrain.errors import DataError, type_name, where
from rmtrain.text import check_messages, check_turns, exchange

Conversation = list[dict[str, str]]


def check_conversation(v: Any) -> str | None:
    """Messages ending with the assistant turn being scored."""
    return check_messages(v)


def check_text_list(v: Any) -> str | None:
    """RM-Bench: a non-empty list of response texts (its style variants)."""
    if not isinstance(v, list) or not v:
        return f"expected a non-empty list of response texts, got {type_name(v)} {v!r:.40}"
    for i, item in enumerate(v):
        if problem := check_text(item):
            return f"item {i}: {problem}"
    return None


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def parse_transcript(text: str) -> Conversation:
    """HH-RLHF's ``\\n\\nHuman: ... \\n\\nAssistant: ...`` → messages (the text after each marker
    is the turn, byte for byte)."""
    marks = list(_HH_TURN.finditer(text))
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        role = "user" if m.group(1) == "Human" else "assistant"
        turns.append({"role": role, "content": text[m.end() : end]})
    return turns


def check_transcript(v: Any) -> str | None:
    if problem := check_text(v):
        return problem
    if not v.lstrip("\n").startswith("Human:"):
        return f"expected an HH-RLHF transcript starting with 'Human:', got {v!r:.40}"
    turns = parse_transcript(v)
    if turns[-1]["role"] != "assistant":
        return "the transcript must end with an 'Assistant:' turn (the response being scored)"
    return None


def implicit_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two full texts: the prompt is their
    longest common prefix, cut back to a word boundary (TRL's extract_prompt, word-aligned)."""
    i = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        i += 1
    if i < min(len(chosen), len(rejected)) and i and not chosen[i - 1].isspace():
        i = max(chosen.rfind(" ", 0, i), chosen.rfind("\n", 0, i)) + 1
    return chosen[:i].rstrip(), chosen[i:], rejected[i:]


def _clean(messages: list[dict[str, Any]]) -> Conversation:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_prompt(v: Any) -> str | None:
    """A prompt: a text (one user turn) or a list of turns."""
    return check_text(v) if isinstance(v, str) else check_turns(v)


def with_prompt(prompt: str | list[dict[str, Any]], side: list[dict[str, Any]]) -> Conversation:
    """The conversation one side of a row scores: `side` as is when it is a whole conversation
    (it opens with a user or system turn, as UltraFeedback's do), else the prompt's turns (a
    text is one user turn) followed by `side`'s assistant turn(s)."""
    if side[0]["role"] in ("user", "system"):
        return _clean(side)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _clean(prompt)
    return turns + _clean(side)


class _PairFormat(Schema):
    """A format without safety labels: each row gives one or more (chosen, rejected)
    conversations; data.margin_column works with every one of them."""

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        raise NotImplementedError

    def row_margin(self, cols: dict[str, list[Any]], i: int, cfg: DataConfig) -> float | None:
        return None

    def pair_meta(self, cols: dict[str, list[Any]], i: int, k: int) -> dict[str, Any]:
        """What evaluation groups the k-th pair of row i by: the row's subset / category, and
        its id where the file has one."""
        return {
            key: str(cols[key][i])
            for key in ("subset", "category", "id")
            if key in cols and cols[key][i] is not None
        }

    def to_pairs(
        self, cols: dict[str, list[Any]], cfg: DataConfig, objective: str
    ) -> tuple[RawPairs, Skipped]:
        sources, rows = cols["_source"], cols["_row"]
        label = sources[0] if sources else cfg.path
        if cfg.preference == "safer" or objective == "cost":
            raise DataError(
                f"{label}: format {self.name} has no safety labels; data.preference=safer and "
                "objective=cost need the pku_saferlhf format"
            )
        margins = column_margins(cols, cfg, label)
        out = RawPairs()
        for i in range(len(sources)):
            margin = self.row_margin(cols, i, cfg)
            if margins is not None:
                margin = float(margins[i])
            for k, (chosen, rejected) in enumerate(self.conversations(cols, i)):
                out.meta.append(self.pair_meta(cols, i, k))
                out.chosen.append(chosen)
                out.rejected.append(rejected)
                out.chosen_unsafe.append(False)
                out.rejected_unsafe.append(False)
                out.chosen_severity.append(-1)
                out.rejected_severity.append(-1)
                out.margin.append(margin or 0.0)
                out.source.append(sources[i])
                out.row.append(rows[i])
        return out, Skipped()


class Standard(_PairFormat):
    """TRL standard preference, explicit prompt: prompt, chosen, rejected strings."""

    name = "standard"
    required: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    checks: ClassVar[dict[str, Check]] = dict.fromkeys(required, check_text)
    example: ClassVar[dict[str, Any]] = {
        "prompt": "How do I bake bread?",
        "chosen": "Mix flour, water, yeast and salt, then ...",
        "rejected": "Buy some.",
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        p = cols["prompt"][i]
        return [(exchange(p, cols["chosen"][i]), exchange(p, cols["rejected"][i]))]


class StandardImplicit(_PairFormat):
    """TRL standard preference, implicit prompt: chosen and rejected full texts; the prompt is
    their common prefix (cut at a word boundary)."""

    name = "standard_implicit"
    required: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    checks: ClassVar[dict[str, Check]] = dict.fromkeys(required, check_text)
    example: ClassVar[dict[str, Any]] = {
        "chosen": "How do I bake bread? Mix flour, water, yeast and salt, then ...",
        "rejected": "How do I bake bread? Buy some.",
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        prompt, c, r = implicit_split(cols["chosen"][i], cols["rejected"][i])
        return [(exchange(prompt, c), exchange(prompt, r))]


class Conversational(_PairFormat):
    """TRL conversational preference, explicit prompt: prompt, chosen, rejected message lists
    (chosen/rejected hold the assistant turn). A text prompt is one user turn; a chosen /
    rejected list that is a whole conversation (opening with a user or system turn) is taken as
    is, as UltraFeedback-binarized rows without their score columns have them."""

    name = "conversational"
    required: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    checks: ClassVar[dict[str, Check]] = {
        "prompt": check_prompt,
        "chosen": check_conversation,
        "rejected": check_conversation,
    }
    example: ClassVar[dict[str, Any]] = {
        "prompt": [{"role": "user", "content": "How do I bake bread?"}],
        "chosen": [{"role": "assistant", "content": "Mix flour, water, yeast and salt, ..."}],
        "rejected": [{"role": "assistant", "content": "Buy some."}],
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        p = cols["prompt"][i]
        return [(with_prompt(p, cols["chosen"][i]), with_prompt(p, cols["rejected"][i]))]


class ConversationalImplicit(_PairFormat):
    """TRL conversational preference, implicit prompt: chosen and rejected full conversations
    (the shared leading turns are the prompt)."""

    name = "conversational_implicit"
    required: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    checks: ClassVar[dict[str, Check]] = dict.fromkeys(required, check_conversation)
    example: ClassVar[dict[str, Any]] = {
        "chosen": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix flour, water, yeast and salt, then ..."},
        ],
        "rejected": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Buy some."},
        ],
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        return [(_clean(cols["chosen"][i]), _clean(cols["rejected"][i]))]


class UltraFeedback(ConversationalImplicit):
    """UltraFeedback-binarized: prompt, chosen/rejected conversations (user turn included),
    score_chosen / score_rejected (→ margin with data.margin_from_scores)."""

    name = "ultrafeedback"
    required: ClassVar[tuple[str, ...]] = (
        "prompt",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
    )
    checks: ClassVar[dict[str, Check]] = {
        "prompt": check_text,
        "chosen": check_conversation,
        "rejected": check_conversation,
        "score_chosen": check_number,
        "score_rejected": check_number,
    }
    example: ClassVar[dict[str, Any]] = {
        "prompt": "How do I bake bread?",
        "chosen": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix flour, water, yeast and salt, then ..."},
        ],
        "rejected": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Buy some."},
        ],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        # Some exports keep only the assistant turn: the prompt column supplies the user turn.
        p = cols["prompt"][i]
        return [(with_prompt(p, cols["chosen"][i]), with_prompt(p, cols["rejected"][i]))]

    def row_margin(self, cols: dict[str, list[Any]], i: int, cfg: DataConfig) -> float | None:
        if not cfg.margin_from_scores:
            return None
        return float(cols["score_chosen"][i]) - float(cols["score_rejected"][i])


class HHRLHF(_PairFormat):
    """Anthropic HH-RLHF transcripts: chosen / rejected strings of
    ``\\n\\nHuman: ...\\n\\nAssistant: ...`` turns (the shared leading turns are the prompt)."""

    name = "hh_rlhf"
    required: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    checks: ClassVar[dict[str, Check]] = dict.fromkeys(required, check_transcript)
    example: ClassVar[dict[str, Any]] = {
        "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast ...",
        "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Buy some.",
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        return [(parse_transcript(cols["chosen"][i]), parse_transcript(cols["rejected"][i]))]


class RewardBench(Standard):
    """RewardBench's flat evaluation format: prompt, chosen, rejected strings and subset."""

    name = "rewardbench"
    required: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected", "subset")
    checks: ClassVar[dict[str, Check]] = dict.fromkeys(required, check_text)
    example: ClassVar[dict[str, Any]] = {**Standard.example, "subset": "alpacaeval-easy"}


class RMBench(_PairFormat):
    """RM-Bench: chosen / rejected are lists of style variants of one answer; every
    (chosen variant, rejected variant) combination is a pair (RM-Bench's 3 x 3 matrix)."""

    name = "rmbench"
    required: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    checks: ClassVar[dict[str, Check]] = {
        "prompt": check_text,
        "chosen": check_text_list,
        "rejected": check_text_list,
    }
    example: ClassVar[dict[str, Any]] = {
        "prompt": "How do I bake bread?",
        "chosen": ["Mix flour, ...", "Mix flour, water, ... (detailed)", "## Steps\n1. Mix ..."],
        "rejected": ["Buy some.", "Buy some bread (detailed)", "## Answer\nBuy some."],
        "subset": "chat",
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        p = cols["prompt"][i]
        return [
            (exchange(p, c), exchange(p, r)) for c in cols["chosen"][i] for r in cols["rejected"][i]
        ]

    def pair_meta(self, cols: dict[str, list[Any]], i: int, k: int) -> dict[str, Any]:
        """Also which (chosen, rejected) style variants the pair compares, for RM-Bench's
        easy / normal / hard accuracy."""
        ci, ri = divmod(k, len(cols["rejected"][i]))
        return {**super().pair_meta(cols, i, k), "style": [ci, ri]}


def check_count(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return None if v >= 0 else f"expected a count >= 0, got {v}"
    return f"expected an int count, got {type_name(v)} {v!r:.40}"


def check_row_id(v: Any) -> str | None:
    if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)):
        return None
    return f"expected a string or int id, got {type_name(v)} {v!r:.40}"


_TIES_ID = re.compile(r"^(ref|tied):\d+$")


class RewardBench2(_PairFormat):
    """RewardBench 2 (allenai/reward-bench-2): `chosen` holds the correct completions and
    `rejected` the incorrect ones (lists; `num_correct` / `num_incorrect` / `total_completions`
    count them), `subset` is Factuality, Precise IF, Math, Safety, Focus or Ties, and `id` pairs
    a Ties prompt's `ref:N` and `tied:N` rows. Every (correct, incorrect) combination is a pair
    (K responses per prompt for training); the pair's meta names the row id, subset and the two
    completion indices, from which evaluation regroups per-completion scores into rows
    (:func:`rmtrain.eval.metrics.regroup`) for the official scores."""

    name = "rewardbench2"
    required: ClassVar[tuple[str, ...]] = (
        "prompt",
        "chosen",
        "rejected",
        "num_correct",
        "num_incorrect",
        "total_completions",
        "subset",
    )
    checks: ClassVar[dict[str, Check]] = {
        "prompt": check_text,
        "chosen": check_text_list,
        "rejected": check_text_list,
        "num_correct": check_count,
        "num_incorrect": check_count,
        "total_completions": check_count,
        "subset": check_text,
        "id": check_row_id,
    }
    example: ClassVar[dict[str, Any]] = {
        "id": "17",
        "prompt": "How do I bake bread?",
        "chosen": ["Mix flour, water, yeast and salt, then ..."],
        "rejected": ["Buy some.", "Bread is baked.", "Use a microwave."],
        "num_correct": 1,
        "num_incorrect": 3,
        "total_completions": 4,
        "subset": "Focus",
    }

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        self._check_row(cols, i)
        p = cols["prompt"][i]
        return [
            (exchange(p, c), exchange(p, r)) for c in cols["chosen"][i] for r in cols["rejected"][i]
        ]

    def _check_row(self, cols: dict[str, list[Any]], i: int) -> None:
        """The counts agree with the lists; a Ties row has a `ref:N` / `tied:N` id."""

        def fail(field: str, problem: str) -> DataError:
            return DataError(where(cols["_source"][i], cols["_row"][i], field, problem))

        chosen, rejected = cols["chosen"][i], cols["rejected"][i]
        for field, items in (("num_correct", chosen), ("num_incorrect", rejected)):
            if cols[field][i] != len(items):
                side = "chosen" if items is chosen else "rejected"
                raise fail(field, f"is {cols[field][i]}, but {side} has {len(items)} completions")
        if cols["total_completions"][i] != len(chosen) + len(rejected):
            raise fail("total_completions", f"is {cols['total_completions'][i]}, but there are "
                       f"{len(chosen) + len(rejected)} completions")  # fmt: skip
        if cols["subset"][i].lower() == "ties":
            row_id = cols["id"][i] if "id" in cols else None
            if not isinstance(row_id, str) or not _TIES_ID.match(row_id):
                raise fail("id", f"a Ties row needs an id 'ref:N' or 'tied:N', got {row_id!r:.40}")

    def pair_meta(self, cols: dict[str, list[Any]], i: int, k: int) -> dict[str, Any]:
        """Also the row id and which (correct, incorrect) completions the pair compares."""
        ci, ri = divmod(k, len(cols["rejected"][i]))
        row_id = cols["id"][i] if "id" in cols else None
        return {**super().pair_meta(cols, i, k), "id": row_id, "completion": [ci, ri],
                "num_correct": len(cols["chosen"][i])}  # fmt: skip


def check_responses(v: Any) -> str | None:
    """K >= 2 response texts of one prompt."""
    if not isinstance(v, list) or len(v) < 2:
        return f"expected a list of at least 2 response texts, got {type_name(v)} {v!r:.40}"
    for i, item in enumerate(v):
        if problem := check_text(item):
            return f"item {i}: {problem}"
    return None


def check_ranking(v: Any) -> str | None:
    """Response indices, best first: a permutation of 0..K-1 (checked against K per row)."""
    if not isinstance(v, list) or len(v) < 2:
        return f"expected a list of response indices (best first), got {type_name(v)} {v!r:.40}"
    if any(isinstance(i, bool) or not isinstance(i, int) for i in v):
        return f"expected integer response indices, got {v!r:.40}"
    if sorted(v) != list(range(len(v))):
        return f"expected each response index 0..{len(v) - 1} exactly once, got {v!r:.40}"
    return None


def completion_rating(c: dict[str, Any]) -> Any:
    """An UltraFeedback completion's rating: its `fine-grained_score` (the mean of the four
    aspect ratings, which Argilla's cleaned binarisation uses because `overall_score`, the
    critique model's, is unreliable), else its `overall_score`."""
    return c.get("fine-grained_score", c.get("overall_score"))


def check_completions(v: Any) -> str | None:
    """UltraFeedback's completions: dicts with a `response` text and a numeric rating."""
    if not isinstance(v, list) or len(v) < 2:
        return f"expected a list of at least 2 completions, got {type_name(v)} {v!r:.40}"
    for i, c in enumerate(v):
        if not isinstance(c, dict):
            return f"item {i}: expected a dict with 'response', got {type_name(c)}"
        if problem := check_text(c.get("response")):
            return f"item {i}: 'response': {problem}"
        rating = completion_rating(c)
        if rating is None:
            return f"item {i}: no 'fine-grained_score' or 'overall_score'"
        if problem := check_number(rating):
            return f"item {i}: rating: {problem}"
    return None


class _KResponses(_PairFormat):
    """One prompt, K >= 2 ranked or rated responses: every ordered pair (better, worse) is a pair,
    and the row's pairs form a group (`loss.k_way` trains them together, the prompt computed
    once). Equal ratings give no pair."""

    def ranked(self, cols: dict[str, list[Any]], i: int) -> list[tuple[str, float]]:
        """The row's (response, rating) list, a higher rating better."""
        raise NotImplementedError

    def prompt(self, cols: dict[str, list[Any]], i: int) -> Any:
        return cols["prompt"][i]

    def order(self, cols: dict[str, list[Any]], i: int) -> list[tuple[int, int]]:
        rated = self.ranked(cols, i)
        return [(a, b) for a in range(len(rated)) for b in range(len(rated))
                if rated[a][1] > rated[b][1]]  # fmt: skip

    def conversations(
        self, cols: dict[str, list[Any]], i: int
    ) -> list[tuple[Conversation, Conversation]]:
        p, rated = self.prompt(cols, i), self.ranked(cols, i)
        pairs = self.order(cols, i)
        return [(exchange(p, rated[a][0]), exchange(p, rated[b][0])) for a, b in pairs]

    def pair_meta(self, cols: dict[str, list[Any]], i: int, k: int) -> dict[str, Any]:
        """Also which two of the row's responses the pair compares (better, worse)."""
        return {**super().pair_meta(cols, i, k), "responses": list(self.order(cols, i)[k])}

    def row_margin(self, cols: dict[str, list[Any]], i: int, cfg: DataConfig) -> float | None:
        return None  # per pair, see to_pairs


class Ranked(_KResponses):
    """An explicit ranking: `prompt`, `responses` (K >= 2 texts) and `ranking` (their indices,
    best first)."""

    name = "ranked"
    required: ClassVar[tuple[str, ...]] = ("prompt", "responses", "ranking")
    checks: ClassVar[dict[str, Check]] = {
        "prompt": check_text,
        "responses": check_responses,
        "ranking": check_ranking,
    }
    example: ClassVar[dict[str, Any]] = {
        "prompt": "How do I bake bread?",
        "responses": ["Buy some.", "Mix flour, water, yeast and salt, then ...", "Bake it."],
        "ranking": [1, 2, 0],
    }

    def ranked(self, cols: dict[str, list[Any]], i: int) -> list[tuple[str, float]]:
        responses, ranking = cols["responses"][i], cols["ranking"][i]
        if len(ranking) != len(responses):
            raise DataError(where(cols["_source"][i], cols["_row"][i], "ranking",
                                  f"ranks {len(ranking)} responses, the row has "
                                  f"{len(responses)}"))  # fmt: skip
        rank = {r: place for place, r in enumerate(ranking)}
        return [(text, -float(rank[j])) for j, text in enumerate(responses)]


class UltraFeedbackCompletions(_KResponses):
    """UltraFeedback with all its completions (openbmb/UltraFeedback): `instruction` and
    `completions` (each a `response` rated by `fine-grained_score`, else `overall_score`).
    `data.margin_from_scores=true loss=margin` trains with the rating difference as margin."""

    name = "ultrafeedback_completions"
    required: ClassVar[tuple[str, ...]] = ("instruction", "completions")
    checks: ClassVar[dict[str, Check]] = {
        "instruction": check_text,
        "completions": check_completions,
    }
    example: ClassVar[dict[str, Any]] = {
        "instruction": "How do I bake bread?",
        "completions": [
            {"response": "Mix flour, water, yeast and salt, then ...", "fine-grained_score": 4.5},
            {"response": "Buy some.", "fine-grained_score": 1.75},
            {"response": "Bake it.", "fine-grained_score": 2.0},
        ],
    }

    def prompt(self, cols: dict[str, list[Any]], i: int) -> Any:
        return cols["instruction"][i]

    def ranked(self, cols: dict[str, list[Any]], i: int) -> list[tuple[str, float]]:
        return [(c["response"], float(completion_rating(c))) for c in cols["completions"][i]]

    def to_pairs(
        self, cols: dict[str, list[Any]], cfg: DataConfig, objective: str
    ) -> tuple[RawPairs, Skipped]:
        out, skipped = super().to_pairs(cols, cfg, objective)
        if cfg.margin_from_scores and not cfg.margin_column:
            margins = []
            for i in range(len(cols["_source"])):
                rated = self.ranked(cols, i)
                margins += [rated[a][1] - rated[b][1] for a, b in self.order(cols, i)]
            out.margin = margins
        return out, skipped


# Most specific first: among formats a row fully matches, the first one wins.
ADAPTERS: tuple[Schema, ...] = (
    PkuSafeRLHF(),
    UltraFeedbackCompletions(),
    Ranked(),
    UltraFeedback(),
    Conversational(),
    ConversationalImplicit(),
    RewardBench2(),
    RMBench(),
    RewardBench(),
    HHRLHF(),
    Standard(),
    StandardImplicit(),
)
BY_NAME = {a.name: a for a in ADAPTERS}
assert tuple(BY_NAME) == FORMATS[1:], "rmtrain.config.FORMATS lists the adapters"


def accepted() -> str:
    return "; ".join(f"{a.name}: {', '.join(a.required)}" for a in ADAPTERS)


def resolve(
    fmt: str, label: str, columns: Iterable[str], first_row: dict[str, Any] | None
) -> Schema:
    """The adapter for a file: the forced one (`fmt` != "auto"), else the first that the
    columns and the first row's values fully match, else the nearest (whose check then names
    the missing column or bad cell); an error listing the formats when nothing is near."""
    if fmt != "auto":
        return BY_NAME[fmt]
    cols = set(columns) - {"_source", "_row"}
    row = {k: v for k, v in (first_row or {}).items() if k in cols}
    if not row:
        row = dict.fromkeys(cols, None)
    for a in ADAPTERS:
        if a.score(row) == len(a.required):
            return a

    # Nearest: most required columns present (valid first-row values break ties), fewest needs.
    def nearness(a: Schema) -> tuple[int, int, int]:
        return (len(cols & set(a.required)), a.score(row), -len(a.required))

    best = max(ADAPTERS, key=nearness)
    if nearness(best)[0] == 0 or nearness(best)[0] < len(best.required) - 1:
        raise DataError(
            f"{label}: unrecognised layout (columns: {', '.join(sorted(cols)) or 'none'}); "
            f"accepted formats and the columns each needs: {accepted()} "
            "(set data.format to force one)"
        )
    return best


def raw_pairs(
    rows: Sequence[tuple[int, dict[str, Any]]], label: str, cfg: DataConfig, objective: str
) -> tuple[RawPairs, Skipped]:
    """The pairs of JSONL rows ((line, row) as `rmtrain.files.read_jsonl` gives them) of one
    format: detected from the first row (or `cfg.format`), every row checked (a bad cell is a
    DataError naming `label`, line and field), then the adapter's pairs. `rmtrain score` reads
    pair rows through this, so it accepts exactly what training does."""
    schema = resolve(cfg.format, label, rows[0][1], rows[0][1])
    fields = schema.fields({k for _, row in rows for k in row}, cfg)
    for line, row in rows:
        if found := schema.row_problem(row, fields):
            raise DataError(where(label, line, *found))
    names = {k for _, row in rows for k in row}
    cols: dict[str, list[Any]] = {k: [row.get(k) for _, row in rows] for k in names}
    cols["_source"] = [label] * len(rows)
    cols["_row"] = [line for line, _ in rows]
    return schema.to_pairs(cols, cfg, objective)
