"""The errors a user can cause, and their one message shape.

Each is shown as one line, `rmtrain[ <command>]: error: <message>`, with exit code 2 (or an HTTP
4xx from `rmtrain serve`), never as a traceback. A bad cell of a data file is named by file, row
and field: ``<file>: row <n>: field '<name>': <problem>`` (:func:`where`), where ``n`` is the
1-based line of a JSONL file (or the row of a split).
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Something the user gave rmtrain is wrong; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key."""


class DataError(UserError, ValueError):
    """A data file or row is unusable: '<file>: row <n>: field '<name>': <problem>'."""


class TextError(UserError, ValueError):
    """A conversation or tokenizer that cannot be rendered; the message says why."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read safely; the message names the file."""


class DivergenceError(UserError, RuntimeError):
    """The loss or the gradient norm became NaN/inf: the run stops, nothing more is written."""


def where(source: str, row: int, field: str, problem: str) -> str:
    """The message of a bad cell: `row` is the 1-based line of a JSONL file (or row of a split)."""
    return f"{source}: row {row}: field '{field}': {problem}"


def type_name(value: Any) -> str:
    return type(value).__name__
