"""The public contract: what clients publish on ``dpbus.generate`` / ``dpbus.abort``
and the answers they receive on their reply subject.

Answers are a tagged union on ``"type"``: any number of ``chunk`` then exactly one
terminal ``done`` or ``error``.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Union

import msgspec
from msgspec import Meta, Struct

from dpbus.schemas.errors import ErrorCode

MAX_NEW_TOKENS_LIMIT = 1 << 16
MAX_PROMPT_TOKENS_LIMIT = 1 << 20
TOKEN_ID = Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]
RID = Annotated[str, Meta(min_length=1, max_length=128)]


class FinishReason(str, Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"      # EOS or one of stop_token_ids
    ABORT = "abort"    # cancelled through dpbus.abort


class SamplingParams(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How to pick each next token. ``temperature`` 0 means greedy."""

    max_new_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS_LIMIT)] = 32
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Meta(ge=1e-6, le=1.0)] = 1.0  # smaller is 0 in float32 (greedy by accident)
    top_k: Annotated[int, Meta(ge=0, le=1 << 20)] = 0  # 0: no top-k cut
    seed: Annotated[int, Meta(ge=0, le=(1 << 31) - 1)] | None = None
    stop_token_ids: Annotated[list[TOKEN_ID], Meta(max_length=64)] = []
    # stop strings: generation ends when the text reaches one; it and what follows are not sent
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)] = []
    ignore_eos: bool = False


class GenerateRequest(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Published on ``dpbus.generate`` with a reply subject. Give ``text`` or ``input_ids``."""

    rid: RID | None = None
    text: str | None = None
    input_ids: Annotated[list[TOKEN_ID], Meta(max_length=MAX_PROMPT_TOKENS_LIMIT)] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = True
    dp_rank: int | None = None
    ack: bool = False
    resend: Annotated[int, Meta(ge=0, le=1000)] = 0


class AbortRequest(Struct, forbid_unknown_fields=True):
    """Published on ``dpbus.abort`` (with a reply subject for the acknowledgement).

    ``reply`` must be the reply subject the request itself was published with: it proves
    the sender owns the request (nobody else can read, so nobody else knows, a private
    inbox). An abort naming another reply subject is answered ``found: false``."""

    rid: RID
    reply: Annotated[str, Meta(min_length=1, max_length=512)]


class Timings(Struct, omit_defaults=True):
    queue_ms: float = 0.0        # accepted by ingest -> first scheduled
    ttft_ms: float = 0.0         # accepted by ingest -> first token
    total_ms: float = 0.0        # accepted by ingest -> terminal message


class Accepted(Struct, tag="accepted", tag_field="type"):
    """With ``ack`` in the request: sent before anything else, once a group holds the
    request (its answers will come; a copy or a retry with the same ``rid`` is not run
    again). A request that moves to another group before it runs gets another one from
    there. No ``accepted`` within a few seconds: the request may be lost before any group
    took it; a retry with the same ``rid`` is safe."""

    rid: str
    dp_rank: int
    position: int                # requests waiting ahead of it in that group's queue


class Chunk(Struct, tag="chunk", tag_field="type"):
    rid: str
    index: int                   # 0, 1, 2, ... per request
    token_ids: list[int]
    text: str


class Done(Struct, tag="done", tag_field="type", omit_defaults=True):
    rid: str
    dp_rank: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings = msgspec.field(default_factory=Timings)
    token_ids: list[int] | None = None  # the whole output, when stream is false
    text: str | None = None
    # set when prompt + max_new_tokens did not fit the context: the max_new_tokens used instead
    clamped_max_new_tokens: int | None = None


class Error(Struct, tag="error", tag_field="type", omit_defaults=True):
    code: ErrorCode
    message: str
    rid: str | None = None
    dp_rank: int | None = None
    retry_after_ms: int | None = None  # overloaded by this client's own share: try again after this long


class AbortAck(Struct, tag="abort", tag_field="type", omit_defaults=True):
    """The answer to ``dpbus.abort``: whether a group still had the request."""

    rid: str
    found: bool
    dp_rank: int | None = None


Answer = Union[Accepted, Chunk, Done, Error]
PUBLIC_MESSAGES = {
    "GenerateRequest": GenerateRequest,
    "AbortRequest": AbortRequest,
    "Accepted": Accepted,
    "Chunk": Chunk,
    "Done": Done,
    "Error": Error,
    "AbortAck": AbortAck,
}


def _default_of(f: msgspec.inspect.Field) -> str:
    if f.default is not msgspec.NODEFAULT:
        return "none" if f.default is None else msgspec.json.encode(f.default).decode()
    if f.default_factory is not msgspec.NODEFAULT:
        value = f.default_factory()
        return "(below)" if isinstance(value, Struct) else msgspec.json.encode(value).decode()
    return "required"


def _range_of(t: msgspec.inspect.Type) -> str:
    if isinstance(t, msgspec.inspect.UnionType):
        return " ".join(r for r in (_range_of(u) for u in t.types) if r)
    if isinstance(t, msgspec.inspect.ListType):
        return f"at most {t.max_length} items" if t.max_length is not None else ""
    if isinstance(t, msgspec.inspect.StrType) and t.max_length is not None:
        return f"{t.min_length or 0} to {t.max_length} characters"
    low = [f"{op} {getattr(t, name)}" for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
           if getattr(t, name, None) is not None]
    return ", ".join(low)


FIELD_NOTES = {
    "rid": "assigned by ingest when missing", "text": "the prompt (give `text` or `input_ids`)",
    "input_ids": "the prompt as token ids", "stream": "false: only the terminal message, with the whole output",
    "dp_rank": "pin the request to one group", "max_new_tokens": "clamped to what the context leaves (see `done`)",
    "temperature": "0: greedy", "top_p": "nucleus sampling cut", "top_k": "0: no top-k cut",
    "seed": "none: a fresh random seed per request", "stop_token_ids": "stop after one of these (it is included)",
    "ignore_eos": "keep going past the EOS token",
    "ack": "send `accepted` first, once a group holds the request",
    "resend": "which copy this is under the retry rule (0: the first send): a copy never runs as a new attempt",
    "stop": "stop strings: the answer ends before the first one (not included)",
}


def wire_defaults_table() -> str:
    """docs/wire-contract.md's table of request fields, their defaults and bounds, made from
    the Structs above (what a field omitted from a request means)."""
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for prefix, typ in (("", GenerateRequest), ("sampling.", SamplingParams)):
        for f in msgspec.inspect.type_info(typ).fields:
            if isinstance(f.type, msgspec.inspect.StructType):
                continue
            rows.append(f"| `{prefix}{f.name}` | `{_default_of(f)}` | {_range_of(f.type)} | "
                        f"{FIELD_NOTES.get(f.name, '')} |")
    return "\n".join(rows) + "\n"
