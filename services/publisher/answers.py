"""The publisher's side of each request, without I/O: where its answers go and how
(``Delivery``: reply subject, encoding, the text decoded so far and what is not streamed
yet), and its standing in the request ledger (the entry's revision, the instance that
holds it, whether its terminal answer was won, given up or lost with a connection).

The scheduler knows none of this: a ``Sequence`` carries its ``Delivery`` for the
publisher (``seq.delivery``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpbus.schemas import Chunk, FinishReason
from dpbus.schemas.codec import Encoding
from dpbus.services.publisher.stops import StopMatcher
from dpbus.services.tokenizer import ByteStream, StreamDecoder


@dataclass(eq=False)
class Delivery:
    reply: str  # the client's inbox for this request
    encoding: Encoding
    stream: bool  # chunks as tokens come, or the whole text in the terminal answer
    stops: list[str] = field(default_factory=list)  # the request's stop strings
    detok: StreamDecoder = field(default_factory=ByteStream)
    pinned: bool = False  # it may not move to another group
    attempt: str = ""  # the admission it came from (see services/ledger.py)
    ledger_rev: int = 0  # the revision of its ledger entry held by this publisher
    owner: int = 0  # the publisher instance that claimed it (see services/ledger.py)
    abandoned: bool = False  # its publisher lost the lease: someone else answers it
    settled: bool = False  # its publisher won its terminal answer in the ledger
    offered: bool = False  # offered to another group once: that group may have taken its entry over
    withdrawn: bool = False  # its terminal answer, sent before it was settled, was lost with a connection
    unsent: list[int] = field(default_factory=list)  # sampled, not streamed yet (see stream_interval)
    unsent_text: str = ""  # their text
    chunks: int = 0  # chunks streamed so far: the next one's index
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.stop_strings = StopMatcher(self.stops)
        self.text_parts: list[str] = []  # the answer's text so far, when it is not streamed

    def stamp(self, now: float) -> float | None:
        """A token came at ``now``: the time since the one before, if there was one."""
        gap = now - self.last_token_at if self.first_token_at and self.last_token_at else None
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        return gap

    def take(self, token: int, reason: FinishReason | None) -> FinishReason | None:
        """Decode a sampled token (``reason``: how it ends the request, if it does) into
        the text to stream or to answer; how the request ends now: a stop string that
        completes here ends it too (its text is not sent)."""
        text, hit = self.stop_strings.feed(self.detok.feed([token], final=reason is not None))
        if hit and reason is None:
            reason = FinishReason.STOP
        elif reason is not None and not hit:
            text += self.stop_strings.flush()  # held as a possible stop string: it was not one
        if self.stream:
            self.unsent.append(token)
            self.unsent_text += text
        else:
            self.text_parts.append(text)
        return reason

    def chunk_due(self, stream_interval: int, ended: bool) -> bool:
        return self.stream and (len(self.unsent) >= stream_interval or ended)

    def next_chunk(self, rid: str) -> Chunk | None:
        """The tokens sampled since the last chunk, as the next one (None if there are none)."""
        if not self.unsent:
            return None
        chunk = Chunk(rid, self.chunks, self.unsent, self.unsent_text)
        self.chunks += 1
        self.unsent, self.unsent_text = [], ""
        return chunk
