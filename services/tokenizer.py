"""Tokenizers: the built-in byte-level one (ids 0..255 are bytes, 256 BOS, 257 EOS), or
a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``) when a model path has one.

Each gives ``encode(text) -> ids`` and ``stream()``: a decoder that turns tokens into text
as they arrive, holding back what is not yet a whole character.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

BOS_ID = 256
EOS_ID = 257
N_BYTES = 256


class StreamDecoder(Protocol):
    def feed(self, ids: list[int], final: bool = False) -> str: ...


class ByteStream:
    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int], final: bool = False) -> str:
        return self._dec.decode(bytes(i for i in ids if 0 <= i < N_BYTES), final)


class ByteTokenizer:
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return [BOS_ID, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < N_BYTES).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return ByteStream()


class HFStream:
    """Decodes the whole output each time and emits the new tail (outputs are short)."""

    def __init__(self, tok: "HFTokenizer") -> None:
        self.tok, self.ids, self.sent = tok, [], 0

    def feed(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        new, self.sent = text[self.sent :], len(text)
        return new


class HFTokenizer:
    name = "tokenizer.json"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        return HFStream(self)


class NoTokenizer:
    """A checkpoint without ``tokenizer.json``: prompts must come as ``input_ids``."""

    name = "none"

    def encode(self, text: str) -> list[int]:
        raise ValueError("this model has no tokenizer.json: send the prompt as 'input_ids'")

    def decode(self, ids: list[int]) -> str:
        return ""

    def stream(self) -> StreamDecoder:
        return HFStream(self)  # type: ignore[arg-type]


def load_tokenizer(model_path: str) -> ByteTokenizer | HFTokenizer | NoTokenizer:
    if not model_path:
        return ByteTokenizer()
    path = Path(model_path) / "tokenizer.json"
    if not path.exists():
        return NoTokenizer()
    try:
        return HFTokenizer(path)
    except ImportError:
        return NoTokenizer()
