"""`rmtrain serve` as a real process, over real HTTP (httpx): every endpoint against `rmtrain
score` (1e-4), scores independent of batching under concurrent clients (exactly), every kind of
bad input, a full queue, the body limit, and SIGTERM draining the requests in flight.

The tests that talk to a server are marked `slow` (real processes, as the launcher tests). Two
servers start once for the module (their start-up overlaps): A serves the tiny chat export
with two replicas (`--device cpu cpu`, the data-parallel path) and the export's trained
max_length; B serves an export with a short context, no cut, the normalisation statistics, and
at most 128 padded tokens per forward (a long request stays in flight long enough to be caught).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, make_export, read_jsonl, write_jsonl

from rmtrain.score import main as score_main
from rmtrain.text import render

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx")),
    reason="needs the serve extra and httpx: pip install -e '.[dev]'",
)
httpx = pytest.importorskip("httpx")

MAX_LENGTH = 48  # A's export was "trained" with this max_length
STATS = {"eval_mean": 0.25, "eval_std": 2.0, "running_mean": 0.0, "running_std": 1.0}
LONG = " ".join(["Rinse the rice, then simmer it covered for fifteen minutes."] * 8)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "How do I bake bread?"},
     {"role": "assistant", "content": "Mix flour, water, salt and yeast."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hey"}],
    [{"role": "user", "content": "Cook rice?"}, {"role": "assistant", "content": "Boil it."},
     {"role": "user", "content": "Longer?"}, {"role": "assistant", "content": LONG}],
]  # fmt: skip


class Server:
    """`rmtrain serve ...` on a free port, its output in a file."""

    def __init__(self, export: Path, log: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        exe = shutil.which("rmtrain", path=cli_env()["PATH"])
        assert exe, "the rmtrain console script is not installed"
        cmd = [exe, "serve", "--model", str(export), "--port", str(self.port), *args]
        # One intra-op thread per replica: the test machine is shared, and speed is not tested.
        env = {**cli_env(), "OMP_NUM_THREADS": "1"}
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready(self, timeout: float = 180.0) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"rmtrain serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"rmtrain serve did not come up in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return httpx.post(f"{self.url}{path}", json=body, timeout=60, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    meta = {"max_length": MAX_LENGTH, "score_stats": STATS}
    return {
        # hidden 256: a forward takes long enough for concurrent requests to pile up
        "a": make_export(root / "a", template="chat", meta=meta, hidden=256),
        # B: a 128-token context, so a longer text is refused when nothing cuts it
        "b": make_export(root / "b", template="chat", seed=1, meta={"score_stats": STATS},
                         max_position_embeddings=128),
    }  # fmt: skip


@pytest.fixture(scope="module")
def servers(exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    logs = tmp_path_factory.mktemp("logs")
    a = Server(exports["a"], logs / "a.log", "--device", "cpu", "cpu", "--max-queue", "256",
               "--max-body-mb", "1", "--log-level", "warning")  # fmt: skip
    b = Server(exports["b"], logs / "b.log", "--max-length", "0", "--max-queue", "1024",
               "--max-batch-tokens", "128", "--normalize", "--log-level", "warning")  # fmt: skip
    try:
        yield {"a": a.ready(), "b": b.ready()}
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def a(servers: dict[str, Server]) -> Server:
    return servers["a"]


@pytest.fixture(scope="module")
def tok(exports: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exports["a"])


def rmtrain_score(export: Path, tmp: Path, *extra: str) -> list[float]:
    """`rmtrain score` (in this process: it is the reference) of CONVERSATIONS."""
    rows = [{"messages": c} for c in CONVERSATIONS]
    out = tmp / f"scored{len(extra)}.jsonl"
    score_main(["--model", str(export), "--input", str(write_jsonl(tmp / "in.jsonl", rows)),
                "--output", str(out), "--no-progress", *extra])  # fmt: skip
    return [r["score"] for r in read_jsonl(out)]


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= 1e-4 for g, w in zip(got, want, strict=True))


@pytest.mark.slow  # a server process
def test_health(a: Server) -> None:
    health = httpx.get(f"{a.url}/health").json()
    assert health["status"] == "ok" and health["template"] == "chat"
    assert health["max_length"] == MAX_LENGTH and health["normalized"] is None
    assert health["batching"]["replicas"] == ["cpu", "cpu"]


@pytest.mark.slow  # a server process
def test_every_endpoint_scores_what_rmtrain_score_does(a, exports, tok, tmp_path) -> None:
    want = rmtrain_score(exports["a"], tmp_path)
    n_ids = [len(tok(render(tok, c))["input_ids"]) for c in CONVERSATIONS]  # the trained ids
    assert n_ids[-1] > MAX_LENGTH > max(n_ids[:-1])  # the last one is cut, as rmtrain score cuts

    r = a.post("/score", {"conversations": CONVERSATIONS}).json()
    assert close(r["scores"], want), (r["scores"], want)
    assert r["truncated"] == [False, False, False, True] and r["n_tokens"][-1] == MAX_LENGTH
    assert close(a.post("/score", {"messages": CONVERSATIONS[1]}).json()["scores"], want[1:2])
    one = a.post("/score", {"prompt": "Hi", "response": "Hello!"}).json()["scores"]
    assert close(one, want[:1])
    best_of = a.post("/score", {"prompt": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}],
                                "responses": ["Hey", "Hey"]}).json()["scores"]  # fmt: skip
    assert close(best_of, want[2:3] * 2)

    # Templated texts as RL frameworks send them: the export's own render (the tiny tokenizer's
    # adds BOS, which the tokenizer adds again), verl's (BOS stripped), OpenRLHF's (the prompt
    # with the generation prompt, then the reply and the EOS the policy generated), or cut at
    # the generation limit (no end of turn at all).
    renders = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    verl = [t.removeprefix(tok.bos_token) for t in renders]
    prompts = [tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True)
               for c in CONVERSATIONS]  # fmt: skip
    openrlhf = [
        p + c[-1]["content"] + tok.eos_token for p, c in zip(prompts, CONVERSATIONS, strict=True)
    ]
    unfinished = [p + c[-1]["content"] for p, c in zip(prompts, CONVERSATIONS, strict=True)]
    assert renders[0].startswith(tok.bos_token) and not verl[0].startswith(tok.bos_token)
    for texts in (renders, verl, openrlhf, unfinished):
        r = a.post("/get_reward", {"query": texts, "prompts": prompts, "labels": [None] * 4})
        body = r.json()
        assert r.status_code == 200 and close(body["rewards"], want), (texts, body)
        assert body["scores"] == body["rewards"]
        assert body["extra_logs"]["truncated"] == [0.0, 0.0, 0.0, 1.0]
        assert body["extra_logs"]["n_tokens"][-1] == MAX_LENGTH

    # vLLM /classify, as verl calls it (raw score in probs[-1]), and its chat form
    r = a.post("/classify", {"model": "whatever", "input": verl, "activation": False}).json()
    assert set(r) == {"id", "object", "created", "model", "data", "usage"}
    assert r["object"] == "list" and r["id"].startswith("classify-")
    assert r["model"] == str(exports["a"]) and isinstance(r["created"], int)
    assert [d["index"] for d in r["data"]] == [0, 1, 2, 3]
    assert all(d["num_classes"] == 1 and d["label"] == "LABEL_0" for d in r["data"])
    assert close([d["probs"][-1] for d in r["data"]], want)
    assert r["usage"] == {"prompt_tokens": sum(n_ids[:-1]) + MAX_LENGTH,
                          "total_tokens": sum(n_ids[:-1]) + MAX_LENGTH,
                          "completion_tokens": 0, "prompt_tokens_details": None}  # fmt: skip
    r = a.post("/classify", {"input": renders[1]}).json()  # use_activation absent: raw
    assert close(r["data"][0]["probs"], want[1:2])
    r = a.post("/classify", {"messages": CONVERSATIONS[1], "use_activation": True}).json()
    assert close(r["data"][0]["probs"], [1 / (1 + math.exp(-want[1]))])


@pytest.mark.slow  # a server process
def test_normalize_and_no_cut(servers, exports, tmp_path) -> None:
    b = servers["b"]
    want = rmtrain_score(exports["b"], tmp_path, "--normalize")
    raw = rmtrain_score(exports["b"], tmp_path)
    r = b.post("/score", {"conversations": CONVERSATIONS[:3]}).json()
    assert close(r["scores"], want[:3]) and close(r["raw_scores"], raw[:3])
    assert r["normalized"] == "eval"
    mean, std = STATS["eval_mean"], STATS["eval_std"]
    assert close(r["scores"], [(x - mean) / std for x in raw[:3]])
    text = b.post("/get_reward", {"query": ["<|user|>\nHi<|end|>\n<|assistant|>\nHello!"]}).json()
    assert close(text["rewards"], want[:1]) and close(text["extra_logs"]["raw_score"], raw[:1])
    # no --max-length here: a text longer than the model's 128-token context is refused
    r = b.post("/score", {"conversations": CONVERSATIONS})
    assert r.status_code == 422
    assert "conversations[3]" in r.json()["error"]["message"]
    assert "context (128)" in r.json()["error"]["message"]


@pytest.mark.slow  # a server process
def test_scores_do_not_depend_on_batching(a) -> None:
    """32 concurrent clients, random requests of 1-3 texts (lengths inside one padding bucket
    and across buckets): every score equals, bit for bit, the text's score sent alone."""
    import random

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "bread"]

    def text() -> str:
        q, r = (" ".join(rng.choices(words, k=rng.randrange(1, n))) for n in (12, 20))
        return f"<|user|>\n{q}<|end|>\n<|assistant|>\n{r}<|end|>\n"

    texts = [text() for _ in range(48)]
    with httpx.Client(base_url=a.url, timeout=60) as c:
        alone = {t: c.post("/get_reward", json={"query": [t]}).json()["rewards"][0] for t in texts}
    before = httpx.get(f"{a.url}/health").json()["batching"]
    seen: list[tuple[str, float]] = []
    errors: list[str] = []

    def client(seed: int) -> None:
        r = random.Random(seed)
        with httpx.Client(base_url=a.url, timeout=60) as c:
            for _ in range(8):
                query = r.sample(texts, r.randrange(1, 4))
                resp = c.post("/get_reward", json={"query": query})
                if resp.status_code != 200:
                    errors.append(resp.text)
                    continue
                seen.extend(zip(query, resp.json()["rewards"], strict=True))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) > 200
    assert [(t, v) for t, v in seen if v != alone[t]] == []
    after = httpx.get(f"{a.url}/health").json()["batching"]
    batches = after["batches"] - before["batches"]
    sequences = after["sequences"] - before["sequences"]
    assert sequences / batches > 1.5, "requests were not batched together: the test is void"
    assert after["largest_batch"] > 3  # a request has at most 3 texts: requests were merged
    assert min(after["sequences_per_replica"]) > 0  # both replicas served


BAD = [
    # (path, raw body, status, words the message must contain)
    ("/get_reward", b"{not json", 400, "not valid JSON"),
    ("/get_reward", b"\xff\xfe", 400, "not valid JSON"),
    ("/get_reward", b"[1, 2]", 400, "JSON object"),
    ("/get_reward", b"", 400, "not valid JSON"),
    ("/get_reward", b"{}", 422, "field 'query': missing"),
    ("/get_reward", b'{"query": "one text"}', 422, "field 'query'"),
    ("/get_reward", b'{"query": ["a", 3]}', 422, "field 'query[1]'"),
    ("/get_reward", b'{"query": ["a", " "]}', 422, "field 'query[1]': empty text"),
    ("/get_reward", b'{"query": ["a"], "prompts": ["p", "q"]}', 422, "field 'prompts'"),
    ("/classify", b'{"input": "a", "use_activation": "true"}', 422, "field 'use_activation'"),
    ("/classify", b'{"model": "m"}', 422, "exactly one of 'input' and 'messages'"),
    ("/classify", b'{"input": [1, 2]}', 422, "field 'input"),
    ("/score", b'{"messages": [{"role": "bot", "content": "x"}]}', 422, "messages[0].role"),
    ("/score", b'{"messages": [{"role": "user", "content": "x"}]}', 422, "assistant"),
    ("/score", b'{"messages": [{"role": "user"}]}', 422, "messages[0].content': missing"),
    ("/score", b'{"prompt": "p"}', 422, "'response' and 'responses'"),
    ("/score", b'{"prompt": "p", "response": "r", "messages": []}', 422, "exactly one of"),
    ("/score", b'{"prompt": 5, "response": "r"}', 422, "field 'prompt'"),
    ("/score", b'{"conversations": [[{"role": "assistant", "content": "r"}], 7]}', 422,
     "conversations[1]"),
]  # fmt: skip


@pytest.mark.slow  # a server process
@pytest.mark.parametrize(("path", "body", "status", "words"), BAD)
def test_bad_requests_get_a_clear_error(a, path, body, status, words) -> None:
    r = httpx.post(f"{a.url}{path}", content=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    assert error["code"] == status


@pytest.mark.slow  # a server process
def test_limits_and_the_server_survives(a) -> None:
    r = a.post("/get_reward", {"query": ["x" * 200_000] * 6})  # 1.2 MB > --max-body-mb 1
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    big = httpx.post(f"{a.url}/get_reward", content=b"{" + b" " * 2_000_000 + b"}", timeout=30,
                     headers={"content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413
    r = a.post("/get_reward", {"query": ["a text"] * 257})  # more than --max-queue 256
    assert r.status_code == 413 and "--max-queue" in r.json()["error"]["message"]
    assert httpx.get(f"{a.url}/get_reward").status_code == 405
    assert httpx.post(f"{a.url}/nowhere", json={}).status_code == 404
    assert a.post("/get_reward", {"query": []}).json()["rewards"] == []
    # still serving, same answers
    assert a.post("/score", {"messages": CONVERSATIONS[0]}).status_code == 200
    assert a.proc.poll() is None


@pytest.mark.slow  # a server process
def test_full_queue_503_then_sigterm_drains(servers) -> None:
    """B scores one text per forward: a 1000-text request stays queued long enough for a
    second one to find the queue full, and for SIGTERM to arrive while it is in flight."""
    b = servers["b"]
    texts = [f"<|user|>\nquestion {i % 20}<|end|>\n<|assistant|>\n{'answer ' * (i % 20)}<|end|>\n"
             for i in range(1000)]  # fmt: skip
    result: dict[str, Any] = {}

    def big() -> None:
        result["response"] = httpx.post(f"{b.url}/get_reward", json={"query": texts}, timeout=120)

    thread = threading.Thread(target=big)
    thread.start()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        health = httpx.get(f"{b.url}/health").json()["batching"]
        if health["queued"] > 0 and health["batches"] > 0:
            break
        time.sleep(0.005)
    else:
        pytest.fail("the big request never got queued")
    busy = b.post("/get_reward", {"query": texts})
    assert busy.status_code == 503, busy.text
    assert int(busy.headers["retry-after"]) >= 1
    assert "busy" in busy.json()["error"]["message"]

    b.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    response = result["response"]
    assert response.status_code == 200, response.text
    rewards = response.json()["rewards"]
    assert len(rewards) == 1000 and all(math.isfinite(x) for x in rewards)
    assert rewards[0] == rewards[20] and rewards[0] != rewards[1]  # the same text, the same score
    assert b.proc.wait(60) == 0, b.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{b.url}/health", timeout=2)


def test_command_line_errors(tmp_path, capsys) -> None:
    from rmtrain.serve.server import main

    for argv, words in (
        (["--model", str(tmp_path / "nowhere")], "rmtrain serve: error:"),
        (["--model", "x", "--max-batch-tokens", "0"], "must be >= 1"),
        (["--model", "x", "--max-length", "1"], "--max-length"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err


def test_normalize_needs_recorded_stats(tmp_path, capsys) -> None:
    from rmtrain.serve.server import main

    export = make_export(tmp_path / "plain", template="chat")
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(export), "--normalize"])
    assert exc.value.code == 2
    assert "cannot normalise" in capsys.readouterr().err


@pytest.mark.slow  # a server process
def test_json_output_is_strict(a) -> None:
    """Replies are plain JSON that any client parses (no NaN, no Infinity)."""
    r = a.post("/score", {"conversations": CONVERSATIONS})
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# --------------------------------------------------------------------------- the batcher alone


def test_buckets_by_hand() -> None:
    from rmtrain.serve.batcher import Batcher

    b = Batcher([lambda seqs, length: [0.0] * len(seqs)], pad_multiple=32)
    got = {n: b.bucket(n) for n in (1, 32, 33, 256, 257, 300, 513, 600, 2000, 4097)}
    assert got == {1: 32, 32: 32, 33: 64, 256: 256, 257: 288, 300: 320, 513: 576, 600: 640,
                   2000: 2048, 4097: 4608}  # fmt: skip


def test_batcher_merges_by_bucket_under_the_budget_and_survives_a_failing_forward() -> None:
    """Batches hold one bucket, at most max_batch_tokens padded tokens, oldest bucket first; a
    forward that raises fails every request in its batch, and the next batch runs."""
    from rmtrain.serve.batcher import Batcher

    calls: list[tuple[int, list[int]]] = []
    gate = threading.Event()

    def forward(seqs: list[list[int]], length: int) -> list[float]:
        gate.wait(10)  # hold the first batch until everything is queued
        calls.append((length, [len(s) for s in seqs]))
        if any(s[0] == -1 for s in seqs):
            raise RuntimeError("boom")
        return [float(sum(s)) for s in seqs]

    b = Batcher([forward], max_batch_tokens=128, max_queue=64, pad_multiple=32)
    b.start()
    try:
        first = b.submit([[1] * 40])  # bucket 64: taken at once, held by the gate
        while b.queued:
            time.sleep(0.01)
        long = b.submit([[2] * 40, [3] * 50, [4] * 60])  # bucket 64: 2 fit in 128 tokens
        short = b.submit([[5] * 10, [6] * 20])  # bucket 32
        bad = b.submit([[-1] * 5])  # bucket 32: shares a batch with `short`
        gate.set()
        assert first.result(10) == [40.0]
        assert long.result(10) == [80.0, 150.0, 240.0]
        with pytest.raises(RuntimeError, match="boom"):
            short.result(10)
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(10)
        assert b.submit([[7] * 3]).result(10) == [21.0]  # still working
    finally:
        b.stop(10)
    assert calls[:4] == [(64, [40]), (64, [40, 50]), (64, [60]), (32, [10, 20, 5])]
    assert b.describe()["failed_batches"] == 1
