"""Files that are read and written whole: the one atomic writer and the one JSONL reader.

- :func:`write_atomic` / :func:`atomic_directory`: a file or directory appears complete or not at
  all (written beside its destination, then renamed into place; removed on any error), so a
  crash, a full disk or a bad row never leaves something half-written that a later run or
  reader could take for whole.
- :func:`read_jsonl`: the rows of a JSONL file (``.jsonl.xz`` too) with their 1-based line
  numbers; a line that is not UTF-8, not JSON or not an object is a :class:`DataError` naming
  the file and line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from rmtrain.errors import CheckpointError, DataError, type_name, where


def write_atomic(path: Path, content: str | Callable[[IO[str]], None]) -> Path:
    """Write `content` (a string, or a function writing to the open file) to `path` through a
    temporary file in the same directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it 0600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if isinstance(content, str):
                f.write(content)
            else:
                content(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """`rows` as JSON lines, atomically."""

    def write(f: IO[str]) -> None:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return write_atomic(path, write)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Build a directory in `<path>.tmp` (yielded), then move it into place, replacing an older
    one; on any error the temporary directory is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def open_lines(path: Path) -> Iterator[bytes]:
    """The raw lines of a text file, `.xz`-compressed or not."""
    opener: Any = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rb") as f:
        yield from f


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) of every non-blank line of a JSONL file.

    DataError names the file and line of the first line that is not UTF-8, not JSON or not a
    JSON object; an unreadable file (missing, a corrupt `.xz`) is a DataError naming the file.
    """
    path = Path(path)
    try:
        for n, raw in enumerate(open_lines(path), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    where(str(path), n, "<json>", f"not UTF-8 ({e.reason} at byte {e.start})")
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    where(str(path), n, "<json>", f"invalid JSON: {e.msg} (column {e.colno})")
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    where(str(path), n, "<json>", f"expected a JSON object, got {type_name(row)}")
                )
            yield n, row
    except (lzma.LZMAError, EOFError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot read it: {reason}") from None


def no_space(err: BaseException, path: Path, last_good: Path | None) -> CheckpointError | None:
    """The one-line error for a write that failed because the disk is full (None otherwise).

    torch.save reports a full disk as a RuntimeError about file positions, safetensors as its own
    error: besides ENOSPC, a failed write on a disk left with almost no free space counts."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    if not full:
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(where).free < 16 * 2**20
    if not full:
        return None
    good = f"the last good checkpoint is {last_good}" if last_good else "there is no checkpoint"
    return CheckpointError(f"no space left on device at {path}; {good}")
