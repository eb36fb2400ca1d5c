"""The shapes of OpenAI's completions and chat completions API, as far as dpbus serves it,
and how they map onto dpbus requests and answers.

Fields dpbus does not implement are refused with a 400 naming them when they would change
the answer (``n`` > 1, ``logprobs``, tools, ...); fields that change nothing here
(``user``, ``presence_penalty`` of 0, ...) are accepted and ignored, as clients send them.
Extensions: ``dp_rank`` (pin a DP group), ``top_k``, ``ignore_eos``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from dpbus.schemas.errors import ErrorCode
from dpbus.schemas.public import MAX_NEW_TOKENS_LIMIT

Text = Union[str, list[Any]]


class StreamOptions(Struct, omit_defaults=True):
    include_usage: bool = False


class Common(Struct, kw_only=True, omit_defaults=True):
    model: str = ""
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # dpbus extensions
    dp_rank: int | None = None
    top_k: int | None = None
    ignore_eos: bool | None = None


class CompletionRequest(Common, kw_only=True):
    prompt: Any = ""  # a string or a list of token ids (one prompt; lists of prompts are refused)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(Struct, omit_defaults=True):
    role: str
    content: Text | None = None
    name: str | None = None


class ChatRequest(Common, kw_only=True):
    messages: list[ChatMessage] = []
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None


class ApiError(Exception):
    """An answer in OpenAI's error shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# dpbus error code -> (HTTP status, OpenAI error type)
STATUS = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_DP_RANK: (400, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.WORKER_LOST: (503, "service_unavailable"),
    ErrorCode.PUBLISHER_LOST: (503, "service_unavailable"),
    ErrorCode.DIVERGED: (500, "server_error"),
    ErrorCode.TIMEOUT: (504, "timeout"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


def from_dpbus_error(code: ErrorCode, message: str) -> ApiError:
    status, kind = STATUS.get(code, (500, "server_error"))
    return ApiError(status, message, kind, code.value)


def decode(body: bytes, typ: type) -> Any:
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None


def refuse_unsupported(req: Common) -> None:
    """Options that would change the answer but dpbus does not implement: a clear 400."""
    unsupported = {
        "n": req.n != 1, "logprobs": req.logprobs not in (None, False, 0), "top_logprobs": req.top_logprobs is not None,
        "presence_penalty": req.presence_penalty != 0, "frequency_penalty": req.frequency_penalty != 0,
        "logit_bias": bool(req.logit_bias),
    }
    if isinstance(req, CompletionRequest):
        unsupported.update(echo=req.echo, suffix=bool(req.suffix))
    if isinstance(req, ChatRequest):
        unsupported.update(tools=bool(req.tools), response_format=req.response_format not in (None, {"type": "text"}))
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ApiError(400, f"dpbus does not support {', '.join(bad)} (only their defaults)", param=bad[0])


def stops_of(req: Common) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise ApiError(400, "at most 16 stop strings", param="stop")
    return [s for s in stop if s]


def sampling_of(req: Common, prompt_tokens: int, max_seq_len: int) -> dict:
    """The dpbus ``sampling`` of an OpenAI request. Without ``max_tokens`` the answer may
    fill the context, as OpenAI's API does."""
    room = max_seq_len - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context holds {max_seq_len}",
                       code="context_length_exceeded", param="messages" if isinstance(req, ChatRequest) else "prompt")
    wanted = req.max_completion_tokens or req.max_tokens
    out: dict[str, Any] = {"max_new_tokens": min(wanted or room, room, MAX_NEW_TOKENS_LIMIT),
                           "temperature": 1.0 if req.temperature is None else req.temperature}
    if req.top_p is not None:
        out["top_p"] = req.top_p
    if req.seed is not None:
        out["seed"] = req.seed % (1 << 31)
    if req.top_k is not None:
        out["top_k"] = req.top_k
    if req.ignore_eos is not None:
        out["ignore_eos"] = req.ignore_eos
    stops = stops_of(req)
    if stops:
        out["stop"] = stops
    return out


def prompt_of(req: CompletionRequest) -> str | list[int]:
    p = req.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return p
    raise ApiError(400, "prompt must be one non-empty string or one list of token ids", param="prompt")


def finish_reason(reason: str) -> str:
    return reason  # dpbus's length | stop | abort; OpenAI's clients know the first two


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, text: str, reason: str, use: dict, dp_rank: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": use, "dp_rank": dp_rank}


def completion_chunk(rid: str, model: str, created: int, text: str, reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason(reason) if reason else None}]}


def chat_body(rid: str, model: str, text: str, reason: str, use: dict, dp_rank: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": use, "dp_rank": dp_rank}


def chat_chunk(rid: str, model: str, created: int, delta: dict, reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason(reason) if reason else None}]}


def message_text(content: Text | None) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise ApiError(400, "only text content parts are supported", param="messages")
    return "".join(parts)
