"""A small client of the public contract (what ``dpbus generate`` and the demo use)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client

from dpbus.schemas import Answer, Chunk, Done, Error, Subjects
from dpbus.services.bus import request_subjects

_json_answer = msgspec.json.Decoder(Answer)
_mp_answer = msgspec.msgpack.Decoder(Answer)


def decode_answer(data: bytes) -> Any:
    return _json_answer.decode(data) if data[:1] == b"{" else _mp_answer.decode(data)


async def stream(nc: Client, request: dict, *, msgpack: bool = False, timeout: float = 120.0,
                 subjects: Subjects = Subjects()) -> AsyncIterator[Any]:
    """Publish ``request`` on the connection's user's own ``dpbus.generate.<user>`` (plain
    ``dpbus.generate`` without a user) and yield its answers up to the terminal one.

    Raises ``TimeoutError`` when no answer comes within ``timeout`` seconds of the last.
    """
    body = msgspec.msgpack.encode(request) if msgpack else msgspec.json.encode(request)
    subject, _ = request_subjects(nc, subjects)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, body, reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=timeout)
            if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                raise ConnectionError(f"nothing serves {subject} (is `dpbus up` running?)")
            answer = decode_answer(msg.data)
            yield answer
            if isinstance(answer, (Done, Error)):
                return
    finally:
        await sub.unsubscribe()


@dataclass
class Outcome:
    """Everything one request received, with client-side timings."""

    chunks: list[Chunk] = field(default_factory=list)
    terminal: Done | Error | None = None
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def text(self) -> str:
        if isinstance(self.terminal, Done) and self.terminal.text is not None:
            return self.terminal.text
        return "".join(c.text for c in self.chunks)

    @property
    def token_ids(self) -> list[int]:
        if isinstance(self.terminal, Done) and self.terminal.token_ids is not None:
            return self.terminal.token_ids
        return [t for c in self.chunks for t in c.token_ids]


async def generate(nc: Client, request: dict, **kw: Any) -> Outcome:
    out = Outcome()
    t0 = time.perf_counter()
    async for answer in stream(nc, request, **kw):
        if not out.ttft_s:
            out.ttft_s = time.perf_counter() - t0
        if isinstance(answer, Chunk):
            out.chunks.append(answer)
        else:
            out.terminal = answer
    out.total_s = time.perf_counter() - t0
    return out
