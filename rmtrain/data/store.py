"""Named flat arrays on disk, memory-mapped back: the storage of the tokenized-pair cache.

A store is a directory of raw little-endian arrays, ``<name>.bin``, and ``manifest.json``: the
store format version, each array's dtype and length, and whatever its builder records. It knows
nothing about pairs: the pair cache (:mod:`rmtrain.data.cache`) decides which arrays there are,
so a new per-pair or per-token array is one more name, not a new file format.

It is built in shards (one per part of the input, written by whichever process or rank
tokenized that part, :class:`ShardWriter`) and :func:`merge`-d into one directory: most arrays
are concatenated (a kernel-side copy of the bytes), a shard's lengths become the store's
offsets, and a shard-local index into another array is shifted by that array's length in the
shards before it. The manifest is written last; a directory without one is never read.

Reading maps every array (`np.memmap`, copy-on-write, never written): what a process holds is
only the pages it touches, shared with every other process that maps the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from rmtrain.files import write_atomic

VERSION = 1
MANIFEST = "manifest.json"
SHARD = "shard.json"
_COPY_CHUNK = 1 << 26


class ShardWriter:
    """Arrays appended batch by batch to ``<directory>/<name>.bin``; :meth:`close` records
    their dtypes and lengths in ``shard.json``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self.arrays: dict[str, dict[str, Any]] = {}

    def append(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        spec = self.arrays.setdefault(name, {"dtype": values.dtype.str, "length": 0})
        if spec["dtype"] != values.dtype.str:
            raise TypeError(f"{name}: {values.dtype.str} appended to {spec['dtype']}")
        if name not in self._files:
            self._files[name] = open(self.dir / f"{name}.bin", "wb")  # noqa: SIM115
        self._files[name].write(values.tobytes())
        spec["length"] += len(values)

    def close(self) -> dict[str, dict[str, Any]]:
        for f in self._files.values():
            f.close()
        (self.dir / SHARD).write_text(json.dumps(self.arrays))
        return self.arrays


def _read_shard(directory: Path) -> dict[str, dict[str, Any]]:
    return dict(json.loads((directory / SHARD).read_text()))


def merge(
    shards: Sequence[Path],
    out: Path,
    dtypes: Mapping[str, str],
    offsets: Mapping[str, str],
    rebase: Mapping[str, str],
    digest: Sequence[str],
) -> tuple[dict[str, dict[str, Any]], str]:
    """Write the arrays of `shards` (in order) into `out` and return (their specs, a digest).

    `dtypes`: every array the store holds (an array no shard wrote is empty); `offsets`:
    {store array: shard array of lengths} (the store holds int64 offsets, one more than the
    lengths); `rebase`: {array: other array}: the array holds shard-local indices into the
    other, shifted by its length in the shards before; `digest`: the arrays whose bytes the
    returned blake2b digest covers. Shard files are removed as they are copied, so the build
    needs little more disk than the store itself.
    """
    out.mkdir(parents=True, exist_ok=True)
    specs = [_read_shard(s) for s in shards]
    lengths_of = set(offsets.values())
    hashes = {name: hashlib.blake2b(digest_size=16) for name in digest}
    arrays: dict[str, dict[str, Any]] = {}
    for name, dtype in dtypes.items():
        dt = np.dtype(dtype)
        total = 0
        with open(out / f"{name}.bin", "wb", buffering=0) as dst:
            if name in offsets:
                source, base = offsets[name], 0
                dst.write(np.zeros(1, np.int64).tobytes())
                for shard, spec in zip(shards, specs, strict=True):
                    if source in spec:
                        lengths = _load(shard, source, spec[source])
                        ends = base + np.cumsum(lengths, dtype=np.int64)
                        dst.write(ends.tobytes())
                        base = int(ends[-1]) if len(ends) else base
                        total += len(ends)
                arrays[name] = {"dtype": dt.str, "length": total + 1}
                continue
            shift = 0
            for shard, spec in zip(shards, specs, strict=True):
                if name not in spec:
                    shift += spec.get(rebase.get(name, ""), {}).get("length", 0)
                    continue
                if spec[name]["dtype"] != dt.str:
                    raise TypeError(f"{shard}: {name} is {spec[name]['dtype']}, not {dt.str}")
                if name in rebase or name in digest:
                    values = _load(shard, name, spec[name])
                    if name in rebase:
                        values = values + np.asarray(shift, dtype=dt)
                        shift += spec.get(rebase[name], {}).get("length", 0)
                    data = values.astype(dt, copy=False).tobytes()
                    dst.write(data)
                    if name in digest:
                        hashes[name].update(data)
                else:
                    _append(dst, shard / f"{name}.bin")
                total += spec[name]["length"]
                (shard / f"{name}.bin").unlink()
        arrays[name] = {"dtype": dt.str, "length": total}
    for shard in shards:  # shard arrays the store does not hold (lengths turned offsets)
        for name in lengths_of:
            (shard / f"{name}.bin").unlink(missing_ok=True)
    # per array, then combined: the same whatever the shards' sizes
    total_hash = hashlib.blake2b(digest_size=16)
    for name in digest:
        total_hash.update(f"{name}:{hashes[name].hexdigest()};".encode())
    return arrays, total_hash.hexdigest()


def _load(shard: Path, name: str, spec: Mapping[str, Any]) -> np.ndarray:
    return np.fromfile(shard / f"{name}.bin", dtype=np.dtype(spec["dtype"]), count=spec["length"])


def _append(dst: Any, src: Path) -> None:
    """Append the bytes of `src` to the raw file `dst`, copied by the kernel where it can."""
    with open(src, "rb") as f:
        size, done = os.fstat(f.fileno()).st_size, 0
        try:
            while done < size:
                n = os.copy_file_range(
                    f.fileno(), dst.fileno(), min(size - done, _COPY_CHUNK), done
                )
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # another filesystem or kernel: a plain copy of the rest
        if done < size:
            f.seek(done)
            shutil.copyfileobj(f, dst, _COPY_CHUNK)


def write_manifest(directory: Path, arrays: Mapping[str, Any], **record: Any) -> None:
    """The manifest, written last: from now on the directory is a complete store."""
    body = {"version": VERSION, "arrays": dict(arrays), **record}
    write_atomic(directory / MANIFEST, json.dumps(body, indent=1))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """A complete store's manifest; None where there is none, or one of another version."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == VERSION else None


@dataclass(frozen=True)
class Store:
    """A complete store, its arrays memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @classmethod
    def open(cls, directory: Path) -> Store | None:
        """The store in `directory`, or None where there is no complete one."""
        manifest = read_manifest(directory)
        if manifest is None:
            return None
        arrays = {}
        for name, spec in manifest["arrays"].items():
            dtype, length = np.dtype(spec["dtype"]), int(spec["length"])
            file = Path(directory) / f"{name}.bin"
            try:
                if file.stat().st_size != length * dtype.itemsize:
                    return None  # damaged: treated as absent, rebuilt
            except OSError:
                return None
            # copy-on-write: shared, read-only pages as with mode "r", but arrays torch takes
            # without a non-writable warning (nothing here writes to them; a write would stay
            # in the process and never reach the file)
            arrays[name] = (
                np.memmap(file, dtype=dtype, mode="c", shape=(length,))
                if length
                else np.zeros(0, dtype)
            )
        return cls(Path(directory), manifest, arrays)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())
