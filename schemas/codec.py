"""Decoding and encoding of public messages, in JSON or msgpack.

A body whose first significant byte is ``{`` is JSON; a msgpack map marker means
msgpack. The answer goes back in the request's encoding. Every failure becomes a
``DecodeError`` whose message says precisely what was wrong, ready for an ``error``
answer.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

import msgspec

from dpbus.schemas.errors import ErrorCode
from dpbus.schemas.public import AbortRequest, Answer, GenerateRequest

T = TypeVar("T")
MAX_BODY_BYTES = 4 << 20
_WS = b" \t\r\n"


class Encoding(str, Enum):
    JSON = "json"
    MSGPACK = "msgpack"


class DecodeError(ValueError):
    """A body that is not a valid message. ``code`` is the ErrorCode to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST):
        super().__init__(message)
        self.code = code
        self.message = message


def sniff_encoding(body: bytes) -> Encoding:
    """msgpack when the body starts with a msgpack map marker, JSON otherwise."""
    if body:
        b0 = body[0]
        if 0x80 <= b0 <= 0x8F or b0 in (0xDE, 0xDF):
            return Encoding.MSGPACK
    return Encoding.JSON


_json_decoders: dict[type, msgspec.json.Decoder] = {}
_mp_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_json_enc = msgspec.json.Encoder()
_mp_enc = msgspec.msgpack.Encoder()


def _decode(body: bytes, typ: type[T]) -> tuple[T, Encoding]:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise DecodeError(f"body must be bytes, got {type(body).__name__}")
    if len(body) > MAX_BODY_BYTES:
        raise DecodeError(f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    enc = sniff_encoding(body)
    if enc is Encoding.JSON:
        stripped = bytes(body).lstrip(_WS)
        if not stripped:
            raise DecodeError("empty body: send a JSON object or a msgpack map")
        if not stripped.startswith(b"{"):
            raise DecodeError(
                f"body must be a JSON object (starting with '{{') or a msgpack map; it starts with {stripped[:8]!r}"
            )
        dec = _json_decoders.get(typ) or _json_decoders.setdefault(typ, msgspec.json.Decoder(typ))
    else:
        dec = _mp_decoders.get(typ) or _mp_decoders.setdefault(typ, msgspec.msgpack.Decoder(typ))
    try:
        return dec.decode(body), enc
    except msgspec.ValidationError as e:
        raise DecodeError(f"invalid {typ.__name__}: {e}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # invalid UTF-8 in a string
        raise DecodeError(f"malformed {enc.value} body: {e}") from None


def decode_request(body: bytes) -> tuple[GenerateRequest, Encoding]:
    """Decode and check a generate request (what the types cannot say is checked here)."""
    req, enc = _decode(body, GenerateRequest)
    if (req.text is None) == (req.input_ids is None):
        raise DecodeError("give exactly one of 'text' or 'input_ids'")
    if req.text is not None and not req.text:
        raise DecodeError("'text' is empty: the prompt needs at least one character")
    if req.input_ids is not None and not req.input_ids:
        raise DecodeError("'input_ids' is empty: the prompt needs at least one token")
    s = req.sampling
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(s, name)):
            raise DecodeError(f"sampling.{name} must be a finite number")
    if req.dp_rank is not None and req.dp_rank < 0:
        raise DecodeError(f"dp_rank must be >= 0, got {req.dp_rank}", ErrorCode.UNKNOWN_DP_RANK)
    return req, enc


def decode_abort(body: bytes) -> tuple[AbortRequest, Encoding]:
    return _decode(body, AbortRequest)


def encode_answer(msg: Any, enc: Encoding) -> bytes:
    return _json_enc.encode(msg) if enc is Encoding.JSON else _mp_enc.encode(msg)


_json_answer = msgspec.json.Decoder(Answer)
_mp_answer = msgspec.msgpack.Decoder(Answer)


def decode_answer(data: bytes) -> Any:
    """An answer (``accepted``, ``chunk``, ``done`` or ``error``) in either encoding."""
    return _json_answer.decode(data) if data[:1] == b"{" else _mp_answer.decode(data)


def recode_answer(data: bytes, enc: Encoding) -> bytes:
    """An encoded answer in the encoding ``enc`` (the same bytes when it is in it already)."""
    return data if sniff_encoding(data) is enc else encode_answer(decode_answer(data), enc)
