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
``gemma`` (gemma-3-*-it; the pipeline of the real Gemma-3-270M tokenizer, tests/realmodel.py)
    ids 0/1/2/3 = ``<pad>``/``<eos>``/``<bos>``/``<unk>``, then ``<mask>``,
    ``<start_of_turn>``, ``<end_of_turn>``, the 256 byte-fallback pieces and ``▁``-pieces;
    normalizer spaces to ``▁`` (no prefix ``▁``), the post-processor adds ``<bos>`` AND the
    chat template starts with ``bos_token``; eos ``<eos>``, pad ``<pad>`` (distinct); turns are
    ``<start_of_turn>user|model\n...<end_of_turn>\n``; the template is gemma-3-it's.
``qwen3`` (Qwen3-8B)
    byte-level BPE with ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and the
    non-special ``<think>``/``</think>`` after the learned vocabulary; no BOS token at all (the
    tokenizer adds nothing); ChatML whose template writes an empty ``<think>\n\n</think>\n\n``
    before the answer of the last assistant turn (Qwen3's reasoning format).
``mistral`` (Mistral-7B-Instruct-v0.3)
    ids 0/1/2 = ``<unk>``/``<s>``/``</s>``, 3/4 the control tokens ``[INST]``/``[/INST]`` (then
    the tool ones), byte-fallback pieces, ``▁``-pieces; Metaspace pre-tokenizer prepending ``▁``
    to the first piece only; the post-processor adds ``<s>`` AND the template starts with
    ``bos_token``; eos ``</s>``, no pad; ``<s>[INST] u[/INST] a</s>``.
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

# --- Gemma 3 (gemma-3-*-it) -----------------------------------------------------------------
GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = "<pad>", "<eos>", "<bos>", "<unk>"
GEMMA_SOT, GEMMA_EOT = "<start_of_turn>", "<end_of_turn>"
GEMMA_SPECIALS = (GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK, "<mask>", GEMMA_SOT, GEMMA_EOT)
# google/gemma-3-*-it tokenizer_config.json "chat_template", line for line (text-only paths
# and the image branch as published).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# --- Qwen3 (Qwen3-8B) ------------------------------------------------------------------------
QWEN_PAD, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_THINK, QWEN_END_THINK = "<think>", "</think>"
QWEN_SPECIALS = (QWEN_PAD, QWEN_IM_START, QWEN_IM_END)  # like 151643..151645
# Qwen/Qwen3-8B tokenizer_config.json "chat_template" (the release with the string checks on
# message.content), verbatim.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

# --- Mistral (Mistral-7B-Instruct-v0.3) --------------------------------------------------------
MISTRAL_UNK, MISTRAL_BOS, MISTRAL_EOS = "<unk>", "<s>", "</s>"
MISTRAL_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]")  # fmt: skip
# mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json "chat_template" (the one with tool
# use), verbatim.
MISTRAL_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{%- for message in loop_messages | rejectattr("role", "equalto", "tool") | rejectattr("role", "equalto", "tool_results") | selectattr("tool_calls", "undefined") %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
        {%- set tool = tool.function %}
        {{- '{"type": "function", "function": {' }}
        {%- for key, val in tool.items() if key != "return" %}
            {%- if val is string %}
            {{- '"' + key + '": "' + val + '"' }}
            {%- else %}
            {{- '"' + key + '": ' + val|tojson }}
            {%- endif %}
            {%- if not loop.last %}
            {{- ", " }}
            {%- endif %}
        {%- endfor %}
        {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "tool_calls" or message.tool_calls is defined %}
        {%- if message.tool_calls is defined %}
            {%- set tool_calls = message.tool_calls %}
        {%- else %}
            {%- set tool_calls = message.content %}
        {%- endif %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

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
# Added for the Gemma / Qwen3 / Mistral toys only (the older toys' vocabularies stay as they were).
_CORPUS_V2 = (*_CORPUS, "user\nHi\nmodel\nHello!\n", "Let me think about the reason.")


def _trained(
    special_tokens: list[str],
    pre_tokenizer: Any,
    vocab_size: int,
    alphabet: list[str],
    corpus: tuple[str, ...] = _CORPUS,
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
    tok.train_from_iterator(corpus * 4, trainer=trainer)
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


def _sentencepiece_layout(
    specials: tuple[str, ...], pre_tokenizer: Any, corpus: tuple[str, ...]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Sentencepiece-style ids: `specials`, the 256 byte-fallback pieces, then ▁-pieces learned
    from `corpus`, VOCAB_SIZE in all."""
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = VOCAB_SIZE - len(specials) - len(byte_pieces)
    alphabet = sorted({c for line in corpus for c in line.replace(" ", _SPIECE_SPACE)})
    model = _trained([], pre_tokenizer, n_pieces, [_SPIECE_SPACE, *alphabet], corpus)["model"]
    learned = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if len(learned) != n_pieces:
        raise RuntimeError(f"toy BPE learned {len(learned)} pieces, wanted {n_pieces}")
    order = [*specials, *byte_pieces, *(piece for piece, _ in learned)]
    vocab = {piece: i for i, piece in enumerate(order)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError("toy BPE learned a piece that is also a special or byte piece")
    return vocab, _merges(model)


@functools.cache
def _gemma_json() -> str:
    vocab, merges = _sentencepiece_layout(
        GEMMA_SPECIALS,
        pre_tokenizers.Metaspace(replacement=_SPIECE_SPACE, prepend_scheme="never"),
        _CORPUS_V2,
    )
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=GEMMA_UNK, byte_fallback=True, fuse_unk=True
        )
    )
    # Gemma 3's tokenizer.json: spaces to ▁ (no prefix ▁), split on spaces (none are left),
    # <bos> added by the post-processor.
    tok.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(list(GEMMA_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{GEMMA_BOS}:0 $A:0",
        pair=f"{GEMMA_BOS}:0 $A:0 {GEMMA_BOS}:1 $B:1",
        special_tokens=[(GEMMA_BOS, vocab[GEMMA_BOS])],
    )
    return tok.to_str()


@functools.cache
def _qwen3_json() -> str:
    added = [*QWEN_SPECIALS, QWEN_THINK, QWEN_END_THINK]
    n_regular = VOCAB_SIZE - len(added)
    model = _trained(
        [],
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        n_regular,
        pre_tokenizers.ByteLevel.alphabet(),
        _CORPUS_V2,
    )["model"]
    if len(model["vocab"]) != n_regular:
        raise RuntimeError(f"qwen3 toy BPE learned {len(model['vocab'])} tokens")
    tok = _byte_level(Tokenizer(models.BPE(vocab=model["vocab"], merges=_merges(model))))
    tok.add_special_tokens(list(QWEN_SPECIALS))  # after the learned vocabulary, like 151643..
    tok.add_tokens([QWEN_THINK, QWEN_END_THINK])  # Qwen3: added, but not special
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing
    return tok.to_str()


@functools.cache
def _mistral_json() -> str:
    specials = (MISTRAL_UNK, MISTRAL_BOS, MISTRAL_EOS, *MISTRAL_CONTROL)
    vocab, merges = _sentencepiece_layout(
        specials,
        pre_tokenizers.Metaspace(replacement=_SPIECE_SPACE, prepend_scheme="always"),
        _CORPUS_V2,
    )
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=MISTRAL_UNK, byte_fallback=True, fuse_unk=True
        )
    )
    # v0.3's tokenizer.json (legacy=False): no normalizer; Metaspace prepends ▁ to the first
    # piece of the text only, never after a special token.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPIECE_SPACE, prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(list(specials))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{MISTRAL_BOS}:0 $A:0",
        pair=f"{MISTRAL_BOS}:0 $A:0 {MISTRAL_BOS}:1 $B:1",
        special_tokens=[(MISTRAL_BOS, vocab[MISTRAL_BOS])],
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


def build_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """gemma-3-it-like: adds ``<bos>`` and its template renders it too; eos ``<eos>``, pad
    ``<pad>``."""
    tok = _wrap(
        _gemma_json(),
        bos_token=GEMMA_BOS,
        eos_token=GEMMA_EOS,
        pad_token=GEMMA_PAD,
        unk_token=GEMMA_UNK,
    )
    tok.chat_template = GEMMA3_TEMPLATE
    return tok


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3-like: no BOS token, eos ``<|im_end|>``, pad ``<|endoftext|>``, ChatML with
    ``<think>``."""
    tok = _wrap(_qwen3_json(), eos_token=QWEN_IM_END, pad_token=QWEN_PAD)
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def build_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral-7B-Instruct-v0.3-like: adds ``<s>`` and its template renders it too; eos
    ``</s>``; ``[INST]``/``[/INST]`` control tokens; no pad."""
    tok = _wrap(_mistral_json(), bos_token=MISTRAL_BOS, eos_token=MISTRAL_EOS,
                unk_token=MISTRAL_UNK)  # fmt: skip
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


CONVENTIONS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "chatml": build_chatml_tokenizer,
    "llama3": build_llama3_tokenizer,
    "llama2": build_llama2_tokenizer,
    "gemma": build_gemma_tokenizer,
    "qwen3": build_qwen3_tokenizer,
    "mistral": build_mistral_tokenizer,
}
# Like the real models: SmolLM2 and Gemma tie their embeddings, Llama-2/3, Qwen3-8B and Mistral
# do not.
TIED_EMBEDDINGS = {"chatml": True, "llama3": False, "llama2": False, "gemma": True,
                   "qwen3": False, "mistral": False}  # fmt: skip
# The architecture of each convention's tiny model (`save_tiny_model`).
MODEL_TYPES = {"chatml": "llama", "llama3": "llama", "llama2": "llama", "gemma": "gemma3_text",
               "qwen3": "qwen3", "mistral": "mistral"}  # fmt: skip


def build_tokenizer(convention: str) -> PreTrainedTokenizerFast:
    try:
        return CONVENTIONS[convention]()
    except KeyError:
        raise ValueError(f"unknown convention {convention!r} ({', '.join(CONVENTIONS)})") from None


def save_tokenizer(convention: str, path: Path) -> Path:
    build_tokenizer(convention).save_pretrained(path)
    return path


def save_tiny_model(convention: str, path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A tiny random-init causal LM of the convention's architecture (``MODEL_TYPES``: LLaMA,
    Gemma 3, Qwen3, Mistral; a sliding window of 8 where the architecture has one) plus the
    convention's tokenizer, in ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(convention)
    model_type = MODEL_TYPES[convention]
    extra: dict[str, Any] = {}
    if model_type != "llama":
        extra = {"sliding_window": 8, "head_dim": 2 * hidden_size // 4}
    if model_type == "gemma3_text":
        extra["layer_types"] = ["sliding_attention", "full_attention"]
    if model_type == "qwen3":
        extra |= {"use_sliding_window": True, "max_window_layers": 1}
    config = AutoConfig.for_model(
        model_type,
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
        **extra,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_llama(convention: str, path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """`save_tiny_model` of the LLaMA conventions (chatml, llama3, llama2)."""
    if MODEL_TYPES[convention] != "llama":
        raise ValueError(f"{convention} is not a LLaMA convention; use save_tiny_model")
    return save_tiny_model(convention, path, seed, hidden_size)
