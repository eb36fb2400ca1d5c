"""The publisher service of one DP group.

It takes submitted requests (``dpbus.dp.{g}.submit``, acknowledged at once, refused
while the group is not whole), runs the scheduling loop (``Step``s on
``dpbus.dp.{g}.step``, carrying only what changed in the rows' page tables
(``tables.py``), each settled when every member acknowledged it with the same digest;
late steps are re-sent and missed ones replayed from a window), streams ``chunk``s and
exactly one terminal message to each client, watches its workers' heartbeats, reports the
group's load and tells ingest which requests it has answered.

Steps overlap (``steps_in_flight``, default 2): step N+1 is planned and published before
step N's tokens are back, so the workers go from one forward to the next without waiting
for the bus; a decode row whose last token is not known yet feeds ``LAST_TOKEN`` (the
workers hold it). While the group computes step N+1, the publisher takes step N's tokens,
sends step N+2, and only then streams step N's chunks and answers: stop checks run a
step late, and a token sampled past a stop is dropped, never sent.

When the group fails (a step fails, times out or diverges, a worker stops beating), the
running requests that streamed nothing move to another group, the others get an
``error`` answer, and the group starts a new epoch; queued requests move too while the
group is not whole, or wait for it up to ``queue_timeout``.

What is decided without I/O lives beside it: the group's step core (``engine.py``:
scheduler, row tables, step numbering and acknowledgements, one record per step out),
and each request's delivery and the answer protocol's decisions (``answers.py``). This
module receives, sends, waits and keeps time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import nats.micro
from prometheus_client import CollectorRegistry

from dpbus.schemas import Chunk, Done, Error, ErrorCode, FinishReason, Subjects, Timings, encode_answer
from dpbus.schemas.internal import (
    GroupAbort, client_of, Heartbeat, LoadReport, Replay, ReplayReply, StepReply, Submit, SubmitAck, pack, unpacker,
)
from dpbus.schemas.public import AbortAck
from dpbus.services import bus, identity, ownership
from dpbus.services import version as package_version
from dpbus.services.lifecycle import unless_stopped
from dpbus.services.errors import GroupFailure, ReceiveDataError, SendDataError
from dpbus.services.ledger import Lease, LeaseClock, Ledger, ledger_full, request_key
from dpbus.services.publisher import answers
from dpbus.services.publisher.answers import Delivery
from dpbus.services.publisher.engine import GroupEngine
from dpbus.services.publisher.scheduler import Scheduler, Sequence
from dpbus.services.publisher.stepper import InFlight, Stepper
from dpbus.services.publisher.tables import RowTables
from dpbus.services.metrics import PublisherMetrics
from dpbus.services.model_config import model_config_for
from dpbus.services.natsconf import user_for
from dpbus.services.settings import PublisherSettings, total_pages
from dpbus.services.tokenizer import load_tokenizer
from dpbus.services.topology import dp_groups, group_nodes

VERSION = package_version()  # announced in NATS discovery
ANSWERED_WINDOW = 120.0  # seconds a terminal answer is remembered against copies and retries


class Publisher:
    def __init__(self, settings: PublisherSettings, log: Any, auth: bus.NatsAuth | None = None) -> None:
        s = self.s = settings
        self.g = s.dp_rank
        self.auth = auth or bus.auth_from(s, user_for("publisher", self.g))
        self.groups = dp_groups(s.dp_size, s.enable_dp_attention)
        if not 0 <= self.g < self.groups:
            raise ValueError(f"dp_rank {self.g} is out of range: this layout has {self.groups} DP group(s) "
                             f"(dp_size={s.dp_size}, enable_dp_attention={s.enable_dp_attention})")
        self.members = group_nodes(self.g, s.nnodes, self.groups)
        self.subjects = Subjects(s.prefix)
        self.log = log.bind(dp_rank=self.g)
        self.model = model_config_for(s.model_path, s.max_seq_len)
        self.tokenizer = load_tokenizer(s.model_path)
        sched = Scheduler(s.max_running_requests, s.max_prefill_tokens, s.max_waiting, self.model.max_seq_len,
                          total_pages(s, self.model.max_seq_len), s.page_size, s.prefix_cache)
        self.engine = GroupEngine(sched, RowTables(s.max_running_requests),  # the rows the workers know
                                  Stepper(self.g, self.members, s.replay_window), s.steps_in_flight)
        self.replied = asyncio.Event()  # set when a step settles or is dropped
        self.beats: dict[int, tuple[float, Heartbeat]] = {}
        self.instance = secrets.randbits(62) | 1  # identifies this run of the publisher (and its lease)
        self.lease = LeaseClock(s.publisher_timeout)
        self.ledger: Ledger | None = None
        self.answered: dict[tuple[str, str], float] = {}  # key -> when answered (monotonic), oldest first
        self.moving: dict[tuple[str, str], Sequence] = {}  # out of the scheduler, being offered elsewhere
        self.doubtful: dict[tuple[str, str], Sequence] = {}  # claims whose outcome is being resolved
        self.resolving_claims: set[asyncio.Task] = set()
        self.resolving: set[asyncio.Task] = set()  # terminal answers whose settling write is being resolved
        self.last_settled = 0.0  # when the last step settled (monotonic)
        self.timing = {"step_ms": 0.0, "compute_ms": 0.0}  # settle to settle, and the leader's compute
        self.wake = asyncio.Event()
        self.counts = {"accepted": 0, "rejected": 0, "done": 0, "errors": 0, "steps": 0, "group_failures": 0,
                       "resent": 0, "replayed": 0, "requeued": 0, "duplicates": 0, "abandoned": 0, "taken": 0,
                       "foreign_reply": 0, "forged": 0}
        self._unpack = {k: unpacker(t) for k, t in
                        (("submit", Submit), ("abort", GroupAbort), ("beat", Heartbeat), ("result", StepReply),
                         ("replay", Replay))}
        self._ack = unpacker(SubmitAck)
        self.metrics = PublisherMetrics(CollectorRegistry(), self.g)  # served when --metrics-port is set

    @property
    def sched(self) -> Scheduler:
        return self.engine.sched

    @property
    def stepper(self) -> Stepper:
        return self.engine.stepper

    @property
    def tables(self) -> RowTables:
        return self.engine.tables

    # ---- readiness -------------------------------------------------------------------
    def missing_members(self, now: float) -> list[int]:
        out = []
        for node in self.members:
            seen = self.beats.get(node)
            if seen is None or not seen[1].ready or now - seen[0] > self.s.heartbeat_timeout:
                out.append(node)
        return out

    def ready(self) -> bool:
        """Whole (every member beats, ready) and holding a valid lease in the ledger."""
        now = time.monotonic()
        return not self.missing_members(now) and self.lease.valid(now)

    def not_ready_reason(self) -> str:
        missing = self.missing_members(time.monotonic())
        if missing:
            return f"group {self.g} is not whole: node(s) {missing} not ready"
        return f"group {self.g}'s publisher has no valid lease in the request ledger"

    # ---- NATS handlers ---------------------------------------------------------------
    async def on_submit(self, req: Any) -> None:
        try:
            sub = self._unpack["submit"].decode(req.data)
        except Exception as e:  # noqa: BLE001
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.BAD_REQUEST, f"bad submit: {e}")))
            return
        if not identity.answerable(sub.reply, sub.client):  # ingest checks this; a publisher never trusts it
            self.counts["foreign_reply"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.BAD_REQUEST, "the reply subject is not the client's inbox")))
            return
        if sub.key in self.doubtful:
            return  # its claim is being resolved: no answer until known (ingest asks again)
        if self.held(sub.client, sub.rid) is not None or self.recently_answered(sub.key):
            # a retried submit, or a copy of a request we hold or answered: one answer only
            self.counts["duplicates"] += 1
            await req.respond(pack(SubmitAck(True, waiting=len(self.sched.waiting), instance=self.instance,
                                             duplicate=True)))
            return
        if not self.ready():
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.UNAVAILABLE, self.not_ready_reason())))
            return
        if len(self.sched.waiting) >= self.sched.max_waiting:
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.OVERLOADED,
                                             f"group {self.g} has {len(self.sched.waiting)} requests waiting")))
            return
        seq = self.new_sequence(sub)
        instance = self.instance
        try:
            rev = await self.claim(sub)
        except Exception as e:  # noqa: BLE001 - no ledger, no acceptance
            if ledger_full(e):  # every group shares the bucket: the system is full
                self.counts["rejected"] += 1
                await req.respond(pack(SubmitAck(False, ErrorCode.OVERLOADED, "the request ledger is full")))
                return
            if ownership.certainly_not_applied(e):
                self.counts["rejected"] += 1
                await req.respond(pack(SubmitAck(False, ErrorCode.UNAVAILABLE,
                                                 f"the request ledger is unreachable: {e!r}")))
                return
            # the claim may have landed: refusing would leave a request nobody runs. No
            # answer now; ingest asks again, or records a refusal that the ledger arbitrates
            self.log.warning("claim_unknown", rid=sub.rid, error=repr(e))
            self.doubtful[sub.key] = seq
            task = asyncio.create_task(self.resolve_claim(sub, seq, instance))
            self.resolving_claims.add(task)
            task.add_done_callback(self.resolving_claims.discard)
            return
        if rev is None:  # the name is someone else's (held elsewhere, or answered): never run it twice
            self.counts["duplicates"] += 1
            await req.respond(pack(SubmitAck(True, instance=self.instance, duplicate=True)))
            return
        self.adopt(seq, rev, instance)
        await req.respond(pack(SubmitAck(True, waiting=len(self.sched.waiting), instance=self.instance)))

    def new_sequence(self, sub: Submit) -> Sequence:
        """The scheduler's sequence for a submitted request, with its delivery record."""
        delivery = Delivery(sub.reply, sub.encoding, sub.stream, sub.sampling.stop,
                            self.tokenizer.stream(sub.input_ids), pinned=sub.pinned, attempt=sub.attempt)
        return Sequence(sub.rid, sub.input_ids, sub.sampling, sub.accepted_at, eos_ids=self.model.eos_token_ids,
                        client=sub.client, delivery=delivery)

    def adopt(self, seq: Sequence, rev: int, instance: int) -> None:
        """``seq`` is claimed in the ledger by ``instance`` (this one): queue it."""
        seq.delivery.ledger_rev, seq.delivery.owner = rev, instance
        self.sched.waiting.append(seq)  # room was checked when it came; the claim is made
        self.counts["accepted"] += 1
        self.wake.set()

    async def resolve_claim(self, sub: Submit, seq: Sequence, instance: int) -> None:
        """A claim whose outcome is unknown: claim again until the ledger answers. If ours,
        run it (ingest could not refuse it: the name was taken). Given up with this
        instance (then ingest answers for the instance's held requests)."""
        try:
            mine = ownership.held_by(instance, self.g, sub)
            rev = await ownership.claim_until_known(self.ledger, request_key(sub.client, sub.rid), mine,
                                                    sub.moved_from, sub.attempt, asyncio.sleep,
                                                    lambda: self.instance == instance)
            if rev is not None and self.instance == instance:
                self.log.info("claim_resolved", rid=sub.rid)
                self.adopt(seq, rev, instance)
        finally:
            self.doubtful.pop(sub.key, None)

    async def on_abort(self, req: Any) -> None:
        try:
            ask = self._unpack["abort"].decode(req.data)
        except Exception as e:  # noqa: BLE001
            await req.respond(pack(AbortAck(rid="", found=False)))
            self.log.warning("bad_abort", error=str(e))
            return
        rid = ask.rid
        # a request whose claim is still in doubt is aborted too: if the claim proves ours,
        # it ends at once with its terminal answer
        seq = self.held(client_of(ask.reply), rid) or self.doubtful.get((client_of(ask.reply), rid))
        found = seq is not None and seq.delivery.reply == ask.reply  # only the owner knows its reply subject
        if found:
            self.engine.abort(seq)
        await req.respond(pack(AbortAck(rid=rid, found=found, dp_rank=self.g if found else None)))
        if found:
            self.wake.set()

    async def claim(self, sub: Submit) -> int | None:
        """Make this instance the holder of ``sub`` in the ledger: its revision, or None
        when the name belongs to someone else. A moved request is taken over from the
        instance that moved it; a refused one by a fresh attempt."""
        mine = ownership.held_by(self.instance, self.g, sub)
        return await ownership.claim(self.ledger, request_key(sub.client, sub.rid), mine, sub.moved_from,
                                     sub.attempt)

    def held(self, client: str, rid: str) -> Sequence | None:
        """The request (client, rid) if this publisher holds it: queued, running or moving."""
        return self.sched.find(rid, client) or self.moving.get((client, rid))

    def speaks_for_itself(self, node_rank: int, subject: str) -> bool:
        """Does a member's message name the member whose subject it came on? Only that
        member's NATS user may publish there (services/natsconf.py): a heartbeat or result
        in another member's name is dropped and counted."""
        if node_rank == Subjects.member_of(subject):
            return True
        self.counts["forged"] += 1
        if self.counts["forged"] & (self.counts["forged"] - 1) == 0:  # 1st, 2nd, 4th...: a flood stays quiet
            self.log.warning("message_in_another_member_s_name", subject=subject, says=node_rank)
        return False

    async def on_heartbeat(self, msg: Any) -> None:
        try:
            beat = self._unpack["beat"].decode(msg.data)
        except Exception:  # noqa: BLE001
            return
        if beat.node_rank in self.members and self.speaks_for_itself(beat.node_rank, msg.subject):
            was_ready = self.ready()
            self.beats[beat.node_rank] = (time.monotonic(), beat)
            if not was_ready and self.ready():
                self.log.info("group_ready", members=self.members)
                self.wake.set()

    async def on_result(self, msg: Any) -> None:
        try:
            reply = self._unpack["result"].decode(msg.data)
        except Exception as e:  # noqa: BLE001
            self.log.error("bad_result", error=str(e))
            return
        if not self.speaks_for_itself(reply.node_rank, msg.subject):
            return
        if self.engine.on_reply(reply) is not None:
            self.replied.set()

    async def on_replay(self, req: Any) -> None:
        """Resend steps a worker missed, from the window of recent ones: the first of them
        that fit in ``REPLAY_BYTES`` (the worker asks again for the rest)."""
        try:
            ask = self._unpack["replay"].decode(req.data)
        except Exception:  # noqa: BLE001
            await req.respond(pack(ReplayReply([])))
            return
        steps = self.stepper.replay(ask)
        self.counts["replayed"] += len(steps)
        await req.respond(pack(ReplayReply(steps)))

    def stats(self, *_: Any) -> dict:
        sched = self.sched
        return {**self.counts, "preemptions": sched.preemptions, "waiting": len(sched.waiting),
                "running": len(sched.running), "free_pages": len(sched.free_pages), "epoch": self.stepper.epoch,
                "cached_pages": sched.pool.cached_pages(), "hit_tokens": sched.hit_tokens,
                "prefill_tokens": sched.prefill_tokens, "evictions": sched.pool.evictions,
                "step_ms_total": round(self.timing["step_ms"], 3), "compute_ms_total": round(self.timing["compute_ms"], 3)}

    # ---- answers ---------------------------------------------------------------------
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
        after a reconnection), or when another group may have taken the request over, the
        write comes first and the answer goes only if it won."""
        self.answered_now(seq.key)  # from now on a copy of it is a duplicate, whoever wins
        if not self.may_answer(seq):
            self.give_up(seq, "the lease expired")
            return
        await self.stream_unsent(seq)  # what was sampled goes out before the end (an abort, a failure)
        d = seq.delivery
        data = encode_answer(msg, d.encoding)
        # a request offered to another group may be that group's now (its acknowledgement
        # lost): only the ledger can say, so its answer waits for the write
        sent = answers.answer_first(d) and await self.outbox.publish_now(d.reply, data, still=lambda: self.resend(seq))
        key = request_key(seq.client, seq.rid)
        await self.settle_answer(seq, key, ownership.answered_by(self.instance, self.g, seq.rid, seq.client), data,
                                 sent, count)

    async def settle_answer(self, seq: Sequence, key: str, done: Any, data: bytes, sent: bool, count: str) -> None:
        """Win ``seq``'s entry for ``done``. An answer ``sent`` already is settled whatever
        the lease says meanwhile (winning late still keeps ingest from answering too); one
        not sent goes out only if this instance wins. A write whose outcome is unknown is
        resolved off the step path."""
        still = answers.settle_guard(sent, lambda: self.may_answer(seq))
        how = await ownership.settle(self.ledger, key, done, seq.delivery.ledger_rev, still, asyncio.sleep)
        then = answers.after_settle(seq.delivery, how, sent)
        if then == answers.RESOLVE:
            self.log.warning("settle_unknown", rid=seq.rid)
            task = asyncio.create_task(self.answer_if_ours(seq, key, done, data, sent, count))
            self.resolving.add(task)
            task.add_done_callback(self.resolving.discard)
        elif then == answers.GIVE_UP:
            self.give_up(seq, "the request ledger stayed unreachable while settling an answer", force=True)
        else:
            await self.settled(seq, then, data, sent, count)

    async def settled(self, seq: Sequence, then: str, data: bytes, sent: bool, count: str) -> None:
        """The settling write ended: won (``answers.SEND``: the answer goes now, or ``DONE``)
        or taken by someone else."""
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
        ours = await ownership.resolve(self.ledger, key, done, asyncio.sleep)
        then = answers.after_resolve(seq.delivery, ours, sent, self.may_answer(seq))
        if then == answers.AGAIN:
            self.log.warning("settle_not_landed", rid=seq.rid, trying="again")
            await self.settle_answer(seq, key, done, data, sent, count)
        elif then == answers.GIVE_UP:
            self.log.warning("settle_not_landed", rid=seq.rid)
            self.give_up(seq, "a settling write did not land")
        else:
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

    # ---- the scheduling loop -----------------------------------------------------------
    async def send_step(self, out: InFlight) -> None:
        """Publish a step the engine planned."""
        out.sent_at = time.monotonic()
        try:
            await bus.publish(self.nc, self.subjects.step(self.g), out.data)
        except SendDataError as e:
            raise GroupFailure(ErrorCode.UNAVAILABLE, str(e)) from None

    async def settle(self, out: InFlight) -> None:
        """Wait until every member acknowledged step ``out`` with the same digest;
        re-publish it while acknowledgements are late (workers drop repeats)."""
        n = out.number
        start = time.monotonic()
        next_send = start + self.s.resend_interval
        while not out.settled and out.dropped is None:
            self.replied.clear()
            try:
                await asyncio.wait_for(self.replied.wait(), 0.05)
            except asyncio.TimeoutError:
                now = time.monotonic()
                missing = self.missing_members(now)
                if missing:
                    raise GroupFailure(ErrorCode.WORKER_LOST, f"group {self.g} lost node(s) {missing} during step "
                                                              f"{n}") from None
                if now - start > self.s.step_timeout:
                    raise GroupFailure(ErrorCode.TIMEOUT, f"step {n} of group {self.g}: node(s) "
                                                          f"{self.stepper.silent(n)} did "
                                                          f"not answer within {self.s.step_timeout}s") from None
                if now >= next_send:
                    self.counts["resent"] += 1
                    next_send = now + self.s.resend_interval
                    await bus.publish(self.nc, self.subjects.step(self.g), out.data)
        if out.dropped is not None:  # given up meanwhile (the lease was lost)
            raise out.dropped

    async def emit(self, events: list) -> None:
        """Chunks in order, then the terminal answers of the requests that finished (their
        ledger writes made together)."""
        now = time.time()
        finished = []
        for seq, token, reason in events:
            gap = seq.delivery.stamp(now)
            if gap is not None:
                self.metrics.itl.observe(gap)
            ended = seq.delivery.take(token, reason)
            if ended is not None and reason is None:  # a stop string: it leaves now
                self.sched.stop_early(seq)
            reason = ended
            if seq.delivery.chunk_due(self.s.stream_interval, reason is not None):
                await self.stream_unsent(seq)
            if reason is not None:
                finished.append((seq, reason))
        await asyncio.gather(*(self.finish(seq, reason) for seq, reason in finished))

    async def reset_group(self, failure: GroupFailure) -> None:
        """Fail what was running (or move it, if it streamed nothing yet), start a new epoch."""
        self.counts["group_failures"] += 1
        victims = self.engine.on_failure(failure)  # what the steps in flight would have sampled is lost
        self.replied.set()
        self.log.error("group_failed", code=failure.code.value, reason=failure.message, running=len(victims))
        for seq in victims:
            if await self.move(seq) is None:
                await self.fail(seq, failure.code, failure.message)

    def movable(self, seq: Sequence) -> bool:
        """Only a request that has sent nothing to its client, and was not pinned, moves
        (nor one a step in flight still samples for: its token would come here)."""
        return not seq.output and not seq.pending and not seq.delivery.pinned and self.groups > 1

    async def move(self, seq: Sequence) -> int | None:
        """Offer ``seq`` (already out of the scheduler) to the other groups; the group that
        took it, or None. While it is offered it stays listed in ``moving``, so that a
        duplicate or an abort still finds it here; an abort that came meanwhile is
        passed on to the group that took it."""
        if not self.movable(seq):
            return None
        self.moving[seq.key] = seq
        try:
            target = await self.requeue(seq)
        finally:
            self.moving.pop(seq.key, None)
        if target is not None and seq.aborted and not seq.delivery.abandoned:
            await self.forward_abort(target, seq)
        return target

    async def forward_abort(self, g: int, seq: Sequence) -> None:
        try:
            await bus.request(self.nc, self.subjects.group_abort(g), pack(GroupAbort(seq.rid, seq.delivery.reply)),
                              timeout=2.0)
        except ReceiveDataError as e:
            self.log.warning("abort_not_forwarded", rid=seq.rid, to_group=g, error=e.message)

    async def move_waiting(self) -> None:
        """While the group is not whole, offer its queued requests to other groups. Each one
        leaves the queue before it is offered, so it cannot also start here meanwhile; one
        that no group took goes back to the head of the queue."""
        for seq in list(self.sched.waiting):
            if self.ready():
                return
            if seq not in self.sched.waiting or not self.movable(seq):
                continue
            self.sched.waiting.remove(seq)
            if await self.move(seq) is None and not seq.delivery.abandoned:
                if seq.aborted:
                    await self.finish(seq, FinishReason.ABORT)
                else:
                    self.sched.waiting.appendleft(seq)

    async def requeue(self, seq: Sequence) -> int | None:
        """Hand a request that has sent nothing to its client yet to another group (the
        one returned). It keeps its rid, reply subject and acceptance time; the other group
        answers the client."""
        if not self.movable(seq):
            return None
        d = seq.delivery
        sub = Submit(seq.rid, seq.prompt, seq.sampling, d.stream, d.reply, d.encoding, seq.accepted_at, -1,
                     client=seq.client, attempt=d.attempt, moved_from=self.instance)
        for g in (x for x in range(self.groups) if x != self.g):
            sub.dp_rank = g
            d.offered = True
            try:
                ack = self._ack.decode(await bus.request(self.nc, self.subjects.submit(g), pack(sub), timeout=2.0,
                                                         attempts=1))
            except ReceiveDataError:
                continue
            if ack.accepted:
                self.counts["requeued"] += 1
                self.log.info("requeued", rid=seq.rid, to_group=g)
                return g
        return None

    async def schedule_loop(self, stop: asyncio.Event) -> None:
        """Keep ``steps_in_flight`` steps on the wire; take each one's tokens when it
        settles, then send the next and only then stream what the settled one sampled."""
        events: list = []
        while not stop.is_set() or self.sched.running or self.engine.in_flight:
            aborted = self.engine.take_aborted()  # out of the batch before the next step is planned
            failure = None
            try:
                await self.fill_flight()
            except GroupFailure as f:
                failure = f
            except Exception as e:  # noqa: BLE001 - a bug (e.g. a plan the row tables refuse)
                self.log.exception("step_error")
                failure = GroupFailure(ErrorCode.INTERNAL, repr(e))
            if events:  # the group computes meanwhile
                await self.emit(events)  # tokens sampled before an abort was seen still go out...
                events = []
            for seq in aborted:  # ...then the aborted requests' answers: nothing after them
                await self.finish(seq, FinishReason.ABORT)
            if failure is None and self.engine.in_flight:
                try:
                    events = await self.take_oldest_step()
                    continue
                except GroupFailure as f:
                    failure = f
                except Exception as e:  # noqa: BLE001 - a bug: fail loudly but keep the group alive
                    self.log.exception("step_error")
                    failure = GroupFailure(ErrorCode.INTERNAL, repr(e))
            if failure is not None:
                await self.reset_group(failure)
            elif not self.sched.has_work():
                self.wake.clear()
                await self._wait_wake(stop)
            elif not self.ready():
                await self._wait_wake(stop, 0.1)
            else:
                await asyncio.sleep(0)  # nothing could be planned now (pages come back as steps settle)
        if events:  # the last settled step's tokens and answers (the loop ended with no work left)
            await self.emit(events)

    async def fill_flight(self) -> None:
        """Plan and send steps until ``steps_in_flight`` are on the wire (or nothing is
        left to plan, or the group is not ready)."""
        while self.ready() and (out := self.engine.plan(time.time(), self.epochs_seen())):
            await self.send_step(out)

    def epochs_seen(self):
        """The epochs the members report (a new epoch is numbered above them)."""
        return (beat.epoch for _, beat in self.beats.values())

    async def take_oldest_step(self) -> list:
        """Wait for the oldest step in flight to settle and apply its tokens; the events
        to stream."""
        out = self.engine.oldest
        await self.settle(out)
        result, events = self.engine.take_settled()
        now = time.monotonic()
        wall = now - max(self.last_settled, out.sent_at)
        self.last_settled = now
        self.timing["step_ms"] += wall * 1000
        self.timing["compute_ms"] += result.elapsed_ms
        self.metrics.step.observe(wall)
        self.metrics.delivery.observe(max(wall - result.elapsed_ms / 1000, 0.0))
        self.counts["steps"] += 1
        return events

    async def _wait_wake(self, stop: asyncio.Event, timeout: float = 1.0) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def housekeeping_loop(self, stop: asyncio.Event) -> None:
        """Load reports, and an answer for requests that waited too long for a whole group."""
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await self.housekeeping(n)
            except Exception:  # noqa: BLE001 - a bug: say so, and keep reporting
                self.log.exception("housekeeping_error")
            await asyncio.sleep(self.s.load_interval)

    async def housekeeping(self, n: int) -> None:
        if self.sched.waiting and not self.ready():  # the group is not whole: try elsewhere
            await self.move_waiting()
        for seq in self.sched.take_expired(time.time(), self.s.queue_timeout):
            missing = self.missing_members(time.monotonic())
            await self.fail(seq, ErrorCode.UNAVAILABLE if missing else ErrorCode.TIMEOUT,
                            f"waited {self.s.queue_timeout}s in group {self.g}'s queue"
                            + (f"; nodes {missing} are not ready" if missing else ""))
        sched = self.sched
        report = LoadReport(self.g, n, time.time(), self.ready(), len(sched.waiting), len(sched.running),
                            sched.max_running - len(sched.running),
                            sum(s.outstanding_tokens for s in (*sched.waiting, *sched.running)),
                            len(sched.free_pages), sched.page_size if sched.pool.cache else 0,
                            sched.pool.digest())
        try:
            await self.nc.publish(self.subjects.load(self.g), pack(report))
        except Exception as e:  # noqa: BLE001
            self.log.warning("load_report_failed", error=repr(e))

    async def run(self, stop: asyncio.Event) -> None:
        g, subj = self.g, self.subjects
        hooks: list = []
        self.nc = await unless_stopped(stop, bus.connect(self.s.nats_url, f"dpbus-publisher-{g}", self.log,
                                                         on_reconnect_hooks=hooks, auth=self.auth))
        self.outbox = bus.ClientOutbox(self.nc, self.log)
        hooks.append(self.outbox.on_reconnect)
        self.ledger = await Ledger.open(self.nc, self.s.prefix, self.s.ledger_replicas, log=self.log)
        leasing = asyncio.create_task(self.lease_loop())
        await bus.subscribe(self.nc, subj.heartbeats(g), self.on_heartbeat)
        await bus.subscribe(self.nc, subj.results(g), self.on_result)
        await bus.subscribe(self.nc, subj.replay(g), self.on_replay)
        svc = await nats.micro.add_service(
            self.nc, name="dpbus-publisher", version=VERSION, description=f"dpbus publisher of DP group {g}",
            metadata={"dp_rank": str(g), "prefix": self.s.prefix}, queue_group=f"dpbus-publisher-{g}",
            stats_handler=self.stats,
        )
        await svc.add_endpoint(name="submit", subject=subj.submit(g), handler=self.on_submit)
        await svc.add_endpoint(name="abort", subject=subj.group_abort(g), handler=self.on_abort)
        self.log.info("publisher_started", members=self.members)
        tasks = [asyncio.create_task(self.schedule_loop(stop)), asyncio.create_task(self.housekeeping_loop(stop))]
        await stop.wait()
        await svc.stop()  # no new work; the loop finishes what is running, for drain_timeout at most
        self.wake.set()
        try:
            await asyncio.wait_for(tasks[0], self.s.drain_timeout)
        except asyncio.TimeoutError:
            pass
        for seq in [*self.sched.take_all(), *self.sched.waiting]:
            await self.fail(seq, ErrorCode.UNAVAILABLE, f"group {g}'s publisher is shutting down")
        self.sched.waiting.clear()
        await self.outbox.drain(timeout=2)
        tasks[1].cancel()
        leasing.cancel()
        await bus.close(self.nc)
