"""The tokenized-pair cache: every split a run reads, tokenized once, in parallel, into one
memory-mapped store that every rank of every later run shares.

**Key.** An entry is named by a fingerprint of everything that changes the token ids or the
labels: rmtrain's pair format (:data:`PAIR_FORMAT`), the tokenizer (a hash of its serialized
vocabulary, merges, normalizer and special tokens), the trained chat template, ``max_length``,
the objective, and for every split read its format, preference settings, row cap and each
file's identity (:func:`rmtrain.data.sources.file_identity`: path, size, modification and change
time; a hub dataset: `datasets`' own fingerprint). A changed input is a new key, never a stale
hit. Settings that only choose among the pairs (``eval_fraction``, ``split_seed``, mixture
weights, the seed) are applied when the store is read, so changing them reuses the entry.

**Build.** The input is cut into parts (byte ranges of a JSONL file at line starts, row ranges
of a table; a capped split is one part). The ranks of a node split the parts between them, and
each rank between ``data.num_proc`` processes; every part is read, checked, rendered and
tokenized in batches of rows and written as a shard of arrays (tokens, lengths, labels, the
pairs' content hashes, provenance). The node's first rank then merges the shards in input order
(:func:`rmtrain.data.store.merge`), so an entry is the same whatever the number of processes.
A bad row fails its part; the error of the first failing part in input order is the one
reported (every rank raises it), and the build directory is removed: nothing is left that a
later run could take for an entry.

**Atomicity and concurrency.** A build happens in ``<cache_dir>/.build-<key>-<id>/`` (the id is
one launch's), and its result is renamed to ``<cache_dir>/<key>`` only when complete, manifest
last. Two launches building the same entry at once each build their own and the first rename
wins; the other maps the winner's (identical) entry. A build directory left by a killed build
(its leader's lock released) is removed by the next build.

**Several nodes.** Each node builds with its own ranks (ranks are grouped by host name), so the
cache directory may be node-local. On a filesystem the nodes share, the nodes build side by side
and the first to finish wins; run ``rmtrain prepare`` once beforehand and every node finds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain, pairwise
from pathlib import Path
from typing import Any

import numpy as np

from rmtrain.config import DataConfig
from rmtrain.data.pairs import DataStats, encode_pairs, pair_meta, run_template
from rmtrain.data.sources import ROW_COL, Read, read_batches, read_columns
from rmtrain.data.store import ShardWriter, Store, merge, write_manifest
from rmtrain.data.table import (
    LABEL_DTYPES,
    LABELS,
    PairTable,
    TextColumn,
    distinct_sequences,
    pair_hash,
)
from rmtrain.errors import ConfigError, DataError
from rmtrain.text import adds_bos

PAIR_FORMAT = 2  # bump when what a stored pair holds, or how its ids are made, changes
ENV = "RMTRAIN_DATA_CACHE"

# The store's arrays. Per token: tokens. Per sequence (2 per pair, chosen then rejected; a row
# with K responses stores each distinct one once): offsets into tokens. Per pair: the labels, the
# content hash, whether both sides are identical (dropped when read for training, kept as ties by
# `rmtrain eval`), whether a side was cut, the pair's row, its two sequences and its meta (JSON,
# offsets into the meta bytes). Per row: its line, its piece and why it gave no pair (0: it did;
# 1: inconsistent labels skipped; 2: below min_severity_gap).
DTYPES: dict[str, str] = {
    "tokens": "<i4",
    "offsets": "<i8",
    **{k: np.dtype(LABEL_DTYPES[k]).str for k in LABELS},
    "hashes": "<u8",
    "identical": "|b1",
    "truncated": "|b1",
    "pair_row": "<i8",
    "pair_seqs": "<i8",
    "meta": "|u1",
    "meta_offsets": "<i8",
    "row_line": "<i8",
    "row_piece": "<i4",
    "row_skip": "|u1",
}
_OFFSETS = {"offsets": "seq_lengths", "meta_offsets": "meta_lengths"}
_REBASE = {"pair_row": "row_line", "pair_seqs": "seq_lengths"}
# What the content digest covers: the pairs' tokens (through their hashes), labels and rows; not
# their provenance (paths, lines) nor the evaluation labels in their meta.
_DIGEST = ("hashes", *LABELS, "identical", "truncated", "pair_row", "row_skip")
SKIP_INCONSISTENT, SKIP_SEVERITY = 1, 2

# Parts: big enough that a part's overhead does not matter, small enough to balance the work
# between processes and to show progress (a part of 16 MiB is a few thousand long pairs).
_PART_BYTES = (1 << 20, 16 << 20)
_PART_ROWS = (1_000, 5_000)
# data.num_proc=null starts processes only for more input than this per rank: starting one
# (importing rmtrain, unpickling the tokenizer) costs a few seconds, tokenizing 64 MiB of long
# pairs about a minute.
_AUTO_PROCS_BYTES = 64 << 20


def _alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class Ranks:
    """The ranks of a launch as the cache needs them; the caller hands over its collective
    (`rmtrain.engine.all_gather_object`), so nothing here starts a process group."""

    rank: int = 0
    size: int = 1
    all_gather: Callable[[Any], list[Any]] = _alone

    def barrier(self) -> None:
        self.all_gather(None)


def cache_root(d: DataConfig) -> Path:
    """`data.cache_dir`, else $RMTRAIN_DATA_CACHE, else <user cache dir>/rmtrain/pairs."""
    if d.cache_dir:
        return Path(d.cache_dir).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rmtrain" / "pairs"


# -- the key ------------------------------------------------------------------------------------
def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what makes a tokenizer's ids: its serialized model, normalizer, pre- and
    post-processor and added tokens, and its special tokens."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
               tokenizer.pad_token, adds_bos(tokenizer)]  # fmt: skip
    h.update(json.dumps(special, default=str).encode())
    return h.hexdigest()


def fingerprint(
    reads: list[Read], tokenizer: Any, template: str, max_length: int, objective: str
) -> dict[str, Any]:
    """Everything that changes the ids or labels of the pairs of `reads` (the module docstring)."""

    def settings(read: Read) -> dict[str, Any]:
        c = read.cfg
        return {
            "split": read.split,
            "format": read.format,
            "limit": read.limit,
            "preference": c.preference,
            "min_severity_gap": c.min_severity_gap,
            "inconsistent_labels": c.inconsistent_labels,
            "margin_column": c.margin_column,
            "margin_from_scores": c.margin_from_scores,
            "pieces": [{"label": p.label, **p.identity} for p in read.pieces],
        }

    return {
        "pair_format": PAIR_FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": hashlib.blake2b(template.encode(), digest_size=16).hexdigest(),
        "max_length": max_length,
        "objective": objective,
        "reads": [settings(r) for r in reads],
    }


def key_of(inputs: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=16).hexdigest()


def changes(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints' inputs, as `key: was -> now` lines."""

    def flat(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            return {
                k: v for key, val in node.items() for k, v in flat(val, f"{prefix}{key}.").items()
            }
        if isinstance(node, list):
            return {
                k: v for i, val in enumerate(node) for k, v in flat(val, f"{prefix}{i}.").items()
            }
        return {prefix.rstrip("."): node}

    a, b = flat(was, ""), flat(now, "")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]  # fmt: skip


def check_same_data(was: dict[str, Any] | None, now: dict[str, Any], source: str) -> None:
    """Refuse to continue, from `source`, a run trained on other pairs than `now`'s: the content
    digests differ. Inputs that changed without changing the pairs (a file copied elsewhere or
    touched, another cache directory) are fine. A checkpoint without a fingerprint (written
    before rmtrain had a data cache) is not checked."""
    if not was or was.get("digest") == now.get("digest"):
        return
    found = changes(was.get("inputs", {}), now.get("inputs", {}))
    what = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
    raise ConfigError(
        f"cannot resume from {source}: the data it was trained on has changed "
        f"({what or 'the same inputs gave other pairs'}); resume with the same data, or start a "
        "new run"
    )


# -- parts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A unit of work: a byte range of a JSONL file (starting at line `first_line`), a row range
    of a table, or (`piece` None) a whole capped split, read in order up to its cap."""

    index: int
    read: int
    piece: int | None
    start: int = 0
    end: int | None = None
    first_line: int = 1
    weight: int = 0  # progress units: bytes or rows
    rows: bool = False  # the units are rows (a table), not bytes

    @property
    def work(self) -> int:
        """About how many bytes of rows it reads (a table row counts as 2 KiB)."""
        return self.weight * 2048 if self.rows else self.weight


def _count(size: int, bounds: tuple[int, int], workers: int) -> int:
    lo, hi = bounds
    return max(1, min(math.ceil(size / lo), max(math.ceil(size / hi), 4 * workers)))


def _line_ranges(path: Path, size: int, n: int) -> list[tuple[int, int, int]]:
    """(start, end, first line) of about `n` byte ranges of a file, cut at line starts. Counting
    the lines before each cut reads the file once (at memory speed, ~1 s per GB)."""
    cuts = [0]
    with open(path, "rb") as f:
        for j in range(1, n):
            f.seek(max(size * j // n - 1, 0))
            f.readline()
            if cuts[-1] < f.tell() < size:
                cuts.append(f.tell())
        cuts.append(size)
        out, line = [], 1
        for a, b in pairwise(cuts):
            out.append((a, b, line))
            if b < size:
                f.seek(a)
                left = b - a
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    line += chunk.count(b"\n")
                    left -= len(chunk)
    return out


def plan_parts(reads: list[Read], workers: int) -> list[Part]:
    """The parts of `reads`, in input order, about 4 per worker (within the size bounds)."""
    parts: list[Part] = []
    for r, read in enumerate(reads):
        if read.limit is not None:
            rows = all(p.ds is not None for p in read.pieces)
            weight = sum(p.size for p in read.pieces)  # bytes or rows; the cap may end it early
            parts.append(Part(len(parts), r, None, weight=weight, rows=rows))
            continue
        for k, piece in enumerate(read.pieces):
            if piece.ds is not None:
                n = _count(piece.size, _PART_ROWS, workers)
                bounds = [piece.size * j // n for j in range(n + 1)]
                for a, b in pairwise(bounds):
                    if b > a:
                        parts.append(Part(len(parts), r, k, a, b, 1, b - a, rows=True))
            elif piece.seekable:
                assert piece.file is not None
                n = _count(piece.size, _PART_BYTES, workers)
                for a, b, line in _line_ranges(piece.file, piece.size, n):
                    parts.append(Part(len(parts), r, k, a, b, line, b - a))
            else:
                parts.append(Part(len(parts), r, k, weight=piece.size, rows=piece.ds is not None))
    return parts


# -- tokenizing a part ----------------------------------------------------------------------------
@dataclass
class _Job:
    """What every process tokenizing parts needs (sent to each once)."""

    reads: list[Read]
    tokenizer: Any
    template: str
    max_length: int
    objective: str
    out: Path
    piece_base: list[int] = field(default_factory=list)  # global index of each read's 1st piece


@dataclass(frozen=True)
class PartResult:
    index: int
    read: int
    rows: int = 0
    pairs: int = 0
    tokens: int = 0
    error: str | None = None
    first: bool = False  # the first part of a rank: `processes` says how many it ran
    processes: int = 0


_job: _Job | None = None
_progress: Any = None  # add(units, pairs)


class _Shared:
    """Progress counters that processes add to and the main process shows."""

    def __init__(self, ctx: Any) -> None:
        self.units, self.pairs = ctx.Value("q", 0), ctx.Value("q", 0)

    def add(self, units: int, pairs: int) -> None:
        with self.units.get_lock():
            self.units.value += units
        with self.pairs.get_lock():
            self.pairs.value += pairs


def _init_worker(job: _Job, progress: Any) -> None:
    global _job, _progress
    _job, _progress = job, progress
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process


def _batches(read: Read, part: Part) -> Iterator[tuple[int, dict[str, list[Any]], int]]:
    if part.piece is None:
        yield from read_columns(read)
        return
    for cols, units in read_batches(read, part.piece, part.start, part.end, part.first_line):
        yield part.piece, cols, units


def _run_part(part: Part) -> PartResult:
    job = _job
    assert job is not None
    read = job.reads[part.read]
    writer = ShardWriter(job.out / f"part-{part.index:06d}")
    rows = pairs = tokens = 0
    try:
        for piece, cols, units in _batches(read, part):
            arrays = encode_batch(cols, read, job, job.piece_base[part.read] + piece, rows)
            for name, values in arrays.items():
                writer.append(name, values)
            rows += len(cols[ROW_COL])
            pairs += len(arrays["hashes"])
            tokens += len(arrays["tokens"])
            if _progress is not None:
                _progress.add(units, len(arrays["hashes"]))
    except DataError as err:
        writer.close()
        return PartResult(part.index, part.read, rows, pairs, tokens, str(err))
    except OSError as err:  # writing the shard: a full disk, say
        return PartResult(part.index, part.read, rows, pairs, tokens,
                          f"{job.out.parent}: cannot write the data cache ({err})")  # fmt: skip
    writer.close()
    return PartResult(part.index, part.read, rows, pairs, tokens)


def encode_batch(
    cols: dict[str, list[Any]], read: Read, job: _Job, piece: int, row_base: int
) -> dict[str, np.ndarray]:
    """The store's arrays of one batch of checked rows: the format adapter's pairs, rendered,
    tokenized and cut (:func:`rmtrain.data.pairs.encode_pairs`, the rule every path uses)."""
    lines = cols[ROW_COL]
    raw, skipped = read.schema.to_pairs(cols, read.cfg, job.objective)
    chosen, rejected, cut_c, cut_r = encode_pairs(raw, job.tokenizer, job.template, job.max_length)
    n = len(raw)
    index_of = {line: i for i, line in enumerate(lines)}
    pair_row = np.fromiter((index_of[r] for r in raw.row), np.int64, n)
    row_skip = np.zeros(len(lines), np.uint8)
    lost = np.ones(len(lines), bool)
    lost[pair_row] = False
    if lost.any():
        row_skip[lost] = _skip_codes(cols, read, job.objective, np.flatnonzero(lost), skipped)
    seqs, pair_seqs = distinct_sequences(chosen, rejected, pair_row)
    seq_lengths = np.fromiter(map(len, seqs), np.int32, len(seqs))
    tokens = np.fromiter(chain.from_iterable(seqs), np.int32, int(seq_lengths.sum()))
    o = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum(seq_lengths, out=o[1:])
    hashes = np.fromiter(
        (pair_hash(tokens[o[c] : o[c + 1]], tokens[o[r] : o[r + 1]])
         for c, r in pair_seqs.tolist()), np.uint64, n,
    )  # fmt: skip
    metas = [pair_meta(raw, i).encode() for i in range(n)]
    arrays = {
        "tokens": tokens,
        "seq_lengths": seq_lengths,
        "pair_seqs": pair_seqs.reshape(-1),
        **{k: np.asarray(getattr(raw, k), dtype=LABEL_DTYPES[k]).reshape(n) for k in LABELS},
        "hashes": hashes,
        "identical": np.fromiter((c == r for c, r in zip(chosen, rejected, strict=True)), bool, n),
        "truncated": np.asarray(cut_c, bool) | np.asarray(cut_r, bool),
        "pair_row": pair_row + row_base,
        "meta": np.frombuffer(b"".join(metas), np.uint8),
        "meta_lengths": np.fromiter(map(len, metas), np.int32, n),
        "row_line": np.asarray(lines, np.int64),
        "row_piece": np.full(len(lines), piece, np.int32),
        "row_skip": row_skip,
    }
    return arrays


def _skip_codes(
    cols: dict[str, list[Any]], read: Read, objective: str, rows: np.ndarray, skipped: Any
) -> np.ndarray:
    """Why each row of `rows` gave no pair (the adapter counts its skips; a batch with both
    kinds asks it again row by row)."""
    if skipped.inconsistent + skipped.severity != len(rows):
        raise AssertionError(f"{len(rows)} rows without pairs, {skipped} skipped")
    if not skipped.severity:
        return np.full(len(rows), SKIP_INCONSISTENT, np.uint8)
    if not skipped.inconsistent:
        return np.full(len(rows), SKIP_SEVERITY, np.uint8)
    codes = []
    for i in rows:
        _, one = read.schema.to_pairs(
            {k: v[i : i + 1] for k, v in cols.items()}, read.cfg, objective
        )
        codes.append(SKIP_INCONSISTENT if one.inconsistent else SKIP_SEVERITY)
    return np.asarray(codes, np.uint8)


# -- running the parts --------------------------------------------------------------------------
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_parts(parts: list[Part], job: _Job, num_proc: int, bar: Any) -> list[PartResult]:
    """Tokenize `parts` here (one process) or in `num_proc` processes."""
    if num_proc > 1 and len(parts) > 1:
        return _run_in_processes(parts, job, num_proc, bar)
    _init_worker_here(job, None if bar is None else _BarProgress(bar))
    results = []
    try:
        for part in parts:  # in input order: the first error here is this rank's first
            results.append(_run_part(part))
            if results[-1].error:
                break
    finally:
        _init_worker_here(None, None)
    return results


def _run_in_processes(parts: list[Part], job: _Job, num_proc: int, bar: Any) -> list[PartResult]:
    ctx = mp.get_context("spawn")  # no fork of a process that runs threads (gloo, torch)
    tasks, done, shared = ctx.Queue(), ctx.Queue(), _Shared(ctx)
    for part in parts:  # taken in order by whichever process is free
        tasks.put(part)
    workers = min(num_proc, len(parts))
    for _ in range(workers):
        tasks.put(None)
    with _plain_main():
        procs = [ctx.Process(target=_worker, args=(job, tasks, done, shared), daemon=True)
                 for _ in range(workers)]  # fmt: skip
        for proc in procs:
            proc.start()
    results: list[PartResult] = []
    try:
        while len(results) < len(parts):
            try:
                results.append(done.get(timeout=0.5))
            except queue.Empty:
                # a process killed (for memory, say) never answers: fail instead of waiting
                dead = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a tokenizing process died (exit code {dead[0]}: out of memory? lower "
                        "data.num_proc)"
                    ) from None
            if bar is not None:
                bar.update(shared.units.value - bar.n)
                bar.set_postfix_str(f"{shared.pairs.value:,} pairs", refresh=False)
    finally:
        for proc in procs:
            if proc.is_alive() and len(results) < len(parts):
                proc.terminate()
            proc.join()
    return sorted(results, key=lambda r: r.index)


def _worker(job: _Job, tasks: Any, done: Any, progress: _Shared) -> None:
    """A tokenizing process: parts from `tasks` until None, each result to `done`."""
    _init_worker(job, progress)
    while (part := tasks.get()) is not None:
        done.put(_run_part(part))


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """Start processes without the parent's main module: a spawned process imports it first
    (`rmtrain train`'s brings torch and DeepSpeed: seconds per process), and a tokenizing
    process needs nothing of it (what it runs is imported by module name)."""
    main = sys.modules.get("__main__")
    saved: dict[str, Any] = {}
    for key in ("__spec__", "__file__"):
        if main is not None and key in main.__dict__:
            saved[key] = main.__dict__[key]
    try:
        if main is not None:
            main.__spec__ = None
            main.__dict__.pop("__file__", None)
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _init_worker_here(job: _Job | None, progress: Any) -> None:
    global _job, _progress
    _job, _progress = job, progress


class _BarProgress:
    def __init__(self, bar: Any) -> None:
        self.bar, self.pairs = bar, 0

    def add(self, units: int, pairs: int) -> None:
        self.pairs += pairs
        self.bar.update(units)
        self.bar.set_postfix_str(f"{self.pairs:,} pairs", refresh=False)


def _bar(total: int, peers: int) -> Any:
    from tqdm import tqdm

    share = f" (rank 0's share of {peers} ranks)" if peers > 1 else ""
    layout = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}"
    return tqdm(total=total, desc=f"tokenizing{share}", file=sys.stderr, mininterval=1.0,
                bar_format=layout)  # fmt: skip


# -- the entry ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _build_directory(root: Path, build: Path) -> Iterator[None]:
    """`build` (in `root`, after removing the build directories of dead builds), with an
    exclusive lock on its `.lock` held while the build uses it (released by the kernel when the
    process dies, which marks the directory stale), and removed afterwards, whatever happened
    (a finished entry has been renamed out of it). It gets its name only once locked, so no other
    build ever takes it for stale."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(root)
        new = root / f".new-{uuid.uuid4().hex}"
        new.mkdir()
        lock = open(new / ".lock", "w")  # noqa: SIM115 (held until the build is over)
    except OSError as err:
        raise ConfigError(f"data.cache_dir={root}: cannot write there ({err})") from err
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        new.rename(build)
        yield
    finally:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)
        lock.close()


def _remove_stale_builds(root: Path) -> None:
    """Build directories whose builder died (their lock is free)."""
    for build in [*root.glob(".build-*"), *root.glob(".new-*")]:
        try:
            with open(build / ".lock") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(build, ignore_errors=True)
        except FileNotFoundError:  # a directory killed before its lock existed
            with contextlib.suppress(OSError):
                if time.time() - build.stat().st_mtime > 3600:
                    shutil.rmtree(build, ignore_errors=True)
        except OSError:
            continue  # locked: a live build


def _place(built: Path, entry: Path) -> None:
    """Rename a complete build into place; where another launch placed the same entry first,
    theirs stays (the same content) and ours is dropped. A damaged entry is replaced."""
    try:
        built.rename(entry)
        return
    except OSError:
        if Store.open(entry) is not None:
            return
    aside = entry.with_name(f".build-{entry.name}-damaged-{uuid.uuid4().hex}")
    with contextlib.suppress(OSError):
        entry.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)
    built.rename(entry)


@dataclass
class Prepared:
    """A run's tokenized pairs, mapped: the store, what it was built from, and its splits."""

    store: Store
    built: bool  # tokenized by this launch (False: a cache hit)
    seconds: float = 0.0

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records: the entry's key, the content digest and the inputs."""
        m = self.store.manifest
        return {"key": m["key"], "digest": m["digest"], "inputs": m["inputs"]}

    def table(self) -> PairTable:
        """Every stored pair, identical ones included (select from it: no copy)."""
        a = self.store.arrays
        n = len(a["hashes"])
        pair_seqs = groups = None
        rows = a["pair_row"]  # ascending: a row's pairs are consecutive
        if n > 1 and bool((rows[1:] == rows[:-1]).any()):  # rows with K responses
            pair_seqs = a["pair_seqs"].reshape(n, 2)  # each response stored once
            groups = rows
        return PairTable(
            a["tokens"], a["offsets"], {k: a[k] for k in LABELS}, a["hashes"],
            TextColumn(a["meta"], a["meta_offsets"]), np.arange(n, dtype=np.int64),
            pair_seqs, groups,
        )  # fmt: skip

    def rows(self, read: int) -> int:
        r0, r1 = self.store.manifest["reads"][read]["rows"]
        return int(r1 - r0)

    def split(
        self, read: int, rows: np.ndarray | None = None, drop_identical: bool = True
    ) -> tuple[np.ndarray, DataStats]:
        """(stored pair indices, stats) of read `read`'s rows where the mask `rows` (over the
        read's rows; None: all) is true; identical pairs dropped unless `drop_identical` is
        False. The stats are those of :func:`rmtrain.data.pairs.build_pairs` for those rows."""
        a, span = self.store.arrays, self.store.manifest["reads"][read]
        (r0, r1), (p0, p1) = span["rows"], span["pairs"]
        in_split = np.ones(p1 - p0, bool) if rows is None else rows[a["pair_row"][p0:p1] - r0]
        identical = in_split & a["identical"][p0:p1]
        keep = in_split & ~identical if drop_identical else in_split
        skip = a["row_skip"][r0:r1] if rows is None else a["row_skip"][r0:r1][rows]
        stats = DataStats(
            rows=len(skip),
            pairs=int(keep.sum()),
            truncated=int((keep & a["truncated"][p0:p1]).sum()),
            identical_dropped=int(identical.sum()) if drop_identical else 0,
            inconsistent_skipped=int((skip == SKIP_INCONSISTENT).sum()),
            severity_filtered=int((skip == SKIP_SEVERITY).sum()),
        )
        return p0 + np.flatnonzero(keep), stats

    def row_lines(self, read: int, rows: np.ndarray) -> dict[str, list[int]]:
        """{piece label: lines} of the read's rows `rows` (indices, ascending)."""
        a, (r0, _) = self.store.arrays, self.store.manifest["reads"][read]["rows"]
        labels = self.store.manifest["pieces"]
        out: dict[str, list[int]] = {}
        for piece, line in zip(a["row_piece"][r0 + rows], a["row_line"][r0 + rows], strict=True):
            out.setdefault(labels[int(piece)], []).append(int(line))
        return out


def prepare(
    reads: list[Read],
    tokenizer: Any,
    d: DataConfig,
    objective: str,
    ranks: Ranks | None = None,
    progress: bool = False,
) -> Prepared:
    """The store of `reads`: the cache entry where one exists (`data.cache`), else built by
    every rank of the node and `data.num_proc` processes each (see the module docstring).
    Raises the DataError of the first bad row, on every rank, leaving no entry."""
    started = time.monotonic()
    ranks = ranks or Ranks()
    template = run_template(tokenizer, d)
    inputs = fingerprint(reads, tokenizer, template, d.max_length, objective)
    key = key_of(inputs)
    root = cache_root(d)
    entry = root / key
    if d.cache:
        found = Store.open(entry) if entry.is_dir() else None
        if all(ranks.all_gather(found is not None)):
            assert found is not None
            return Prepared(found, built=False, seconds=time.monotonic() - started)

    hosts = ranks.all_gather(socket.gethostname())
    peers = [r for r, host in enumerate(hosts) if host == hosts[ranks.rank]]
    leader = ranks.rank == peers[0]
    build_id = ranks.all_gather(uuid.uuid4().hex[:12])[peers[0]]
    build = root / f".build-{key}-{build_id}"
    with contextlib.ExitStack() as stack:
        problem = None
        if leader:
            try:
                stack.enter_context(_build_directory(root, build))
            except ConfigError as err:
                problem = str(err)
        _agree(ranks, problem)
        job = _Job(reads, tokenizer, template, d.max_length, objective, build)
        results = _tokenize(job, ranks, peers, d.num_proc, progress)
        failed = next((r for r in results if r.error), None)
        if failed is not None:
            raise DataError(failed.error)
        if leader:
            built = {"seconds": round(time.monotonic() - started, 3),
                     "processes": sum(r.processes for r in results if r.first)}  # fmt: skip
            try:
                _write_entry(job, results, build / "entry", key=key, inputs=inputs, built=built)
                if d.cache:
                    _place(build / "entry", entry)
            except OSError as err:  # a full disk, say
                problem = f"{root}: cannot write the data cache ({err})"
        _agree(ranks, problem)
        store = Store.open(entry if d.cache else build / "entry")
        if store is None:
            raise DataError(f"{entry}: the data cache entry just built cannot be read back")
        ranks.barrier()  # every rank maps it before the build directory goes
    return Prepared(store, built=True, seconds=time.monotonic() - started)


def _agree(ranks: Ranks, problem: str | None) -> None:
    """A barrier after which every rank raises the first rank's problem, or none does (a rank
    alone in an error would leave the others waiting in the next collective)."""
    problems = [p for p in ranks.all_gather(problem) if p]
    if problems:
        raise ConfigError(problems[0])


def _tokenize(
    job: _Job, ranks: Ranks, peers: list[int], num_proc: int | None, progress: bool
) -> list[PartResult]:
    """Plan the parts, tokenize this rank's share (the node's ranks take turns), and return the
    node's results in input order."""
    me = peers.index(ranks.rank)
    cores = max(1, cpu_count() // len(peers))
    parts = plan_parts(job.reads, len(peers) * (num_proc or cores))
    mine = [p for p in parts if p.index % len(peers) == me]
    procs = num_proc or (cores if sum(p.work for p in mine) >= _AUTO_PROCS_BYTES else 1)
    job.piece_base = [int(b) for b in np.cumsum([0] + [len(r.pieces) for r in job.reads[:-1]])]
    bar = _bar(sum(p.weight for p in mine), len(peers)) if progress and me == 0 else None
    try:
        results = _run_parts(mine, job, procs, bar)
    finally:
        if bar is not None:
            bar.close()
    if results:  # how many processes this rank ran, on its first result
        results[0] = dataclasses.replace(results[0], first=True, processes=procs)
    gathered = ranks.all_gather(results)
    return sorted((r for rank in peers for r in gathered[rank]), key=lambda r: r.index)


def _write_entry(job: _Job, results: list[PartResult], out: Path, **record: Any) -> None:
    """Merge the parts' shards into the complete entry `out`, manifest last: the arrays, the
    rows and pairs of each read, the pieces' labels and `record`."""
    spans, row, pair = [], 0, 0
    for r in range(len(job.reads)):
        rows = sum(x.rows for x in results if x.read == r)
        pairs = sum(x.pairs for x in results if x.read == r)
        spans.append({"rows": [row, row + rows], "pairs": [pair, pair + pairs]})
        row, pair = row + rows, pair + pairs
    shards = [job.out / f"part-{x.index:06d}" for x in results]
    arrays, digest = merge(shards, out, DTYPES, _OFFSETS, _REBASE, _DIGEST)
    pieces = [p.label for read in job.reads for p in read.pieces]
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_manifest(out, arrays, digest=digest, reads=spans, pieces=pieces, created=created,
                   **record)  # fmt: skip
