"""`rmtrain serve --model <export>`: an HTTP reward server for RL loops.

Endpoints (bodies in :mod:`rmtrain.serve.protocol`): ``GET /health``, ``POST /get_reward``
(OpenRLHF), ``POST /classify`` (vLLM / verl), ``POST /score`` (conversations). Every text
becomes exactly the ids training used: conversations are rendered with the trained template
(:func:`rmtrain.text.render`), texts that already carry a chat template are normalised at both
ends (:func:`rmtrain.text.query_ids`), and texts longer than the trained ``max_length`` are cut
keeping EOS, as `rmtrain score` and training cut them (counted in every response). Scores come
from the dynamic batcher (:mod:`rmtrain.serve.batcher`), so a score never depends on what else
was in flight.

Operational rules: binds 127.0.0.1 unless told otherwise; a bounded queue (503 with
``Retry-After`` when full); a body size limit (413); malformed bodies get 400/422 naming the
field; no request can take the server down (an unexpected error is a 500 for that request);
SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import logging
import math
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rmtrain.data.pairs import truncate_keep_eos
from rmtrain.errors import TextError
from rmtrain.model import NORMALIZE_STATS, score_stats
from rmtrain.scoring import DTYPES, Scorer
from rmtrain.serve.batcher import Batcher, QueueFull
from rmtrain.serve.protocol import (
    ClassifyRequest,
    GetRewardRequest,
    Message,
    ScoreRequest,
    ServeError,
    parse,
)
from rmtrain.text import check_messages, check_turns, query_frame, query_ids, render

log = logging.getLogger("rmtrain.serve")
T = TypeVar("T")
Conversation = list[dict[str, str]]


class Service:
    """The model replicas, the text rules and the batcher behind the endpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
        cpu_replicas = sum(torch.device(d).type == "cpu" for d in args.device)
        if cpu_replicas > 1:  # each replica's forward runs its own team of intra-op threads
            torch.set_num_threads(max(1, torch.get_num_threads() // cpu_replicas))
        self.scorers = [Scorer(args.model, device=d, dtype=dtype) for d in args.device]
        first = self.scorers[0]
        self.tokenizer, self.chat_template = first.tokenizer, first.chat_template
        self.frame = query_frame(self.tokenizer, self.chat_template)
        trained = first.meta.get("max_length")
        self.max_length: int | None = (
            trained if args.max_length is None else (args.max_length or None)
        )
        self.context = first.context
        self.eos_id = self.tokenizer.eos_token_id
        self.normalize: str | None = args.normalize
        self.stats = score_stats(first.model.config, args.normalize) if args.normalize else None
        id2label: dict[Any, str] = dict(first.model.config.id2label or {})
        self.label = str(id2label.get(0, "LABEL_0"))  # vLLM: id2label of the argmax
        self.name = args.served_model_name or str(args.model)
        self.max_body = int(args.max_body_mb * 2**20)
        self.drain_timeout = float(args.drain_timeout)
        self.batcher = Batcher(
            [s.score_ids for s in self.scorers],
            max_batch_tokens=args.max_batch_tokens,
            max_queue=args.max_queue,
            pad_multiple=args.pad_multiple,
            names=list(args.device),
        )
        # Tokenizing runs off the event loop, one text at a time (a fast tokenizer must not be
        # used by two threads at once).
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="rmtrain-tokenize")
        self.counts = {"requests": 0, "texts": 0, "truncated": 0}

    # -- texts -> ids -------------------------------------------------------------------------
    def _finish_ids(self, ids: list[int], where: str) -> tuple[list[int], bool]:
        cut = False
        if self.max_length is not None:
            ids, cut = truncate_keep_eos(ids, self.max_length, self.eos_id)
        if len(ids) > self.context:
            raise ServeError(
                422,
                f"field '{where}': {len(ids)} tokens, more than the model's context "
                f"({self.context}); start the server with a --max-length to cut such texts",
                param=where.split("[")[0],
            )
        return ids, cut

    def _query_ids(self, texts: Sequence[str], field: str) -> tuple[list[list[int]], list[bool]]:
        out = [self._finish_ids(query_ids(self.tokenizer, t, self.frame), f"{field}[{i}]")
               for i, t in enumerate(texts)]  # fmt: skip
        return [ids for ids, _ in out], [cut for _, cut in out]

    def _conversation_ids(
        self, conversations: Sequence[tuple[str, Conversation]]
    ) -> tuple[list[list[int]], list[bool]]:
        out = []
        for where, conversation in conversations:
            try:
                text = render(self.tokenizer, conversation, self.chat_template)
            except TextError as exc:
                raise ServeError(422, f"field '{where}': {exc}", param=where) from None
            out.append(self._finish_ids(list(self.tokenizer(text)["input_ids"]), where))
        return [ids for ids, _ in out], [cut for _, cut in out]

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn)

    def _check_count(self, n: int) -> None:
        """A request with more texts than the queue holds can never be admitted: 413 before
        any work is done on it."""
        if n > self.batcher.max_queue:
            raise ServeError(
                413,
                f"{n} texts in one request, more than the queue holds "
                f"({self.batcher.max_queue}, --max-queue); split the request",
            )

    async def queries(self, texts: Sequence[str], field: str) -> tuple[list[list[int]], list[bool]]:
        self._check_count(len(texts))
        for i, text in enumerate(texts):
            if not text.strip():
                raise ServeError(422, f"field '{field}[{i}]': empty text", param=field)
        return await self._off_loop(functools.partial(self._query_ids, texts, field))

    async def conversations(
        self, conversations: Sequence[tuple[str, Conversation]]
    ) -> tuple[list[list[int]], list[bool]]:
        self._check_count(len(conversations))
        for where, conversation in conversations:
            if problem := check_messages(conversation):
                raise ServeError(422, f"field '{where}': {problem}", param=where.split("[")[0])
        return await self._off_loop(functools.partial(self._conversation_ids, conversations))

    # -- scoring ------------------------------------------------------------------------------
    async def score(
        self, seqs: list[list[int]], cut: list[bool]
    ) -> tuple[list[float], list[float]]:
        """(served scores, raw scores): normalised with the export's stats when asked."""
        self._check_count(len(seqs))
        try:
            future = self.batcher.submit(seqs)
        except QueueFull as exc:
            raise ServeError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except RuntimeError as exc:  # shutting down
            raise ServeError(503, str(exc), headers={"Retry-After": "5"}) from None
        raw: list[float] = await asyncio.wrap_future(future)
        if not all(math.isfinite(x) for x in raw):
            raise ServeError(500, "the model produced a non-finite score (broken weights?)")
        self.counts["requests"] += 1
        self.counts["texts"] += len(seqs)
        self.counts["truncated"] += sum(cut)
        if self.stats is None:
            return raw, raw
        mean, std = self.stats
        return [(x - mean) / std for x in raw], raw

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.name,
            "objective": self.scorers[0].objective,
            "template": self.scorers[0].template,
            "max_length": self.max_length,
            "normalized": self.normalize,
            "served": dict(self.counts),
            "batching": self.batcher.describe(),
        }


def _conversation(messages: Sequence[Message]) -> Conversation:
    return [{"role": m.role, "content": m.content} for m in messages]


def score_conversations(req: ScoreRequest) -> list[tuple[str, Conversation]]:
    """(field, conversation) of every conversation a /score body asks for."""
    given = [k for k in ("messages", "conversations", "prompt") if getattr(req, k) is not None]
    if len(given) != 1:
        raise ServeError(
            422, "give exactly one of 'messages', 'conversations', or 'prompt' with 'response' "
            f"or 'responses' (got {', '.join(given) or 'none'})", param=given[-1] if given else None
        )  # fmt: skip
    if req.messages is not None:
        return [("messages", _conversation(req.messages))]
    if req.conversations is not None:
        return [(f"conversations[{i}]", _conversation(c)) for i, c in enumerate(req.conversations)]
    if (req.response is None) == (req.responses is None):
        raise ServeError(422, "field 'prompt': goes with exactly one of 'response' and "
                         "'responses'", param="prompt")  # fmt: skip
    if isinstance(req.prompt, str):
        turns = [{"role": "user", "content": req.prompt}]
    else:
        turns = _conversation(req.prompt or [])
        if problem := check_turns(turns):
            raise ServeError(422, f"field 'prompt': {problem}", param="prompt")
    if req.response is not None:
        return [("response", [*turns, {"role": "assistant", "content": req.response}])]
    return [(f"responses[{i}]", [*turns, {"role": "assistant", "content": r}])
            for i, r in enumerate(req.responses or [])]  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading more of it."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ServeError(400, f"bad Content-Length header {length!r:.40}")
        if int(length) > limit:
            raise ServeError(413, f"the body has {length} bytes, more than the limit {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the body is larger than the limit ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


def create_app(service: Service) -> FastAPI:
    """The FastAPI application; the batcher's workers run for the application's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        service.batcher.start()
        yield
        # uvicorn has already finished the requests in flight; the workers are daemon threads,
        # so a forward that never returns cannot keep the process alive past this wait
        service.batcher.stop(timeout=service.drain_timeout)
        service.cpu.shutdown()

    app = FastAPI(title="rmtrain serve", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def guarded(
        handler: Callable[[Request], Awaitable[dict[str, Any]]],
    ) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        """No request takes the server down: an unexpected error is this request's 500."""

        @functools.wraps(handler)
        async def run(request: Request) -> dict[str, Any]:
            try:
                return await handler(request)
            except ServeError:
                raise
            except Exception as exc:
                log.exception("%s failed", request.url.path)
                raise ServeError(500, f"internal error: {type(exc).__name__}: {exc}") from None

        return run

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.post("/get_reward")
    @guarded
    async def get_reward(request: Request) -> dict[str, Any]:
        req = parse(GetRewardRequest, await read_body(request, service.max_body))
        for field in ("prompts", "labels"):
            value = getattr(req, field)
            if value is not None and len(value) != len(req.query):
                raise ServeError(422, f"field '{field}': {len(value)} items for "
                                 f"{len(req.query)} queries", param=field)  # fmt: skip
        seqs, cut = await service.queries(req.query, "query")
        rewards, raw = await service.score(seqs, cut)
        extra: dict[str, list[float]] = {
            "n_tokens": [float(len(s)) for s in seqs],
            "truncated": [float(c) for c in cut],
        }
        if service.stats is not None:
            extra["raw_score"] = raw
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra}

    @app.post("/classify")
    @guarded
    async def classify(request: Request) -> dict[str, Any]:
        req = parse(ClassifyRequest, await read_body(request, service.max_body))
        if (req.input is None) == (req.messages is None):
            raise ServeError(422, "give exactly one of 'input' and 'messages'", param="input")
        if req.messages is not None:
            seqs, cut = await service.conversations([("messages", _conversation(req.messages))])
        else:
            texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
            seqs, cut = await service.queries(texts, "input")
        values, _ = await service.score(seqs, cut) if seqs else ([], [])
        activation = req.use_activation if req.use_activation is not None else req.activation
        if activation:
            values = [_sigmoid(v) for v in values]
        n_tokens = sum(len(s) for s in seqs)
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": service.name,
            "data": [
                {"index": i, "label": service.label, "probs": [v], "num_classes": 1}
                for i, v in enumerate(values)
            ],
            "usage": {
                "prompt_tokens": n_tokens,
                "total_tokens": n_tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }

    @app.post("/score")
    @guarded
    async def score(request: Request) -> dict[str, Any]:
        req = parse(ScoreRequest, await read_body(request, service.max_body))
        seqs, cut = await service.conversations(score_conversations(req))
        values, raw = await service.score(seqs, cut) if seqs else ([], [])
        out: dict[str, Any] = {
            "model": service.name,
            "scores": values,
            "n_tokens": [len(s) for s in seqs],
            "truncated": cut,
            "normalized": service.normalize,
        }
        if service.stats is not None:
            out["raw_scores"] = raw
        return out

    return app


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rmtrain serve",
        description="Serve an exported reward model over HTTP: /get_reward (OpenRLHF), "
        "/classify (vLLM, verl), /score (chat messages), /health.",
    )
    p.add_argument("--model", required=True, help="export directory (config.json, weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--device",
        nargs="+",
        default=["cuda" if torch.cuda.is_available() else "cpu"],
        help="one model replica per device, data parallel (e.g. cuda:0 cuda:1)",
    )
    p.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: the export's dtype"
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="padded tokens per forward pass (a longer text runs alone)",
    )
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=32,
        help="each text is padded to a multiple of this (or of 1/8 of its length's power of "
        "two, if larger): its bucket; only texts of one bucket share a forward, which makes "
        "scores independent of batching. Smaller wastes less compute on padding (CPU), larger "
        "batches more texts together (GPU)",
    )
    p.add_argument(
        "--max-queue", type=int, default=1024, help="texts waiting; beyond it requests get 503"
    )
    p.add_argument("--max-body-mb", type=float, default=32.0, help="larger bodies get 413")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="cut longer texts from the right keeping EOS, as in training (default: the "
        "export's trained max_length; 0: no cut, texts longer than the context get 422)",
    )
    p.add_argument(
        "--normalize",
        nargs="?",
        const="eval",
        default=None,
        choices=NORMALIZE_STATS,
        help="serve (score - mean) / std with the export's recorded statistics: eval (default "
        "when given) or running; raw scores unless given",
    )
    p.add_argument("--served-model-name", default=None, help="the `model` in /classify replies")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM, seconds to wait for requests in flight before closing them",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    if min(args.max_batch_tokens, args.pad_multiple, args.max_queue) < 1:
        p.error("--max-batch-tokens, --pad-multiple and --max-queue must be >= 1")
    if args.max_length is not None and (args.max_length < 0 or args.max_length == 1):
        p.error("--max-length must be >= 2 (or 0: no cut)")
    if args.max_body_mb <= 0:
        p.error("--max-body-mb must be > 0")
    return args


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        service = Service(args)
    except (OSError, ValueError) as err:
        print(f"rmtrain serve: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not _loopback(args.host):
        log.warning("listening on %s: there is no authentication and no TLS; put a reverse "
                    "proxy in front (README: Serving)", args.host)  # fmt: skip
    log.info(
        "rmtrain serve: %s (%s, template %s, max_length %s) on %s",
        args.model, service.scorers[0].objective, service.scorers[0].template,
        service.max_length, ", ".join(args.device),
    )  # fmt: skip
    config = uvicorn.Config(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=math.ceil(args.drain_timeout),
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again with the handler it found
    # installed: this one, so that a drained shutdown ends with exit code 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        sys.exit(1)  # uvicorn has said why (e.g. the port is in use)
    log.info("rmtrain serve: stopped after %d requests", service.counts["requests"])
