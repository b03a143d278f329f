"""Text exactly as each tokenizer convention says (issues 10, 18): ChatML (no BOS added, pad ==
EOS), Llama-3 (BOS in the template and added by the tokenizer), Llama-2 / sentencepiece (BOS
added, no chat template), Gemma (BOS in the template and added; turns end `<end_of_turn>\n`, EOS
`<eos>` is not in the render), Qwen3 (ChatML without BOS, an empty `<think>` block before the
scored answer), Mistral (`<s>[INST] u[/INST] a</s>`, BOS in the template and added) and rmtrain's
tiny tokenizer. For each: the rendered text, its ids (== `apply_chat_template(tokenize=True)` of
the trained tokenizer), the read-out token, truncation, and that an export -- of the convention's
own architecture: LLaMA, Gemma 3, Qwen3, Mistral -- scores the same through its model card's
snippet, `pipeline`, `AutoModelForScore` and `rmtrain score`.

Expected texts and ids are written out from the real tokenizers' documented behaviour
(tests/conventions.py mimics them), not computed by rmtrain.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_jsonl
from conventions import save_tiny_model

from rmtrain import hf
from rmtrain.card import write_export
from rmtrain.config import DataConfig, ModelConfig
from rmtrain.data.pairs import DataStats, build_pairs, truncate_keep_eos
from rmtrain.data.sources import load_rows
from rmtrain.model import AutoModelForScore
from rmtrain.record import RunRecord
from rmtrain.scoring import Scorer
from rmtrain.text import TextError, format_text, use_template
from rmtrain.toy.sample_data import generate_rows

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
CHATML_TEXT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
)
LLAMA3_TEXT = (  # the render without its leading <|begin_of_text|> (the tokenizer adds it)
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
)
SAFE_RLHF_TEXT = "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT:Hello!</s>"
GEMMA_TEXT = (  # without its leading <bos> (the tokenizer adds it), EOS after the closed turn
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<eos>"
)
QWEN3_TEXT = (  # untouched: no BOS to strip, ends with EOS <|im_end|> and its newline
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!"
    "<|im_end|>\n"
)
MISTRAL_TEXT = "[INST] Hi[/INST] Hello!</s>"  # without <s>; the template's </s> is the EOS
# convention -> the template it trains with
TEMPLATE = {"chatml": "chat", "llama3": "chat", "llama2": "safe_rlhf", "gemma": "chat",
            "qwen3": "chat", "mistral": "chat"}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conventions")
    return {c: save_tiny_model(c, root / c, seed=i) for i, c in enumerate(TEMPLATE)}


def _tok(models: dict[str, Path], convention: str) -> Any:
    """The tokenizer as rmtrain trains with it: pad added, trained chat template set."""
    tok = hf.load_tokenizer(ModelConfig(name_or_path=str(models[convention])))
    use_template(tok, TEMPLATE[convention])
    return tok


def test_chatml_text_is_the_render_untouched(models) -> None:
    tok = _tok(models, "chatml")
    assert tok.pad_token_id != tok.eos_token_id  # rmtrain's own <pad>, not <|im_end|>
    text = format_text(tok, "chat", "Hi", "Hello!")
    assert text == CHATML_TEXT == tok.apply_chat_template(CHAT, tokenize=False)
    ids = tok(text)["input_ids"]
    want = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids == want
    bos, eos = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(bos) == 3 and ids.count(eos) == 3  # one per turn: none dropped, none added
    # the read-out token is the newline after the last <|im_end|>
    assert ids[-2] == eos and tok.decode(ids[-1:]) == "\n"


def test_llama3_text_has_one_bos(models) -> None:
    tok = _tok(models, "llama3")
    text = format_text(tok, "chat", "Hi", "Hello!")
    assert text == LLAMA3_TEXT
    ids = tok(text)["input_ids"]
    want = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids == want
    bos, eot = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"])
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-1] == eot and ids.count(eot) == 2  # read at <|eot_id|>, not doubled


def test_llama2_safe_rlhf_text(models) -> None:
    tok = _tok(models, "llama2")
    text = format_text(tok, "safe_rlhf", "Hi", "Hello!")
    assert text == SAFE_RLHF_TEXT
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    with pytest.raises(TextError, match="no chat_template"):
        format_text(hf.load_tokenizer(ModelConfig(name_or_path=str(models["llama2"]))), "chat",
                    "Hi", "Hello!")  # fmt: skip


@pytest.mark.parametrize(
    ("convention", "want", "read_at"),
    [
        ("gemma", GEMMA_TEXT, "<eos>"),
        ("qwen3", QWEN3_TEXT, "\n"),
        ("mistral", MISTRAL_TEXT, "</s>"),
    ],
)
def test_new_conventions_text_ids_and_read_out(
    models, convention: str, want: str, read_at: str
) -> None:
    tok = _tok(models, convention)
    text = format_text(tok, "chat", "Hi", "Hello!")
    assert text == want
    ids = tok(text)["input_ids"]
    # the trained tokenizer's own apply_chat_template(tokenize=True): the same ids
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    bos = tok.bos_token_id
    assert bos is None or (ids[0] == bos and ids.count(bos) == 1)  # never doubled nor dropped
    assert ids.count(tok.eos_token_id) == (2 if convention == "qwen3" else 1)  # once per turn
    assert tok.decode(ids[-1:]) == read_at and ids[-1] != tok.pad_token_id
    cut, was_cut = truncate_keep_eos(ids, 6, tok.eos_token_id)  # the read-out survives a cut
    assert was_cut and cut[-1] == ids[-1]
    print(f"{convention}: {text!r} -> {ids}")


@pytest.mark.parametrize("convention", list(TEMPLATE))
def test_training_pairs_use_the_same_ids(models, convention: str, tmp_path: Path) -> None:
    tok = _tok(models, convention)
    rows = generate_rows(3, seed=0)
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=str(tmp_path), template=TEMPLATE[convention], max_length=4096)
    pairs, _ = build_pairs(load_rows(cfg, "train"), cfg, tok)
    for pair, row in zip(pairs, rows, strict=True):
        chosen = row[f"response_{row['better_response_id']}"]
        text = format_text(tok, TEMPLATE[convention], row["prompt"], chosen)
        assert pair["chosen_input_ids"] == tok(text)["input_ids"]


def test_truncation_keeps_the_closing_tail(models) -> None:
    tok = _tok(models, "chatml")
    ids = tok(CHATML_TEXT)["input_ids"]
    cut, was_cut = truncate_keep_eos(ids, 10, tok.eos_token_id)
    assert was_cut and len(cut) == 10
    assert cut[:8] == ids[:8] and cut[8:] == ids[-2:]  # <|im_end|> \n kept: same read-out


def _export(models: dict[str, Path], convention: str, out: Path) -> Path:
    cfg = ModelConfig(name_or_path=str(models[convention]))
    tok = _tok(models, convention)
    torch.manual_seed(0)
    model = hf.build_score_model(cfg, tok, torch.float32).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far from 0
    empty = DataStats().as_dict()
    record = RunRecord(
        {"model": {"name_or_path": cfg.name_or_path}, "data": {"template": TEMPLATE[convention]}},
        {"train": empty, "eval": empty},
        {"mean": 0.0, "var": 1.0, "count": 0},
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return write_export(record, state, model.config, tok, out)


@pytest.mark.parametrize("convention", list(TEMPLATE))
def test_card_snippet_pipeline_and_score_agree(models, convention: str, tmp_path: Path) -> None:
    path = _export(models, convention, tmp_path / "export")
    card = (path / "README.md").read_text()
    snippet = re.search(r"## Load it with plain transformers\n\n```python\n(.*?)```", card, re.S)
    assert snippet is not None
    scope: dict[str, Any] = {"path": str(path)}
    exec(snippet.group(1), scope)  # the card's code, verbatim
    scorer = Scorer(path)
    text = scorer.messages_text(CHAT)
    assert scope["text"] == text
    [ours] = scorer.score_texts([text])
    assert scope["score"] == pytest.approx(ours, abs=1e-4)
    assert scope["score_direct"] == pytest.approx(ours, abs=1e-4)
    # config.json's problem_type "regression": without function_to_apply the pipeline (and
    # vLLM's pooling runner) return the raw score, not a sigmoid of it
    assert json.loads((path / "config.json").read_text())["problem_type"] == "regression"
    default = scope["rm_pipe"]([text], top_k=None, batch_size=1)[0][0]["score"]
    assert default == pytest.approx(ours, abs=1e-4)
    model = AutoModelForScore.from_pretrained(path)
    with torch.no_grad():
        end = model(**scope["tok"](text, return_tensors="pt")).end_scores[0, 0].item()
    assert end == pytest.approx(ours, abs=1e-4)
    assert abs(ours) > 1e-3  # a real score, not a degenerate 0
