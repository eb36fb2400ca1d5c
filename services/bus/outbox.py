"""The outbox of a service that answers clients: ordered, held across outages, terminal
answers confirmed, client inboxes only."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from nats.aio.client import Client

from dpbus.services.identity import is_client_inbox


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
        self._connection = 0  # reconnections so far: a probe belongs to one connection
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
        self._connection += 1
        if self.unconfirmed:
            task = asyncio.create_task(self._after_reconnect(list(self.unconfirmed), self._connection))
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

    async def _after_reconnect(self, before: list[int], connection: int) -> None:
        """Once a probe echo came back on the new connection, every terminal answer of
        ``before`` still unconfirmed was lost with the old one: send it again. A probe
        without an echo is sent again (every ``confirm_timeout``) for as long as this
        connection lasts; the next one's own probe takes over."""
        while not await self._probe():
            if connection != self._connection:
                return
            self.log.warning("answers_unconfirmed", count=len(self.unconfirmed), action="probing again")
        if connection != self._connection:
            return
        lost = [(i, self.unconfirmed.pop(i)) for i in before if i in self.unconfirmed]
        if not lost:
            return
        self.resent += len(lost)
        self.log.warning("answers_resent", count=len(lost))
        self.held.extendleft((subject, data, still, True) for _, (subject, data, still) in reversed(lost))
        self._start_flusher()

    async def _probe(self) -> bool:
        """Whether an echo sent now comes back within ``confirm_timeout`` (everything sent
        before it on this connection then reached the server)."""
        self._echoes += 1
        n, probe = self._echoes, asyncio.get_running_loop().create_future()
        self._probes[n] = probe
        try:
            await self.nc.publish(self._echo_subject, b"p%d" % n)
            await asyncio.wait_for(probe, self.confirm_timeout)
            return True
        except Exception:  # noqa: BLE001 - no echo in time, or disconnected again
            self._probes.pop(n, None)
            if not self.nc.is_connected:
                await asyncio.sleep(min(self.confirm_timeout, 0.5))
            return False

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


