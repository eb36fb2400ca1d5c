"""The NATS connection every service uses: sane reconnects, errors logged (never a
traceback per failed reconnect), pending limits high enough that a busy service is not
silently dropped as a slow consumer."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.aio.client import Client

from services.errors import ReceiveDataError, SendDataError

# nats-py drops messages silently past these; a step or a result must never be dropped
PENDING_MSGS_LIMIT = 1_000_000
PENDING_BYTES_LIMIT = 1 << 30


async def connect(url: str, name: str, log: Any, on_reconnect_hooks: list | None = None, **kw: Any) -> Client:
    """Connect with dpbus's settings; ``on_reconnect_hooks`` (plain callables) run after
    every reconnection."""
    async def on_error(e: Exception) -> None:
        log.warning("nats_error", error=repr(e))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")
        for hook in on_reconnect_hooks or ():
            hook()

    return await nats.connect(
        servers=[url],
        name=name,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        pending_size=8 << 20,  # bytes buffered while reconnecting
        **kw,
    )


async def publish(nc: Client, subject: str, data: bytes, attempts: int = 3, backoff: float = 0.2) -> None:
    """Publish, retrying a few times (a full reconnect buffer, a closing connection)."""
    for attempt in range(attempts):
        try:
            await nc.publish(subject, data)
            return
        except Exception as e:  # noqa: BLE001 - nats-py raises several kinds
            if attempt == attempts - 1:
                raise SendDataError(None, f"could not publish on {subject} after {attempts} attempts: {e!r}") from e
            await asyncio.sleep(backoff * (attempt + 1))


async def request(nc: Client, subject: str, data: bytes, timeout: float, attempts: int = 3) -> bytes:
    """Request/reply with a time-out per attempt and a bounded number of attempts."""
    for attempt in range(attempts):
        try:
            return (await nc.request(subject, data, timeout=timeout)).data
        except Exception as e:  # noqa: BLE001
            if attempt == attempts - 1:
                raise ReceiveDataError(None, f"no reply on {subject} after {attempts} attempts of {timeout}s: "
                                             f"{e!r}") from e
    raise AssertionError("unreachable")


async def subscribe(nc: Client, subject: str, cb: Any, queue: str = "") -> Any:
    return await nc.subscribe(subject, queue=queue, cb=cb,
                              pending_msgs_limit=PENDING_MSGS_LIMIT, pending_bytes_limit=PENDING_BYTES_LIMIT)


def reply_subject(request: Any) -> str:
    """The reply subject of a ``nats.micro`` request (its Request has no public accessor)."""
    return request._msg.reply or ""  # noqa: SLF001


async def _ignore(_: Exception) -> None:
    return None


async def connect_client(url: str, timeout: float = 5.0) -> Client:
    """A short-lived client connection (CLI, demo): fails fast with a clear message."""
    try:
        return await asyncio.wait_for(
            nats.connect(servers=[url], error_cb=_ignore, allow_reconnect=False, connect_timeout=3,
                         max_reconnect_attempts=0), timeout)
    except Exception as e:  # noqa: BLE001 - nats raises several kinds here
        raise ConnectionError(f"cannot reach NATS at {url} ({type(e).__name__}); is `dpbus up` running?") from None


class ClientOutbox:
    """Answers to clients' reply subjects, sent in order.

    After a NATS outage a client needs a moment to reconnect and subscribe its inbox again
    (nats-py waits 2 s between attempts by default); an answer sent before that reaches
    nobody. So while disconnected, and for ``hold`` seconds after reconnecting, answers
    wait here and then go out in the order they were made."""

    def __init__(self, nc: Client, log: Any, hold: float = 2.5, limit: int = 200_000) -> None:
        self.nc, self.log, self.hold, self.limit = nc, log, hold, limit
        self.hold_until = 0.0
        self.held: list[tuple[str, bytes]] = []
        self._flusher: asyncio.Task | None = None

    def on_reconnect(self) -> None:
        self.hold_until = asyncio.get_running_loop().time() + self.hold

    def _open(self) -> bool:
        return self.nc.is_connected and asyncio.get_running_loop().time() >= self.hold_until

    async def send(self, subject: str, data: bytes) -> None:
        if not self.held and self._open():
            try:
                await self.nc.publish(subject, data)
                return
            except Exception as e:  # noqa: BLE001 - keep it for the flush
                self.log.warning("answer_deferred", error=repr(e))
        if len(self.held) >= self.limit:
            self.log.error("answer_dropped", subject=subject, reason=f"more than {self.limit} answers held")
            return
        self.held.append((subject, data))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every held answer is out."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.held and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def _flush(self) -> None:
        while self.held:
            if not self._open():
                await asyncio.sleep(0.1)
                continue
            subject, data = self.held[0]
            try:
                await self.nc.publish(subject, data)
            except Exception:  # noqa: BLE001 - disconnected again: wait
                await asyncio.sleep(0.1)
                continue
            self.held.pop(0)
