"""Opening and closing NATS connections: a service's long-lived one (sane reconnects,
errors logged, never a traceback per failed reconnect) and a short-lived client's (CLI,
demo: fails fast), and what a connection's user may publish on."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import nats
from nats.aio.client import Client

from dpbus.services.bus.auth import FatalConnectError, NatsAuth, redact, refuse_placeholder, servers
from dpbus.services.natsconf import INBOX_ROOT, NAME


def _fatal(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, ssl.SSLError) or "authorization" in text or "authentication" in text \
        or "permissions violation" in text and "connect" in text


async def connect(url: str, name: str, log: Any, on_reconnect_hooks: list | None = None,
                  auth: NatsAuth | None = None, **kw: Any) -> Client:
    """Connect with dpbus's settings; ``on_reconnect_hooks`` (plain callables) run after
    every reconnection.

    Until the first connection: refused credentials or a failed TLS handshake raise
    ``FatalConnectError`` at once (naming the user and server); an unreachable server is
    retried, with one log line every few seconds. Cancel the call to give up."""
    auth = auth or NatsAuth()
    refuse_placeholder(url, auth)
    connected = False
    last_said = [0.0]

    async def on_error(e: Exception) -> None:
        if connected:
            log.warning("nats_error", error=repr(e))
            return
        if _fatal(e):
            raise FatalConnectError(f"NATS refused {auth.who(url)}: {e}")
        now = time.monotonic()
        if now - last_said[0] >= 5.0:
            last_said[0] = now
            log.warning("nats_unreachable", server=redact(url), error=repr(e), retrying_every_s=0.5)

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")
        for hook in on_reconnect_hooks or ():
            hook()

    nc = await nats.connect(
        servers=servers(url),
        dont_randomize=True,  # the order given is the preference (``dpbus up`` spreads services)
        name=name,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        pending_size=8 << 20,  # bytes buffered while reconnecting
        **auth.kwargs(url),
        **kw,
    )
    connected = True
    return nc


async def close(nc: Client, timeout: float = 2.0) -> None:
    """Drain ``nc`` (flush what is buffered), but for at most ``timeout`` seconds."""
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception:  # noqa: BLE001 - a time-out or a dead connection: just close
        await nc.close()


def own_user(nc: Client) -> str:
    """The user whose private inbox ``nc`` replies to (``_INBOX.<user>``; set by
    ``NatsAuth.kwargs``), or "" for a connection with nats-py's shared default inbox."""
    root, _, user = bytes(nc._inbox_prefix).decode().partition(".")  # noqa: SLF001 - set at connect
    return user if root == INBOX_ROOT and NAME.match(user) else ""


def request_subjects(nc: Client, subjects: Any) -> tuple[str, str]:
    """Where ``nc`` publishes its requests and aborts: its user's own subjects (the only
    ones a secured server lets it publish on, besides the default client's plain ones),
    or the plain ones for a connection without a user (an open server)."""
    user = own_user(nc)
    return (subjects.generate_for(user), subjects.abort_for(user)) if user else (subjects.generate, subjects.abort)


def reply_subject(request: Any) -> str:
    """The reply subject of a ``nats.micro`` request (its Request has no public accessor)."""
    return request._msg.reply or ""  # noqa: SLF001


async def _ignore(_: Exception) -> None:
    return None


async def connect_client(url: str, timeout: float = 5.0, auth: NatsAuth | None = None) -> Client:
    """A short-lived client connection (CLI, demo): fails fast with a clear message."""
    auth = auth or NatsAuth()
    refuse_placeholder(url, auth)
    try:
        return await asyncio.wait_for(
            nats.connect(servers=servers(url), error_cb=_ignore, allow_reconnect=False, connect_timeout=3,
                         max_reconnect_attempts=0, **auth.kwargs(url)), timeout)
    except Exception as e:  # noqa: BLE001 - nats raises several kinds here
        if _fatal(e):
            raise FatalConnectError(f"NATS refused {auth.who(url)}: {e}") from None
        raise ConnectionError(f"cannot reach NATS at {redact(url)} ({type(e).__name__}); is `dpbus up` running?") \
            from None


