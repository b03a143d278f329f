"""Where rows come from: the generated sample, a local file or directory, or a hub dataset.

A single file (``.jsonl``, ``.json``, ``.parquet``, ``.jsonl.xz``) is read whole, whatever the
split asked for: the caller carves an eval set out of it (``data.eval_fraction``) or reads one
from ``data.eval_path``.

A split is a :class:`Read`: a list of pieces (one per file) with one row layout. A local JSONL
file is read by rmtrain itself, line by line, so any byte range of it can be read on its own (a
large file is tokenized in parts, by several processes and ranks) and every row keeps its exact
line; everything else (parquet, ``.json``, hub datasets, the sample) is read through `datasets`
(memory-mapped Arrow) in row ranges. Rows come in batches of columns, each row checked by the
layout's adapter first and tagged with provenance columns (``_source``, ``_row``: file or split
label, and the 1-based line of a JSONL file) so that a later error can still name file and line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from rmtrain.config import DataConfig
from rmtrain.data.formats import BY_NAME, resolve
from rmtrain.data.schemas import Schema
from rmtrain.errors import DataError, where
from rmtrain.files import jsonl_lines, parse_jsonl_line

SOURCE_COL, ROW_COL = "_source", "_row"
_SPLIT_EXTS = (".jsonl", ".jsonl.xz", ".parquet")
FILE_EXTS = (".jsonl", ".jsonl.xz", ".json", ".parquet")
BATCH_ROWS = 1024  # rows per batch: what one process holds as Python objects at a time


@dataclass
class Piece:
    """Rows from one source of a split: a local JSONL file (`file`, read by rmtrain) or a
    `datasets` table (`ds`)."""

    label: str  # what errors and the pairs' provenance name: the file, or the split's label
    file: Path | None = None
    ds: datasets.Dataset | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # what the data cache keys it by
    columns: tuple[str, ...] = ()  # a JSONL file: its first row's keys
    first: dict[str, Any] | None = None  # its first row
    size: int = 0  # bytes of a file, rows of a table

    @property
    def seekable(self) -> bool:
        """Whether any byte range of it can be read on its own (a plain JSONL file)."""
        return self.file is not None and not self.file.name.endswith(".xz")


@dataclass
class Read:
    """One split of one source: its settings, its pieces, their row layout (format) and the
    cap on its rows (data.max_train_rows / max_eval_rows)."""

    cfg: DataConfig
    split: str
    pieces: list[Piece]
    format: str
    limit: int | None = None

    @property
    def schema(self) -> Schema:
        return BY_NAME[self.format]

    def keys(self, piece: Piece) -> tuple[str, ...]:
        """The columns a batch of `piece` carries: its own and every field checked."""
        return tuple(dict.fromkeys((*piece.columns, *self.schema.fields(piece.columns, self.cfg))))


def file_identity(path: Path) -> dict[str, Any]:
    """What the data cache keys a local file by: its absolute path, size, and modification
    and change times (a change time moves on every write, rename or copy over it), not its
    content, whose hash would cost a warm start of a multi-GB file its seconds."""
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}  # fmt: skip


def _first_row(path: Path) -> dict[str, Any]:
    """The first row of a JSONL file (DataError for a bad first line or a file without rows)."""
    seen = False
    for n, raw, _ in jsonl_lines(path):
        seen = True
        row = parse_jsonl_line(path, n, raw)
        if row is not None:
            return row
    raise DataError(f"{path}: no rows ({'only blank lines' if seen else 'empty file'})")


def _cap(cfg: DataConfig, split: str) -> int | None:
    if split == cfg.train_split:
        return cfg.max_train_rows
    if split == cfg.eval_split:
        return cfg.max_eval_rows
    return None


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.xz"))


def _load_file(path: Path, cfg: DataConfig | None = None) -> Piece:
    if not path.name.endswith(FILE_EXTS):
        raise DataError(
            f"{path}: unsupported file type (data files: {', '.join(FILE_EXTS)}, "
            "or a directory holding train.jsonl / test.jsonl)"
        )
    identity = file_identity(path)
    if _is_jsonl(path):
        first = _first_row(path)
        return Piece(str(path), file=path, identity=identity, columns=tuple(first), first=first,
                     size=identity["size"])  # fmt: skip
    builder = "parquet" if path.name.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"{path}: datasets cannot load it: {type(exc).__name__}: {exc}") from exc
    assert isinstance(ds, datasets.Dataset)
    return _table_piece(str(path), ds, identity)


def _table_piece(label: str, ds: datasets.Dataset, identity: dict[str, Any]) -> Piece:
    ds = ds.with_format(None)
    first = ds[0] if len(ds) else None
    return Piece(label, ds=ds, identity=identity, columns=tuple(ds.column_names), first=first,
                 size=len(ds))  # fmt: skip


def _load_hub(cfg: DataConfig, split: str, path: str) -> Piece:
    rev = f", revision={cfg.revision}" if cfg.revision else ""
    label = f"{cfg.path} (config={cfg.name or 'default'}, split={split}{rev})"
    try:
        ds = datasets.load_dataset(path, name=cfg.name, revision=cfg.revision, split=split)
    except Exception as exc:
        raise DataError(f"{label}: cannot load: {type(exc).__name__}: {exc}") from exc
    assert isinstance(ds, datasets.Dataset)
    # datasets' own fingerprint of what it loaded (the resolved revision, the files)
    return _table_piece(label, ds, {"dataset": label, "fingerprint": ds._fingerprint})


def _readme_declares_configs(root: Path) -> bool:
    """A local copy of a hub dataset repo whose README front matter lists configs: `datasets`
    then resolves `name` and `split` itself."""
    readme = root / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    return text.startswith("---") and "\nconfigs:" in text.split("\n---", 1)[0]


def _config_files(cfg: DataConfig, root: Path, split: str) -> list[Path]:
    """v1 hub layout without README: data/<Config>/<split>.jsonl, filtered by config name."""
    files: list[Path] = []
    for pattern in ("data/*", "*"):
        for ext in _SPLIT_EXTS:
            files.extend(root.glob(f"{pattern}/{split}{ext}"))
        if files:
            break
    if not files or cfg.name in (None, "default"):
        return sorted(files)
    chosen = sorted(f for f in files if f.parent.name.lower() == cfg.name.lower())
    if not chosen:
        have = ", ".join(sorted({f.parent.name.lower() for f in files}))
        raise DataError(f"{root}: no config {cfg.name!r} with split {split!r} (found: {have})")
    return chosen


def _load_local_dir(cfg: DataConfig, root: Path, split: str) -> list[Piece]:
    for ext in _SPLIT_EXTS:
        if (root / f"{split}{ext}").is_file():
            return [_load_file(root / f"{split}{ext}", cfg)]
    if _readme_declares_configs(root):
        return [_load_hub(cfg, split, str(root))]
    files = _config_files(cfg, root, split)
    if not files:
        raise DataError(
            f"{root}: no {split!r} split: expected {split}.jsonl or {split}.parquet in it, "
            f"data/<config>/{split}.jsonl, or a README.md declaring configs"
        )
    return [_load_file(f, cfg) for f in files]


def _load_sample(cfg: DataConfig, split: str) -> Piece:
    # imported here: the toy package brings in the toy model's config (transformers, torch),
    # which a process that only tokenizes files should not spend seconds importing
    from rmtrain.toy import sample_data

    if split == cfg.train_split:
        n, seed, pool = cfg.sample_train_rows, 0, "train"
    elif split == cfg.eval_split:
        n, seed, pool = cfg.sample_eval_rows, 1, "test"
    else:
        raise DataError(
            f"sample: no split {split!r} (sample data has {cfg.train_split!r}, {cfg.eval_split!r})"
        )
    rows = sample_data.generate_rows(n, seed, split=pool)
    label = f"sample:{pool}(seed={seed})"
    generator = hashlib.blake2b(Path(sample_data.__file__).read_bytes()).hexdigest()[:16]
    identity = {"sample": label, "rows": n, "generator": generator}
    return _table_piece(label, datasets.Dataset.from_list(rows), identity)


def _load_pieces(cfg: DataConfig, split: str) -> list[Piece]:
    if cfg.path == "sample":
        return [_load_sample(cfg, split)]
    local = Path(cfg.path).expanduser()
    if local.is_file():
        return [_load_file(local, cfg)]
    if local.exists():
        return _load_local_dir(cfg, local, split)
    if cfg.path.startswith(("/", ".", "~")) or cfg.path.endswith(FILE_EXTS):
        raise DataError(f"{cfg.path}: no such file or directory (data.path)")
    return [_load_hub(cfg, split, cfg.path)]


def plan_read(cfg: DataConfig, split: str) -> Read:
    """One split's pieces, their format (detected from the first piece's columns and first row,
    or `data.format`) and its row cap. Files are opened, not read: a JSONL file only for its
    first row."""
    pieces = [p for p in _load_pieces(cfg, split) if p.size]
    if not pieces:
        raise DataError(f"{cfg.path}: split {split!r} has no rows")
    first = pieces[0]
    schema = resolve(cfg.format, first.label, first.columns, first.first)
    return Read(cfg, split, pieces, schema.name, _cap(cfg, split))


def read_batches(
    read: Read,
    piece: int,
    start: int = 0,
    end: int | None = None,
    first_line: int = 1,
    size: int = BATCH_ROWS,
) -> Iterator[tuple[dict[str, list[Any]], int]]:
    """(columns, units read) of checked rows of piece `piece`, `size` rows at a time.

    `start` / `end`: a byte range of a JSONL file (`first_line`: the line at `start`) or a row
    range of a table; units are bytes or rows. A bad cell is a DataError naming file, row and
    field; rows are checked in order, so the first bad one is the one reported.
    """
    p = read.pieces[piece]
    if p.ds is not None:
        yield from _table_batches(read, p, start, p.size if end is None else min(end, p.size), size)
    else:
        yield from _file_batches(read, p, start, end, first_line, size)


def _table_batches(
    read: Read, p: Piece, start: int, stop: int, size: int
) -> Iterator[tuple[dict[str, list[Any]], int]]:
    assert p.ds is not None
    keys, fields, schema = read.keys(p), read.schema.fields(p.columns, read.cfg), read.schema
    for a in range(start, stop, size):
        b = min(a + size, stop)
        got: dict[str, list[Any]] = p.ds[a:b]
        found = schema.first_problem(got, fields, b - a)
        if found is not None:
            index, name, problem = found
            raise DataError(where(p.label, a + index + 1, name, problem))
        cols = {k: got.get(k, [None] * (b - a)) for k in keys}
        cols[SOURCE_COL] = [p.label] * (b - a)
        cols[ROW_COL] = list(range(a + 1, b + 1))
        yield cols, b - a


def _file_batches(
    read: Read, p: Piece, start: int, end: int | None, first_line: int, size: int
) -> Iterator[tuple[dict[str, list[Any]], int]]:
    assert p.file is not None
    keys, fields, schema = read.keys(p), read.schema.fields(p.columns, read.cfg), read.schema
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    done = start
    for n, raw, pos in jsonl_lines(p.file, start, end, first_line):
        row = parse_jsonl_line(p.file, n, raw)
        if row is None:
            continue
        if found := schema.row_problem(row, fields):
            raise DataError(where(p.label, n, *found))
        rows.append(row)
        lines.append(n)
        if len(rows) == size:
            yield _columns(rows, lines, keys, p.label), pos - done
            rows, lines, done = [], [], pos
    if rows:
        yield _columns(rows, lines, keys, p.label), (p.size if end is None else end) - done


def _columns(
    rows: list[dict[str, Any]], lines: list[int], keys: tuple[str, ...], label: str
) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {k: [row.get(k) for row in rows] for k in keys}
    cols[SOURCE_COL] = [label] * len(rows)
    cols[ROW_COL] = list(lines)
    return cols


def read_columns(read: Read) -> Iterator[tuple[int, dict[str, list[Any]], int]]:
    """(piece, columns, units) of every batch of a split's checked rows, in order, up to its
    cap."""
    left = read.limit
    for piece in range(len(read.pieces)):
        for cols, units in read_batches(read, piece):
            n = len(cols[ROW_COL])
            if left is not None and n >= left:
                yield piece, {k: v[:left] for k, v in cols.items()}, units
                return
            if left is not None:
                left -= n
            yield piece, cols, units


def load_rows(cfg: DataConfig, split: str) -> datasets.Dataset:
    """Rows of one split, checked, capped to max_{train,eval}_rows, as one in-memory table with
    ``_source`` / ``_row`` (file or split label, 1-based line), for inspection and tests: a run
    reads its rows in batches (:func:`read_batches`) and never holds them all."""
    read = plan_read(cfg, split)
    parts = [datasets.Dataset.from_dict(cols) for _, cols, _ in read_columns(read)]
    try:
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except Exception as exc:
        raise DataError(
            f"{cfg.path}: split {split!r}: files have different schemas: {exc}"
        ) from exc
