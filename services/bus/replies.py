"""Many request/reply exchanges over one wildcard subscription (ingest's hot path)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable

import nats.errors
from nats.aio.client import Client

from dpbus.services.bus.messaging import subscribe


class Replies:
    """Request/reply over one wildcard subscription of our inbox: a future per request and
    one loop that expires them, instead of nats-py's ``request`` (a fresh token from the
    random source, a timer and two extra callbacks per request). Used on hot paths.

    A reply arriving after its request timed out is dropped. ``NoRespondersError`` and
    ``TimeoutError`` are nats-py's own, so callers handle them as with ``nc.request``."""

    def __init__(self, nc: Client, tick: float = 0.05) -> None:
        self.nc, self.tick = nc, tick
        self.prefix = ""
        self.waiting: dict[str, Callable[[Any], None]] = {}
        self.deadlines: dict[float, deque[tuple[float, str]]] = {}  # per time-out, in the order sent
        self.sent = 0
        self.chained: set[asyncio.Future] = set()
        self._expirer: asyncio.Task | None = None

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox() + "."
        await subscribe(self.nc, self.prefix + "*", self.on_reply)
        self._expirer = asyncio.create_task(self._expire_loop())

    def stop(self) -> None:
        if self._expirer is not None:
            self._expirer.cancel()

    async def send(self, subject: str, data: bytes, timeout: float, done: Callable[[Any], Awaitable[None] | None],
                   headers: dict[str, str] | None = None) -> None:
        """Publish a request; ``done`` is called once, from the reply's delivery, with the
        reply's body (bytes) or the exception (no responders, time-out). What it returns,
        if anything, is awaited there (e.g. the next request of a chain)."""
        self.sent += 1
        token = str(self.sent)
        self.waiting[token] = done
        self.deadlines.setdefault(timeout, deque()).append((asyncio.get_running_loop().time() + timeout, token))
        try:
            await self.nc.publish(subject, data, reply=self.prefix + token, headers=headers)
        except BaseException:
            self.waiting.pop(token, None)
            raise

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        fut = asyncio.get_running_loop().create_future()

        def done(got: Any) -> None:
            if not fut.done():
                if isinstance(got, BaseException):
                    fut.set_exception(got)
                else:
                    fut.set_result(got)

        await self.send(subject, data, timeout, done)
        return await fut

    async def on_reply(self, msg: Any) -> None:
        done = self.waiting.pop(msg.subject[len(self.prefix):], None)
        if done is None:
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            then = done(nats.errors.NoRespondersError())
        else:
            then = done(msg.data)
        if then is not None:
            await then

    def expire(self, now: float) -> None:
        for queue in self.deadlines.values():
            while queue and queue[0][0] <= now:
                done = self.waiting.pop(queue.popleft()[1], None)
                if done is not None:
                    then = done(nats.errors.TimeoutError())
                    if then is not None:  # a chain goes on in a task (this loop keeps expiring)
                        task = asyncio.ensure_future(then)
                        self.chained.add(task)
                        task.add_done_callback(self.chained.discard)

    async def _expire_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            self.expire(loop.time())
