"""Training from a LLaMA checkpoint on disk, the way `model.name_or_path=/models/llama-7b` does.

The test writes a tiny `LlamaForCausalLM` and a tokenizer WITHOUT a pad token (like LLaMA's) with
`save_pretrained`; rmtrain must add a real `<pad>`, resize the embeddings, keep the pretrained
backbone, start a fresh score head, and export something plain transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, check_ok, read_metrics, run_train
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from rmtrain.toy.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(path)
    # Like LLaMA's, this vocabulary has no pad token at all: rename the tiny tokenizer's.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = path / name
        file.write_text(file.read_text().replace("<pad>", "<unused_0>"))
    assert "<pad>" not in AutoTokenizer.from_pretrained(path).get_vocab()
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def overrides(llama_dir: Path, run_dir: Path) -> list[str]:
    return [
        *SMALL, "model=llama", f"model.name_or_path={llama_dir}",
        "model.gradient_checkpointing=false", "trainer.max_steps=3", "trainer.eval_every=0",
        "trainer.lr=1e-9", "trainer.warmup_ratio=0", f"output_dir={run_dir}",
    ]  # fmt: skip


def check_export_from_checkpoint(run_dir: Path, llama_dir: Path) -> None:
    export = run_dir / "export"
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == 1088  # 1024 + <pad>, padded to a multiple of 64
    # the backbone is the pretrained one (lr 1e-9: three steps move nothing measurable)
    causal = load_file(llama_dir / "model.safetensors")
    ours = model.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(ours[key], causal[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        ours["model.embed_tokens.weight"][:1024], causal["model.embed_tokens.weight"],
        atol=1e-6, rtol=0,
    )  # fmt: skip
    assert "score.weight" in ours and "lm_head.weight" not in ours


@pytest.fixture(scope="module")
def single_run(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 1-rank run from the checkpoint, trained once for both tests."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    check_ok(run_train(overrides(llama_dir, run_dir)))
    return run_dir


def test_trains_from_a_local_llama_checkpoint(llama_dir: Path, single_run: Path) -> None:
    check_export_from_checkpoint(single_run, llama_dir)


@pytest.mark.slow
def test_two_ranks_zero3_from_checkpoint_share_one_default_run_dir(
    llama_dir: Path, single_run: Path, tmp_path: Path
) -> None:
    """ZeRO-3 shards the checkpoint while loading; with no output_dir given, both ranks still
    write into one timestamped directory (rank 0's), and the fresh score head starts the same as
    in a 1-rank ZeRO-2 run (same first loss on the same first batch)."""
    single = single_run  # the 1-rank run of the test above
    args = [o for o in overrides(llama_dir, single) if not o.startswith("output_dir=")]
    args += ["deepspeed=zero3", "deepspeed.stage3_param_persistence_threshold=0",
             "trainer.micro_batch_size=4"]  # fmt: skip
    # Each rank resolves ${now:} itself (the default output_dir works the same way).
    stamp = f"{tmp_path}/outputs/${{now:%H-%M-%S}}"
    proc = run_train([*args, f"hydra.run.dir={stamp}", f"output_dir={stamp}"], nproc=2)
    check_ok(proc)
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1, runs
    check_export_from_checkpoint(runs[0], llama_dir)
    first = next(r["train/loss"] for r in read_metrics(runs[0]) if "train/loss" in r)
    want = next(r["train/loss"] for r in read_metrics(single) if "train/loss" in r)
    assert first == pytest.approx(want, rel=1e-5)
    assert json.loads((runs[0] / "export" / "config.json").read_text())["rmtrain"]["base_model"]
