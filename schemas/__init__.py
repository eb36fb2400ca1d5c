"""dpbus wire contracts: msgspec Structs, codecs and subject names. No I/O here."""

from dpbus.schemas.codec import DecodeError, Encoding, decode_abort, decode_request, encode_answer, sniff_encoding
from dpbus.schemas.errors import ErrorCode
from dpbus.schemas.public import (
    AbortAck,
    AbortRequest,
    Accepted,
    Answer,
    Chunk,
    Done,
    Error,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    Timings,
)
from dpbus.schemas.subjects import Subjects

__all__ = [
    "AbortAck", "AbortRequest", "Accepted", "Answer", "Chunk", "DecodeError", "Done", "Encoding", "Error",
    "ErrorCode", "FinishReason", "GenerateRequest", "SamplingParams", "Subjects", "Timings",
    "decode_abort", "decode_request", "encode_answer", "sniff_encoding",
]
