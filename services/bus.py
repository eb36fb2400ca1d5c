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


async def connect(url: str, name: str, log: Any, **kw: Any) -> Client:
    async def on_error(e: Exception) -> None:
        log.warning("nats_error", error=repr(e))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

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
