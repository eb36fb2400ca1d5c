"""Tokenizers: the built-in byte-level one (ids 0..255 are bytes, 256 BOS, 257 EOS), or
a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``) when a model path has one.

Each gives ``encode(text) -> ids`` and ``stream()``: a decoder that turns tokens into text
as they arrive, holding back what is not yet a whole character.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

CONTEXT_IDS = 6  # prompt ids an output stream is decoded after
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

    def encode(self, text: str, special: bool = True) -> list[int]:
        """``special``: start with BOS (a chat template that writes its own leaves it out)."""
        return [BOS_ID, *text.encode("utf-8")] if special else list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < N_BYTES).decode("utf-8", errors="replace")

    def stream(self, context: list[int] | tuple[int, ...] = ()) -> StreamDecoder:
        return ByteStream()


class HFStream:
    """Incremental detokenizing by offsets: each new token is decoded together with the few
    tokens before it (enough for the tokenizer to place spaces and join bytes right), never
    the whole output, so the work grows linearly with its length. Text that ends in an
    incomplete character is held back until the next token completes it.

    ``context`` (the prompt's last ids) lets the first output token be decoded as it reads
    after the prompt. ``decoded`` counts the ids passed to the tokenizer (tests count it)."""

    def __init__(self, tok: "HFTokenizer", context: list[int] | tuple[int, ...] = ()) -> None:
        self.tok = tok
        self.ids = list(context)
        self.prefix = 0                 # start of the window decoded for context
        self.read = len(self.ids)       # ids before this are already emitted as text
        self.decoded = 0

    def _decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids)

    def feed(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or a character still incomplete: wait
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class HFTokenizer:
    name = "tokenizer.json"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream(self, context: list[int] | tuple[int, ...] = ()) -> StreamDecoder:
        return HFStream(self, list(context)[-CONTEXT_IDS:])


class NoTokenizer:
    """A checkpoint without ``tokenizer.json``: prompts must come as ``input_ids``."""

    name = "none"

    def encode(self, text: str, special: bool = True) -> list[int]:
        raise ValueError("this model has no tokenizer.json: send the prompt as 'input_ids'")

    def decode(self, ids: list[int]) -> str:
        return ""

    def stream(self, context: list[int] | tuple[int, ...] = ()) -> StreamDecoder:
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
