"""`rmtrain.text.query_ids`: a conversation sent as already-templated text (the way OpenRLHF
and verl send it) becomes exactly the ids training used, for every tokenizer convention in
tests/conventions.py, rmtrain's tiny tokenizer, and both trained templates.

The expected ids are `tokenizer(render(conversation))`, the ids training tokenizes (checked
against the conventions' documented texts in tests/test_text_conventions.py); the query texts
are built the ways the clients build them, with plain transformers calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conventions import CONVENTIONS, save_tokenizer

from rmtrain import hf
from rmtrain.config import ModelConfig
from rmtrain.text import query_frame, query_ids, render, use_template
from rmtrain.toy.tokenizer import build_tiny_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"},
     {"role": "assistant", "content": "Mix flour, water, salt and yeast."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Is it safe to mix bleach and ammonia?"},
     {"role": "assistant", "content": "No. It releases toxic chloramine gas."}],
]  # fmt: skip


def _tokenizers(root: Path) -> dict[str, Any]:
    """(convention, template) -> the tokenizer as training loads it (pad added, template set)."""
    out: dict[str, Any] = {}
    for convention in [*CONVENTIONS, "tiny"]:
        for template in ("chat", "safe_rlhf"):
            if convention == "tiny":
                tok = build_tiny_tokenizer()
            else:
                path = save_tokenizer(convention, root / convention)
                tok = hf.load_tokenizer(ModelConfig(name_or_path=str(path)))
            if template == "chat" and not tok.chat_template:
                continue  # Llama-2: no chat template, trains with safe_rlhf only
            use_template(tok, template)
            out[f"{convention}-{template}"] = tok
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _tokenizers(tmp_path_factory.mktemp("tok"))


def _queries(tok: Any, conversation: list[dict[str, str]]) -> dict[str, str]:
    """The texts clients send for one conversation."""
    raw = tok.apply_chat_template(conversation, tokenize=False)  # the export's own render
    prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    reply = conversation[-1]["content"]
    out = {
        "rmtrain render": render(tok, conversation),
        "apply_chat_template": raw,  # Llama-3 and tiny: BOS in the text and added again
    }
    if tok.bos_token:  # Qwen3 has no BOS token at all
        out["double BOS"] = tok.bos_token + raw
    if tok.bos_token and raw.startswith(tok.bos_token):  # verl strips bos_token from a render
        out["verl (BOS stripped)"] = raw[len(tok.bos_token) :]
    # A policy's text: the generation prompt, then the reply. Only where the template renders
    # a finished reply right after its generation prompt (a template that renders past replies
    # differently, e.g. with a thinking block, gives another text in the middle).
    if raw.startswith(prompt + reply):
        out["OpenRLHF (reply + EOS)"] = prompt + reply + tok.eos_token
        out["cut at the generation limit (no end of turn)"] = prompt + reply
    return out


def test_every_convention_gets_the_trained_ids(tokenizers: dict[str, Any]) -> None:
    assert set(tokenizers) >= {"chatml-chat", "llama3-chat", "llama2-safe_rlhf", "tiny-chat"}
    for name in ("chatml-chat", "llama3-chat", "llama2-safe_rlhf", "tiny-chat"):
        assert "OpenRLHF (reply + EOS)" in _queries(tokenizers[name], CONVERSATIONS[0]), name
    failures = []
    for name, tok in tokenizers.items():
        frame = query_frame(tok)
        for conversation in CONVERSATIONS:
            want = tok(render(tok, conversation))["input_ids"]
            for how, text in _queries(tok, conversation).items():
                got = query_ids(tok, text, frame)
                if got != want:
                    failures.append(f"{name}, {how}:\n  got  {tok.convert_ids_to_tokens(got)}"
                                    f"\n  want {tok.convert_ids_to_tokens(want)}")  # fmt: skip
    assert not failures, "\n".join(failures)


def test_frames_by_hand(tokenizers: dict[str, Any]) -> None:
    """The lead and tail each convention's trained ids have, written out."""

    def tokens(name: str) -> tuple[list[str], list[str]]:
        tok = tokenizers[name]
        frame = query_frame(tok)
        return tok.convert_ids_to_tokens(list(frame.lead)), tok.convert_ids_to_tokens(
            list(frame.tail)
        )

    assert tokens("chatml-chat") == (["<|im_start|>"], ["<|im_end|>", "Ċ"])  # Ċ: byte-level \n
    assert tokens("llama3-chat") == (["<|begin_of_text|>"], ["<|eot_id|>"])
    assert tokens("llama2-safe_rlhf") == (["<s>"], ["</s>"])
    assert tokens("tiny-chat") == (["<s>"], ["<|end|>", "Ċ", "</s>"])
    assert tokens("chatml-safe_rlhf") == ([], ["<|im_end|>"])  # no BOS anywhere


def test_text_in_the_middle_is_scored_as_sent(tokenizers: dict[str, Any]) -> None:
    """Only the ends are normalised: a different system prompt is a different text."""
    tok = tokenizers["chatml-chat"]
    conversation = CONVERSATIONS[0]
    other = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *conversation], tokenize=False
    )
    assert query_ids(tok, other) != tok(render(tok, conversation))["input_ids"]
    assert query_ids(tok, other) == tok(other)["input_ids"]
