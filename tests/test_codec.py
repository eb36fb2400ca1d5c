"""The wire contract: JSON and msgpack bodies, tagged answers, precise decode errors."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpbus.schemas import (
    AbortAck,
    AbortRequest,
    Answer,
    Chunk,
    DecodeError,
    Done,
    Encoding,
    Error,
    ErrorCode,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    Timings,
    decode_abort,
    decode_request,
    encode_answer,
    sniff_encoding,
)
from dpbus.schemas.codec import MAX_BODY_BYTES

ENCODINGS = [Encoding.JSON, Encoding.MSGPACK]


def _encode(obj, enc: Encoding) -> bytes:
    return msgspec.json.encode(obj) if enc is Encoding.JSON else msgspec.msgpack.encode(obj)


def _raw(body: bytes, enc: Encoding):
    """Decode an encoded body without any schema: what a client in another language sees."""
    return json.loads(body.decode("utf-8")) if enc is Encoding.JSON else msgspec.msgpack.decode(body)


def _decode_error(body) -> DecodeError:
    with pytest.raises(DecodeError) as ei:
        decode_request(body)
    err = ei.value
    assert isinstance(err.code, ErrorCode)
    assert err.message == str(err)
    return err


# ---------------------------------------------------------------------------------------
# Round trips


FULL_REQUEST = GenerateRequest(
    rid="req-1",
    text="Hello, wörld ✓",
    sampling=SamplingParams(
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=1234,
        stop_token_ids=[2, 13],
        ignore_eos=True,
    ),
    stream=False,
    dp_rank=1,
)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_generate_request_round_trip_text(enc: Encoding) -> None:
    body = _encode(FULL_REQUEST, enc)
    assert sniff_encoding(body) is enc
    req, got_enc = decode_request(body)
    assert got_enc is enc
    assert req == FULL_REQUEST
    assert req.sampling.stop_token_ids == [2, 13] and req.sampling.seed == 1234 and req.sampling.top_k == 40


@pytest.mark.parametrize("enc", ENCODINGS)
def test_generate_request_round_trip_input_ids(enc: Encoding) -> None:
    orig = GenerateRequest(input_ids=[0, 5, (1 << 31) - 1], sampling=SamplingParams(temperature=0.0))
    req, got_enc = decode_request(_encode(orig, enc))
    assert got_enc is enc
    assert req == orig
    assert req.text is None and req.rid is None and req.dp_rank is None and req.stream is True


@pytest.mark.parametrize("enc", ENCODINGS)
def test_generate_request_from_plain_dict(enc: Encoding) -> None:
    # What a client in another language sends: a plain map with the documented field names.
    body = {
        "rid": "abc",
        "text": "hi",
        "sampling": {
            "max_new_tokens": 3,
            "temperature": 0.7,
            "top_p": 0.5,
            "top_k": 5,
            "seed": 9,
            "stop_token_ids": [1],
            "ignore_eos": False,
        },
        "stream": True,
        "dp_rank": 0,
    }
    req, got_enc = decode_request(_encode(body, enc))
    assert got_enc is enc
    assert (req.rid, req.text, req.stream, req.dp_rank) == ("abc", "hi", True, 0)
    s = req.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop_token_ids, s.ignore_eos) == (
        3, 0.7, 0.5, 5, 9, [1], False,
    )


@pytest.mark.parametrize("enc", ENCODINGS)
def test_defaults_when_only_text(enc: Encoding) -> None:
    req, _ = decode_request(_encode({"text": "x"}, enc))
    assert req.sampling == SamplingParams()
    assert req.sampling.max_new_tokens == 32 and req.sampling.temperature == 1.0 and req.sampling.top_p == 1.0


ANSWERS = [
    Chunk(rid="r1", index=0, token_ids=[1, 2, 3], text="abc"),
    Chunk(rid="r1", index=7, token_ids=[], text=""),
    Done(
        rid="r1",
        dp_rank=1,
        finish_reason=FinishReason.LENGTH,
        prompt_tokens=5,
        completion_tokens=3,
        timings=Timings(queue_ms=1.5, ttft_ms=2.25, total_ms=10.0),
    ),
    Done(
        rid="r2",
        dp_rank=0,
        finish_reason=FinishReason.STOP,
        prompt_tokens=1,
        completion_tokens=2,
        token_ids=[4, 5],
        text="de",
    ),
    Done(rid="r3", dp_rank=3, finish_reason=FinishReason.ABORT, prompt_tokens=1, completion_tokens=0),
    Error(code=ErrorCode.OVERLOADED, message="queues are full", rid="r4", dp_rank=2),
    Error(code=ErrorCode.BAD_REQUEST, message="no rid known"),
    AbortAck(rid="r5", found=True, dp_rank=0),
    AbortAck(rid="r6", found=False),
]
TAGS = {Chunk: "chunk", Done: "done", Error: "error", AbortAck: "abort"}


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("msg", ANSWERS, ids=lambda m: type(m).__name__)
def test_answer_round_trip_with_type_tag(msg, enc: Encoding) -> None:
    body = encode_answer(msg, enc)
    assert isinstance(body, bytes)
    assert sniff_encoding(body) is enc
    raw = _raw(body, enc)
    assert isinstance(raw, dict)
    assert raw["type"] == TAGS[type(msg)]
    if msg.rid is not None:
        assert raw["rid"] == msg.rid
    else:
        assert "rid" not in raw  # omitted, not null
    typ = AbortAck if isinstance(msg, AbortAck) else Answer
    back = (msgspec.json.decode(body, type=typ) if enc is Encoding.JSON else msgspec.msgpack.decode(body, type=typ))
    assert back == msg
    assert type(back) is type(msg)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_answer_field_values_on_the_wire(enc: Encoding) -> None:
    done = _raw(encode_answer(ANSWERS[2], enc), enc)
    assert done["finish_reason"] == "length"
    assert (done["dp_rank"], done["prompt_tokens"], done["completion_tokens"]) == (1, 5, 3)
    assert done["timings"] == {"queue_ms": 1.5, "ttft_ms": 2.25, "total_ms": 10.0}
    err = _raw(encode_answer(ANSWERS[5], enc), enc)
    assert err == {"type": "error", "code": "overloaded", "message": "queues are full", "rid": "r4", "dp_rank": 2}
    chunk = _raw(encode_answer(ANSWERS[0], enc), enc)
    assert chunk == {"type": "chunk", "rid": "r1", "index": 0, "token_ids": [1, 2, 3], "text": "abc"}


@pytest.mark.parametrize("enc", ENCODINGS)
def test_abort_request_round_trip(enc: Encoding) -> None:
    req, got = decode_abort(_encode({"rid": "r-9", "reply": "_INBOX.me.1"}, enc))
    assert got is enc and req == AbortRequest(rid="r-9", reply="_INBOX.me.1")


@pytest.mark.parametrize(
    "body", [b"", b"{}", b'{"rid": ""}', b'{"rid": 5}', b'{"rid": "a", "x": 1}', b"[1]", b"{", b'{"rid": "\xff"}',
             b'{"rid": "a"}', b'{"rid": "a", "reply": ""}']
)
def test_abort_request_errors(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_abort(body)


# ---------------------------------------------------------------------------------------
# Encoding detection and answering in the request's encoding


@pytest.mark.parametrize(
    "body",
    [
        msgspec.msgpack.encode({"text": "a"}),                      # fixmap 0x81
        msgspec.msgpack.encode({}),                                 # fixmap 0x80
        msgspec.msgpack.encode({str(i): i for i in range(20)}),     # map16 0xde
        b"\xdf\x00\x00\x00\x00",                                    # map32 header
        bytes([0x8F]),
    ],
)
def test_sniff_msgpack_maps(body: bytes) -> None:
    assert sniff_encoding(body) is Encoding.MSGPACK


@pytest.mark.parametrize(
    "body",
    [b'{"text": "a"}', b'  \n{"text": "a"}', b"", b"[1]", b"\x91\x01", b"\xff\xfe\x00", b"hello", b"\xc0", b"\x90"],
)
def test_sniff_json_otherwise(body: bytes) -> None:
    assert sniff_encoding(body) is Encoding.JSON


def test_map16_request_is_msgpack() -> None:
    # Sixteen or more keys push msgpack from fixmap to map16 (0xde); still a request.
    body = b"\xde\x00\x01" + msgspec.msgpack.encode("text") + msgspec.msgpack.encode("hi")
    req, enc = decode_request(body)
    assert enc is Encoding.MSGPACK and req.text == "hi"


@pytest.mark.parametrize("enc", ENCODINGS)
def test_answer_goes_back_in_request_encoding(enc: Encoding) -> None:
    req, got = decode_request(_encode({"rid": "x", "input_ids": [1, 2]}, enc))
    for answer in (
        Chunk(rid=req.rid, index=0, token_ids=[3], text="c"),
        Done(rid=req.rid, dp_rank=0, finish_reason=FinishReason.LENGTH, prompt_tokens=2, completion_tokens=1),
        Error(code=ErrorCode.TIMEOUT, message="late", rid=req.rid),
    ):
        body = encode_answer(answer, got)
        assert sniff_encoding(body) is enc
        assert _raw(body, enc)["rid"] == "x"
    if enc is Encoding.JSON:
        assert encode_answer(Error(code=ErrorCode.TIMEOUT, message="m"), got).startswith(b"{")
    else:
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(encode_answer(Error(code=ErrorCode.TIMEOUT, message="m"), got))


def test_buffer_types_accepted() -> None:
    assert decode_request(bytearray(b'{"text": "a"}'))[0].text == "a"
    assert decode_request(memoryview(msgspec.msgpack.encode({"text": "b"})))[0].text == "b"


def test_non_bytes_body_is_decode_error() -> None:
    err = _decode_error('{"text": "a"}')  # a str, not bytes
    assert "bytes" in err.message and "str" in err.message


# ---------------------------------------------------------------------------------------
# Malformed bodies: DecodeError with a precise message


def test_empty_body() -> None:
    for body in (b"", b"   ", b"\n\t"):
        err = _decode_error(body)
        assert err.code is ErrorCode.BAD_REQUEST
        assert "empty" in err.message


def test_truncated_json() -> None:
    err = _decode_error(b"{")
    assert err.code is ErrorCode.BAD_REQUEST
    assert "malformed json" in err.message and "truncated" in err.message.lower()


def test_trailing_garbage_json() -> None:
    err = _decode_error(b'{"text": "a"} x')
    assert "malformed json" in err.message and "trailing" in err.message


def test_invalid_utf8_start() -> None:
    err = _decode_error(b"\xff\xfe\x00")
    assert err.code is ErrorCode.BAD_REQUEST
    assert "JSON object" in err.message and "msgpack map" in err.message
    assert "\\xff" in err.message  # shows what it starts with


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "\xff"}',                    # invalid UTF-8 inside a JSON string value
        b'{"te\xffxt": "a"}',                   # ... inside a JSON key
        b"\x81\xa4text\xa1\xff",                # ... inside a msgpack str value
        b"\x81\xa4te\xffxt\xa1a",               # ... inside a msgpack key
    ],
)
def test_invalid_utf8_inside_strings(body: bytes) -> None:
    err = _decode_error(body)
    assert err.code is ErrorCode.BAD_REQUEST
    assert "utf-8" in err.message.lower()


def test_json_array() -> None:
    err = _decode_error(b'[{"text": "a"}]')
    assert "JSON object" in err.message
    assert "b'[{" in err.message  # shows what it got


def test_text_wrong_type() -> None:
    err = _decode_error(b'{"text": 5}')
    assert "text" in err.message and "int" in err.message


def test_negative_max_new_tokens() -> None:
    err = _decode_error(b'{"text": "a", "sampling": {"max_new_tokens": -1}}')
    assert "sampling.max_new_tokens" in err.message and ">= 1" in err.message


def test_max_new_tokens_too_big() -> None:
    err = _decode_error(b'{"text": "a", "sampling": {"max_new_tokens": 100000000}}')
    assert "max_new_tokens" in err.message


def test_temperature_string() -> None:
    err = _decode_error(b'{"text": "a", "sampling": {"temperature": "hot"}}')
    assert "sampling.temperature" in err.message and "str" in err.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"text": "a", "bogus": 1}', "bogus"),
        (b'{"text": "a", "sampling": {"tempurature": 0.5}}', "tempurature"),
        (b'{"text": "a", "max_tokens": 5}', "max_tokens"),
    ],
)
def test_unknown_field(body: bytes, field: str) -> None:
    err = _decode_error(body)
    assert err.code is ErrorCode.BAD_REQUEST
    assert field in err.message and "unknown" in err.message.lower()


def test_unknown_field_msgpack() -> None:
    err = _decode_error(msgspec.msgpack.encode({"text": "a", "prompt": "b"}))
    assert "prompt" in err.message and "unknown" in err.message.lower()


@pytest.mark.parametrize("enc", ENCODINGS)
def test_both_text_and_input_ids(enc: Encoding) -> None:
    err = _decode_error(_encode({"text": "a", "input_ids": [1]}, enc))
    assert "text" in err.message and "input_ids" in err.message and "exactly one" in err.message


@pytest.mark.parametrize("enc", ENCODINGS)
def test_neither_text_nor_input_ids(enc: Encoding) -> None:
    for body in ({}, {"rid": "r"}, {"text": None, "input_ids": None}):
        err = _decode_error(_encode(body, enc))
        assert "text" in err.message and "input_ids" in err.message


def test_empty_text() -> None:
    err = _decode_error(b'{"text": ""}')
    assert "text" in err.message and "empty" in err.message


def test_empty_input_ids() -> None:
    err = _decode_error(b'{"input_ids": []}')
    assert "input_ids" in err.message and "empty" in err.message


def test_negative_token_ids() -> None:
    err = _decode_error(b'{"input_ids": [1, -2]}')
    assert "input_ids[1]" in err.message and ">= 0" in err.message
    err = _decode_error(b'{"text": "a", "sampling": {"stop_token_ids": [-5]}}')
    assert "stop_token_ids" in err.message


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_in_msgpack(field: str, value: float) -> None:
    err = _decode_error(msgspec.msgpack.encode({"text": "a", "sampling": {field: value}}))
    assert err.code is ErrorCode.BAD_REQUEST
    assert field in err.message


def test_nan_in_json_is_rejected() -> None:
    err = _decode_error(b'{"text": "a", "sampling": {"temperature": NaN}}')
    assert "malformed json" in err.message
    err = _decode_error(b'{"text": "a", "sampling": {"temperature": 1e400}}')
    assert "temperature" in err.message


def test_body_over_size_limit() -> None:
    body = b'{"text": "a"}' + b" " * MAX_BODY_BYTES
    err = _decode_error(body)
    assert err.code is ErrorCode.BAD_REQUEST
    assert str(len(body)) in err.message and str(MAX_BODY_BYTES) in err.message
    with pytest.raises(DecodeError):
        decode_abort(b'{"rid": "a"}' + b" " * MAX_BODY_BYTES)


def test_body_at_size_limit_accepted() -> None:
    body = b'{"text": "a"}'
    body += b" " * (MAX_BODY_BYTES - len(body))
    assert len(body) == MAX_BODY_BYTES
    assert decode_request(body)[0].text == "a"


@pytest.mark.parametrize("enc", ENCODINGS)
def test_negative_dp_rank_is_unknown_dp_rank(enc: Encoding) -> None:
    err = _decode_error(_encode({"text": "a", "dp_rank": -1}, enc))
    assert err.code is ErrorCode.UNKNOWN_DP_RANK
    assert "dp_rank" in err.message and "-1" in err.message


def test_other_validation_errors() -> None:
    assert "rid" in _decode_error(b'{"rid": "", "text": "a"}').message
    assert "rid" in _decode_error(b'{"rid": "' + b"x" * 129 + b'", "text": "a"}').message
    assert "top_p" in _decode_error(b'{"text": "a", "sampling": {"top_p": 0}}').message
    # a top_p that float32 makes 0 (the sampler would keep nothing) is refused too
    assert "top_p" in _decode_error(b'{"text": "a", "sampling": {"top_p": 1e-46}}').message
    assert "stream" in _decode_error(b'{"text": "a", "stream": "yes"}').message
    assert "sampling" in _decode_error(b'{"text": "a", "sampling": 3}').message


# ---------------------------------------------------------------------------------------
# Fuzz: nothing but DecodeError, and accepted requests satisfy the checks

FIELDS = ["rid", "text", "input_ids", "sampling", "stream", "dp_rank", "type"]
SAMPLING_FIELDS = ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS + SAMPLING_FIELDS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=20,
)
sampling_dicts = st.dictionaries(st.sampled_from(SAMPLING_FIELDS), values, max_size=7)
request_dicts = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8),
    st.one_of(values, sampling_dicts, st.lists(st.integers(-3, 1 << 32), max_size=5)),
    max_size=7,
)


def _check_accepted(req: GenerateRequest, enc: Encoding) -> None:
    assert isinstance(req, GenerateRequest) and isinstance(enc, Encoding)
    assert (req.text is None) != (req.input_ids is None)
    assert req.text is None or len(req.text) > 0
    assert req.input_ids is None or (len(req.input_ids) > 0 and all(t >= 0 for t in req.input_ids))
    s = req.sampling
    assert math.isfinite(s.temperature) and 0 <= s.temperature
    assert math.isfinite(s.top_p) and 0 < s.top_p <= 1
    assert s.max_new_tokens >= 1
    assert req.dp_rank is None or req.dp_rank >= 0


def _only_decode_errors(body: bytes) -> None:
    try:
        req, enc = decode_request(body)
    except DecodeError as e:
        assert isinstance(e.code, ErrorCode) and e.message
    else:
        _check_accepted(req, enc)
    try:
        decode_abort(body)
    except DecodeError as e:
        assert isinstance(e.code, ErrorCode) and e.message


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(body: bytes) -> None:
    _only_decode_errors(body)


@FUZZ
@given(st.sampled_from([b"{", b" {", b"\x81", b"\x82", b"\x83", b"\xde\x00\x02"]), st.binary(max_size=100))
def test_fuzz_random_bytes_after_a_map_start(prefix: bytes, rest: bytes) -> None:
    _only_decode_errors(prefix + rest)


@FUZZ
@given(request_dicts, st.sampled_from(ENCODINGS))
def test_fuzz_jsonish_dicts(d: dict, enc: Encoding) -> None:
    try:
        body = _encode(d, enc)
    except (OverflowError, TypeError, ValueError, msgspec.EncodeError):
        return
    _only_decode_errors(body)


@FUZZ
@given(request_dicts, st.sampled_from(ENCODINGS), st.data())
def test_fuzz_corrupted_bodies(d: dict, enc: Encoding, data) -> None:
    try:
        body = bytearray(_encode(d, enc))
    except (OverflowError, TypeError, ValueError, msgspec.EncodeError):
        return
    if body:
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(body)))
        body = body[:cut] if data.draw(st.booleans()) else body
    _only_decode_errors(bytes(body))


@FUZZ
@given(
    st.one_of(st.text(min_size=1, max_size=50), st.none()),
    st.lists(st.integers(0, (1 << 31) - 1), min_size=1, max_size=10),
    st.sampled_from(ENCODINGS),
)
def test_fuzz_valid_requests_round_trip(text, ids, enc: Encoding) -> None:
    orig = GenerateRequest(text=text) if text is not None else GenerateRequest(input_ids=ids)
    req, got = decode_request(_encode(orig, enc))
    assert req == orig and got is enc


def test_an_answer_kept_in_one_encoding_is_sent_again_in_the_retry_s():
    from dpbus.schemas import Done, FinishReason
    from dpbus.schemas.codec import decode_answer, encode_answer, recode_answer

    done = Done(rid="r", dp_rank=1, finish_reason=FinishReason.LENGTH, prompt_tokens=3, completion_tokens=2,
                token_ids=[5, 6], text="ab")
    kept = encode_answer(done, Encoding.JSON)
    assert recode_answer(kept, Encoding.JSON) is kept
    again = recode_answer(kept, Encoding.MSGPACK)
    assert sniff_encoding(again) is Encoding.MSGPACK and decode_answer(again) == done
