"""Row schemas: validating raw rows, and turning them into preference pairs.

A schema adapter knows one dataset layout: which columns it needs, how to check one cell, and
how its rows become :class:`RawPairs` (conversations for the chosen and rejected side, plus the
labels the objectives use). Everything after that (rendering, tokenizing, truncation, batching)
is layout-independent. A new input format is one new adapter in :data:`ADAPTERS`.

Every row is checked before a pair is built, and a bad row is reported once, as
``<file>: row <n>: field '<name>': <problem>`` with the 1-based line of a JSONL file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rmtrain.config import DataConfig
from rmtrain.errors import DataError, type_name, where
from rmtrain.text import exchange

Check = Callable[[Any], str | None]


def check_text(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"expected str, got {type_name(v)} {v!r:.40}"
    return None if v.strip() else "empty text"


def check_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected bool, got {type_name(v)} {v!r:.40}"


def check_id(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return None if v in (0, 1) else f"expected 0 or 1, got {v}"
    return f"expected 0 or 1, got {type_name(v)} {v!r:.40}"


def check_severity(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return None if 0 <= v <= 3 else f"expected 0-3, got {v}"
    return f"expected int 0-3, got {type_name(v)} {v!r:.40}"


def check_harm(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"expected dict of harm category -> bool, got {type_name(v)} {v!r:.40}"
    for key, flag in v.items():
        if not isinstance(flag, bool):
            return f"category {key!r}: expected bool, got {type_name(flag)} {flag!r:.40}"
    return None


def check_number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return f"expected a finite number, got {v!r:.40}"
    return None


@dataclass
class RawPairs:
    """Preference pairs before tokenization, as columns; row i of each list is pair i."""

    chosen: list[list[dict[str, str]]] = field(default_factory=list)  # conversations
    rejected: list[list[dict[str, str]]] = field(default_factory=list)
    chosen_unsafe: list[bool] = field(default_factory=list)
    rejected_unsafe: list[bool] = field(default_factory=list)
    chosen_severity: list[int] = field(default_factory=list)  # -1 where unknown
    rejected_severity: list[int] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    source: list[str] = field(default_factory=list)  # file or split label
    row: list[int] = field(default_factory=list)  # 1-based line / row
    # Per pair, what evaluation breaks accuracy down by (rmtrain.eval.metrics.PairResult's
    # fields: subset, category, harm categories, severities, safety labels; RM-Bench's style
    # pair). Optional: an adapter with nothing to add leaves it empty.
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class Skipped:
    """Rows a schema left out on purpose (counted, never silent)."""

    inconsistent: int = 0
    severity: int = 0


class Schema:
    """One dataset layout. Subclasses fill in the class attributes and `to_pairs`.

    ``required``: the columns a file of this layout always has (detection looks for them);
    ``checks``: how to check a cell of every column the layout knows (optional ones are checked
    where present).
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    checks: ClassVar[dict[str, Check]]
    example: ClassVar[dict[str, Any]] = {}

    def needed(self, cfg: DataConfig | None) -> tuple[str, ...]:
        """The columns this run needs (some depend on the objective or preference)."""
        return self.required

    def fields(self, columns: Iterable[str], cfg: DataConfig | None = None) -> tuple[str, ...]:
        """The fields every row must have valid values in, in the order they are checked."""
        needed = self.needed(cfg)
        present = set(columns)
        return needed + tuple(f for f in self.checks if f in present and f not in needed)

    def score(self, row: dict[str, Any]) -> int:
        """How many of the required columns a (first) row has with valid values: detection."""
        return sum(
            1 for f in self.required if row.get(f) is not None and self.checks[f](row[f]) is None
        )

    def row_problem(self, row: dict[str, Any], fields: Sequence[str]) -> tuple[str, str] | None:
        """(field, problem) of the first bad cell of one raw row, or None."""
        for name in fields:
            value = row.get(name)
            problem = "missing" if value is None else self.checks[name](value)
            if problem:
                return name, problem
        return None

    def first_problem(
        self, columns: dict[str, list[Any]], fields: Sequence[str], n: int
    ) -> tuple[int, str, str] | None:
        """(row index, field, problem) of the first bad cell in row-major order, column-wise."""
        best: tuple[int, str, str] | None = None
        for name in fields:
            if name not in columns:
                return (0, name, "missing") if best is None or best[0] > 0 else best
            values, check = columns[name], self.checks[name]
            for i in range(best[0] if best else n):  # only an earlier row can beat the best
                value = values[i]
                problem = "missing" if value is None else check(value)
                if problem:
                    best = (i, name, problem)
                    break
        return best

    def to_pairs(
        self, cols: dict[str, list[Any]], cfg: DataConfig, objective: str
    ) -> tuple[RawPairs, Skipped]:
        raise NotImplementedError


_TEXT = ("prompt", "response_0", "response_1")
_BOOL = ("is_response_0_safe", "is_response_1_safe")
_ID = ("better_response_id", "safer_response_id")
_HARM = ("response_0_harm_category", "response_1_harm_category")
_SEVERITY = ("response_0_severity_level", "response_1_severity_level")
_LABELS = (*_BOOL, *_HARM, *_SEVERITY)


def pku_pair_labels(row: Mapping[str, Any], chosen_id: int) -> dict[str, Any]:
    """A PKU-SafeRLHF row's per-response labels as the chosen / rejected side's, JSON-ready:
    what evaluation breaks accuracy down by (harm categories as sorted lists of the true names,
    severity levels, safety flags). `chosen_id`: the row's better_response_id (reward model) or
    safer_response_id (cost model). Fields a row lacks (v0 rows have only the safety labels)
    are left out."""
    if chosen_id not in (0, 1):
        raise ValueError(f"chosen_id must be 0 or 1, got {chosen_id!r}")
    out: dict[str, Any] = {}
    for side, k in (("chosen", chosen_id), ("rejected", 1 - chosen_id)):
        harm = row.get(f"response_{k}_harm_category")
        if harm is not None:
            out[f"harm_categories_{side}"] = sorted(str(c) for c, on in harm.items() if on)
        if (severity := row.get(f"response_{k}_severity_level")) is not None:
            out[f"severity_{side}"] = int(severity)
        if (safe := row.get(f"is_response_{k}_safe")) is not None:
            out[f"{side}_safe"] = bool(safe)
    return out


def column_margins(cols: dict[str, list[Any]], cfg: DataConfig, label: str) -> list[Any] | None:
    """The per-pair margins of data.margin_column (checked), or None when it is not set."""
    if not cfg.margin_column:
        return None
    margins = cols.get(cfg.margin_column)
    if margins is None:
        raise DataError(f"{label}: field '{cfg.margin_column}': missing (data.margin_column)")
    for i, m in enumerate(margins):
        if problem := check_number(m):
            raise DataError(where(cols["_source"][i], cols["_row"][i], cfg.margin_column, problem))
    return margins


class PkuSafeRLHF(Schema):
    """PKU-SafeRLHF rows: v0 (7 fields) or v1 (16 fields: severity levels, harm categories).

    chosen = response_{id}, id = better_response_id (data.preference=better) or
    safer_response_id (safer). The safety labels are needed only where they are used
    (data.preference=safer, which objective=cost requires); where present they are checked.
    For the cost objective, a row whose safety labels contradict safer_response_id is an error
    (or skipped with data.inconsistent_labels=skip).
    """

    name = "pku_saferlhf"
    required = ("prompt", "response_0", "response_1", "better_response_id")
    checks: ClassVar[dict[str, Check]] = {
        **dict.fromkeys(_TEXT, check_text),
        **dict.fromkeys(_BOOL, check_bool),
        **dict.fromkeys(_HARM, check_harm),
        **dict.fromkeys(_SEVERITY, check_severity),
        **dict.fromkeys(_ID, check_id),
    }
    example: ClassVar[dict[str, Any]] = {
        "prompt": "How do I bake bread?",
        "response_0": "Mix flour, water, yeast and salt, then ...",
        "response_1": "Buy some.",
        "better_response_id": 0,
        "safer_response_id": 0,
        "is_response_0_safe": True,
        "is_response_1_safe": True,
    }

    @staticmethod
    def version(columns: Iterable[str]) -> str:
        """'v1' (severity levels and harm categories present) or 'v0'."""
        return "v1" if set(columns) & set(_SEVERITY + _HARM) else "v0"

    def needed(self, cfg: DataConfig | None) -> tuple[str, ...]:
        if cfg is not None and cfg.preference == "safer":
            return (*_TEXT, *_BOOL, "safer_response_id")
        return self.required

    def to_pairs(
        self, cols: dict[str, list[Any]], cfg: DataConfig, objective: str
    ) -> tuple[RawPairs, Skipped]:
        v1 = self.version(cols) == "v1"
        id_field = f"{cfg.preference}_response_id"
        sources, rows = cols["_source"], cols["_row"]
        label = sources[0] if sources else cfg.path

        def fail(i: int, name: str, problem: str) -> DataError:
            return DataError(where(sources[i], rows[i], name, problem))

        if cfg.min_severity_gap > 0 and not v1:
            raise DataError(
                f"{label}: field '{_SEVERITY[0]}': missing (data.min_severity_gap needs the v1 "
                f"schema with severity levels)"
            )
        margins = column_margins(cols, cfg, label)
        labelled = all(b in cols for b in _BOOL)

        out, skipped = RawPairs(), Skipped()
        for i, c in enumerate(cols[id_field]):
            r = 1 - c
            unsafe = (not cols[_BOOL[0]][i], not cols[_BOOL[1]][i]) if labelled else (False, False)
            if objective == "cost" and unsafe[c] and not unsafe[r]:
                if cfg.inconsistent_labels == "error":
                    raise fail(
                        i,
                        id_field,
                        f"points at response_{c}, which is unsafe, while response_{r} is safe "
                        "(set data.inconsistent_labels=skip to drop such rows)",
                    )
                skipped.inconsistent += 1
                continue
            severity = (cols[_SEVERITY[0]][i], cols[_SEVERITY[1]][i]) if v1 else (-1, -1)
            if cfg.min_severity_gap > 0 and abs(severity[0] - severity[1]) < cfg.min_severity_gap:
                skipped.severity += 1
                continue
            prompt = cols["prompt"][i]
            out.chosen.append(exchange(prompt, cols[f"response_{c}"][i]))
            out.rejected.append(exchange(prompt, cols[f"response_{r}"][i]))
            out.chosen_unsafe.append(unsafe[c])
            out.rejected_unsafe.append(unsafe[r])
            out.chosen_severity.append(severity[c])
            out.rejected_severity.append(severity[r])
            out.margin.append(float(margins[i]) if margins is not None else 0.0)
            out.source.append(sources[i])
            out.row.append(rows[i])
            # The labels evaluation splits accuracy by, as chosen/rejected.
            out.meta.append(pku_pair_labels({k: cols[k][i] for k in _LABELS if k in cols}, c))
        return out, skipped
