"""The one owner of text formatting: how a conversation becomes the text a score model reads.

Training, evaluation, `rmtrain score` and anyone loading an export with plain transformers render
text the same way, because there is one rule: **a conversation is rendered with the chat template
the export carries** (`tokenizer.apply_chat_template(messages, tokenize=False)`), and that
template is decided once, when the tokenizer is loaded for training (:func:`trained_template`):

- ``safe_rlhf``: safe-rlhf's dialogue format, ``BEGINNING OF CONVERSATION: USER: {prompt}
  ASSISTANT:{response}`` + EOS after each assistant turn (:data:`SAFE_RLHF_CHAT_TEMPLATE`);
- ``chat``: the tokenizer's own chat template, with EOS appended when its rendering of a finished
  conversation does not already end a turn with EOS.

`tokenizer(text)` gives the ids the model scores, for every tokenizer convention:

- ChatML (SmolLM2, Qwen; no BOS added, pad == EOS): the render untouched, ending
  `<|im_end|>\n`; read at that final `\n`.
- Llama-3 (BOS in the template and added by the tokenizer): the render without its leading BOS
  string; read at `<|eot_id|>`.
- Llama-2 / sentencepiece (BOS added, no chat template, so `safe_rlhf`):
  `BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:{r}</s>`; read at `</s>`.
- Gemma (BOS in the template and added; turns end `<end_of_turn>\n`, EOS `<eos>`): the render
  without its leading `<bos>`, then `<eos>`; read at `<eos>`.
- Qwen3 (ChatML without a BOS token): the render untouched, the scored turn with the template's
  `<think>\n\n</think>\n\n` block; read at the final `\n`.
- Mistral (`[INST]`, BOS in the template and added): `[INST] {p}[/INST] {r}</s>`; read at `</s>`.
- rmtrain's tiny tokenizer (Llama-3-like, turns end with `<|end|>`): the render without its
  leading BOS, then EOS; read at `</s>`.

The template's leading BOS string is removed only when the tokenizer adds BOS itself (otherwise
it is not a BOS at all: ChatML's `<|im_start|>` opens every turn), so BOS is never doubled or
dropped. EOS is appended only when the render does not already end with EOS (trailing
whitespace aside), so it is never doubled. The read-out is the last token, which is never the
pad token (rmtrain gives every tokenizer a pad distinct from EOS).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rmtrain.errors import TextError

TEMPLATES = ("safe_rlhf", "chat")
ROLES = ("system", "user", "assistant")

# safe-rlhf's prompt format (one exchange), for documentation and the tiny tokenizer's corpus.
SAFE_RLHF_FORMAT = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
# The same format as a chat template, EOS after each assistant turn (multi-turn as safe-rlhf
# writes it: USER: u1 ASSISTANT:a1<eos>USER: u2 ASSISTANT:a2<eos>).
SAFE_RLHF_CHAT_TEMPLATE = (
    "{{ 'BEGINNING OF CONVERSATION: ' }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('the safe-rlhf format needs alternating user/assistant turns, "
    "starting with user') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ASSISTANT:' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}"
    "{% if not message['content'].endswith(eos_token) %}{{ eos_token }}{% endif %}"
    "{% else %}{{ raise_exception('the safe-rlhf format has only user and assistant turns') }}"
    "{% endif %}{% endfor %}"
)
_EOS_SUFFIX = "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


def exchange(prompt: str, response: str) -> list[dict[str, str]]:
    """One user turn and one assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def trained_template(tokenizer: Any, template: str) -> str:
    """The chat template a run trains with, and its export carries (EOS included)."""
    if template == "safe_rlhf":
        return SAFE_RLHF_CHAT_TEMPLATE
    if template != "chat":
        raise TextError(f"unknown template {template!r} ({', '.join(TEMPLATES)})")
    base = getattr(tokenizer, "chat_template", None)
    if not isinstance(base, str) or not base:
        raise TextError(
            f"data.template=chat: tokenizer {tokenizer.name_or_path!r} has no chat_template "
            f"(a base model); use data.template=safe_rlhf, which works with any tokenizer"
        )
    if _EOS_SUFFIX in base:
        return base
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False, chat_template=base)
    except Exception:
        return base + _EOS_SUFFIX
    return base if ends_turn(tokenizer, text) else base + _EOS_SUFFIX


def ends_turn(tokenizer: Any, text: str) -> bool:
    """Whether `text` already ends with EOS (ChatML's `<|im_end|>\n` counts)."""
    eos = tokenizer.eos_token
    return bool(eos) and text.rstrip().endswith(eos)


_ADDS_BOS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama-2/3 do, ChatML not)."""
    if tokenizer not in _ADDS_BOS:
        bos, ids = tokenizer.bos_token_id, tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        _ADDS_BOS[tokenizer] = bos is not None and ids[:1] == [bos] and len(ids) > len(plain)
    return _ADDS_BOS[tokenizer]


def use_template(tokenizer: Any, template: str) -> None:
    """Give `tokenizer` the chat template of `template` (done once, when training loads it)."""
    tokenizer.chat_template = trained_template(tokenizer, template)


def check_turns(messages: Any) -> str | None:
    """The problem with a list of turns, or None: a non-empty list of {role, content} messages
    (a prompt: it need not end with the assistant)."""
    if not isinstance(messages, list) or not messages:
        return f"expected a non-empty list of {{role, content}} messages, got {messages!r:.60}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"item {i}: expected an object with role and content, got {m!r:.40}"
        if m.get("role") not in ROLES:
            return f"item {i}: role must be one of {', '.join(ROLES)}, got {m.get('role')!r:.40}"
        if not isinstance(m.get("content"), str):
            return f"item {i}: content must be a string, got {m.get('content')!r:.40}"
    return None


def check_messages(messages: Any) -> str | None:
    """The problem with a conversation to score, or None: turns (:func:`check_turns`) ending
    with the assistant turn being scored."""
    if problem := check_turns(messages):
        return problem
    if messages[-1]["role"] != "assistant":
        return "the last turn must be the assistant's (the response being scored)"
    return None


def render(
    tokenizer: Any, messages: Sequence[dict[str, str]], chat_template: str | None = None
) -> str:
    """THE text of a conversation: `tokenizer(text)` gives the ids the model scores.

    `chat_template`: a trained template (:func:`trained_template`); by default the tokenizer's
    own, which is the trained one for a training tokenizer (:func:`use_template`) and an export's.
    """
    problem = check_messages(list(messages))
    if problem:
        raise TextError(problem)
    if not tokenizer.eos_token:
        raise TextError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise TextError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template")
    try:
        text: str = tokenizer.apply_chat_template(
            list(messages), tokenize=False, chat_template=template
        )
    except Exception as exc:  # jinja's raise_exception, a template that rejects the roles
        raise TextError(f"the chat template cannot render this conversation: {exc}") from exc
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]  # the tokenizer adds it back
    return text if ends_turn(tokenizer, text) else text + tokenizer.eos_token


def user_recipe(tokenizer: Any) -> str:
    """The Python line that turns `chat` into the scored text with plain transformers, for a
    tokenizer carrying its trained template: `tokenizer(text)` (or a pipeline) then gives the
    trained ids. FsfairX's `.replace(tok.bos_token, "")` where the template writes a BOS the
    tokenizer adds again (Llama-3); the render untouched otherwise (ChatML, safe_rlhf)."""
    render_call = "tok.apply_chat_template(chat, tokenize=False)"
    probe = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    bos = tokenizer.bos_token
    if bos and probe.startswith(bos) and adds_bos(tokenizer):
        return f'text = {render_call}.replace(tok.bos_token, "")'
    return f"text = {render_call}"


def format_text(tokenizer: Any, template: str, prompt: str, response: str) -> str:
    """The text of one (prompt, response) exchange in `template` ("safe_rlhf" or "chat")."""
    return render(tokenizer, exchange(prompt, response), trained_template(tokenizer, template))


def describe(template: str) -> str:
    """How a template's text looks, for model cards and export metadata."""
    if template == "safe_rlhf":
        return SAFE_RLHF_FORMAT
    return "tokenizer chat template"


# --------------------------------------------------------------------------- templated queries

# The assistant content of the probe conversation `query_frame` renders: a text no template
# rewrites (no surrounding whitespace to trim), found again in the render to split it.
_FRAME_PROBE = "rmtrain frame probe"


@dataclass(frozen=True)
class QueryFrame:
    """What the trained ids of every conversation have around it, for one tokenizer and
    trained template: ``lead``, the ids before the rendered text (BOS, whether the template
    writes it or the tokenizer adds it; empty when there is none), and ``tail``, the ids after
    the last assistant turn's content (its end-of-turn token and what follows it: ChatML's
    newline, an appended EOS)."""

    lead: tuple[int, ...]
    tail: tuple[int, ...]
    bos_id: int | None
    eos_id: int | None


def query_frame(tokenizer: Any, chat_template: str | None = None) -> QueryFrame:
    """The :class:`QueryFrame` of `tokenizer` with its trained template (``chat_template``, by
    default the tokenizer's own), read off the trained ids of a probe conversation."""
    text = render(tokenizer, exchange("x", _FRAME_PROBE), chat_template)
    ids = list(tokenizer(text)["input_ids"])
    at = text.rfind(_FRAME_PROBE)
    if at < 0:
        raise TextError("the chat template rewrites the assistant's content; cannot frame it")
    tail = list(tokenizer(text[at + len(_FRAME_PROBE) :], add_special_tokens=False)["input_ids"])
    if not tail or ids[-len(tail) :] != tail:
        raise TextError(
            f"tokenizer {tokenizer.name_or_path!r}: the closing text after a reply does not "
            "tokenize on its own as it does after the reply; cannot frame templated queries"
        )
    bos = tokenizer.bos_token_id
    lead = (bos,) if bos is not None and ids[:1] == [bos] else ()
    return QueryFrame(lead, tuple(tail), bos, tokenizer.eos_token_id)


def query_ids(tokenizer: Any, text: str, frame: QueryFrame | None = None) -> list[int]:
    """The ids training used for a conversation sent as text that already carries the chat
    template, the way RL frameworks send it (OpenRLHF's `query`, verl's `/classify` input).

    Such a text is right in the middle (it is the rendered conversation) but may be off at
    both ends, depending on who rendered it and how. The rule, one for every tokenizer
    convention (`frame`: :func:`query_frame`, computed once per tokenizer):

    1. the text is tokenized as it is, adding no special tokens;
    2. **start**: every leading BOS id is dropped and the frame's ``lead`` put in front. A BOS
       the tokenizer would add again (Llama-3's ``<|begin_of_text|>`` written by the template)
       is therefore not doubled, and one a client stripped (verl strips ``bos_token`` from
       every render, which for ChatML is the first ``<|im_start|>``) is restored;
    3. **end**: when the ids end with the first k ids of the frame's ``tail`` (k >= 1: the
       end-of-turn token, perhaps with what follows it), the rest of the tail is appended
       (ChatML's ``\n`` after a generated ``<|im_end|>``); when they end with none of it (a
       reply cut at the generation limit), the whole tail is appended, after dropping a final
       EOS that is not the end-of-turn token (a generation that stopped on EOS where the
       template closes turns with another token, as rmtrain's tiny tokenizer does).

    Anything else in the text is scored as sent: a query rendered with another template than
    the trained one, or by a template that renders a finished reply differently from the one it
    prompts for (an empty thinking block in past turns), scores differently (send messages to
    `/score` instead).
    """
    frame = frame or query_frame(tokenizer)
    # Leading BOS strings go before tokenizing: a sentencepiece tokenizer that prefixes "▁" only
    # to the text's first piece (Mistral v0.3's Metaspace "first") would otherwise tokenize what
    # follows a written BOS without it.
    bos_text = tokenizer.bos_token
    while bos_text and text.startswith(bos_text):
        text = text[len(bos_text) :]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    start = 0
    while frame.bos_id is not None and start < len(ids) and ids[start] == frame.bos_id:
        start += 1
    ids = [*frame.lead, *ids[start:]]
    tail = list(frame.tail)
    for k in range(len(tail), 0, -1):
        if ids[len(ids) - k :] == tail[:k] and len(ids) - k >= len(frame.lead):
            return ids + tail[k:]
    if frame.eos_id is not None and len(ids) > len(frame.lead) and ids[-1] == frame.eos_id:
        ids.pop()
    return ids + tail
