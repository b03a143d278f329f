"""The data layer's one error type and its message shape."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """One clear message: '<file>: row <n>: field '<name>': <problem>'."""


def where(source: str, row: int, field: str, problem: str) -> str:
    """The message of a bad cell: `row` is the 1-based line of a JSONL file (or row of a split)."""
    return f"{source}: row {row}: field '{field}': {problem}"


def type_name(value: Any) -> str:
    return type(value).__name__
