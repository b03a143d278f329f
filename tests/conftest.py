"""Shared helpers: run rmtrain the way users do (real CLI, real launchers, real DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
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


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    # Launchers (deepspeed, torchrun) from the environment running the tests, activated or not.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_train(
    overrides: list[str], nproc: int = 1, timeout: int = 600, launcher: str = "deepspeed"
) -> subprocess.CompletedProcess[str]:
    """`python -m rmtrain.train` (1 rank) or `launch/cpu.sh` (N ranks on this CPU)."""
    env = cli_env()
    if nproc == 1:
        cmd = [sys.executable, "-m", "rmtrain.train", *overrides]
    else:
        env.update(NPROC=str(nproc), LAUNCHER=launcher)
        cmd = ["bash", str(REPO / "launch" / "cpu.sh"), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


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
    """`rmtrain train <overrides>` in this process (for error paths, where a subprocess would
    prove nothing more): (exit code, stderr)."""
    from rmtrain import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "argv", ["rmtrain train", *overrides])
    capsys.readouterr()
    try:
        train.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


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
