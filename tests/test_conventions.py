"""The convention tokenizers (tests/conventions.py) and the real SmolLM2 model (tests/realmodel.py)
have the special-token behaviour they claim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conventions import (
    CHATML_TEMPLATE,
    CONVENTIONS,
    GEMMA3_TEMPLATE,
    GEMMA_EOT,
    GEMMA_SOT,
    GEMMA_SPECIALS,
    LLAMA3_SPECIALS,
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    QWEN3_TEMPLATE,
    QWEN_END_THINK,
    QWEN_IM_END,
    QWEN_PAD,
    QWEN_THINK,
    VOCAB_SIZE,
    build_chatml_tokenizer,
    build_gemma_tokenizer,
    build_llama2_tokenizer,
    build_llama3_tokenizer,
    build_mistral_tokenizer,
    build_qwen3_tokenizer,
    build_tokenizer,
    save_tiny_model,
)
from realmodel import (
    BOS_ID,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_ID,
    EOS_TOKEN,
    NUM_PARAMETERS,
    PAD_ID,
    PAD_TOKEN,
    UNK_ID,
    UNK_TOKEN,
)
from realmodel import (
    VOCAB_SIZE as SMOLLM2_VOCAB,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)
CHATML_RENDER = (
    f"{SMOLLM2_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
)
LLAMA3_RENDER = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
)

GEMMA_RENDER = (
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
)
QWEN3_RENDER = (
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
)
MISTRAL_RENDER = "<s>[INST] Hi[/INST] Hello!</s>"


def ids(tok: Any, text: str, special: bool = True) -> list[int]:
    out: list[int] = tok(text, add_special_tokens=special)["input_ids"]
    return out


def chat_ids(tok: Any, chat: list[dict[str, str]]) -> list[int]:
    """``apply_chat_template(tokenize=True)``: a BatchEncoding in transformers 5."""
    out: list[int] = tok.apply_chat_template(chat)["input_ids"]
    return out


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_round_trips_through_save_pretrained(name: str, tmp_path: Path) -> None:
    tok = build_tokenizer(name)
    assert len(tok) == VOCAB_SIZE
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(again, attr) == getattr(tok, attr), attr
    text = "Hello there, é ☃!"
    assert ids(again, text) == ids(tok, text)
    assert again.decode(ids(again, text), skip_special_tokens=True) == text


def test_builders_are_deterministic() -> None:
    from conventions import _chatml_json

    first = build_chatml_tokenizer().backend_tokenizer.to_str()
    _chatml_json.cache_clear()
    assert build_chatml_tokenizer().backend_tokenizer.to_str() == first


def test_chatml_like_smollm2() -> None:
    tok = build_chatml_tokenizer()
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert ids(tok, "Hi") == ids(tok, "Hi", special=False)  # adds no BOS (nor EOS)
    assert tok.chat_template == CHATML_TEMPLATE == CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == CHATML_RENDER
    plain = ids(tok, text, special=False)
    assert ids(tok, text) == plain == chat_ids(tok, CHAT)
    assert plain[0] == 1 and plain.count(1) == 3  # <|im_start|> opens each of the three turns
    assert plain[-2:] == [2, tok.convert_tokens_to_ids("Ċ")]  # ... <|im_end|> \n
    # The FsfairX recipe (.replace(bos_token, "")) deletes every turn opener here.
    assert 1 not in ids(tok, text.replace(tok.bos_token, ""))


def test_llama3_like_instruct() -> None:
    tok = build_llama3_tokenizer()
    first = VOCAB_SIZE - len(LLAMA3_SPECIALS)
    assert [tok.convert_tokens_to_ids(t) for t in LLAMA3_SPECIALS] == list(range(first, VOCAB_SIZE))
    bos, eot = first, VOCAB_SIZE - 1  # like 128000 and 128009
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
        "<|begin_of_text|>",
        bos,
        "<|eot_id|>",
        eot,
    )
    assert tok.pad_token is None and tok.unk_token is None
    assert ids(tok, "Hi") == [bos, *ids(tok, "Hi", special=False)]  # the tokenizer adds BOS
    assert tok.chat_template == LLAMA3_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == LLAMA3_RENDER
    naive, plain = ids(tok, text), ids(tok, text, special=False)
    assert naive[:2] == [bos, bos] and naive[1:] == plain  # the double BOS
    assert plain.count(bos) == 1 and plain[-1] == eot and plain.count(eot) == 2
    assert chat_ids(tok, CHAT) == plain
    # The FsfairX recipe gives the same ids as add_special_tokens=False.
    assert ids(tok, text.replace(tok.bos_token, "")) == plain


def test_llama2_like_sentencepiece() -> None:
    tok = build_llama2_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert tok.pad_token is None and tok.chat_template is None
    assert tok.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    plain = ids(tok, "Hi", special=False)
    assert ids(tok, "Hi") == [1, *plain]  # BOS added, EOS never
    assert tok.convert_ids_to_tokens(plain)[0].startswith("▁")  # sentencepiece's prefix space
    assert ids(tok, "☃", special=False)[-3:] == [3 + 0xE2, 3 + 0x98, 3 + 0x83]  # byte fallback
    assert ids(tok, "Hello!</s>")[-1] == 2
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template(CHAT, tokenize=False)


def test_gemma_like_gemma3_it() -> None:
    tok = build_gemma_tokenizer()
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == GEMMA_SPECIALS[:4]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    sot, eot = tok.convert_tokens_to_ids([GEMMA_SOT, GEMMA_EOT])
    assert ids(tok, "Hi") == [2, *ids(tok, "Hi", special=False)]  # the tokenizer adds <bos>
    assert not tok.convert_ids_to_tokens(ids(tok, "Hi", special=False))[0].startswith("▁")
    assert tok.chat_template == GEMMA3_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == GEMMA_RENDER
    naive, plain = ids(tok, text), ids(tok, text, special=False)
    assert naive[:2] == [2, 2] and naive[1:] == plain  # the double BOS, as Llama-3
    assert plain.count(sot) == plain.count(eot) == 2 and 1 not in plain  # no <eos> in a render
    assert chat_ids(tok, CHAT) == plain
    system = [{"role": "system", "content": "Be brief."}, *CHAT]  # folded into the user turn
    assert tok.apply_chat_template(system, tokenize=False) == GEMMA_RENDER.replace(
        "user\nHi", "user\nBe brief.\n\nHi"
    )


def test_qwen3_like_qwen3() -> None:
    tok = build_qwen3_tokenizer()
    assert tok.bos_token is None and tok.unk_token is None
    assert (tok.eos_token, tok.pad_token) == (QWEN_IM_END, QWEN_PAD)
    assert ids(tok, "Hi") == ids(tok, "Hi", special=False)  # adds nothing
    think = tok.convert_tokens_to_ids([QWEN_THINK, QWEN_END_THINK])
    assert think == [VOCAB_SIZE - 2, VOCAB_SIZE - 1] and not {QWEN_THINK} & set(
        tok.all_special_tokens
    )  # added, not special
    assert tok.chat_template == QWEN3_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == QWEN3_RENDER  # no default system prompt; an empty think block
    assert ids(tok, text) == chat_ids(tok, CHAT) and ids(tok, text).count(think[0]) == 1
    # reasoning kept only in the last assistant turn (after the last user query)
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greet</think>Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>\nwave\n</think>\n\nBye!"},
    ]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nwave\n</think>\n\nBye!<|im_end|>\n"
    )


def test_mistral_like_v03() -> None:
    tok = build_mistral_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["[INST]", "[/INST]"]) == [3, 4]
    assert tok.pad_token is None
    assert ids(tok, "Hi") == [1, *ids(tok, "Hi", special=False)]
    assert tok.convert_ids_to_tokens(ids(tok, "Hi", special=False))[0].startswith("▁")
    assert tok.chat_template == MISTRAL_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == MISTRAL_RENDER
    naive, plain = ids(tok, text), ids(tok, text, special=False)
    assert naive[:2] == [1, 1] and naive[1:] == plain and plain[-1] == 2 and plain.count(2) == 1
    assert chat_ids(tok, CHAT) == plain
    # the space after a control token becomes one ▁, none is added (Metaspace "first")
    pieces = tok.convert_ids_to_tokens(plain)
    assert "".join(pieces[2 : pieces.index("[/INST]")]) == "▁Hi"


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_tiny_model_uses_the_tokenizer(name: str, tmp_path: Path) -> None:
    save_tiny_model(name, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tok) == VOCAB_SIZE
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    texts = ["Hi", "Hello there!"] if tok.pad_token else ["Hello there!"]  # no pad: one text
    batch = tok(texts, padding=bool(tok.pad_token), return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == VOCAB_SIZE and torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_is_a_plain_llama_with_its_tokenizer(smollm2: Path) -> None:
    tok: Any = AutoTokenizer.from_pretrained(smollm2)
    model: Any = AutoModelForCausalLM.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.num_parameters() == NUM_PARAMETERS
    assert len(tok) == model.config.vocab_size == SMOLLM2_VOCAB
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
        UNK_TOKEN,
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
        UNK_ID,
    )
    assert ids(tok, "Hi") == ids(tok, "Hi", special=False) == [26843]  # no BOS added
    assert tok.chat_template == CHAT_TEMPLATE == CHATML_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == CHATML_RENDER
    assert ids(tok, text)[-3:] == [17, EOS_ID, 198]  # "!" <|im_end|> "\n"

    prompt: Any = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
