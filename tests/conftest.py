"""The suite's one module of shared helpers and fixtures (test modules import nothing from each
other): run rmtrain the way users do (its real entry points, real launchers, real DeepSpeed),
build tiny exports, read what runs write, and check exports against plain transformers.

One rank runs in this process (`run_train`): `rmtrain.train.main()` with the command line, so
Hydra composes the config as for a user and the run is a world of one; several ranks, launchers,
kills and signals run as real processes.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data samples beside the checkout (RMTRAIN_SHARED_DATA points elsewhere, e.g. from a
# git worktree whose parent has no shared/ folder).
SHARED_DATA = Path(os.environ.get("RMTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
PKU_HEAD60 = SHARED_DATA / "pku_saferlhf_v1_alpaca7b_test_head60.jsonl"

# A small, fast training run on the generated sample data.
SMALL = [
    "data.sample_train_rows=256",
    "data.sample_eval_rows=64",
    "data.max_length=96",
    "trainer.micro_batch_size=8",
    "trainer.eval_batch_size=16",
    "trainer.lr=3e-3",
    "logger=none",
]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data cache of this test session (on, as for users, but never a user's own): every
    run, in this process or a child, tokenizes into it (RMTRAIN_DATA_CACHE)."""
    path = tmp_path_factory.mktemp("data-cache")
    os.environ["RMTRAIN_DATA_CACHE"] = str(path)
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    # Launchers (deepspeed, torchrun) from the environment running the tests, activated or not.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


_DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_train(
    overrides: list[str], nproc: int = 1, timeout: int = 600, launcher: str = "deepspeed"
) -> subprocess.CompletedProcess[str]:
    """`rmtrain train <overrides>`: one rank in this process (`train_here`), N ranks on this CPU
    with `launch/cpu.sh` (the deepspeed launcher or torchrun)."""
    if nproc == 1:
        return train_here(overrides)
    env = cli_env()
    env.update(NPROC=str(nproc), LAUNCHER=launcher)
    cmd = ["bash", str(REPO / "launch" / "cpu.sh"), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_train_many(
    runs: list[list[str]], nproc: int = 2, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    """Several `rmtrain train` runs (override lists) in one `nproc`-rank torchrun launch, one
    after the other (`tests/launch_runs.py`): for tests that compare configurations, not
    launchers. Each run's overrides must give its own output_dir."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(runs, f)
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    harness = str(REPO / "tests" / "launch_runs.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), harness, f.name]  # fmt: skip
    try:
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
    finally:
        os.unlink(f.name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def train_here(overrides: list[str]) -> subprocess.CompletedProcess[str]:
    """`rmtrain train <overrides>` as one rank in this process: `rmtrain.train.main()` parses the
    command line with Hydra and runs a world of one (its process group is kept for the next
    run, as in a Hydra multirun). Returns what a process would: exit code, stdout, stderr."""
    from rmtrain import train

    for key in _DIST_KEYS:  # a world of one, whatever a test set before
        os.environ.pop(key, None)
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with _argv(["rmtrain train", *overrides]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):  # fmt: skip
        try:
            train.main()
        except SystemExit as exc:
            code = exc.code or 0
    return subprocess.CompletedProcess(overrides, int(code), out.getvalue(), err.getvalue())


def check_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "metrics.jsonl")


@pytest.fixture
def pku_head60() -> Path:
    if not PKU_HEAD60.exists():
        pytest.skip(f"real PKU-SafeRLHF rows not found at {PKU_HEAD60}")
    return PKU_HEAD60


def write_jsonl(path: Path, rows: list[Any], raw_lines: dict[int, str] | None = None) -> Path:
    """Rows as JSONL (parents created); raw_lines maps a 0-based position to a literal line."""
    lines = [json.dumps(r) for r in rows]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def varied_labels(n: int) -> dict[str, list[Any]]:
    """Labels for n tokenized pairs that differ from pair to pair (safety flags, margins), so
    that a batch which mixes up pairs mixes up their labels too."""
    return {
        "chosen_unsafe": [i % 2 == 0 for i in range(n)],
        "rejected_unsafe": [i % 3 != 0 for i in range(n)],
        "chosen_severity": [-1] * n,
        "rejected_severity": [-1] * n,
        "margin": [0.1 * i for i in range(n)],
    }


def tiny_score_config(vocab_size: int, hidden: int = 32, **extra: Any) -> Any:
    """A small LLaMA score-model config (no training needed to build one)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **extra,
    )  # fmt: skip


def make_export(
    out: Path,
    template: str = "safe_rlhf",
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    **config: Any,
) -> Path:
    """An export as a run writes it, without training: a random tiny score model + hf.export.
    `config`: extra LlamaConfig fields (e.g. rope_theta)."""
    import torch

    from rmtrain import hf, text
    from rmtrain.model import LlamaScoreModel
    from rmtrain.toy.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    text.use_template(tok, template)
    torch.manual_seed(seed)
    model_config = tiny_score_config(
        len(tok), num_labels=1, pad_token_id=tok.pad_token_id, **config
    )
    model = LlamaScoreModel(model_config).eval()
    info = {"objective": "reward", "template": template, "score_stats": {}, **(meta or {})}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return hf.export(state, model.config, tok, out, "200KB", {"rmtrain": info}, "# card\n")


def train_in_process(
    overrides: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """(exit code, stderr) of `rmtrain train <overrides>` in this process."""
    proc = train_here(overrides)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as a local LLaMA directory (built once, cached)."""
    from realmodel import RealModelUnavailable, smollm2_dir

    try:
        return smollm2_dir()
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The real Gemma-3-270M (base model) as a local Gemma 3 directory (built once, cached)."""
    from realmodel import RealModelUnavailable, gemma3_dir

    try:
        return gemma3_dir()
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))


# -- what runs write ----------------------------------------------------------------------------
def read_marker(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's completion marker, read as the JSON file it is."""
    return dict(json.loads((checkpoint / "rmtrain_complete.json").read_text()))


def export_weights(export: Path) -> dict[str, Any]:
    """Every tensor of an export's safetensors shards (read with safetensors, not rmtrain)."""
    from safetensors.torch import load_file

    shards = sorted(Path(export).glob("*.safetensors"))
    assert shards, f"no safetensors in {export}"
    out: dict[str, Any] = {}
    for shard in shards:
        out.update(load_file(shard))
    return out


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    """Two exports hold the same tensors (to `atol`; 0 = bit for bit)."""
    wa, wb = export_weights(a), export_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].float() - wb[k].float()).abs().max().item()
        assert diff <= atol, f"{k}: max abs diff {diff}"


def check_export(run_dir: Path, min_shards: int = 2) -> None:
    """A run's export loads with plain transformers and scores exactly what the trained model
    did (eval_scores.jsonl), also through a text-classification pipeline."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    export = run_dir / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= min_shards
    assert all((export / s).exists() for s in shards)
    assert not list(run_dir.glob("*.tmp"))

    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    assert model.num_labels == 1
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id

    samples = read_jsonl(run_dir / "eval_scores.jsonl")
    assert len(samples) >= 4
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            plain = model(input_ids=ids).logits[0, 0].item()
            assert plain == pytest.approx(s["score"], abs=1e-4)
            # the text round-trips through the exported tokenizer to the same ids
            assert tok(s["text"])["input_ids"] == s["input_ids"]
    pipe = pipeline("text-classification", model=str(export), tokenizer=tok)
    out = pipe([s["text"] for s in samples[:3]], top_k=None, function_to_apply="none")
    for s, o in zip(samples[:3], out, strict=True):
        assert o[0]["score"] == pytest.approx(s["score"], abs=1e-4)


def png_size_and_variation(path: Path) -> tuple[tuple[int, ...], float]:
    """(shape, pixel std) of a PNG: its size, and whether it is more than a blank canvas."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.shape, float(img[..., :3].std())


def load_upstream_rewardbench() -> tuple[ModuleType, Any]:
    """RewardBench's constants and `calculate_scores_per_section`, without its dependencies.

    `import rewardbench.<anything>` runs `rewardbench/__init__.py`, which imports fastchat,
    torch, datasets and its model zoo. So locate the installed package without importing it,
    load `constants.py` (pure data) from its file, and compile just the one function out of
    `utils.py`. Needs `pip install --no-deps rewardbench==0.1.4`.
    """
    spec = importlib.util.find_spec("rewardbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "RewardBench cross-check needs the reference package: "
            "pip install --no-deps rewardbench==0.1.4"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    cspec = importlib.util.spec_from_file_location("_rewardbench_constants", root / "constants.py")
    assert cspec is not None and cspec.loader is not None
    constants = importlib.util.module_from_spec(cspec)
    cspec.loader.exec_module(constants)
    tree = ast.parse((root / "utils.py").read_text(encoding="utf-8"))
    fn = next(
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "calculate_scores_per_section"
    )
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(root / "utils.py"), "exec"), namespace)
    return constants, namespace["calculate_scores_per_section"]


# -- comparing runs ---------------------------------------------------------------------------
def weight_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str]:
    """(||a - b|| / ||b|| over all tensors, max |a - b|, the tensor holding that max)."""
    import math

    assert sorted(a) == sorted(b)
    diffs = {k: (a[k].double() - b[k].double()) for k in b}
    fro = math.sqrt(sum(float((d**2).sum()) for d in diffs.values()))
    norm = math.sqrt(sum(float((b[k].double() ** 2).sum()) for k in b))
    worst = max(diffs, key=lambda k: float(diffs[k].abs().max()))
    return fro / norm, float(diffs[worst].abs().max()), worst


def weights_close(
    got: dict[str, Any], want: dict[str, Any], what: str, rtol_fro: float, atol_max: float
) -> None:
    """Final weights agree as a whole (relative Frobenius norm of the difference) and element by
    element (why both: tests/test_equivalence.py's tolerance note)."""
    rel, worst, key = weight_diff(got, want)
    print(f"{what}: weights rel-Frobenius {rel:.2e}, max |diff| {worst:.2e} ({key})")
    assert rel < rtol_fro and worst < atol_max, (
        f"{what}: final weights differ: relative Frobenius {rel:.3e} (limit {rtol_fro}), "
        f"max |diff| {worst:.3e} in {key} (limit {atol_max})"
    )


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def assert_close_steps(
    got: list[float], want: list[float], what: str, rtol: float, atol: float = 0.0
) -> None:
    """Per-step values agree (`math.isclose`), naming the steps that do not."""
    import math

    bad = [
        (step, g, w)
        for step, (g, w) in enumerate(zip(got, want, strict=True), 1)
        if not math.isclose(g, w, rel_tol=rtol, abs_tol=atol)
    ]
    print(f"{what}: max rel {max_rel(got, want):.2e}")
    assert not bad, f"{what} differs at (step, got, want): {bad} (max rel {max_rel(got, want):.2e})"
