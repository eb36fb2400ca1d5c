"""The built-in byte-level tokenizer: ids 0..255 are bytes, then a few special ids."""

from __future__ import annotations

import codecs

BOS_ID = 256
EOS_ID = 257
N_BYTES = 256


def encode(text: str, add_bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS_ID, *ids] if add_bos else ids


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if 0 <= i < N_BYTES).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns tokens into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int], final: bool = False) -> str:
        return self._dec.decode(bytes(i for i in ids if 0 <= i < N_BYTES), final)
