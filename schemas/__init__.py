"""dpbus wire contracts: msgspec Structs, codecs and subject names. No I/O here."""

from schemas.codec import DecodeError, Encoding, decode_abort, decode_request, encode_answer, sniff_encoding
from schemas.errors import ErrorCode
from schemas.public import (
    AbortAck,
    AbortRequest,
    Answer,
    Chunk,
    Done,
    Error,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    Timings,
)
from schemas.subjects import Subjects

__all__ = [
    "AbortAck", "AbortRequest", "Answer", "Chunk", "DecodeError", "Done", "Encoding", "Error",
    "ErrorCode", "FinishReason", "GenerateRequest", "SamplingParams", "Subjects", "Timings",
    "decode_abort", "decode_request", "encode_answer", "sniff_encoding",
]
