"""Where rows come from: the generated sample, a local file or directory, or a hub dataset.

A single file (``.jsonl``, ``.json``, ``.parquet``, ``.jsonl.xz``) is read whole, whatever the
split asked for: the caller carves an eval set out of it (``data.eval_fraction``) or reads one
from ``data.eval_path``.

Everything is read through `datasets`. Each split is a list of pieces (one per file); every
piece is validated by its schema adapter, then tagged with provenance columns (``_source``,
``_row``: file or split label, and the 1-based line of a JSONL file) so that a later error can
still name file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from rmtrain.config import DataConfig
from rmtrain.data.formats import resolve
from rmtrain.data.schemas import Schema
from rmtrain.errors import DataError, where
from rmtrain.files import open_lines, read_jsonl
from rmtrain.toy import sample_data

SOURCE_COL, ROW_COL = "_source", "_row"
_SPLIT_EXTS = (".jsonl", ".jsonl.xz", ".parquet")
FILE_EXTS = (".jsonl", ".jsonl.xz", ".json", ".parquet")


@dataclass
class _Piece:
    """Rows from one source; ``file`` is set for a local JSONL file (exact line numbers)."""

    label: str
    ds: datasets.Dataset
    file: Path | None = None


def scan_jsonl(path: Path, cfg: DataConfig | None = None, limit: int | None = None) -> str | None:
    """Validate a JSONL file line by line: the message for its first bad line, or None.

    Every local JSONL file is checked this way (its first `limit` rows): ``datasets`` infers
    one type per column and may coerce a cell ("0" in an int column, ...) instead of failing,
    or fail on the file as a whole; the raw values give the exact line and the cell as written.
    """
    schema: Schema | None = None
    fields: tuple[str, ...] = ()
    seen = 0
    try:
        for n, row in read_jsonl(path):
            if limit is not None and seen >= limit:
                break
            seen += 1
            if schema is None:
                schema = resolve(cfg.format if cfg else "auto", str(path), row, row)
                fields = schema.fields(row, cfg)
            found = schema.row_problem(row, fields)
            if found:
                return where(str(path), n, *found)
    except DataError as err:
        return str(err)
    if schema is None:
        blank = any(True for _ in open_lines(path))
        return f"{path}: no rows ({'only blank lines' if blank else 'empty file'})"
    return None


def _line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines: row i of the dataset is line numbers[i]."""
    return [n for n, raw in enumerate(open_lines(path), 1) if raw.strip()]


def _cap(cfg: DataConfig, split: str) -> int | None:
    if split == cfg.train_split:
        return cfg.max_train_rows
    if split == cfg.eval_split:
        return cfg.max_eval_rows
    return None


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.xz"))


def _load_file(path: Path, cfg: DataConfig | None = None) -> _Piece:
    if not path.name.endswith(FILE_EXTS):
        raise DataError(
            f"{path}: unsupported file type (data files: {', '.join(FILE_EXTS)}, "
            "or a directory holding train.jsonl / test.jsonl)"
        )
    builder = "parquet" if path.name.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        message = scan_jsonl(path, cfg) if _is_jsonl(path) else None
        if message:
            raise DataError(message) from exc
        raise DataError(f"{path}: datasets cannot load it: {type(exc).__name__}: {exc}") from exc
    assert isinstance(ds, datasets.Dataset)
    return _Piece(str(path), ds, path if _is_jsonl(path) else None)


def _load_hub(cfg: DataConfig, split: str, path: str) -> _Piece:
    rev = f", revision={cfg.revision}" if cfg.revision else ""
    label = f"{cfg.path} (config={cfg.name or 'default'}, split={split}{rev})"
    try:
        ds = datasets.load_dataset(path, name=cfg.name, revision=cfg.revision, split=split)
    except Exception as exc:
        raise DataError(f"{label}: cannot load: {type(exc).__name__}: {exc}") from exc
    assert isinstance(ds, datasets.Dataset)
    return _Piece(label, ds)


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


def _load_local_dir(cfg: DataConfig, root: Path, split: str) -> list[_Piece]:
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


def _load_sample(cfg: DataConfig, split: str) -> _Piece:
    if split == cfg.train_split:
        n, seed, pool = cfg.sample_train_rows, 0, "train"
    elif split == cfg.eval_split:
        n, seed, pool = cfg.sample_eval_rows, 1, "test"
    else:
        raise DataError(
            f"sample: no split {split!r} (sample data has {cfg.train_split!r}, {cfg.eval_split!r})"
        )
    rows = sample_data.generate_rows(n, seed, split=pool)
    return _Piece(f"sample:{pool}(seed={seed})", datasets.Dataset.from_list(rows))


def _load_pieces(cfg: DataConfig, split: str) -> list[_Piece]:
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


def _validate(piece: _Piece, cfg: DataConfig) -> None:
    if piece.file is not None:
        # The raw lines first: datasets may coerce a "true" string to a bool, and keeps invalid
        # UTF-8 that fails only when read; the raw values give the exact line and cell.
        message = scan_jsonl(piece.file, cfg, limit=len(piece.ds))
        if message:
            raise DataError(message)
        return
    ds = piece.ds.with_format(None)
    schema = resolve(cfg.format, piece.label, ds.column_names, ds[0] if len(ds) else None)
    fields = schema.fields(ds.column_names, cfg)
    present = [f for f in fields if f in ds.column_names]
    columns: dict[str, list[Any]] = ds.select_columns(present)[:] if present else {}
    found = schema.first_problem(columns, fields, len(ds))
    if found is None:
        return
    index, name, problem = found
    raise DataError(where(piece.label, index + 1, name, problem))


def load_rows(cfg: DataConfig, split: str) -> datasets.Dataset:
    """Rows of one split, validated, capped to max_{train,eval}_rows.

    Adds ``_source`` / ``_row`` (file or split label, 1-based line) so that pair building can
    point at the offending line of an inconsistent label.
    """
    cap = _cap(cfg, split)
    parts: list[datasets.Dataset] = []
    remaining = cap
    for piece in _load_pieces(cfg, split):
        if remaining is not None:
            if remaining <= 0:
                break
            if len(piece.ds) > remaining:
                piece.ds = piece.ds.select(range(remaining))
            remaining -= len(piece.ds)
        if len(piece.ds) == 0:
            continue
        _validate(piece, cfg)
        n = len(piece.ds)
        rows = _line_numbers(piece.file)[:n] if piece.file else []
        if len(rows) != n:
            rows = list(range(1, n + 1))
        ds = piece.ds.add_column(SOURCE_COL, [piece.label] * n)
        parts.append(ds.add_column(ROW_COL, rows))
    if not parts:
        raise DataError(f"{cfg.path}: split {split!r} has no rows")
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(
            [parts[0], *(p.cast(parts[0].features) for p in parts[1:])]
        )
    except Exception as exc:
        raise DataError(
            f"{cfg.path}: split {split!r}: files have different schemas: {exc}"
        ) from exc
