"""The one client of the public contract that streams answers: ``dpbus generate``, the
demo, the bench and the gateway all send their requests and read their answers here.

``Streams`` is one connection's subscription for any number of requests: each request
answers on the connection's inbox plus a random token nobody can guess, and an answer
there that is not its request's (another ``rid``, undecodable, for no request at all) is
dropped, and reported to ``on_drop``. ``Stream`` is one request's answers, in order, up
to the terminal ``Done`` or ``Error``; a request left before that (a time-out, a cancelled
reader) is aborted on the bus."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
from nats.aio.client import Client

from dpbus.schemas import Accepted, Chunk, Done, Error, Subjects
from dpbus.schemas.codec import decode_answer
from dpbus.services.bus import request_subjects, subscribe

REPLY_TOKEN_BYTES = 16  # 128 random bits after the inbox prefix: a request's reply subject cannot be guessed
RESENDS = 4  # with ack_timeout t: resent after t, 3t, 7t and 15t seconds of silence
_NO_RESPONDERS = object()  # queued for a request when NATS says nobody serves the generate subject


class NoResponders(ConnectionError):
    """Nothing serves the generate subject (no ingest is running)."""


class Stream:
    """One request's answers; iterate it, or call ``next``. ``arrived`` is when the answer
    last returned reached this process (``time.perf_counter``)."""

    def __init__(self, streams: Streams, rid: str | None, reply: str) -> None:
        self.streams, self.rid, self.reply = streams, rid, reply
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.answered = False  # an answer came (the first one may lack the rid: see Streams.take)
        self.arrived = 0.0
        self.accepted: list[Accepted] = []  # with ``ack``: each group that held the request said so
        self.with_accepted = False
        self.resent = 0  # copies sent while nothing came back (see Streams.send)

    async def next(self) -> Accepted | Chunk | Done | Error:
        """The next answer. Raises ``TimeoutError`` (the request is aborted) when none
        comes within the time-out, ``NoResponders`` when nothing serves the request."""
        while True:
            try:
                self.arrived, answer = await asyncio.wait_for(self.queue.get(), self.streams.timeout)
            except asyncio.TimeoutError:
                self.abort("timeout")  # nobody will read its answers: free its slot in the group
                raise TimeoutError(f"no answer from dpbus within {self.streams.timeout:g}s") from None
            if not isinstance(answer, Accepted):
                break
            self.accepted.append(answer)  # kept; returned only to a reader that asked (``stream``)
            if self.with_accepted:
                return answer
        if answer is _NO_RESPONDERS:
            self.close()
            raise NoResponders(f"nothing serves {self.streams.generate_subject} (is `dpbus up` running?)")
        if isinstance(answer, (Done, Error)):
            self.close()
        return answer

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk | Done | Error:
        if self.finished:
            raise StopAsyncIteration
        try:
            return await self.next()
        except asyncio.CancelledError:
            self.abort("cancelled")
            raise

    def close(self) -> None:
        self.finished = True
        self.streams.open.pop(self.reply, None)

    def abort(self, reason: str) -> None:
        """Cancel the request on the bus, unless it ended (see ``Streams.abort``)."""
        self.streams.abort(self, reason)


class Streams:
    """Requests of one connection and their answers, over one subscription of its inbox.

    ``on_drop(reason, subject, rid, **kw)`` hears of every answer no request takes;
    ``on_abort(stream, reason, found, error)`` of every abort's outcome (``found`` None
    when the abort itself failed, with ``error``)."""

    def __init__(self, nc: Client, subjects: Subjects = Subjects(), timeout: float = 120.0,
                 on_drop: Callable[..., None] | None = None, on_abort: Callable[..., None] | None = None) -> None:
        self.nc, self.timeout = nc, timeout
        self.on_drop = on_drop or (lambda *a, **kw: None)
        self.on_abort = on_abort or (lambda *a: None)
        self.generate_subject, self.abort_subject = request_subjects(nc, subjects)
        self.open: dict[str, Stream] = {}  # reply subject -> its request's answers
        self.tasks: set[asyncio.Task] = set()  # aborts under way
        self.resending: set[asyncio.Task] = set()  # requests sent again while unheard
        self.prefix = ""
        self._sub: Any = None

    async def start(self) -> Streams:
        self.prefix = self.nc.new_inbox()  # private to this connection's user
        self._sub = await subscribe(self.nc, self.prefix + ".*", self.take)
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for the aborts under way, then unsubscribe."""
        for t in self.resending:
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()

    async def send(self, request: dict, msgpack: bool = True, ack_timeout: float | None = None) -> Stream:
        """Publish ``request``; its answers come to the returned ``Stream``.

        With ``ack_timeout``, the request asks for ``accepted`` (with a ``rid``, made up
        when it has none) and is sent again, the same request to the same reply subject
        numbered by ``resend``, while nothing at all came back: after ``ack_timeout``
        seconds, then twice that, up to ``RESENDS`` times. A copy of a request that did
        arrive is not run again (the group holding it answers the same reply subject, and
        a copy crossing a refusal is dropped), so only a request lost on its way (an ingest
        gone with it in hand) runs because of it: the retry rule of docs/guarantees.md."""
        if ack_timeout is not None:
            request = {**request, "ack": True, "rid": request.get("rid") or f"c-{secrets.token_hex(8)}"}
        reply = f"{self.prefix}.{secrets.token_hex(REPLY_TOKEN_BYTES)}"
        stream = self.open[reply] = Stream(self, request.get("rid"), reply)
        encode = msgspec.msgpack.encode if msgpack else msgspec.json.encode
        body = encode(request)
        try:
            await self.nc.publish(self.generate_subject, body, reply=reply)
        except asyncio.CancelledError:
            self.abort(stream, "cancelled")  # it may be in the connection's buffer, and go all the same
            raise
        except BaseException:
            stream.close()
            raise
        if ack_timeout is not None:
            copies = (encode({**request, "resend": n}) for n in range(1, RESENDS + 1))
            self._background(self._resend_while_unheard(stream, copies, ack_timeout), self.resending)
        return stream

    async def _resend_while_unheard(self, stream: Stream, copies: Iterator[bytes], wait: float) -> None:
        for body in copies:
            await asyncio.sleep(wait)
            if stream.answered or stream.finished:
                return
            try:
                await self.nc.publish(self.generate_subject, body, reply=stream.reply)
            except Exception:  # noqa: BLE001 - disconnected: the next round tries again
                pass
            stream.resent += 1
            wait *= 2

    def _background(self, coro: Any, tasks: set[asyncio.Task] | None = None) -> None:
        tasks = self.tasks if tasks is None else tasks
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def take(self, msg: Any) -> None:
        """Hand an answer to its request, or drop it."""
        arrived = time.perf_counter()
        stream = self.open.get(msg.subject)
        if stream is None:  # late answers of a request that ended or was aborted (or a guess)
            self.on_drop("no_call", msg.subject)
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            if stream.answered:  # NATS says this before any answer, or never
                self.on_drop("unexpected_status", msg.subject, stream.rid)
                return
            if stream.resent:  # a copy found no ingest: one restarting (the first found one); the next copy tries again
                self.on_drop("no_responders_to_a_copy", msg.subject, stream.rid)
                return
            stream.answered = True
            stream.queue.put_nowait((arrived, _NO_RESPONDERS))
            return
        try:
            answer = decode_answer(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.on_drop("undecodable", msg.subject, stream.rid)
            return
        if not self._belongs(stream, answer):
            self.on_drop("wrong_rid", msg.subject, stream.rid, got=answer.rid)
            return
        stream.answered = True
        stream.rid = stream.rid or answer.rid  # a request sent without one learns the rid ingest gave it
        stream.queue.put_nowait((arrived, answer))

    @staticmethod
    def _belongs(stream: Stream, answer: Any) -> bool:
        # ingest refuses some requests (unknown dp_rank, ...) with an error that has no rid:
        # taken only as a request's first answer; a request sent without a rid takes the first's
        if not stream.answered and (stream.rid is None or isinstance(answer, Error) and answer.rid is None):
            return True
        return answer.rid == stream.rid

    def abort(self, stream: Stream, reason: str) -> None:
        """Cancel ``stream``'s request on the bus (``reason``: a time-out, a reader gone);
        runs on its own, whatever happens to the caller. Nothing to do once it ended."""
        if stream.finished:
            return
        stream.close()
        if stream.rid is None:  # nothing came yet, and it was sent without a rid: nothing to name
            return
        self._background(self._send_abort(stream, reason))

    async def _send_abort(self, stream: Stream, reason: str) -> None:
        body = json.dumps({"rid": stream.rid, "reply": stream.reply}).encode()
        try:
            ack = json.loads((await self.nc.request(self.abort_subject, body, timeout=5)).data)
        except Exception as e:  # noqa: BLE001
            self.on_abort(stream, reason, None, e)
            return
        self.on_abort(stream, reason, ack.get("found") is True, None)


async def stream(nc: Client, request: dict, *, msgpack: bool = False, timeout: float = 120.0,
                 subjects: Subjects = Subjects(), with_accepted: bool = False,
                 ack_timeout: float | None = None) -> AsyncIterator[Any]:
    """Publish ``request`` on the connection's user's own ``dpbus.generate.<user>`` (plain
    ``dpbus.generate`` without a user) and yield its answers up to the terminal one
    (``accepted`` messages too with ``with_accepted``); ``ack_timeout``: see ``Streams.send``.

    Raises ``TimeoutError`` when no answer comes within ``timeout`` seconds of the last,
    ``NoResponders`` when nothing serves the request. Left early, the request is aborted."""
    streams = await Streams(nc, subjects, timeout).start()
    try:
        answers = await streams.send(request, msgpack, ack_timeout)
        answers.with_accepted = with_accepted
        try:
            async for answer in answers:
                yield answer
        finally:
            answers.abort("cancelled")
    finally:
        await streams.stop(timeout=2.0)


@dataclass
class Outcome:
    """Everything one request received, with client-side timings."""

    chunks: list[Chunk] = field(default_factory=list)
    terminal: Done | Error | None = None
    accepted: list[Accepted] = field(default_factory=list)  # with ``ack``: what each holding group said
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
    async for answer in stream(nc, request, with_accepted=True, **kw):
        if isinstance(answer, Accepted):
            out.accepted.append(answer)
            continue
        if not out.ttft_s:
            out.ttft_s = time.perf_counter() - t0
        if isinstance(answer, Chunk):
            out.chunks.append(answer)
        else:
            out.terminal = answer
    out.total_s = time.perf_counter() - t0
    return out
