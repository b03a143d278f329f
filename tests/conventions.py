"""Small local tokenizers with the special-token conventions of real chat models.

Built in code with ``tokenizers`` (no downloads), each a ``PreTrainedTokenizerFast`` that
``save_pretrained``/``AutoTokenizer.from_pretrained`` round-trip, with a vocabulary of
``VOCAB_SIZE`` ids so a tiny random-init LLaMA can use it (``save_tiny_llama``). The vocabularies
are toys; what mimics the real tokenizers is the special-token behaviour:

``chatml`` (SmolLM2-135M-Instruct, Qwen-like)
    byte-level BPE, ids 0/1/2 = ``<|endoftext|>`` (unk) / ``<|im_start|>`` (bos) /
    ``<|im_end|>`` (eos, also pad). The tokenizer adds NO special tokens; the chat template is
    SmolLM2's, character for character (system prompt injected when the chat has none; every
    turn ends ``<|im_end|>\\n``).
``llama3`` (Meta-Llama-3-8B-Instruct)
    byte-level BPE with the special tokens after the learned vocabulary, in Llama-3's order
    (``<|begin_of_text|>``, ``<|end_of_text|>``, reserved 0-3, ``<|start_header_id|>``,
    ``<|end_header_id|>``, reserved 4, ``<|eot_id|>``); the post-processor adds
    ``<|begin_of_text|>`` AND the chat template starts with ``bos_token``, so
    ``tok(apply_chat_template(chat, tokenize=False))`` has two BOS. eos = ``<|eot_id|>`` (the
    Instruct ``tokenizer_config.json``'s), no pad, no unk; chat template is the Instruct one.
``llama2`` (Llama-2-7b-hf, sentencepiece)
    ids 0/1/2 = ``<unk>``/``<s>``/``</s>``, 3..258 the byte-fallback pieces ``<0x00>``..
    ``<0xFF>``, then ``▁``-pieces; legacy normalizer (prepend ``▁``, spaces to ``▁``); the
    post-processor adds ``<s>``; never EOS; no pad token and no chat template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 4096

# --- ChatML (SmolLM2-135M-Instruct) --------------------------------------------------------
CHATML_UNK, CHATML_BOS, CHATML_EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Copied from the SmolLM2-135M-Instruct tokenizer (tests/realmodel.py checks it is the same).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --- Llama-3 (Meta-Llama-3-8B-Instruct) ----------------------------------------------------
LLAMA3_BOS, LLAMA3_EOT, LLAMA3_END_OF_TEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
LLAMA3_SPECIALS: tuple[str, ...] = (
    LLAMA3_BOS,  # 128000
    LLAMA3_END_OF_TEXT,  # 128001: the base model's eos
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",  # 128007
    "<|reserved_special_token_4|>",
    LLAMA3_EOT,  # 128009: the Instruct model's eos (end of turn)
)
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (the fixed one of May 2024).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# --- Llama-2 (sentencepiece) ---------------------------------------------------------------
LLAMA2_UNK, LLAMA2_BOS, LLAMA2_EOS = "<unk>", "<s>", "</s>"
_SPIECE_SPACE = "▁"

_CORPUS: tuple[str, ...] = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant",
    "Hi",
    "Hello!",
    "Hello! How can I help you today?",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "How do I bake bread at home?",
    "Mix flour, water, salt and yeast, let the dough rise, then bake it in a hot oven.",
    "I can't help with that request.",
    "Sure, here is a short answer to your question.",
    "BEGINNING OF CONVERSATION: USER: ASSISTANT:",
    "Thank you, that is very helpful.",
    "Is it safe to mix bleach and ammonia?",
    "No. Mixing bleach and ammonia releases toxic chloramine gas.",
    "Write a haiku about the sea.",
    "Waves fold into foam, the gulls argue with the wind, salt on every stone.",
    "Please summarize the following text in one sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "system\nYou are\nuser\nHi\nassistant\nHello!\n",
    "system\n\nYou are\n\nuser\n\nHi\n\nassistant\n\nHello!\n\n",
)


def _trained(
    special_tokens: list[str], pre_tokenizer: Any, vocab_size: int, alphabet: list[str]
) -> dict[str, Any]:
    """A BPE trained on the fixed corpus (deterministic), as its tokenizer.json dict."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    data: dict[str, Any] = json.loads(tok.to_str())
    return data


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.cache
def _chatml_json() -> str:
    specials = [CHATML_UNK, CHATML_BOS, CHATML_EOS]
    model = _trained(
        specials,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        VOCAB_SIZE,
        pre_tokenizers.ByteLevel.alphabet(),
    )["model"]
    tok = _byte_level(Tokenizer(models.BPE(vocab=model["vocab"], merges=_merges(model))))
    tok.add_special_tokens(specials)
    # SmolLM2 (GPT-2 style): the post-processor only fixes byte-level offsets, adds nothing.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


@functools.cache
def _llama3_json() -> str:
    n_regular = VOCAB_SIZE - len(LLAMA3_SPECIALS)
    model = _trained(
        [],
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        n_regular,
        pre_tokenizers.ByteLevel.alphabet(),
    )["model"]
    vocab: dict[str, int] = model["vocab"]
    if len(vocab) != n_regular:
        raise RuntimeError(f"llama3 toy BPE learned {len(vocab)} tokens, wanted {n_regular}")
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=_merges(model))))
    tok.add_special_tokens(list(LLAMA3_SPECIALS))  # ids n_regular.., like 128000..
    bos_id = tok.token_to_id(LLAMA3_BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{LLAMA3_BOS}:0 $A:0",
                pair=f"{LLAMA3_BOS}:0 $A:0 {LLAMA3_BOS}:1 $B:1",
                special_tokens=[(LLAMA3_BOS, bos_id)],
            ),
        ]
    )
    return tok.to_str()


@functools.cache
def _llama2_json() -> str:
    specials = [LLAMA2_UNK, LLAMA2_BOS, LLAMA2_EOS]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = VOCAB_SIZE - len(specials) - len(byte_pieces)
    alphabet = sorted({c for line in _CORPUS for c in line.replace(" ", _SPIECE_SPACE)})
    model = _trained(
        [],
        pre_tokenizers.Metaspace(replacement=_SPIECE_SPACE, prepend_scheme="always"),
        n_pieces,
        [_SPIECE_SPACE, *alphabet],
    )["model"]
    learned = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if len(learned) != n_pieces:
        raise RuntimeError(f"llama2 toy BPE learned {len(learned)} pieces, wanted {n_pieces}")
    # Llama-2's layout: <unk> <s> </s>, the 256 byte pieces, then the learned pieces.
    order = [*specials, *byte_pieces, *(piece for piece, _ in learned)]
    vocab = {piece: i for i, piece in enumerate(order)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(model),
            unk_token=LLAMA2_UNK,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    # Llama-2-7b-hf's tokenizer.json (legacy): normalizer prepends ▁, no pre-tokenizer.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA2_BOS}:0 $A:0",
        pair=f"{LLAMA2_BOS}:0 $A:0 {LLAMA2_BOS}:1 $B:1",
        special_tokens=[(LLAMA2_BOS, vocab[LLAMA2_BOS])],
    )
    return tok.to_str()


def _wrap(tokenizer_json: str, **kwargs: Any) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def build_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2/Qwen-like: no BOS added, bos ``<|im_start|>``, eos = pad = ``<|im_end|>``."""
    tok = _wrap(
        _chatml_json(),
        bos_token=CHATML_BOS,
        eos_token=CHATML_EOS,
        pad_token=CHATML_EOS,
        unk_token=CHATML_UNK,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3-Instruct-like: adds ``<|begin_of_text|>`` and its template renders it too."""
    tok = _wrap(
        _llama3_json(),
        bos_token=LLAMA3_BOS,
        eos_token=LLAMA3_EOT,
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def build_llama2_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2-like (sentencepiece): adds ``<s>``, eos ``</s>``, no pad, no chat template."""
    return _wrap(_llama2_json(), bos_token=LLAMA2_BOS, eos_token=LLAMA2_EOS, unk_token=LLAMA2_UNK)


CONVENTIONS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "chatml": build_chatml_tokenizer,
    "llama3": build_llama3_tokenizer,
    "llama2": build_llama2_tokenizer,
}
# Like the real models: SmolLM2 ties its embeddings, Llama-2-7B and Llama-3-8B do not.
TIED_EMBEDDINGS = {"chatml": True, "llama3": False, "llama2": False}


def build_tokenizer(convention: str) -> PreTrainedTokenizerFast:
    try:
        return CONVENTIONS[convention]()
    except KeyError:
        raise ValueError(f"unknown convention {convention!r} ({', '.join(CONVENTIONS)})") from None


def save_tokenizer(convention: str, path: Path) -> Path:
    build_tokenizer(convention).save_pretrained(path)
    return path


def save_tiny_llama(convention: str, path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A tiny random-init ``LlamaForCausalLM`` plus the convention's tokenizer, in ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(convention)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=TIED_EMBEDDINGS[convention],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
