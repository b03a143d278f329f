from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from rmtrain.toy.tokenizer import CHAT_TOKENS, build_tiny_tokenizer


def _digest() -> str:
    return hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()


def test_deterministic_in_process_and_across_processes() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a is not b  # a fresh wrapper each call: callers may mutate padding_side etc.
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    code = (
        "import hashlib; from rmtrain.toy.tokenizer import build_tiny_tokenizer as b; "
        "print(hashlib.sha256(b().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "1"},
    )
    assert other.stdout.strip() == _digest()


def test_vocab_size() -> None:
    assert len(build_tiny_tokenizer()) == 1024


def test_special_tokens_are_distinct_single_ids() -> None:
    tok = build_tiny_tokenizer()
    ids = {
        name: tok.convert_tokens_to_ids(t)
        for name, t in [("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"), ("unk", "<unk>")]
    }
    assert ids == {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "unk": tok.unk_token_id,
    }
    assert len(set(ids.values())) == 4
    assert tok.pad_token_id != tok.eos_token_id
    for text in ["<s>", "</s>", "<pad>", *CHAT_TOKENS]:
        assert tok(text, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(text)]
        assert tok.convert_tokens_to_ids(text) in tok.all_special_ids


def test_bos_added_like_llama() -> None:
    tok = build_tiny_tokenizer()
    plain = tok("How do I bake bread at home?", add_special_tokens=False)["input_ids"]
    assert tok("How do I bake bread at home?")["input_ids"] == [tok.bos_token_id, *plain]
    assert tok.bos_token_id not in plain
    assert tok.model_max_length >= 4096


def test_round_trip_any_text_without_unk() -> None:
    tok = build_tiny_tokenizer()
    text = (
        "How do I bake bread at home? Sure!\n\tTabs, émigré, 日本語, emoji 😀, "
        "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:ok</s>"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    with_bos = tok(text)["input_ids"]
    assert tok.decode(with_bos, skip_special_tokens=False) == "<s>" + text


def test_chat_template_renders() -> None:
    tok = build_tiny_tokenizer()
    messages = [
        {"role": "user", "content": "How do I knit?"},
        {"role": "assistant", "content": "Start small."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\nHow do I knit?<|end|>\n<|assistant|>\nStart small.<|end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nHow do I knit?<|end|>\n<|assistant|>\n"
