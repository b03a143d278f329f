"""Load test: `rmtrain serve` (dynamic batching) vs a naive server (one forward per request).

    python benchmarks/serve.py [--models tiny smollm2] [--clients 1 8 32] [--requests N]
                               [--threads N] [--max-tokens 384] [--serve-args "..."]

For each model, both servers run as their own process on this machine and get the same load:
`--clients` concurrent clients (threads, one keep-alive connection each), each sending
OpenRLHF-style requests (`POST /get_reward` with ONE query, as OpenRLHF's agent executor sends
them) until `--requests` requests are done. Queries are chat-templated texts (the export's
render) of seeded random lengths, log-uniform between 24 and `--max-tokens` tokens.

* rmtrain -- `rmtrain serve --model <export>` with its defaults (plus `--serve-args`).
* naive   -- the way a reward server is usually written (OpenRLHF's `serve_rm.py`): FastAPI on
             uvicorn, one forward per request (the request's texts padded to the longest),
             requests one at a time. Same model, same ids (rmtrain.text.query_ids), same
             threads; the forward runs in one worker thread, as rmtrain serve's do (OpenRLHF
             calls it on the event loop's thread, which on a busy CPU was several times slower
             here), so the comparison measures batching alone.

Models: `tiny` (rmtrain's quickstart LLaMA, random init, its own tokenizer) and `smollm2` (the
real SmolLM2-135M-Instruct from tests/realmodel.py with a seeded new score head). Exports are
built once under `--workdir`. Printed per (model, server, clients): requests/s, p50 and p99
latency, and the speed-up over the naive server; the two servers' scores are compared (they
must agree to 1e-4). Timings mean something only on an otherwise idle machine; the clients run
on the same CPU as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # the serve extra: pip install -e '.[serve]'

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REQUESTS = {"tiny": 400, "smollm2": 48}


# --------------------------------------------------------------------------- exports


def build_export(name: str, out: Path) -> Path:
    """The export a run would write (chat template, max_length 2048), without training."""
    if (out / "config.json").is_file():
        return out
    import torch

    from rmtrain import hf, text
    from rmtrain.config import ModelConfig

    if name == "tiny":
        cfg = ModelConfig(name_or_path="tiny")
    elif name == "smollm2":
        sys.path.insert(0, str(REPO / "tests"))
        from realmodel import smollm2_dir

        cfg = ModelConfig(name_or_path=str(smollm2_dir()))
    else:
        raise SystemExit(f"--models: unknown model {name!r} (tiny, smollm2)")
    tok = hf.load_tokenizer(cfg)
    text.use_template(tok, "chat")
    torch.manual_seed(0)
    model = hf.build_score_model(cfg, tok, torch.float32).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"objective": "reward", "template": "chat", "max_length": 2048, "score_stats": {}}
    hf.export(state, model.config, tok, out, "2GB", {"rmtrain": meta}, f"# {name} (bench)\n")
    return out


def make_queries(export: Path, n: int, max_tokens: int, seed: int = 0) -> list[str]:
    """n chat-templated texts (the export's own render, as RL frameworks send them)."""
    from transformers import AutoTokenizer

    from rmtrain.toy.sample_data import generate_rows

    tok = AutoTokenizer.from_pretrained(export)
    rows = generate_rows(max(n, 64), seed)
    sentences = [r[f"response_{k}"] for r in rows for k in (0, 1)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = int(math.exp(rng.uniform(math.log(24), math.log(max_tokens))))
        reply = ""
        while len(tok(reply)["input_ids"]) < target:
            reply += rng.choice(sentences) + " "
        chat = [{"role": "user", "content": rows[i % len(rows)]["prompt"]},
                {"role": "assistant", "content": reply.strip()}]  # fmt: skip
        out.append(tok.apply_chat_template(chat, tokenize=False))
    return out


# --------------------------------------------------------------------------- servers


def naive_server(export: str, port: int) -> None:
    """One forward per request inside the async handler (OpenRLHF's serve_rm.py structure)."""
    import uvicorn

    from rmtrain.scoring import Scorer
    from rmtrain.text import query_frame, query_ids

    scorer = Scorer(export)
    frame = query_frame(scorer.tokenizer, scorer.chat_template)
    worker = ThreadPoolExecutor(1)  # one forward at a time
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict[str, Any]:
        queries = (await request.json())["query"]
        ids = [query_ids(scorer.tokenizer, q, frame) for q in queries]
        rewards = await asyncio.get_running_loop().run_in_executor(worker, scorer.score_ids, ids)
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, export: Path, env: dict[str, str], serve_args: list[str]) -> Any:
    import httpx

    port = free_port()
    if kind == "rmtrain":
        cmd = [sys.executable, "-c", "from rmtrain.cli import main; main()", "serve", "--model",
               str(export), "--port", str(port), "--log-level", "warning", *serve_args]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--naive-server", str(export), str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited with {proc.returncode}")
        try:
            httpx.get(f"{url}/health", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{kind} server did not start")


def load(url: str, queries: list[str], clients: int, n: int) -> dict[str, Any]:
    """`clients` threads sending 1-query requests until n are done: req/s, latencies."""
    import httpx

    lock = threading.Lock()
    todo = iter(range(n))
    latencies: list[float] = []
    scores: dict[int, float] = {}
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post("/get_reward", json={"query": [queries[i % len(queries)]]})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    scores[i % len(queries)] = r.json()["rewards"][0]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} failed requests, e.g. {failures[0]}")
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
        "scores": scores,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="per run (default: tiny 400, "
                   "smollm2 48)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=4, help="requests before each timed run")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers")
    p.add_argument("--max-tokens", type=int, default=384, help="longest query, in tokens")
    p.add_argument("--serve-args", default="", help="extra `rmtrain serve` arguments")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rmtrain" / "bench")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--naive-server", nargs=2, metavar=("EXPORT", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        naive_server(args.naive_server[0], int(args.naive_server[1]))
        return
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = []
    for model in args.models:
        export = build_export(model, args.workdir / f"{model}-export")
        n = args.requests or DEFAULT_REQUESTS.get(model, 100)
        queries = make_queries(export, n, args.max_tokens)
        scores: dict[str, dict[int, float]] = {}
        for kind in ("naive", "rmtrain"):
            proc, url = start(kind, export, env, shlex.split(args.serve_args))
            try:
                load(url, queries, 1, args.warmup)
                for clients in args.clients:
                    r = load(url, queries, clients, n)
                    scores.setdefault(kind, {}).update(r.pop("scores"))
                    results.append({"model": model, "server": kind, "clients": clients, **r})
                    print(f"{model:<8} {kind:<8} {clients:>3} clients: "
                          f"{r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                          f"p99 {r['p99_ms']:8.1f} ms", flush=True)  # fmt: skip
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
        common = set(scores["naive"]) & set(scores["rmtrain"])
        diff = max(abs(scores["naive"][i] - scores["rmtrain"][i]) for i in common)
        print(f"{model}: max |score difference| between the servers over {len(common)} queries: "
              f"{diff:.2e}", flush=True)  # fmt: skip
        if diff > 1e-4:
            raise SystemExit(f"{model}: the servers disagree by {diff}")
    naive = {(r["model"], r["clients"]): r["requests_per_s"] for r in results
             if r["server"] == "naive"}  # fmt: skip
    print("\n| model | server | clients | req/s | p50 ms | p99 ms | req/s vs naive |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["requests_per_s"] / naive[(r["model"], r["clients"])]
        print(f"| {r['model']} | {r['server']} | {r['clients']} | {r['requests_per_s']:,.1f} | "
              f"{r['p50_ms']:,.1f} | {r['p99_ms']:,.1f} | {ratio:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
