"""Dynamic batching for `rmtrain serve`: the sequences of concurrent requests, merged into
batches under a token budget, scored by one worker thread per model replica.

**Batch invariance, by construction.** A sequence is always scored right-padded to its own
length bucket (:meth:`Batcher.bucket`: its length rounded up to a multiple of ``pad_multiple``,
or of an eighth of its power of two for long texts), and a batch only holds sequences of one
bucket. Every row of a batch then goes through exactly the same arithmetic as
it would alone: the same padded length (so attention reduces over the same positions) and the
same per-row kernels. On CPU this makes a score bit-for-bit independent of what it was batched
with (`tests/test_serve.py` checks it under concurrent clients, with several replicas too);
padding to the longest row instead moves fp32 scores in their last bits as batch-mates change
(here up to 7e-7 for a 4-layer SmolLM2-shaped model).
On GPU the padded length is fixed the same way, but cuBLAS may pick a different GEMM kernel
for a different number of rows, so the last bits are not guaranteed there (untested here).

**Scheduling.** Sequences wait in one queue per bucket. A free worker takes the bucket whose
oldest sequence has waited longest, and from it as many sequences, oldest first, as fit
``max_batch_tokens`` padded tokens (at least one). Sequences that arrive while a batch runs
are merged into the next one: no timer, no added latency when the server is idle.

**Back-pressure.** At most ``max_queue`` sequences wait; a request that would exceed it is
refused as a whole (:class:`QueueFull`, with a retry estimate from the recent throughput), so
latency stays bounded instead of growing with an unbounded backlog.

**Data parallel.** One worker thread per replica (``forwards``: e.g. one model per GPU), all
taking from the same queue; the forward releases the GIL, so replicas run concurrently.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

# A replica's forward: (sequences of one bucket, their padded length) -> raw scores, in order.
Forward = Callable[[list[list[int]], int], list[float]]


class QueueFull(RuntimeError):
    """The queue cannot take a request now; ``retry_after`` is a wait estimate in seconds."""

    def __init__(self, queued: int, wanted: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {queued} texts are queued, this request adds {wanted} "
            f"(limit {limit}); retry in {retry_after} s"
        )
        self.retry_after = retry_after


class _Request:
    """One request's sequences: its future resolves once, with all their scores in order (one
    wake-up of the event loop per request, not per sequence)."""

    def __init__(self, n: int) -> None:
        self.future: Future[list[float]] = Future()
        self.scores = [0.0] * n
        self.remaining = n
        self.failed = False


@dataclass
class _Item:
    ids: list[int]
    request: _Request
    index: int  # position in its request
    order: int  # admission order: FIFO across buckets


@dataclass
class BatchStats:
    """Counters for /health: what the workers did since start."""

    batches: int = 0
    sequences: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    largest_batch: int = 0
    refused_requests: int = 0
    failed_batches: int = 0
    per_worker: list[int] = field(default_factory=list)


class Batcher:
    """Queue of sequences to score; ``submit`` returns one future per request."""

    def __init__(
        self,
        forwards: Sequence[Forward],
        max_batch_tokens: int = 16384,
        max_queue: int = 1024,
        pad_multiple: int = 32,
        names: Sequence[str] | None = None,
    ) -> None:
        if not forwards:
            raise ValueError("a batcher needs at least one replica")
        if max_batch_tokens < 1 or max_queue < 1 or pad_multiple < 1:
            raise ValueError("max_batch_tokens, max_queue and pad_multiple must be >= 1")
        self.forwards = list(forwards)
        self.names = list(names or [f"replica{i}" for i in range(len(forwards))])
        self.max_batch_tokens, self.max_queue = max_batch_tokens, max_queue
        self.pad_multiple = pad_multiple
        self._buckets: dict[int, deque[_Item]] = {}
        self._queued = 0
        self._order = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._rate = 0.0  # sequences per second, smoothed
        self.stats = BatchStats(per_worker=[0] * len(forwards))

    def bucket(self, n: int) -> int:
        """The padded length of an n-id sequence, a function of n alone: n rounded up to a
        multiple of ``pad_multiple``, or of 1/8 of n's power of two when that is larger, so long
        texts waste at most 1/8 on padding while there are only 8 buckets per doubling."""
        n = max(n, 1)
        step = max(self.pad_multiple, (1 << (n.bit_length() - 1)) // 8)
        return -(-n // step) * step

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, seqs: Sequence[list[int]]) -> Future[list[float]]:
        """Queue every sequence of one request, or none of them (:class:`QueueFull`); the
        future gives their raw scores in order."""
        request = _Request(len(seqs))
        if not seqs:
            request.future.set_result([])
            return request.future
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self._queued + len(seqs) > self.max_queue:
                self.stats.refused_requests += 1
                rate = self._rate or 1.0
                retry = min(60, max(1, math.ceil((self._queued + len(seqs)) / rate)))
                raise QueueFull(self._queued, len(seqs), self.max_queue, retry)
            for index, ids in enumerate(seqs):
                self._order += 1
                item = _Item(list(ids), request, index, self._order)
                self._buckets.setdefault(self.bucket(len(ids)), deque()).append(item)
            self._queued += len(seqs)
            self._cond.notify_all()
        return request.future

    def start(self) -> None:
        for i, name in enumerate(self.names):
            thread = threading.Thread(target=self._work, args=(i,), name=f"rmtrain-{name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Score what is queued, then end the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _take(self) -> tuple[int, list[_Item]] | None:
        """(padded length, items) of the next batch; None once stopping and empty."""
        with self._cond:
            while not self._queued:
                if self._stopping:
                    return None
                self._cond.wait()
            length = min(
                (b for b, q in self._buckets.items() if q), key=lambda b: self._buckets[b][0].order
            )
            queue = self._buckets[length]
            rows = max(1, self.max_batch_tokens // length)
            items: list[_Item] = []
            while queue and len(items) < rows:
                item = queue.popleft()
                self._queued -= 1
                if not (item.request.future.cancelled() or item.request.failed):  # client left
                    items.append(item)
            if not queue:
                del self._buckets[length]
            return length, items

    def _work(self, worker: int) -> None:
        forward = self.forwards[worker]
        while (taken := self._take()) is not None:
            length, items = taken
            if not items:
                continue
            start = time.perf_counter()
            try:
                scores = forward([it.ids for it in items], length)
                if len(scores) != len(items):
                    raise RuntimeError(f"{len(scores)} scores for {len(items)} sequences")
            except Exception as exc:  # the error goes to every request waiting on this batch
                with self._cond:
                    self.stats.failed_batches += 1
                    failed = {id(it.request): it.request for it in items if not it.request.failed}
                    for request in failed.values():
                        request.failed = True
                for request in failed.values():
                    _resolve(request.future, exception=exc)
                continue
            done = []
            with self._cond:
                for it, score in zip(items, scores, strict=True):
                    it.request.scores[it.index] = score
                    it.request.remaining -= 1
                    if it.request.remaining == 0:
                        done.append(it.request)
            for request in done:
                _resolve(request.future, result=request.scores)
            self._account(worker, len(items), length, sum(len(it.ids) for it in items), start)

    def _account(self, worker: int, n: int, length: int, real: int, start: float) -> None:
        seconds = max(time.perf_counter() - start, 1e-6)
        with self._cond:
            s = self.stats
            s.batches += 1
            s.sequences += n
            s.padded_tokens += n * length
            s.real_tokens += real
            s.per_worker[worker] += n
            s.largest_batch = max(s.largest_batch, n)
            rate = n / seconds * len(self.forwards)
            self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate

    def describe(self) -> dict[str, Any]:
        """Queue and counters, JSON-ready."""
        with self._cond:
            s = self.stats
            return {
                "queued": self._queued,
                "max_queue": self.max_queue,
                "max_batch_tokens": self.max_batch_tokens,
                "pad_multiple": self.pad_multiple,
                "replicas": self.names,
                "batches": s.batches,
                "sequences": s.sequences,
                "mean_batch_size": s.sequences / s.batches if s.batches else None,
                "largest_batch": s.largest_batch,
                "real_token_fraction": s.real_tokens / s.padded_tokens if s.padded_tokens else None,
                "refused_requests": s.refused_requests,
                "failed_batches": s.failed_batches,
                "sequences_per_replica": list(s.per_worker),
            }


def _resolve(
    future: Future[list[float]],
    result: list[float] | None = None,
    exception: BaseException | None = None,
) -> None:
    """Set a request's outcome unless its client has cancelled it meanwhile."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result or [])
    except InvalidStateError:
        pass  # cancelled: nobody is waiting
