"""Publish, subscribe and request with dpbus's limits and retries."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client

from dpbus.services.errors import ReceiveDataError, SendDataError

# nats-py drops messages silently past these; a step or a result must never be dropped
PENDING_MSGS_LIMIT = 1_000_000
PENDING_BYTES_LIMIT = 1 << 30


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


async def at_server(nc: Any, timeout: float = 5.0) -> None:
    """Return once everything written on ``nc`` so far (subscriptions above all) has reached
    the server. nats-py's ``flush`` writes its PING straight to the socket, ahead of
    commands still in its own buffer, so its PONG alone proves nothing about them: the
    buffer is written out first."""
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout=timeout)


async def service_stats(nc: Client, service: str, prefix: str, wait: float = 1.0) -> list[dict]:
    """The nats.micro STATS of every instance of ``service`` (e.g. ``dpbus-worker``) that
    serves ``prefix``, whole documents (``metadata``, ``endpoints``): every answer until none
    came for ``wait`` seconds. Needs a user allowed ``$SRV.>`` (the operator)."""
    import json

    import nats.errors

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{service}", b"", reply=inbox)
    found = []
    try:
        while True:
            doc = json.loads((await sub.next_msg(timeout=wait)).data)
            if doc.get("metadata", {}).get("prefix") == prefix:
                found.append(doc)
    except nats.errors.TimeoutError:  # no more answers
        return found
    finally:
        await sub.unsubscribe()
