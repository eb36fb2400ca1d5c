"""A small world of one publisher and the workers of its group exchanging steps over a
faulty network, run by a seeded event scheduler (see ``tests/sim/world.py`` for the
request-ledger world).

What is decided is decided by the production code: ``services.publisher.stepper.Stepper``
(numbering, epochs, which replies count, what a settled step means, the replay window)
and ``services.worker.ordering.StepOrder`` (which steps a worker runs). This module
sequences the messages as the services do (publish, re-send while acknowledgements are
late, give up after a time-out and start a new epoch; a worker takes its steps one at a
time, fetching missed ones) and checks after every event:

* each worker runs, in each epoch, steps 1, 2, 3... in order, each once (per life);
* what it runs for (epoch, seq) is exactly what the publisher sent as that step;
* the publisher settles a step only when every member has run it;
* once the faults stop, the group makes progress again.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

from schemas.errors import ErrorCode
from schemas.internal import Replay, StepFailure, StepResult
from services.errors import GroupFailure
from services.publisher.stepper import Stepper
from services.worker.ordering import GAP, NEXT, REPEAT, StepOrder
from tests.sim.checker import Violation

RESEND = 0.05  # the publisher re-sends a step whose acknowledgements are late
STEP_TIMEOUT = 0.6  # then it gives the step up: the group resets into a new epoch
BEAT = 0.1
RUN = 0.01  # a worker's time to run one step
FAULTS_UNTIL = 4.0
END = 8.0
WINDOW = 8  # steps kept for replay


@dataclass
class StepFaults:
    drop: float = 0.1
    duplicate: float = 0.05
    slow: float = 0.15  # up to 0.3 s: reorders
    kill: bool = True  # a worker or the publisher killed and restarted
    fail: float = 0.02  # a worker's step fails (it reports it and waits for a new epoch)


def parse(data: bytes) -> tuple[int, int]:
    epoch, seq, _ = data.split(b":", 2)
    return int(epoch), int(seq)


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Worker:
    def __init__(self, world: "StepWorld", node: int) -> None:
        self.w, self.node, self.life = world, node, 0
        self.start()

    def start(self) -> None:
        self.life += 1
        self.alive, self.busy = True, False
        self.fetching: bytes | None = None  # the step whose missing predecessors are being fetched
        self.order = StepOrder()
        self.queue: list[bytes] = []
        self.ran: dict[int, int] = {}  # epoch -> last seq run (this life)
        self.w.at(0.0, self.beat, self.life)

    def kill(self) -> None:
        self.alive = False
        self.w.at(self.w.rng.uniform(0.1, 1.0), self.start)

    def beat(self, life: int) -> None:
        if self.alive and self.life == life:
            self.w.network(self.w.publisher.on_beat, self.node, self.order.epoch)
            self.w.at(BEAT, self.beat, life)

    def on_step(self, data: bytes) -> None:
        if self.alive:
            self.queue.append(data)
            self.next_in_queue()

    def next_in_queue(self) -> None:
        """The worker's step loop: one step at a time, in arrival order."""
        if self.busy or not self.queue or not self.alive:
            return
        data = self.queue.pop(0)
        epoch, seq = parse(data)
        kind = self.order.classify(epoch, seq)
        if kind == REPEAT:
            kept = self.order.reply_to_repeat(seq)
            if kept is not None:
                self.reply(kept)
        elif kind == NEXT:
            self.busy = True
            self.w.at(RUN, self.run, self.life, [data])
            return
        elif kind == GAP:
            self.busy, self.fetching = True, data
            missing = self.order.missing(seq)
            ask = Replay(epoch, missing.start, missing.stop - 1)
            self.w.network(self.w.publisher.on_replay, ask, self.life, self.node, data)
            self.w.at(STEP_TIMEOUT, self.replayed, self.life, data, None)
            return
        self.next_in_queue()

    def replayed(self, life: int, data: bytes, steps: list[bytes] | None) -> None:
        if not self.alive or self.life != life or self.fetching != data:
            return  # late: given up already
        self.fetching = None
        epoch, seq = parse(data)
        wanted = list(self.order.missing(seq))
        if steps is None or [parse(s)[1] for s in steps] != wanted:
            self.order.lose_sync()
            self.reply(StepFailure(epoch, seq, self.node, ErrorCode.DIVERGED, "replay failed"))
            self.busy = False
            return self.next_in_queue()
        self.w.at(RUN * len(steps), self.run, life, [*steps, data])

    def run(self, life: int, steps: list[bytes]) -> None:
        if not self.alive or self.life != life:
            return
        for data in steps:
            epoch, seq = parse(data)
            if self.w.faulty() and self.w.rng.random() < self.w.faults.fail:
                self.order.lose_sync()
                self.reply(StepFailure(epoch, seq, self.node, ErrorCode.INTERNAL, "step failed"))
                break
            self.w.check_run(self, epoch, seq, data)
            self.order.ran(seq, self.reply_for(epoch, seq, data))
            self.reply(self.order.last_reply)
        self.busy = False
        self.next_in_queue()

    def reply_for(self, epoch: int, seq: int, data: bytes) -> StepResult:
        return StepResult(epoch, seq, self.node, [], [], 0.0, digest(data))

    def reply(self, reply) -> None:
        self.w.network(self.w.publisher.on_reply, reply)


class Publisher:
    def __init__(self, world: "StepWorld") -> None:
        self.w, self.life = world, 0
        self.start()

    def start(self) -> None:
        self.life += 1
        self.alive = True
        self.stepper = Stepper(0, [wk.node for wk in self.w.workers], WINDOW)
        self.epochs: dict[int, int] = {}  # node -> epoch in its last beat (since this start)
        self.w.at(0.0, self.loop, self.life)

    def kill(self) -> None:
        self.alive = False
        self.w.at(self.w.rng.uniform(0.1, 1.0), self.start)

    def on_beat(self, node: int, epoch: int) -> None:
        if self.alive:
            self.epochs[node] = epoch

    def on_replay(self, ask: Replay, life: int, node: int, data: bytes) -> None:
        if self.alive:
            steps = self.stepper.replay(ask)
            worker = self.w.workers[node]
            self.w.network(worker.replayed, life, data, steps)

    def loop(self, life: int) -> None:
        """Send the next step once the group is whole (every member beat since this start)."""
        if not self.alive or self.life != life:
            return
        if len(self.epochs) < len(self.w.workers):
            return self.w.at(BEAT, self.loop, life)
        self.n = getattr(self, "n", 0) + 1
        data = self.stepper.next_step(lambda e, s: b"%d:%d:%d" % (e, s, self.w.rng.getrandbits(32)),
                                      self.epochs.values())
        self.w.sent[parse(data)] = data
        self.sent_at = self.w.t
        self.broadcast(data)
        self.w.at(RESEND, self.resend, life, data)

    def broadcast(self, data: bytes) -> None:
        for worker in self.w.workers:
            self.w.network(worker.on_step, data)

    def resend(self, life: int, data: bytes) -> None:
        if not self.alive or self.life != life or not self.stepper.in_flight or self.stepper.sent.get(
                self.stepper.seq) is not data:
            return
        if self.w.t - self.sent_at > STEP_TIMEOUT:  # given up: a new epoch
            self.stepper.reset()
            self.w.resets += 1
            return self.w.at(0.0, self.loop, life)
        self.broadcast(data)
        self.w.at(RESEND, self.resend, life, data)

    def on_reply(self, reply) -> None:
        if not self.alive or not self.stepper.on_reply(reply):
            return
        epoch, seq = self.stepper.epoch, self.stepper.seq
        try:
            self.stepper.outcome(lambda leader: leader.digest)
        except GroupFailure:
            self.stepper.reset()
            self.w.resets += 1
        else:
            self.w.check_settled(epoch, seq)
        self.w.at(0.0, self.loop, self.life)


@dataclass
class StepWorld:
    seed: int
    faults: StepFaults = field(default_factory=StepFaults)
    nodes: int = 2

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.t, self.n = 0.0, 0
        self.events: list = []
        self.sent: dict[tuple[int, int], bytes] = {}  # every step the publisher sent
        self.runs: dict[tuple[int, int], set[int]] = {}  # (epoch, seq) -> nodes that ran it
        self.settled: list[tuple[float, int, int]] = []
        self.resets = 0
        self.workers: list[Worker] = []
        self.workers = [Worker(self, node) for node in range(self.nodes)]
        self.publisher = Publisher(self)

    def at(self, delay: float, fn, *args) -> None:
        self.n += 1
        heapq.heappush(self.events, (self.t + delay, self.n, fn, args))

    def faulty(self) -> bool:
        return self.t < FAULTS_UNTIL

    def network(self, fn, *args) -> None:
        copies = 2 if self.faulty() and self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            if self.faulty() and self.rng.random() < self.faults.drop:
                continue
            slow = self.faulty() and self.rng.random() < self.faults.slow
            self.at(self.rng.uniform(0.02, 0.3) if slow else self.rng.uniform(0.0005, 0.003), fn, *args)

    def fault(self) -> None:
        if not self.faulty() or not self.faults.kill:
            return
        victim = self.rng.choice([*self.workers, self.publisher])
        if victim.alive:
            victim.kill()
        self.at(self.rng.uniform(0.3, 1.5), self.fault)

    # ---- invariants -------------------------------------------------------------------
    def check_run(self, worker: Worker, epoch: int, seq: int, data: bytes) -> None:
        last = worker.ran.get(epoch, 0)
        if seq != last + 1:
            raise Violation(f"t={self.t:.3f} node {worker.node} ran step {seq} of epoch {epoch} after step {last}")
        if self.sent.get((epoch, seq)) != data:
            raise Violation(f"t={self.t:.3f} node {worker.node} ran ({epoch}, {seq}) not as the publisher sent it")
        worker.ran[epoch] = seq
        self.runs.setdefault((epoch, seq), set()).add(worker.node)

    def check_settled(self, epoch: int, seq: int) -> None:
        ran = self.runs.get((epoch, seq), set())
        if len(ran) < self.nodes:
            raise Violation(f"t={self.t:.3f} step ({epoch}, {seq}) settled, but only nodes {sorted(ran)} ran it")
        self.settled.append((self.t, epoch, seq))

    def run(self) -> "StepWorld":
        self.at(self.rng.uniform(0.2, 1.0), self.fault)
        while self.events and self.events[0][0] <= END:
            self.t, _, fn, args = heapq.heappop(self.events)
            fn(*args)
        after = [s for s in self.settled if s[0] > FAULTS_UNTIL + 2 * STEP_TIMEOUT + 1.0]
        if len(after) < 10:
            raise Violation(f"no progress once the faults stopped: {len(after)} steps settled in the last "
                            f"{END - FAULTS_UNTIL - 2 * STEP_TIMEOUT - 1.0:.1f} s")
        return self
