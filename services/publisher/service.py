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
and each request's delivery and the answer protocol's decisions (``answers.py``). The
service is this module (readiness, its workers' messages, the step loop, load reports)
and three parts with a file each: ``admission.py`` (submits, claims, aborts),
``answering.py`` (chunks, terminal answers, their ledger writes and the lease) and
``moving.py`` (offering requests to other groups). They receive, send, wait and keep
time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import nats.micro
from prometheus_client import CollectorRegistry

from dpbus.schemas import ErrorCode, FinishReason, Subjects
from dpbus.schemas.internal import (
    GroupAbort, Heartbeat, LoadReport, Replay, ReplayReply, StepReply, Submit, SubmitAck, pack, unpacker,
)
from dpbus.services import bus
from dpbus.services import version as package_version
from dpbus.services.lifecycle import unless_stopped
from dpbus.services.errors import GroupFailure, SendDataError
from dpbus.services.ledger import LeaseClock, Ledger
from dpbus.services.publisher.admission import Admission
from dpbus.services.publisher.answering import Answering
from dpbus.services.publisher.moving import Moving
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


class Publisher(Admission, Answering, Moving):
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
        self.ready_since: float | None = None  # when the group last became ready (None: not ready)
        self.was_ready = False  # ready at least once since this publisher started
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
                       "foreign_reply": 0, "forged": 0, "moves_unanswered": 0}
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

    def starting(self, now: float) -> bool:
        """Never ready yet, every member beating: the group's workers are still loading (a
        deployment coming up), not gone."""
        return not self.was_ready and all(
            (seen := self.beats.get(node)) is not None and now - seen[0] <= self.s.heartbeat_timeout
            for node in self.members)

    def ready_for(self, ready: bool, now: float) -> float:
        """Seconds the group has been ready without a break, given whether it is now."""
        if not ready:
            self.ready_since = None
            return 0.0
        self.was_ready = True
        if self.ready_since is None:
            self.ready_since = now
        return now - self.ready_since

    def not_ready_reason(self) -> str:
        missing = self.missing_members(time.monotonic())
        if missing:
            return f"group {self.g} is not whole: node(s) {missing} not ready"
        return f"group {self.g}'s publisher has no valid lease in the request ledger"

    # ---- its workers (submits and aborts: admission.py) --------------------------------
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
        sched, ready, now = self.sched, self.ready(), time.monotonic()
        report = LoadReport(self.g, n, time.time(), ready, len(sched.waiting), len(sched.running),
                            sched.max_running - len(sched.running),
                            sum(s.outstanding_tokens for s in (*sched.waiting, *sched.running)),
                            len(sched.free_pages), sched.page_size if sched.pool.cache else 0,
                            sched.pool.digest(), self.starting(now), self.ready_for(ready, now))
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
