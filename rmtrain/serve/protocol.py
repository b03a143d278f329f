"""The request bodies `rmtrain serve` accepts and the errors it answers with.

Three wire protocols, each matching the client that speaks it:

- ``POST /get_reward``: OpenRLHF's remote reward model (``--remote_rm_url``; its own
  ``openrlhf/cli/serve_rm.py`` and the client in ``openrlhf/utils/agent.py``):
  ``{"query": [text, ...], "prompts": [...], "labels": [...]}`` ->
  ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``. OpenRLHF reads ``rewards`` (the
  RL reward) and ``scores`` (dynamic filtering), and turns every ``extra_logs`` value into one
  logged number per query, so each value here is a list with one number per query.
- ``POST /classify``: vLLM's pooling API (``vllm/entrypoints/pooling/classify/protocol.py``),
  as verl's reward loop calls it: ``{"model", "input": text | [text, ...], "use_activation"}``
  (or ``"messages"``, vLLM's chat form) -> ``{"id", "object": "list", "created", "model",
  "data": [{"index", "label", "probs": [score], "num_classes": 1}], "usage"}``.
- ``POST /score``: rmtrain's own, taking conversations (rendered with the trained template).

Bodies are parsed strictly (``"true"`` is not a bool, ``3`` is not a string); unknown fields
are ignored, as vLLM does, so clients that send more (``user``, ``request_id``,
``truncate_prompt_tokens``) work. Every error is one JSON object in the OpenAI/vLLM shape,
``{"error": {"message", "type", "param", "code"}}``, whose message names the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class GetRewardRequest(_Body):
    """OpenRLHF: `query` holds prompt + response texts, special tokens included (the policy's
    chat template, as `tokenizer.decode(..., skip_special_tokens=False)` writes them).
    `prompts` and `labels` are accepted and checked for length, not used (a reward model
    scores the query alone)."""

    query: list[str]
    prompts: list[str | None] | None = None
    labels: list[Any] | None = None


class ClassifyRequest(_Body):
    """vLLM `/classify`: `input` (text or texts that carry the chat template) or `messages`
    (one conversation, rendered with the trained template). `use_activation` (`activation`
    in vLLM < 0.11.2, which verl still sends): true gives sigmoid(score), false or absent the
    raw score. `model` is echoed back, never checked; `add_special_tokens` is accepted and
    changes nothing (the BOS rule of `rmtrain.text.query_ids` applies either way)."""

    model: str | None = None
    input: str | list[str] | None = None
    messages: list[Message] | None = None
    use_activation: bool | None = None
    activation: bool | None = None
    add_special_tokens: bool | None = None


class ScoreRequest(_Body):
    """rmtrain's `/score`, one of: `messages` (one conversation ending with the assistant
    turn), `conversations` (several), `prompt` (a string, or the turns before the reply) with
    `response` (one reply) or `responses` (several replies to the same prompt: best-of-N)."""

    messages: list[Message] | None = None
    conversations: list[list[Message]] | None = None
    prompt: str | list[Message] | None = None
    response: str | None = None
    responses: list[str] | None = None


_FIELDS = {
    name
    for model in (Message, GetRewardRequest, ClassifyRequest, ScoreRequest)
    for name in model.model_fields
}


class ServeError(Exception):
    """A request the server answers with an error status and a message naming the field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {
            400: "BadRequestError",
            413: "RequestTooLargeError",
            422: "UnprocessableEntityError",
            503: "ServiceUnavailableError",
        }.get(self.status, "InternalServerError" if self.status >= 500 else "BadRequestError")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }


def _path(loc: Iterable[Any]) -> str:
    """A pydantic error location as the client wrote it (`messages[0].content`), without
    pydantic's union-member tags (`str`, `list[Message]`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out


def parse(model: type[_Body], body: bytes) -> Any:
    """The request body as `model`, or a :class:`ServeError`: 400 for a body that is not a
    JSON object, 422 naming every bad or missing field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            detail = next(e["msg"] for e in errors if e["type"] == "json_invalid")
            raise ServeError(400, f"the body is not valid JSON: {detail}") from None
        if any(not e["loc"] for e in errors):
            raise ServeError(400, "the body must be a JSON object") from None
        problems: dict[str, list[str]] = {}
        for e in errors:
            msg = "missing" if e["type"] == "missing" else e["msg"]
            problems.setdefault(_path(e["loc"]), [])
            if msg not in problems[_path(e["loc"])]:
                problems[_path(e["loc"])].append(msg)
        text = "; ".join(f"field '{p}': {' or '.join(m)}" for p, m in problems.items())
        raise ServeError(422, text, param=next(iter(problems))) from None
