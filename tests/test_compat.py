"""An export loads and scores the same way for safe-rlhf users, plain transformers users and
`rmtrain score` (issue #4): output fields and shapes, a safe-rlhf-layout checkpoint, the FsfairX
pipeline recipe verbatim, opt-in normalisation, the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_export, tiny_score_config
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaModel,
    pipeline,
)

from rmtrain.card import export_metadata, model_card
from rmtrain.config import to_config
from rmtrain.model import AutoModelForScore, LlamaScoreModel, ScoreModelOutput
from rmtrain.record import RunRecord
from rmtrain.scoring import Scorer
from rmtrain.text import render, trained_template, use_template
from rmtrain.toy.tokenizer import build_tiny_tokenizer

HIDDEN = 32
STATS = {"eval_mean": 0.25, "eval_std": 2.0, "running_mean": -0.5, "running_std": 4.0}
CHAT = [
    {"role": "user", "content": "How do I cook rice?"},
    {"role": "assistant", "content": "Rinse it, then simmer it covered for 15 minutes."},
]
# What each template must render CHAT as, written out by hand (the tiny tokenizer's chat template
# is Llama-3-like; EOS is </s>).
CHAT_TEXT = {
    "safe_rlhf": "BEGINNING OF CONVERSATION: USER: How do I cook rice? "
    "ASSISTANT:Rinse it, then simmer it covered for 15 minutes.</s>",
    "chat": "<|user|>\nHow do I cook rice?<|end|>\n<|assistant|>\n"
    "Rinse it, then simmer it covered for 15 minutes.<|end|>\n</s>",
}
TEXTS = [
    "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT:Hello!</s>",
    "BEGINNING OF CONVERSATION: USER: How do I cook rice? ASSISTANT:Rinse and boil it.</s>",
    "BEGINNING OF CONVERSATION: USER: Tell me a joke ASSISTANT:No.</s>",
]


def tiny_config(vocab_size: int, **extra: Any) -> LlamaConfig:
    return tiny_score_config(vocab_size, HIDDEN, **extra)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    meta = {"score_stats": STATS}
    return {
        t: make_export(root / t, t, seed=i, meta=meta) for i, t in enumerate(("safe_rlhf", "chat"))
    }


def batch(tok: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(texts, return_tensors="pt", padding=True))


# --------------------------------------------------------------------------- safe-rlhf outputs


def test_score_model_outputs_match_safe_rlhf_and_plain_transformers(exports) -> None:
    path = exports["safe_rlhf"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForScore.from_pretrained(path)
    assert isinstance(model, LlamaScoreModel) and not model.training
    inputs = batch(tok, TEXTS)
    b, length = inputs["input_ids"].shape
    with torch.no_grad():
        out = model(**inputs)
        plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
        logits = plain(**inputs).logits
    assert isinstance(out, ScoreModelOutput)
    assert list(out.keys()) == [
        "scores", "end_scores", "last_hidden_state", "end_last_hidden_state", "end_index"
    ]  # fmt: skip
    assert out.scores.shape == (b, length, 1)
    assert out.end_scores.shape == (b, 1)
    assert out.last_hidden_state.shape == (b, length, HIDDEN)
    assert out.end_last_hidden_state.shape == (b, HIDDEN)
    assert out.end_index.shape == (b,)
    assert out.end_index.tolist() == (inputs["attention_mask"].sum(-1) - 1).tolist()
    rows = torch.arange(b)
    torch.testing.assert_close(out.end_scores, out.scores[rows, out.end_index])
    end_hidden = out.last_hidden_state[rows, out.end_index]
    torch.testing.assert_close(out.end_last_hidden_state, end_hidden)
    # the token at end_index is the EOS the text ends with
    assert (inputs["input_ids"][rows, out.end_index] == tok.eos_token_id).all()
    torch.testing.assert_close(out.end_scores, logits, atol=1e-5, rtol=0)


def write_safe_rlhf_checkpoint(
    path: Path, fmt: str
) -> tuple[LlamaModel, torch.Tensor, torch.Tensor]:
    """A checkpoint in safe-rlhf's LlamaForScore layout: model.* + score_head (with bias)."""
    tok = build_tiny_tokenizer()
    torch.manual_seed(7)
    config = tiny_config(len(tok), pad_token_id=tok.pad_token_id)
    base = LlamaModel(config).eval()
    weight, bias = torch.randn(1, HIDDEN), torch.randn(1)
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state.update({"score_head.weight": weight, "score_head.bias": bias})
    # safe-rlhf's normaliser buffers travel in its state dict; they are not weights
    state.update({"normalizer.mean": torch.zeros(1), "normalizer.var": torch.ones(1)})
    path.mkdir(parents=True)
    cfg = config.to_dict()
    cfg.update(architectures=["LlamaForScore"], score_dim=1, bias=True, score_type="reward")
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")
    tok.save_pretrained(path)
    return base, weight, bias


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loads_a_safe_rlhf_layout_checkpoint(tmp_path: Path, fmt: str) -> None:
    base, weight, bias = write_safe_rlhf_checkpoint(tmp_path / "ckpt", fmt)
    model = AutoModelForScore.from_pretrained(tmp_path / "ckpt")
    assert model.score.bias is not None
    torch.testing.assert_close(model.score.weight, weight, atol=0, rtol=0)
    torch.testing.assert_close(model.score.bias, bias, atol=0, rtol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    inputs = batch(tok, TEXTS)
    with torch.no_grad():
        out = model(**inputs)
        hidden = base(**inputs).last_hidden_state  # right padding: positions agree
    ends = inputs["attention_mask"].sum(-1) - 1
    expected = hidden[torch.arange(len(TEXTS)), ends] @ weight.T + bias
    torch.testing.assert_close(out.end_scores, expected, atol=1e-5, rtol=0)
    # and the Scorer reads it with the safe-rlhf template, independent of padding side
    left = Scorer(tmp_path / "ckpt", padding_side="left").score_texts(TEXTS)
    torch.testing.assert_close(torch.tensor(left), expected[:, 0], atol=1e-5, rtol=0)


def test_checkpoint_without_score_head_is_an_error(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    config = tiny_config(len(tok), pad_token_id=tok.pad_token_id)
    LlamaModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no score head"):
        AutoModelForScore.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- FsfairX pipeline


def fsfairx_score(path: Path, chat: list[dict[str, str]]) -> tuple[str, float]:
    """The FsfairX-LLaMA3-RM-v0.1 model-card code, verbatim but for device/dtype (CPU, fp32)."""
    tok = AutoTokenizer.from_pretrained(path)
    rm_pipe = pipeline(
        "sentiment-analysis",
        model=str(path),
        tokenizer=tok,
        device="cpu",
        model_kwargs={"dtype": torch.float32},
    )
    pipe_kwargs = {"return_all_scores": True, "function_to_apply": "none", "batch_size": 1}
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False).replace(
        tok.bos_token, ""
    )
    try:
        result = rm_pipe([text], **pipe_kwargs)
    except (TypeError, ValueError):
        result = None
    if result is None or isinstance(result[0], dict):
        # transformers 5 no longer takes return_all_scores (rejected, or ignored and only the
        # top label returned): top_k=None is its replacement
        pipe_kwargs.pop("return_all_scores")
        result = rm_pipe([text], top_k=None, **pipe_kwargs)
    score = result[0][0]["score"]
    return text, float(score)


@pytest.mark.parametrize("template", ["safe_rlhf", "chat"])
def test_fsfairx_pipeline_recipe_gives_rmtrains_score(exports, template: str) -> None:
    path = exports[template]
    scorer = Scorer(path)
    ours = scorer.messages_text(CHAT)
    assert ours == CHAT_TEXT[template]
    text, score = fsfairx_score(path, CHAT)
    assert text == ours, (
        "the exported tokenizer's chat template must render the trained format (EOS included)"
    )
    assert score == pytest.approx(scorer.score_texts([ours])[0], abs=1e-5)


@pytest.mark.parametrize("template", ["safe_rlhf", "chat"])
def test_exported_tokenizer_pad_and_chat_template(exports, template: str) -> None:
    tok = AutoTokenizer.from_pretrained(exports[template])
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    config = json.loads((exports[template] / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_token_id
    assert tok.chat_template == trained_template(build_tiny_tokenizer(), template)


def test_trained_template_renders_the_trained_text() -> None:
    tok = build_tiny_tokenizer()
    for template in ("safe_rlhf", "chat"):
        trained = build_tiny_tokenizer()
        trained.chat_template = trained_template(tok, template)
        rendered = trained.apply_chat_template(CHAT, tokenize=False).replace(tok.bos_token, "")
        assert rendered == CHAT_TEXT[template]
        # applying it again (re-export of an export) changes nothing
        assert trained_template(trained, template) == trained.chat_template
    # multi-turn: safe-rlhf's dialogue format
    turns = [*CHAT, {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Ok"}]
    trained.chat_template = trained_template(tok, "safe_rlhf")
    assert render(trained, turns) == CHAT_TEXT["safe_rlhf"] + "USER: Thanks ASSISTANT:Ok</s>"


# --------------------------------------------------------------------------- normalisation


def test_normalisation_is_opt_in(exports) -> None:
    path = exports["safe_rlhf"]
    raw = Scorer(path).score_texts(TEXTS)
    model = AutoModelForScore.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        direct = model(**batch(tok, TEXTS)).end_scores[:, 0].tolist()
        normed = model(**batch(tok, TEXTS), normalize=True).end_scores[:, 0].tolist()
    assert raw == pytest.approx(direct, abs=1e-5)  # default: raw
    expected = [(r - STATS["eval_mean"]) / STATS["eval_std"] for r in raw]
    assert Scorer(path, normalize=True).score_texts(TEXTS) == pytest.approx(expected, abs=1e-5)
    assert normed == pytest.approx(expected, abs=1e-5)
    running = [(r - STATS["running_mean"]) / STATS["running_std"] for r in raw]
    assert Scorer(path, normalize="running").score_texts(TEXTS) == pytest.approx(running, abs=1e-5)


def test_normalising_without_recorded_stats_is_an_error(tmp_path: Path) -> None:
    write_safe_rlhf_checkpoint(tmp_path / "ckpt", "safetensors")
    with pytest.raises(ValueError, match="score_stats"):
        Scorer(tmp_path / "ckpt", normalize=True)


# --------------------------------------------------------------------------- model card


def test_model_card_covers_the_issue() -> None:
    cfg = to_config(
        {"model": {"name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"},
         "data": {"path": "PKU-Alignment/PKU-SafeRLHF", "name": "alpaca-7b", "revision": "abc123",
                  "template": "chat"}}
    )  # fmt: skip
    last_eval = {"eval/accuracy": 0.75, "eval/score_mean": 0.1, "eval/score_std": 1.5}
    record = RunRecord(
        {"trainer": {"lr": 2e-6}},
        {
            "train": {"rows": 100, "pairs": 97, "truncated": 5, "identical_dropped": 3},
            "eval": {"rows": 10, "pairs": 10, "truncated": 0, "identical_dropped": 0},
        },
        {"mean": 0.2, "var": 4.0, "count": 10},
        last_eval,
    )
    tok = build_tiny_tokenizer()
    use_template(tok, "chat")
    meta = export_metadata(cfg, record, tok)
    assert meta["score_stats"] == {
        "eval_mean": 0.1, "eval_std": 1.5, "running_mean": 0.2, "running_std": 2.0,
        "running_updates": 10,
    }  # fmt: skip
    card = model_card(cfg, meta, record)
    for needle in (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "PKU-Alignment/PKU-SafeRLHF", "alpaca-7b", "abc123", "better_response_id",
        "| pairs | 97 | 10 |", "| truncated | 5 | 0 |", "| identical_dropped | 3 | 0 |",
        "| eval/accuracy | 0.7500 |", "| eval_std | 1.5000 |", "| running_std | 2.0000 |",
        '"lr": 2e-06', "AutoModelForScore", 'pipeline("sentiment-analysis"', "top_k=None",
        "apply_chat_template", "Sign convention: higher score = better response",
        "never applied unless asked",
    ):  # fmt: skip
        assert needle in card, needle
