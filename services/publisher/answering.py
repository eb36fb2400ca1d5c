"""A group's answers to its clients, and the ledger writes that make each terminal
answer this publisher instance's own (the protocol's decisions are ``answers.py``; the
ledger's compare-and-sets ``ownership.py``): chunks while the lease holds, exactly one
``done`` or ``error`` per request, and the lease that lets this instance speak at all
(lost: every request of the instance is given up, and ingest answers them).

A part of ``Publisher`` (``service.py``): it uses the service's outbox, ledger,
scheduler, engine, counters, metrics and log."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from dpbus.schemas import Chunk, Done, Error, ErrorCode, FinishReason, Timings, encode_answer
from dpbus.services import ownership
from dpbus.services.errors import GroupFailure
from dpbus.services.ledger import Lease, LeaseClock, request_key
from dpbus.services.publisher import answers
from dpbus.services.publisher.scheduler import Sequence

ANSWERED_WINDOW = 120.0  # seconds a terminal answer is remembered against copies and retries


class Answering:
    async def send(self, seq: Sequence, chunk: Chunk) -> None:
        """Stream a chunk to a client, only while this instance holds its lease (after
        that, ingest answers for it). Terminal answers go through ``answer``."""
        if not self.may_answer(seq):
            self.give_up(seq, "the lease expired")
            return
        d = seq.delivery
        await self.outbox.send(d.reply, encode_answer(chunk, d.encoding), still=lambda: self.may_answer(seq))

    async def stream_unsent(self, seq: Sequence) -> None:
        """Stream the tokens ``seq`` sampled since its last chunk, as its next chunk."""
        chunk = seq.delivery.next_chunk(seq.rid)
        if chunk is not None:
            await self.send(seq, chunk)

    def may_answer(self, seq: Sequence) -> bool:
        """Answers of ``seq`` may go out (now, or when the outbox sends them later): it is
        settled here (this instance won its terminal answer), or this instance still holds
        its lease and has not given ``seq`` up."""
        return answers.may_answer(seq.delivery, self.instance, self.lease.valid(time.monotonic()))

    async def answer(self, seq: Sequence, msg: Done | Error, count: str) -> None:
        """Send ``seq``'s terminal answer and make it this instance's in the ledger.

        The answer goes first and the settling write (a compare-and-set from held to
        answered) right behind it, with nothing that suspends in between: both reach the
        NATS server in one write, and the server handles one connection's messages in
        order. So a publisher killed at any moment leaves both done or neither: an entry
        still held (ingest answers ``publisher_lost`` once the lease lapses, and the
        client heard nothing) or an answered one whose answer the server took. Settling
        first would leave a window where the entry says answered and the answer dies with
        the process. When the answer cannot go at once (no connection, or answers held
        after a reconnection), the write comes first and the answer goes only if it won. (A
        request this group moved is not answered here at all: its entry says ``moved``.)"""
        self.answered_now(seq.key)  # from now on a copy of it is a duplicate, whoever wins
        if not self.may_answer(seq):
            self.give_up(seq, "the lease expired")
            return
        await self.stream_unsent(seq)  # what was sampled goes out before the end (an abort, a failure)
        if not self.may_answer(seq):  # the lease lapsed while that last chunk waited for the connection
            self.give_up(seq, "the lease expired")
            return
        d = seq.delivery
        data = encode_answer(msg, d.encoding)
        sent = await self.outbox.publish_now(d.reply, data, still=lambda: self.resend(seq))
        key = request_key(self.g, seq.client, seq.rid)
        await self.settle_answer(seq, key, ownership.answered_by(self.instance, self.g, seq.rid, seq.client, data),
                                 data, sent, count)

    async def settle_answer(self, seq: Sequence, key: str, done: Any, data: bytes, sent: bool, count: str) -> None:
        """Win ``seq``'s entry for ``done``. An answer ``sent`` already is settled whatever
        the lease says meanwhile (winning late still keeps ingest from answering too); one
        not sent goes out only if this instance wins. A write whose outcome is unknown is
        resolved off the step path."""
        may = lambda: self.may_answer(seq)  # noqa: E731
        then = await answers.settle_terminal(self.ledger, key, done, seq.delivery, sent, may, asyncio.sleep)
        if then == answers.RESOLVE:
            self.log.warning("settle_unknown", rid=seq.rid)
            task = asyncio.create_task(self.answer_if_ours(seq, key, done, data, sent, count))
            self.resolving.add(task)
            task.add_done_callback(self.resolving.discard)
        else:
            await self.settled(seq, then, data, sent, count)

    async def settled(self, seq: Sequence, then: str, data: bytes, sent: bool, count: str) -> None:
        """The settling write ended: won (``answers.SEND``: the answer goes now, or ``DONE``),
        taken by someone else, or not ours any more (given up)."""
        if then == answers.GIVE_UP_ALL:
            self.give_up(seq, "the request ledger stayed unreachable while settling an answer", force=True)
            return
        if then == answers.GIVE_UP:
            self.log.warning("settle_not_landed", rid=seq.rid)
            self.give_up(seq, "a settling write did not land")
            return
        if then == answers.TAKEN:
            self.counts["taken"] += 1
            # after an answer of ours went out, only a ledger out of reach for longer than
            # the lease lets ingest answer too (the client then hears two terminal answers)
            self.log.error("answer_taken", rid=seq.rid, ours_sent=sent)
            return
        self.counts[count] += 1
        if then == answers.SEND:
            await self.outbox.send(seq.delivery.reply, data, still=lambda: self.may_answer(seq), terminal=True)

    def resend(self, seq: Sequence) -> bool:
        """May the outbox send ``seq``'s terminal answer again (its copy was lost with a
        connection)?"""
        return answers.may_resend(seq.delivery, self.may_answer(seq))

    async def answer_if_ours(self, seq: Sequence, key: str, done: Any, data: bytes, sent: bool, count: str) -> None:
        then = await answers.resolve_terminal(
            self.ledger, key, done, seq.delivery, sent, lambda: self.may_answer(seq), asyncio.sleep,
            again=lambda: self.log.warning("settle_not_landed", rid=seq.rid, trying="again"))
        if then in (answers.SEND, answers.DONE):
            self.log.info("settle_resolved", rid=seq.rid)
        await self.settled(seq, then, data, sent, count)

    def give_up(self, seq: Sequence, why: str, force: bool = False) -> None:
        """``seq`` may not be answered from here: give up every request of its instance (once)."""
        if answers.give_up(seq.delivery, self.instance, self.lease.valid(time.monotonic()), force):
            self.abandon(why)

    def abandon(self, why: str) -> None:
        """This instance lost (or may have lost) its lease: ingest may be answering its
        requests now, so it drops all of them without a word and carries on as a new
        instance with an empty queue and a new epoch."""
        seqs = [*self.sched.take_all(), *self.sched.waiting, *self.moving.values()]
        self.sched.waiting.clear()
        for seq in seqs:
            seq.delivery.abandoned = True
        self.counts["abandoned"] += len(seqs)
        self.log.error("lease_lost", reason=why, requests=len(seqs), instance=self.instance,
                       rids=[seq.rid for seq in seqs[:100]])
        self.instance = secrets.randbits(62) | 1
        self.lease = LeaseClock(self.s.publisher_timeout)
        self.engine.drop(GroupFailure(ErrorCode.UNAVAILABLE, why))  # a wait for one of them fails
        self.replied.set()

    async def lease_loop(self) -> None:
        """Renew the lease every quarter of its length; give everything up when it lapses.
        It runs until the publisher ends (cancelled then), a stop included: draining the
        requests after a SIGTERM needs the lease as much as serving them."""
        while True:
            clock, sent_at = self.lease, time.monotonic()
            try:
                await self.ledger.renew(Lease(self.instance, self.g, self.s.publisher_timeout))
                clock.renewed(sent_at)
            except Exception as e:  # noqa: BLE001 - the next renewal retries
                self.log.warning("lease_not_renewed", error=repr(e))
            if not self.lease.valid(time.monotonic()) and (self.sched.has_work() or self.moving):
                self.abandon("the lease expired")
            await asyncio.sleep(self.s.publisher_timeout / 4)

    async def finish(self, seq: Sequence, reason: FinishReason) -> None:
        now, d = time.time(), seq.delivery
        timings = Timings(
            queue_ms=round(max(seq.scheduled_at - seq.accepted_at, 0) * 1000, 3) if seq.scheduled_at else 0.0,
            ttft_ms=round(max(d.first_token_at - seq.accepted_at, 0) * 1000, 3) if d.first_token_at else 0.0,
            total_ms=round((now - seq.accepted_at) * 1000, 3),
        )
        done = Done(seq.rid, self.g, reason, len(seq.prompt), len(seq.output), timings)
        if seq.scheduled_at:
            self.metrics.queue.observe(timings.queue_ms / 1000)
        if d.first_token_at:
            self.metrics.ttft.observe(timings.ttft_ms / 1000)
        room = self.model.max_seq_len - len(seq.prompt)
        if seq.sampling.max_new_tokens > room:  # the context ends the output first: say so
            done.clamped_max_new_tokens = room
        if not d.stream:
            done.token_ids = list(seq.output)
            done.text = "".join(d.text_parts)
        await self.answer(seq, done, "done")

    async def fail(self, seq: Sequence, code: ErrorCode, message: str) -> None:
        await self.answer(seq, Error(code, message, rid=seq.rid, dp_rank=self.g), "errors")

    def answered_now(self, key: tuple[str, str]) -> None:
        """Remember a request's terminal answer: a copy or retry of it within
        ``ANSWERED_WINDOW`` is acknowledged without asking the ledger."""
        self.answered[key] = time.monotonic()

    def recently_answered(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        while self.answered and now - next(iter(self.answered.values())) > ANSWERED_WINDOW:
            self.answered.pop(next(iter(self.answered)))
        return key in self.answered
