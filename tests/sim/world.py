"""A small world of ingests, publishers and one ledger, run by a seeded event scheduler.

Time is virtual; every service reads its own monotonic clock (the world's time plus an
offset drawn at each start, so clocks restart with the process; a publisher's clock can
also jump forward). The network delays, reorders, duplicates and drops messages while
faults are on; services are killed and restarted, and groups fail. The ledger is a
``dpbus.services.ledger.Ledger`` on a ``MemoryKV``; every ledger call is atomic within one event.

What the services decide is decided by the production code: ``dpbus.services.ownership``
(admit a name, claim, hand over and take back, settle, may answer, refuse, sweep and
revoke), the publisher's answer protocol (``dpbus.services.publisher.answers``: when to
answer, the settling write and its resolution to the end, ``settle_terminal`` and
``resolve_terminal``, or giving up, on the publisher's own ``Delivery`` records),
``LeaseClock`` (a publisher's lease) and ``SweepView`` (ingest's view of leases, names and
held requests, and which are orphans or moves to revoke). This module only delivers the
messages between those calls, and records what the services send. A ledger
call may time out while faults are on, lost or applied without an answer; the services
react as theirs do (a publisher rejects the submit or retries its settle, ingest gives up
the sweep until the next one).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass, field

from nats.errors import TimeoutError as NatsTimeout

from dpbus.schemas import Encoding
from dpbus.services import ownership
from dpbus.services.ledger import (ANSWERED, HELD, MOVED, Lease, LeaseClock, Ledger, SweepView, decode_entry,
                                   name_key, request_key)
from dpbus.services.publisher import answers
from dpbus.services.publisher.answers import Delivery
from tests.sim.checker import Checker
from tests.sim.memkv import MemoryKV, run

TTL = 2.0  # publisher_timeout
RECONCILE = 0.5  # ingest's sweep interval
SUBMIT_TIMEOUT = 0.3
SUBMIT_ATTEMPTS = 3
MOVE_TIMEOUT = 0.4
MOVE_GRACE = 2.0  # ingest revokes a move its target has not taken for this long
STEP = 0.1  # one token per running request per step
RUNNING = 1  # requests a publisher runs at once; the others wait (and can still move)
FAULTS_UNTIL = 6.0  # then the network heals, killed services come back and the world settles
END = 20.0


class Sleep:
    """What ``sleep`` gives a coroutine run by ``World.spawn`` to await."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __await__(self):
        yield self


def sleep(seconds: float) -> Sleep:
    """The simulation's ``asyncio.sleep``, in virtual time."""
    return Sleep(seconds)


@dataclass
class Faults:
    drop: float = 0.1
    duplicate: float = 0.05
    slow: float = 0.15  # a message takes up to 0.6 s (reordering it)
    kill: bool = True
    group_failure: bool = True
    clock_jump: bool = True
    lease_outage: bool = True  # a publisher's lease renewals are lost for up to 2 x TTL
    ledger: float = 0.0  # probability that a ledger call times out (lost, or applied unanswered)


@dataclass
class Sub:
    rid: str
    client: str
    reply: str
    attempt: str
    tokens: int
    moved_from: int = 0
    moved_group: int = -1
    encoding: Encoding = Encoding.JSON

    @property
    def key(self) -> str:
        """Its name in the ledger (written by ingest), and what names it in every service."""
        return name_key(self.client, self.rid)

    def entry(self, g: int) -> str:
        """Its request entry in group ``g``."""
        return request_key(g, self.client, self.rid)


@dataclass
class Ack:
    accepted: bool
    duplicate: bool = False


@dataclass
class Held:
    """A request a publisher holds: ``d`` is the publisher's ``Delivery`` (the ledger
    revision, the holder, and settled/abandoned/offered), decided by ``answers``."""

    sub: Sub
    d: Delivery
    output: int = 0
    moving: int = 0  # the token of the move under way, 0: none


class Service:
    def __init__(self, world: "World", name: str) -> None:
        self.w, self.name = world, name
        self.alive, self.life, self.offset = False, 0, 0.0

    def now(self) -> float:
        return self.w.t + self.offset

    def live(self, life: int) -> bool:
        return self.alive and self.life == life

    def start(self) -> None:
        self.alive, self.life = True, self.life + 1
        self.offset = self.w.rng.uniform(-1000.0, 1000.0)
        self.instances: list[int] = []  # the instances this life used

    def kill(self) -> None:
        self.alive = False
        for instance in self.instances:  # won terminal answers it never learnt of die with it
            self.w.died_in_doubt |= self.w.in_doubt.pop(instance, set())
        self.w.at(self.w.rng.uniform(0.1, 3.0), self.start)

    def new_instance(self) -> int:
        instance = self.w.rng.getrandbits(62) | 1
        self.instances.append(instance)
        return instance


class Publisher(Service):
    def __init__(self, world: "World", g: int) -> None:
        super().__init__(world, f"publisher{g}")
        self.g = g
        self.unsettled: set[str] = set()  # terminal answers sent, their settling write not known to have landed

    def kill(self) -> None:
        self.w.check.died_unsettled |= self.unsettled
        self.unsettled = set()
        super().kill()

    def start(self) -> None:
        super().start()
        self.instance = self.new_instance()
        self.lease = LeaseClock(TTL)
        self.held: dict[str, Held] = {}
        self.answered: set[str] = set()
        self.doubtful: set[str] = set()  # claims being resolved
        self.move_token = 0
        self.outage_until = 0.0
        self.w.at(0.0, self.renew, self.life)
        self.w.at(STEP, self.step, self.life)

    # ---- the lease ------------------------------------------------------------------
    def renew(self, life: int) -> None:
        if not self.live(life):
            return
        clock, sent_at, lease = self.lease, self.now(), Lease(self.instance, self.g, TTL)
        landed = self.w.deliver_at() if self.w.t >= self.outage_until else None
        answered: list[bool] = []
        if landed is not None:
            self.w.at(landed, self.land, lease, answered)  # lands even if we die meanwhile
        acked = self.w.deliver_at()
        back = (landed or 0.0) + (acked or self.w.rng.uniform(0.0, 0.05))
        self.w.at(back, self.renewed, life, clock, sent_at, answered, acked is not None)

    def land(self, lease: Lease, answered: list[bool]) -> None:
        try:
            run(self.w.ledger.renew(lease))
            answered.append(True)
        except NatsTimeout:
            pass

    def renewed(self, life: int, clock: LeaseClock, sent_at: float, answered: list[bool], acked: bool) -> None:
        if not self.live(life):
            return
        if answered and acked:
            clock.renewed(sent_at)
        if not self.lease.valid(self.now()) and self.held:
            self.abandon()
        self.w.at(TTL / 4, self.renew, self.life)

    def abandon(self) -> None:
        for seq in self.held.values():
            seq.d.abandoned = True
        self.held.clear()
        self.instance = self.new_instance()
        self.lease = LeaseClock(TTL)

    # ---- submits --------------------------------------------------------------------
    def on_submit(self, sub: Sub, answer) -> None:
        """``Publisher.on_submit``."""
        if not self.alive or sub.key in self.doubtful:
            return
        if sub.key in self.held or sub.key in self.answered:
            return answer(Ack(True, duplicate=True))
        if not self.lease.valid(self.now()):
            return answer(Ack(False))
        instance = self.instance
        mine = ownership.held_by(instance, self.g, sub)
        moved = ownership.source_of(sub)
        try:
            rev = run(ownership.claim(self.w.ledger, sub.entry(self.g), mine, sub.attempt, moved))
        except NatsTimeout:  # it may have landed: no answer until known (``resolve_claim``)
            self.doubtful.add(sub.key)
            resolving = ownership.claim_until_known(self.w.ledger, sub.entry(self.g), mine, sub.attempt, moved,
                                                    sleep, lambda: self.instance == instance)
            return self.w.spawn(self, resolving, lambda rev: self.claim_resolved(sub, rev, instance))
        if rev is None and moved is not None:
            return answer(Ack(False))  # not moved here: the mover keeps it
        if rev is None:
            return answer(Ack(True, duplicate=True))
        self.adopt(sub, rev, instance)
        answer(Ack(True))

    def claim_resolved(self, sub: Sub, rev: int | None, instance: int) -> None:
        self.doubtful.discard(sub.key)
        if rev is not None and self.instance == instance:
            self.w.paths["claim resolved: ours"] += 1
            self.adopt(sub, rev, instance)

    def adopt(self, sub: Sub, rev: int, instance: int) -> None:
        self.held[sub.key] = Held(sub, Delivery(sub.reply, sub.encoding, True, ledger_rev=rev, owner=instance))
        self.w.accepted.add(sub.rid)

    # ---- answers --------------------------------------------------------------------
    def may_answer(self, seq: Held) -> bool:
        return answers.may_answer(seq.d, self.instance, self.lease.valid(self.now()))

    def give_up(self, seq: Held, force: bool = False) -> None:
        if answers.give_up(seq.d, self.instance, self.lease.valid(self.now()), force):
            self.abandon()

    def send(self, seq: Held, kind: str, index: int = -1) -> None:
        if not self.may_answer(seq):
            return self.give_up(seq)
        self.w.check.record(self.w.t, self.name, seq.sub.rid, kind, index)

    def finish(self, seq: Held, kind: str) -> None:
        """``Publisher.answer``: send, with the settling write right behind (one write: a
        death takes both or neither), then settle (or resolve, or give up)."""
        self.held.pop(seq.sub.key, None)
        self.answered.add(seq.sub.key)  # from now on a copy of it is a duplicate, whoever wins
        if not self.may_answer(seq):
            return self.give_up(seq)
        sub = seq.sub
        sent = True
        self.w.check.record(self.w.t, self.name, sub.rid, kind)
        self.unsettled.add(sub.rid)
        self.settle(seq, kind, ownership.answered_by(self.instance, self.g, sub.rid, sub.client), sent)

    def settle(self, seq: Held, kind: str, done, sent: bool) -> None:
        """``Answering.settle_answer``: the production ``answers.settle_terminal``, then
        (its outcome unknown) ``answers.resolve_terminal``, then what they lead to."""
        may = lambda: self.may_answer(seq)  # noqa: E731
        settling = answers.settle_terminal(self.w.ledger, seq.sub.entry(self.g), done, seq.d, sent, may, sleep)
        self.w.spawn(self, settling, lambda then: self.settled(seq, kind, done, sent, then))

    def settled(self, seq: Held, kind: str, done, sent: bool, then: str, resolved: bool = False) -> None:
        """``Answering.settled``."""
        if then == answers.RESOLVE:  # ``Answering.answer_if_ours``
            resolving = answers.resolve_terminal(self.w.ledger, seq.sub.entry(self.g), done, seq.d, sent,
                                                 lambda: self.may_answer(seq), sleep)
            return self.w.spawn(self, resolving, lambda then: self.settled(seq, kind, done, sent, then, True))
        self.unsettled.discard(seq.sub.rid)  # what its settling write did is known now
        if then == answers.TAKEN:
            self.w.paths["taken after sending" if sent else "taken"] += 1
        elif then in (answers.GIVE_UP, answers.GIVE_UP_ALL):
            self.give_up(seq, force=then == answers.GIVE_UP_ALL)
        else:
            if resolved:
                self.w.paths["settle resolved: ours"] += 1
            self.won(seq, kind, done, then)

    def won(self, seq: Held, kind: str, done, then: str) -> None:
        if seq.sub.rid in self.w.in_doubt.get(done.owner, ()):
            self.w.paths["settle landed unanswered: ours"] += 1
        if then == answers.SEND:
            self.send(seq, kind)

    def step(self, life: int) -> None:
        if not self.live(life):
            return
        for seq in [s for s in self.held.values() if not s.moving][:RUNNING]:
            if seq.sub.key not in self.held:
                continue
            self.send(seq, "chunk", seq.output)
            if seq.d.abandoned:
                break  # given up: everything held went with it
            seq.output += 1
            if seq.output == seq.sub.tokens:
                self.finish(seq, "done")
        self.w.at(STEP, self.step, life)

    # ---- a group failure: move what streamed nothing, fail the rest --------------------
    def fail_group(self) -> None:
        if not self.alive:
            return
        for seq in list(self.held.values()):
            if seq.moving:
                continue
            if seq.output == 0 and len(self.w.publishers) > 1:
                self.move(seq)
            else:
                self.finish(seq, "error")

    def move(self, seq: Held) -> None:
        """``Moving.requeue`` to the next group: our entry says ``moved`` to it first, then
        the offer; refused outright: held here again (and failed, as the sim's group
        failure does); no answer: not ours any more (the target or ingest answers)."""
        self.move_token += 1
        seq.moving = token = self.move_token
        other = self.w.publishers[(self.g + 1) % len(self.w.publishers)]
        held = ownership.held_by(seq.d.owner, self.g, seq.sub)
        offered = ownership.moved_to(held, other.g)
        writing = ownership.rewrite(self.w.ledger, seq.sub.entry(self.g), offered, seq.d.ledger_rev, sleep)
        self.w.spawn(self, writing, lambda rev: self.offer(seq, token, other, offered, rev))

    def offer(self, seq: Held, token: int, other: "Publisher", offered, rev: int | None) -> None:
        if seq.moving != token or seq.d.abandoned:
            return
        if rev is None:  # not handed over: it stays here
            seq.moving = 0
            return self.finish(seq, "error")
        seq.d.ledger_rev = rev
        sub = Sub(seq.sub.rid, seq.sub.client, seq.sub.reply, seq.sub.attempt, seq.sub.tokens, seq.d.owner, self.g)
        life = self.life
        self.w.network(other.on_submit, sub, lambda ack: self.w.network(self.moved, life, seq, token, offered, ack),
                       once=True)
        self.w.at(MOVE_TIMEOUT, self.moved, life, seq, token, offered, None)

    def moved(self, life: int, seq: Held, token: int, offered, ack: Ack | None) -> None:
        if not self.live(life) or seq.moving != token or seq.d.abandoned:
            return
        seq.moving = 0
        if ack is None or ack.accepted:
            self.held.pop(seq.sub.key, None)  # the other group answers it, or ingest does
            self.w.paths["move taken" if ack else "move unanswered"] += 1
            return
        back = ownership.taken_back(offered)
        writing = ownership.rewrite(self.w.ledger, seq.sub.entry(self.g), back, seq.d.ledger_rev, sleep)
        self.w.spawn(self, writing, lambda rev: self.taken_back(seq, rev))

    def taken_back(self, seq: Held, rev: int | None) -> None:
        if seq.d.abandoned:
            return
        if rev is None:  # left moved: ingest revokes the move and answers
            self.held.pop(seq.sub.key, None)
            self.w.paths["move not taken back"] += 1
            return
        seq.d.ledger_rev = rev
        self.w.paths["move taken back"] += 1
        self.finish(seq, "error")


@dataclass
class Forward:
    sub: Sub
    groups: list[int]
    at: int = 0  # index into groups
    tries: int = 0
    token: int = 0
    name_rev: int = 0
    unanswered: bool = False  # a try to the current group went unanswered


class Ingest(Service):
    def __init__(self, world: "World", i: int) -> None:
        super().__init__(world, f"ingest{i}")
        self.tokens = 0

    def start(self) -> None:
        super().start()
        self.view = SweepView(fallback_ttl=TTL, move_grace=MOVE_GRACE)
        self.instance = self.new_instance()
        self.unsure: dict = {}
        self.handing: dict[str, Forward] = {}
        self.watch_at = self.w.t
        for key, rev, value in self.w.kv.snapshot():  # a new watcher first gets every live key
            self.view.update(key, rev, value, self.now())
        self.w.at(RECONCILE, self.sweep, self.life)

    def on_change(self, life: int, key: str, rev: int, value: bytes | None) -> None:
        if self.live(life):
            self.view.update(key, rev, value, self.now())

    def on_generate(self, rid: str, client: str, tokens: int) -> None:
        if not self.alive:
            return
        sub = Sub(rid, client, f"_INBOX.{client}.{rid}", f"{self.name}.{self.w.rng.getrandbits(32):08x}", tokens)
        if sub.key in self.handing:
            return  # a copy of a request being handed over now
        groups = self.w.rng.sample(range(len(self.w.publishers)), len(self.w.publishers))
        try:  # ``Ingest.record_name``
            how, rev = run(ownership.admit(self.w.ledger, sub.key, ownership.name_of(sub, groups[0]), client, rid))
        except NatsTimeout:
            return self.w.check.record(self.w.t, self.name, sub.rid, "refused")
        if how == ownership.DUPLICATE:
            self.w.paths["copy dropped by its name"] += 1
            return
        self.handing[sub.key] = Forward(sub, groups, name_rev=rev)
        self.submit(sub.key)

    def submit(self, key: str) -> None:
        fwd = self.handing[key]
        fwd.tries += 1
        self.tokens += 1
        fwd.token = token = self.tokens
        publisher, life = self.w.publishers[fwd.groups[fwd.at]], self.life
        if not publisher.alive:  # no responders
            return self.w.at(0.0, self.on_ack, life, key, token, Ack(False))
        self.w.network(publisher.on_submit, fwd.sub, lambda ack: self.w.network(self.on_ack, life, key, token, ack),
                       once=True)
        self.w.at(SUBMIT_TIMEOUT, self.on_ack, life, key, token, None)

    def on_ack(self, life: int, key: str, token: int, ack: Ack | None) -> None:
        fwd = self.handing.get(key)
        if not self.live(life) or fwd is None or fwd.token != token:
            return  # a late answer: its request timed out
        if ack is None:  # no acknowledgement in time
            fwd.unanswered = True
            if fwd.tries < SUBMIT_ATTEMPTS:
                return self.submit(key)
        if ack is None or (fwd.unanswered and not ack.accepted):  # ``Ingest.submit_to``: as unheard
            del self.handing[key]
            return self.refuse_unheard(fwd, fwd.groups[fwd.at])
        if ack.accepted:  # its holder answers it now (for a duplicate: whoever holds the name)
            del self.handing[key]
            self.w.accepted.add(fwd.sub.rid)
            return
        fwd.at, fwd.tries, fwd.unanswered = fwd.at + 1, 0, False
        if fwd.at < len(fwd.groups):
            return self.submit(key)
        del self.handing[key]
        try:  # ``Ingest.forget_name``
            run(self.w.ledger.swap(key, ownership.refused_name(fwd.sub), fwd.name_rev))
        except NatsTimeout:
            pass
        self.w.check.record(self.w.t, self.name, fwd.sub.rid, "refused")

    def refuse_unheard(self, fwd: Forward, g: int) -> None:
        """``Ingest.refuse_unheard`` (and ``rename``)."""
        refusing = ownership.refuse(self.w.ledger, fwd.sub.entry(g), ownership.refused(fwd.sub, g), sleep)
        self.w.spawn(self, refusing, lambda ours: self.refused(fwd, g, ours))

    def refused(self, fwd: Forward, g: int, ours: bool) -> None:
        self.w.paths[f"refusal {'recorded' if ours else 'found the name taken'}"] += 1
        if ours:
            self.w.check.record(self.w.t, self.name, fwd.sub.rid, "refused")
            if g != fwd.groups[0]:
                try:
                    run(self.w.ledger.swap(fwd.sub.key, ownership.name_of(fwd.sub, g), fwd.name_rev))
                except NatsTimeout:
                    pass

    def sweep(self, life: int) -> None:
        """``Ingest.sweep_loop``: ``ownership.sweep`` every ``RECONCILE``."""
        if not self.live(life):
            return
        self.w.at(RECONCILE, self.sweep, life)
        try:
            run(ownership.sweep(self.w.ledger, self.view, self.unsure, self.instance, self.now(), self.answer_lost))
        except NatsTimeout:
            pass  # the next sweep carries on

    async def answer_lost(self, entry) -> None:
        if entry.rid in self.w.in_doubt.get(self.instance, ()):
            self.w.paths["sweep resolved: ours"] += 1
        self.w.check.record(self.w.t, self.name, entry.rid, "revoked" if entry.state == MOVED else "publisher_lost")


@dataclass
class World:
    seed: int
    faults: Faults = field(default_factory=Faults)
    requests: int = 6
    groups: int = 2
    ingests: int = 2

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.t, self.n = 0.0, 0
        self.events: list = []
        self.kv = MemoryKV()
        self.ledger = Ledger(self.kv)
        self.kv.watchers.append(self.on_change)
        self.kv.fault = self.ledger_fault
        self.kv.unanswered = self.on_unanswered
        self.in_doubt: dict[int, set[str]] = {}  # instance -> rids whose terminal it won unanswered
        self.died_in_doubt: set[str] = set()
        self.paths: Counter[str] = Counter()  # the rarer ways through the protocol, for the tests  # ... and whose winner died before it could read that back
        self.check = Checker()
        self.accepted: set[str] = set()
        self.publishers = [Publisher(self, g) for g in range(self.groups)]
        self.ingest = [Ingest(self, i) for i in range(self.ingests)]
        self.steps = 0

    # ---- scheduling and the network ---------------------------------------------------
    def spawn(self, service: Service, coro, then) -> None:
        """Run a coroutine of the production code (``dpbus.services.ownership``) for ``service``:
        its ledger calls complete at once, each ``await sleep(d)`` resumes it ``d`` later,
        and it dies with the service. ``then`` gets its result."""
        life = service.life

        def resume() -> None:
            if not service.live(life):
                return coro.close()
            try:
                pause = coro.send(None)
            except StopIteration as finished:
                return then(finished.value)
            self.at(pause.seconds, resume)

        resume()

    def at(self, delay: float, fn, *args) -> None:
        self.n += 1
        heapq.heappush(self.events, (self.t + delay, self.n, fn, args))

    def faulty(self) -> bool:
        return self.t < FAULTS_UNTIL

    def deliver_at(self) -> float | None:
        """A message's delay, or None when the network drops it."""
        if self.faulty() and self.rng.random() < self.faults.drop:
            return None
        if self.faulty() and self.rng.random() < self.faults.slow:
            return self.rng.uniform(0.05, 0.6)
        return self.rng.uniform(0.001, 0.02)

    def ledger_fault(self) -> str | None:
        if self.faulty() and self.rng.random() < self.faults.ledger:
            return self.rng.choice(["lost", "unanswered"])
        return None

    def on_unanswered(self, key: str, value: bytes | None) -> None:
        """A write landed and its answer was lost: if it won a terminal answer, its writer
        holds that answer without knowing it until it reads the entry back."""
        entry = decode_entry(value) if value is not None and key.startswith("r.") else None
        if entry is not None and entry.state == ANSWERED:
            self.in_doubt.setdefault(entry.owner, set()).add(entry.rid)

    def network(self, fn, *args, once: bool = False) -> None:
        """Deliver a message late, reordered, twice or never. ``once``: a message between
        services (a submit), which core NATS delivers at most once: a client's copy of a
        request (its reconnect buffer sending it again) is a new message, a submit never
        arrives twice."""
        copies = 2 if not once and self.faulty() and self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            delay = self.deliver_at()
            if delay is not None:
                self.at(delay, fn, *args)

    def on_change(self, key: str, rev: int, value: bytes | None) -> None:
        """The ledger's watch: every change reaches every live ingest, in order, late. A
        request held in the ledger is accepted, whoever knows it."""
        entry = decode_entry(value) if value is not None and key.startswith("r.") else None
        if entry is not None and entry.state == HELD:
            self.accepted.add(entry.rid)
        for ingest in self.ingest:
            if ingest.alive:
                ingest.watch_at = max(ingest.watch_at, self.t + self.rng.uniform(0.001, 0.3))
                self.at(ingest.watch_at - self.t, ingest.on_change, ingest.life, key, rev, value)

    # ---- clients and faults -----------------------------------------------------------
    def client(self, rid: str) -> None:
        ingest = self.rng.choice(self.ingest)
        self.network(ingest.on_generate, rid, "c1", self.rng.randint(1, 4))

    def fault(self) -> None:
        if not self.faulty():
            return
        f, rng = self.faults, self.rng
        what = rng.choice([x for x, on in (("kill", f.kill), ("kill_ingest", f.kill), ("fail", f.group_failure),
                                           ("jump", f.clock_jump), ("outage", f.lease_outage)) if on] or ["none"])
        if what == "kill":
            p = rng.choice(self.publishers)
            if p.alive:
                p.kill()
        elif what == "kill_ingest":
            i = rng.choice(self.ingest)
            if i.alive:
                i.kill()
        elif what == "fail":
            rng.choice(self.publishers).fail_group()
        elif what == "jump":
            rng.choice(self.publishers).offset += rng.uniform(0.0, TTL)  # monotonic clocks only go forward
        elif what == "outage":
            rng.choice(self.publishers).outage_until = self.t + rng.uniform(0.0, 2 * TTL)
        self.at(rng.uniform(0.2, 1.0), self.fault)

    def run(self) -> Checker:
        for service in (*self.publishers, *self.ingest):
            service.start()
        for r in range(self.requests):
            self.at(self.rng.uniform(0.5, FAULTS_UNTIL), self.client, f"r{r}")
        self.at(self.rng.uniform(0.2, 1.0), self.fault)
        while self.events and self.events[0][0] <= END:
            self.t, _, fn, args = heapq.heappop(self.events)
            fn(*args)
            self.steps += 1
            self.check.check()
        self.check.check_settled(self.accepted, self.died_in_doubt)
        return self.check
