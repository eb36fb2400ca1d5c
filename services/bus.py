"""The NATS connection every service uses: sane reconnects, errors logged (never a
traceback per failed reconnect), pending limits high enough that a busy service is not
silently dropped as a slow consumer."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote, urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client

from dpbus.services.errors import ReceiveDataError, SendDataError
from dpbus.services.identity import is_client_inbox
from dpbus.services.natsconf import INBOX_ROOT, NAME, inbox_prefix, placeholder

# nats-py drops messages silently past these; a step or a result must never be dropped
PENDING_MSGS_LIMIT = 1_000_000
PENDING_BYTES_LIMIT = 1 << 30


class FatalConnectError(ConnectionError):
    """NATS refused us (wrong credentials, TLS): retrying cannot help."""


class PlaceholderPasswordError(FatalConnectError):
    """A known placeholder password (natsconf.PLACEHOLDER_PASSWORDS): dpbus never sends one."""


@dataclass
class NatsAuth:
    """Who a connection is and how it proves it. ``user`` also names its inbox
    (``_INBOX.<user>``), the only one its permissions let it read."""

    user: str = ""
    password: str = field(default="", repr=False)
    nkey_seed: str = ""  # path of a file holding an nkey seed
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def kwargs(self, url: str) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        user = self.user or url_user(url)
        if user:
            kw["inbox_prefix"] = inbox_prefix(user)
        if self.user and self.password:
            kw["user"], kw["password"] = self.user, self.password
        if self.nkey_seed:
            kw["nkeys_seed"] = self.nkey_seed
        if self.tls_ca or self.tls_cert or any(u.startswith("tls://") for u in servers(url)):
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
            kw["tls"] = ctx
        return kw

    def who(self, url: str) -> str:
        return f"user {self.user or url_user(url) or '(none)'} at {redact(url)}"


def servers(url: str) -> list[str]:
    """The servers of ``url``: one URL, or several separated by commas (a NATS cluster;
    tried in the order given)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def url_user(url: str) -> str:
    return unquote(urlsplit(servers(url)[0] if url else "").username or "")


def redact(url: str) -> str:
    """``url`` (or a comma-separated list of them) without passwords, for messages and logs."""
    if "," in url:
        return ",".join(redact(u) for u in servers(url))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{parts.username}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def refuse_placeholder(url: str, auth: NatsAuth) -> None:
    """Raise PlaceholderPasswordError, naming the user, if ``auth`` or a server of ``url``
    carries a known placeholder password: a server that takes it takes it from anyone who
    has read the example it came from. A user named with no password nor nkey is refused
    too (what compose gives a service run without its env file). (No user at all, on an
    open server, is not refused.)"""
    if auth.user and not auth.password and not auth.nkey_seed and not any(urlsplit(u).password for u in servers(url)):
        raise PlaceholderPasswordError(
            f"NATS user {auth.user} at {redact(url)} has no password: `dpbus nats-config --out DIR` writes every "
            "user's (DIR/credentials.json for --nats-credentials; under compose, pass --env-file DIR/compose.env)")
    given = [(auth.user or url_user(url), auth.password)] if auth.password else []
    for u in servers(url):
        parts = urlsplit(u)
        if parts.password:
            given.append((unquote(parts.username or ""), unquote(parts.password)))
    for user, password in given:
        if why := placeholder(password, user):
            raise PlaceholderPasswordError(
                f"NATS user {user or '(none)'} at {redact(url)} has {why}: refusing to connect with it. Give every "
                "user its own secret: `dpbus nats-config --out DIR` writes random ones (DIR/credentials.json, "
                "DIR/compose.env)")


def auth_for(creds: Any, user: str) -> NatsAuth:
    """How ``user`` of a ``natsconf.Credentials`` connects (password or nkey seed)."""
    name, password = creds.user(user)
    return NatsAuth(name, password, creds.nkey_seeds.get(name, ""), creds.tls_ca)


def auth_from(settings: Any, default_user: str = "") -> NatsAuth:
    """The NatsAuth of a service's settings: explicit user/password, else the role's entry
    in ``nats_credentials`` (a file from `dpbus nats-config` / `dpbus up`)."""
    if settings.nats_credentials and not settings.nats_password and not settings.nats_nkey_seed:
        from dpbus.services.natsconf import Credentials

        auth = auth_for(Credentials.load(settings.nats_credentials), settings.nats_user or default_user)
        auth.tls_ca = settings.tls_ca or auth.tls_ca
        auth.tls_cert, auth.tls_key = settings.tls_cert, settings.tls_key
        return auth
    return NatsAuth(settings.nats_user, settings.nats_password, settings.nats_nkey_seed, settings.tls_ca,
                    settings.tls_cert, settings.tls_key)


def answer_auth(settings: Any, main: NatsAuth) -> NatsAuth | None:
    """How a service connects to answer clients (``answer_nats_user``), when it does so
    apart from its main connection: given a password, or found in ``nats_credentials``.
    None on an open server (one connection does everything); a secured service without
    it is refused at start-up (its main user may not publish to client inboxes)."""
    user = settings.answer_nats_user
    if settings.answer_nats_password:
        return NatsAuth(user, settings.answer_nats_password, "", main.tls_ca, main.tls_cert, main.tls_key)
    if settings.nats_credentials:
        from dpbus.services.natsconf import Credentials

        creds = Credentials.load(settings.nats_credentials)
        if user in creds.passwords or user in creds.nkey_seeds:
            auth = auth_for(creds, user)
            auth.tls_ca, auth.tls_cert, auth.tls_key = main.tls_ca or auth.tls_ca, main.tls_cert, main.tls_key
            return auth
    if main.user or main.nkey_seed:
        raise FatalConnectError(
            f"{main.user or 'this service'} answers clients over a connection of its own as NATS user {user}, and "
            f"has no credentials for it: give --answer-nats-password (DPBUS_ANSWER_NATS_PASSWORD) or "
            "--nats-credentials with that user (`dpbus nats-config` writes it)")
    return None


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


class ClientOutbox:
    """Answers to clients' reply subjects, sent in order.

    After a NATS outage a client needs a moment to reconnect and subscribe its inbox again
    (nats-py waits 2 s between attempts by default); an answer sent before that reaches
    nobody. So while disconnected, and for ``hold`` seconds after reconnecting, answers
    wait here and then go out in the order they were made. An answer is never dropped:
    past ``limit`` held answers, ``send`` waits for room (the service slows down instead).
    An answer sent with ``still`` goes out only if ``still()`` is true when it actually
    goes out (a publisher that lost its lease meanwhile must not answer any more).

    **Terminal answers are confirmed.** Core NATS delivers at most once: bytes written to
    a server that dies before reading them are gone, and a terminal answer lost so leaves
    its client waiting for ever. Each terminal answer is followed, in the same write, by an
    *echo*: a message to this service's own inbox, which the server handles after the
    answer (one connection's messages are handled in order). The echo coming back proves
    the server took the answer. After a reconnection, a probe echo on the new connection
    (it comes back after everything nats-py re-sent from its buffer) settles the rest: a
    terminal answer whose echo never came back was lost, and goes out again. It can arrive
    twice only if the server took it and died before its echo left (a window of one
    server-side write), where without this it would have been lost far more often.

    **Only client inboxes.** An answer to a subject outside ``_INBOX.`` is never sent
    (counted in ``refused``): whatever a message names, this outbox writes nothing but
    client inboxes (ingest and publishers check more closely before: ``services/identity.py``)."""

    def __init__(self, nc: Client, log: Any, hold: float = 2.5, limit: int = 200_000,
                 confirm_timeout: float = 5.0) -> None:
        self.nc, self.log, self.hold, self.limit = nc, log, hold, limit
        self.confirm_timeout = confirm_timeout
        self.hold_until = 0.0
        self.held: deque[tuple[str, bytes, Any, bool]] = deque()  # (subject, data, still, terminal)
        self.withdrawn = 0  # held answers whose sender may no longer send them
        self._flusher: asyncio.Task | None = None
        self.waited = 0  # sends that had to wait for room
        self.unconfirmed: dict[int, tuple[str, bytes, Any]] = {}  # echo number -> terminal answer
        self.resent = 0  # terminal answers sent again after a reconnection lost them
        self._echo_subject = ""
        self._echoes = 0
        self._probes: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.refused = 0  # answers to a subject that is not a client inbox: never sent

    def _foreign(self, subject: str) -> bool:
        if is_client_inbox(subject):
            return False
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood stays quiet
            self.log.warning("answer_to_foreign_subject_refused", subject=subject[:80], refused=self.refused)
        return True

    def on_reconnect(self) -> None:
        self.hold_until = asyncio.get_running_loop().time() + self.hold
        if self.unconfirmed:
            task = asyncio.create_task(self._after_reconnect(list(self.unconfirmed)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _open(self) -> bool:
        return self.nc.is_connected and asyncio.get_running_loop().time() >= self.hold_until

    async def send(self, subject: str, data: bytes, still: Any = None, terminal: bool = False) -> None:
        """Send (or hold) one answer; ``terminal`` answers are confirmed (see the class)."""
        if self._foreign(subject):
            return
        if not self.held and self._open():
            try:
                await self._publish(subject, data, still, terminal)
                return
            except Exception as e:  # noqa: BLE001 - keep it for the flush
                self.log.warning("answer_deferred", error=repr(e))
        if len(self.held) >= self.limit:
            self.waited += 1
            self.log.warning("answers_backlogged", held=len(self.held))
            while len(self.held) >= self.limit:
                self._start_flusher()
                await asyncio.sleep(0.05)
        self.held.append((subject, data, still, terminal))
        self._start_flusher()

    async def publish_now(self, subject: str, data: bytes, still: Any = None) -> bool:
        """Publish a terminal answer at once, without holding it: True when it is in the
        connection's buffer, False when it cannot go now (disconnected, or answers held
        after a reconnection). Whatever the caller publishes next without suspending
        reaches the server behind it, in the same write (see ``Publisher.answer``)."""
        if self._foreign(subject):
            return True  # never sent, never to be: as good as out
        if self.held or not self._open():
            return False
        try:
            await self._publish(subject, data, still, True)
        except Exception as e:  # noqa: BLE001 - not in the buffer: the caller holds it
            self.log.warning("answer_not_published", error=repr(e))
            return False
        return True

    async def _publish(self, subject: str, data: bytes, still: Any, terminal: bool) -> None:
        if terminal and not self._echo_subject:
            self._echo_subject = self.nc.new_inbox()
            await self.nc.subscribe(self._echo_subject, cb=self._on_echo)
        await self.nc.publish(subject, data)
        if terminal:
            # no await may suspend between the answer and its echo (nats-py appends both to
            # its buffer at once): they reach the server in one write
            self._echoes += 1
            self.unconfirmed[self._echoes] = (subject, data, still)
            try:
                await self.nc.publish(self._echo_subject, b"%d" % self._echoes)
            except Exception as e:  # noqa: BLE001 - the answer went: the next reconnection settles it
                self.log.warning("echo_not_sent", error=repr(e))

    async def _on_echo(self, msg: Any) -> None:
        if msg.data[:1] != b"p":  # a terminal answer's echo
            self.unconfirmed.pop(int(msg.data), None)
            return
        probe = self._probes.pop(int(msg.data[1:]), None)  # a probe's, after a reconnection
        if probe is not None and not probe.done():
            probe.set_result(None)

    async def _after_reconnect(self, before: list[int]) -> None:
        """Once a probe echo came back on the new connection, every terminal answer of
        ``before`` still unconfirmed was lost with the old one: send it again."""
        self._echoes += 1
        n, probe = self._echoes, asyncio.get_running_loop().create_future()
        self._probes[n] = probe
        try:
            await self.nc.publish(self._echo_subject, b"p%d" % n)
            await asyncio.wait_for(probe, self.confirm_timeout)
        except Exception as e:  # noqa: BLE001 - disconnected again: the next reconnection looks again
            self._probes.pop(n, None)
            self.log.warning("answers_unconfirmed", count=len(self.unconfirmed), error=repr(e))
            return
        lost = [(i, self.unconfirmed.pop(i)) for i in before if i in self.unconfirmed]
        if not lost:
            return
        self.resent += len(lost)
        self.log.warning("answers_resent", count=len(lost))
        self.held.extendleft((subject, data, still, True) for _, (subject, data, still) in reversed(lost))
        self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every held answer is out and every terminal
        answer confirmed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (self.held or self.unconfirmed) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def _flush(self) -> None:
        while self.held:
            if not self._open():
                await asyncio.sleep(0.1)
                continue
            subject, data, still, terminal = self.held[0]
            if still is not None and not still():
                self.withdrawn += 1
                self.held.popleft()
                continue
            try:
                await self._publish(subject, data, still, terminal)
            except Exception:  # noqa: BLE001 - disconnected again: wait
                await asyncio.sleep(0.1)
                continue
            self.held.popleft()


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
        self._expirer: asyncio.Task | None = None

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox() + "."
        await subscribe(self.nc, self.prefix + "*", self.on_reply)
        self._expirer = asyncio.create_task(self._expire_loop())

    def stop(self) -> None:
        if self._expirer is not None:
            self._expirer.cancel()

    async def send(self, subject: str, data: bytes, timeout: float, done: Callable[[Any], None]) -> None:
        """Publish a request; ``done`` is called once, from the reply's delivery, with the
        reply's body (bytes) or the exception (no responders, time-out)."""
        self.sent += 1
        token = str(self.sent)
        self.waiting[token] = done
        self.deadlines.setdefault(timeout, deque()).append((asyncio.get_running_loop().time() + timeout, token))
        try:
            await self.nc.publish(subject, data, reply=self.prefix + token)
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
            done(nats.errors.NoRespondersError())
        else:
            done(msg.data)

    def expire(self, now: float) -> None:
        for queue in self.deadlines.values():
            while queue and queue[0][0] <= now:
                done = self.waiting.pop(queue.popleft()[1], None)
                if done is not None:
                    done(nats.errors.TimeoutError())

    async def _expire_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            self.expire(loop.time())
