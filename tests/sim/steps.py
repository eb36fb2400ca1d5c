"""A small world of one publisher and the workers of its group exchanging real steps over
a faulty network, run by a seeded event scheduler (see ``tests/sim/world.py`` for the
request-ledger world).

What is decided is decided by the production code. The publisher drives the same
``GroupEngine`` as the service: its ``Scheduler`` (requests come and go, prompts are
prefilled in chunks, pages run out and requests are preempted, the prefix cache is on in
odd seeds), ``RowTables`` (wire steps carry row deltas) and ``Stepper`` (numbering,
epochs, which replies count, what a settled step means, the replay window); each worker owns a ``StepOrder`` (which steps it
runs) and a ``PageTables`` (the rows rebuilt from the deltas). This module sequences the
messages as the services do: the publisher keeps up to ``depth`` steps in flight (2, or 3
in some seeds), takes them strictly in order, re-sends the oldest while its
acknowledgements are late and gives it up after a time-out or when a member stops
beating (the group resets into a new epoch: what was running ends with an error); a
worker takes its steps one at a time and fetches missed ones.

The workers compute with a deterministic fake model on their own "device": a KV pool
written and read through each row's page list (a slot remembers the context it was
computed in, so a read of the wrong page or a stale slot is seen), and the token each row
sampled last (``LAST_TOKEN`` feeds it). A token is a hash of the context read back and
of the row's counter; so a request's tokens are known in advance: what it samples alone.

Checked after every event:

* each worker runs, in each epoch, steps 1, 2, 3... in order, each once (per life), and
  exactly what the publisher sent as that step;
* the publisher takes steps in order, and a step only when every member has run it;
* every answer is what the request gives alone: its tokens in order, ending exactly as
  alone (stop or length), or a prefix of them when it ended by an error or an abort;
  nothing after its end;
* workers agree on every step of an epoch (equal digests, whichever life ran it);
* a worker never finds its tables, KV slots or held tokens missing or wrong;
* a worker can answer again any step it ran while the publisher waits for it;
* once the faults stop, the group makes progress and every request gets its end (but
  those a killed publisher held: its scheduler is gone; they are counted as lost).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from dpbus.schemas import FinishReason, SamplingParams
from dpbus.schemas.errors import ErrorCode
from dpbus.schemas.internal import LAST_TOKEN, Replay, Step, StepFailure, StepResult, token_digest, unpacker
from dpbus.services.errors import GroupFailure
from dpbus.services.publisher.engine import GroupEngine
from dpbus.services.publisher.scheduler import Scheduler, Sequence
from dpbus.services.publisher.stepper import Stepper
from dpbus.services.publisher.tables import RowTables
from dpbus.services.worker.ordering import GAP, NEXT, REPEAT, StepOrder
from dpbus.services.worker.tables import PageTables
from tests.sim.checker import Violation

RESEND = 0.05  # the publisher re-sends the step it waits for while acknowledgements are late
STEP_TIMEOUT = 0.6  # then it gives the step up: the group resets into a new epoch
BEAT = 0.1
BEAT_TIMEOUT = 0.45  # a member silent that long is lost: the step waited for fails
POLL = 0.1  # an idle publisher looks again for work it can plan
RUN = 0.01  # a worker's time to run one step
FAULTS_UNTIL = 6.0  # clients send requests until then too
QUIET = FAULTS_UNTIL + 2 * STEP_TIMEOUT + 1.0  # every process is back, every old step given up
END = QUIET + 0.8  # a few more requests come at QUIET: they must be answered in full by then
WINDOW = 8  # steps kept for replay
DEPTH = 2  # steps in flight (3 in some seeds)

ROWS = 3  # running requests (rows)
PREFILL = 8  # prompt tokens per step
QUEUE = 4  # waiting requests
MAX_LEN = 24  # context length
PAGE = 4  # positions per KV page
VOCAB = 24  # tokens 3 .. 3 + VOCAB - 1
STOP = 3  # every request's stop token
ROOT = 0x5EED  # the context hash of nothing

_step = unpacker(Step)


# ---- the fake model --------------------------------------------------------------------
def extend(context: int, token: int) -> int:
    """The hash of a context one token longer."""
    return hash((context, token))


def sample(context: int, counter: int) -> int:
    return hash((context, counter, 1)) % VOCAB + 3


def alone(prompt: list[int], max_new_tokens: int) -> tuple[list[int], FinishReason]:
    """What a request samples when nothing interrupts it, and how it ends."""
    context, out = ROOT, []
    for token in prompt:
        context = extend(context, token)
    while True:
        token = sample(context, len(out))
        out.append(token)
        context = extend(context, token)
        if token == STOP:
            return out, FinishReason.STOP
        if len(out) >= max_new_tokens or len(prompt) + len(out) >= MAX_LEN:
            return out, FinishReason.LENGTH


@dataclass
class StepFaults:
    drop: float = 0.1
    duplicate: float = 0.05
    slow: float = 0.15  # up to 0.3 s: reorders
    kill: bool = True  # a worker or the publisher killed and restarted
    fail: float = 0.02  # a worker's step fails (it reports it and waits for a new epoch)


@dataclass
class Request:
    """What a client sent and was answered, and what it should be answered."""

    prompt: list[int]
    want: list[int]
    reason: FinishReason
    publisher_life: int
    sent_at: float
    tokens: list[int] = field(default_factory=list)
    end: str = ""  # a finish reason, "error", or "lost" (its publisher was killed)


class Worker:
    """One worker process: ``StepOrder`` picks the steps it runs, ``PageTables`` rebuilds
    their rows, and its "device" (KV slots, held tokens) computes them. A restart loses
    everything."""

    def __init__(self, world: "StepWorld", node: int) -> None:
        self.w, self.node, self.life = world, node, 0
        self.start()

    def start(self) -> None:
        self.life += 1
        self.alive, self.busy = True, False
        self.fetching: bytes | None = None  # the step whose missing predecessors are being fetched
        self.order = StepOrder(self.new_epoch)
        self.tables = PageTables(ROWS)
        self.kv: dict[int, tuple[int, int, int]] = {}  # slot -> (token, context before it, context after it)
        self.held: dict[int, int] = {}  # row -> the token it sampled last
        self.queue: list[bytes] = []
        self.ran: dict[int, int] = {}  # epoch -> last seq run (this life)
        self.w.at(0.0, self.beat, self.life)

    def new_epoch(self, epoch: int) -> None:
        """An epoch starts from nothing: no rows, no held tokens, no KV the publisher may
        count on (its prefix cache was forgotten with the last epoch)."""
        self.tables.clear()
        self.kv, self.held = {}, {}

    def kill(self) -> None:
        self.alive = False
        self.w.at(self.w.rng.uniform(0.1, 1.0), self.start)

    def beat(self, life: int) -> None:
        if self.alive and self.life == life:
            self.w.network(self.w.publisher, self.w.publisher.on_beat, self.node, self.order.epoch)
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
        step = _step.decode(data)
        kind = self.order.classify(step.epoch, step.seq)
        if kind == NEXT:
            self.busy = True
            self.w.at(RUN, self.run, self.life, [data])
            return
        if kind == GAP:
            self.busy, self.fetching = True, data
            missing = self.order.missing(step.seq)
            ask = Replay(step.epoch, missing.start, missing.stop - 1)
            self.w.network(self.w.publisher, self.w.publisher.on_replay, ask, self.life, self.node, data)
            self.w.at(STEP_TIMEOUT, self.replayed, self.life, data, None)
            return
        kept = self.order.reply_to_repeat(step.seq) if kind == REPEAT else None
        if kept is not None:
            self.reply(kept)
        else:
            self.w.check_unanswered(self, step.epoch, step.seq)
        self.next_in_queue()

    def replayed(self, life: int, data: bytes, steps: list[bytes] | None) -> None:
        if not self.alive or self.life != life or self.fetching != data:
            return  # late: given up already
        self.fetching = None
        step = _step.decode(data)
        wanted = list(self.order.missing(step.seq))
        if steps is None or [_step.decode(s).seq for s in steps] != wanted:
            self.order.lose_sync()
            self.reply(StepFailure(step.epoch, step.seq, self.node, ErrorCode.DIVERGED, "replay failed"))
            self.busy = False
            return self.next_in_queue()
        self.w.replayed += len(steps)
        self.w.at(RUN * len(steps), self.run, life, [*steps, data])

    def run(self, life: int, steps: list[bytes]) -> None:
        if not self.alive or self.life != life:
            return
        for data in steps:
            step = _step.decode(data)
            if self.w.faulty() and self.w.rng.random() < self.w.faults.fail:
                self.order.lose_sync()
                self.reply(StepFailure(step.epoch, step.seq, self.node, ErrorCode.INTERNAL, "step failed"))
                break
            self.w.check_run(self, step.epoch, step.seq, data)
            prefill, decode = self.compute(step)
            digest = token_digest(prefill, decode)
            self.w.check_digest(self, step, digest)
            if self.node != 0:  # the leader reports the tokens, the others vouch for them
                prefill, decode = [], []
            self.order.ran(step.seq, StepResult(step.epoch, step.seq, self.node, prefill, decode, 0.0, digest))
            self.reply(self.order.last_reply)
        self.busy = False
        self.next_in_queue()

    def reply(self, reply: StepResult | StepFailure) -> None:
        self.w.network(self.w.publisher, self.w.publisher.on_reply, reply)

    # ---- the device --------------------------------------------------------------------
    def compute(self, step: Step) -> tuple[list[int], list[int]]:
        """Apply the step to the tables and run it: what the runner does on the device."""
        try:
            prefill, decode = self.tables.apply(step)
        except ValueError as e:
            raise self.w.violation(f"node {self.node} cannot apply step ({step.epoch}, {step.seq}): {e}") from None
        for row in [*step.freed, *(s.row for s in step.started)]:
            self.held.pop(row, None)
        prefill_tokens, decode_tokens = [], []
        for chunk, item in zip(step.prefill, prefill):
            context = self.read(step, item.pages, item.start)
            for i, token in enumerate(item.token_ids):
                context = self.write(step, item.pages, item.start + i, context, token)
            token = sample(context, 0) if item.sample else -1
            if item.sample:
                self.held[chunk.row] = token
            prefill_tokens.append(token)
        for row, item in zip(step.decode, decode):
            fed = self.held_token(step, row.row) if item.token == LAST_TOKEN else item.token
            context = self.write(step, item.pages, item.position, self.read(step, item.pages, item.position), fed)
            self.held[row.row] = sample(context, item.counter)
            decode_tokens.append(self.held[row.row])
        return prefill_tokens, decode_tokens

    def held_token(self, step: Step, row: int) -> int:
        if row not in self.held:
            raise self.w.violation(f"node {self.node}: step ({step.epoch}, {step.seq}) feeds row {row}'s last "
                                   f"token, and the row has sampled none")
        return self.held[row]

    def read(self, step: Step, pages: list[int], n: int) -> int:
        """The context of positions 0..n-1, read through ``pages``: each slot must have been
        written in the context the ones before it make."""
        if n:
            self.slot(step, pages, n - 1)  # a page for every position read
        context, kv = ROOT, self.kv
        for pos in range(n):
            token, before, after = kv.get(pages[pos // PAGE] * PAGE + pos % PAGE, (0, None, None))
            if before != context:
                what = "never written" if before is None else "written in another context"
                raise self.w.violation(f"node {self.node}: step ({step.epoch}, {step.seq}) reads position {pos} "
                                       f"(page {pages[pos // PAGE]}), {what}")
            context = after
        return context

    def write(self, step: Step, pages: list[int], pos: int, context: int, token: int) -> int:
        after = extend(context, token)
        self.kv[self.slot(step, pages, pos)] = (token, context, after)
        return after

    def slot(self, step: Step, pages: list[int], pos: int) -> int:
        """Where position ``pos`` is kept; the pages up to it must exist (and not be the trash page)."""
        if pos // PAGE >= len(pages) or 0 in pages[:pos // PAGE + 1]:
            raise self.w.violation(f"node {self.node}: step ({step.epoch}, {step.seq}) has no page for "
                                   f"position {pos} (pages {pages})")
        return pages[pos // PAGE] * PAGE + pos % PAGE


class Publisher:
    """The group's publisher, as ``services/publisher/service.py`` runs it: its
    ``GroupEngine`` (scheduler, row tables, stepper and the steps in flight), the members'
    heartbeats. A restart loses
    everything (its requests are lost, see ``StepWorld.lose``)."""

    def __init__(self, world: "StepWorld") -> None:
        self.w, self.life = world, 0
        self.start()

    def start(self) -> None:
        self.life += 1
        self.alive = True
        self.members = [wk.node for wk in self.w.workers]
        self.engine = GroupEngine(Scheduler(ROWS, PREFILL, QUEUE, MAX_LEN, self.w.pages, PAGE, self.w.prefix_cache),
                                  RowTables(ROWS), Stepper(0, self.members, WINDOW, self.w.rng), self.w.depth)
        self.sched, self.stepper = self.engine.sched, self.engine.stepper
        self.watched: int | None = None  # the step waited for (the oldest in flight)
        self.watching = 0  # bumped whenever the step waited for changes: older timers stop
        self.waiting_since = 0.0
        self.beats: dict[int, tuple[float, int]] = {}  # node -> (when, its epoch) of its last beat
        self.w.at(0.0, self.poll, self.life)

    def kill(self) -> None:
        self.alive = False
        self.w.lose(self.life)
        self.w.count_scheduler(self.sched)
        self.w.at(self.w.rng.uniform(0.1, 1.0), self.start)

    def missing(self) -> list[int]:
        return [n for n in self.members if n not in self.beats or self.w.t - self.beats[n][0] > BEAT_TIMEOUT]

    def on_beat(self, node: int, epoch: int) -> None:
        if not self.alive:
            return
        was_whole = not self.missing()
        self.beats[node] = (self.w.t, epoch)
        if not was_whole and not self.missing() and not self.engine.in_flight:
            self.loop()

    def on_replay(self, ask: Replay, life: int, node: int, data: bytes) -> None:
        if self.alive:
            worker = self.w.workers[node]
            self.w.network(worker, worker.replayed, life, data, self.stepper.replay(ask))

    def poll(self, life: int) -> None:
        """The idle loop: look for work now and then (the service waits for a wake-up, or
        a short while when the group is not whole)."""
        if self.alive and self.life == life:
            if not self.engine.in_flight:
                self.loop()
            self.w.at(POLL, self.poll, life)

    def add(self, seq: Sequence) -> bool:
        if not self.engine.add(seq):
            return False
        if not self.engine.in_flight:  # the loop is idle: wake it
            self.loop()
        return True

    def abort(self, rid: str) -> None:
        seq = next((s for s in (*self.sched.waiting, *self.sched.running) if s.rid == rid), None)
        if seq is not None:
            self.engine.abort(seq)
            if not self.engine.in_flight:
                self.loop()

    # ---- the scheduling loop -----------------------------------------------------------
    def loop(self) -> None:
        """One turn of ``schedule_loop``: answer aborted requests, fill the flight."""
        for seq in self.engine.take_aborted():
            self.w.ended(seq.rid, FinishReason.ABORT.value)
        while not self.missing() and (out := self.plan()):
            self.w.sent[(self.stepper.epoch, out.number)] = out.data
            self.w.overlapped += self.engine.in_flight > 1
            self.w.deepest = max(self.w.deepest, self.engine.in_flight)
            self.broadcast(out.data)
            self.watch_oldest()

    def plan(self):
        try:
            return self.engine.plan(self.w.t, (epoch for _, epoch in self.beats.values()))
        except ValueError as e:  # the row tables refuse the plan
            raise self.w.violation(f"the publisher cannot make step ({self.stepper.epoch}, "
                                   f"{self.stepper.seq + 1}): {e}") from None

    def broadcast(self, data: bytes) -> None:
        for worker in self.w.workers:
            self.w.network(worker, worker.on_step, data)

    def watch_oldest(self) -> None:
        """Wait for the oldest step in flight (``settle``): from now on it is re-sent while
        its acknowledgements are late, and given up after ``STEP_TIMEOUT``."""
        oldest = self.engine.oldest.number if self.engine.in_flight else None
        if oldest == self.watched:
            return
        self.watched, self.waiting_since = oldest, self.w.t
        self.watching += 1
        if oldest is not None:
            self.w.at(RESEND, self.watch, self.life, self.watching)

    def watch(self, life: int, watching: int) -> None:
        if not self.alive or self.life != life or self.watching != watching:
            return
        if self.missing():
            return self.reset(ErrorCode.WORKER_LOST)
        if self.w.t - self.waiting_since > STEP_TIMEOUT:
            return self.reset(ErrorCode.TIMEOUT)
        self.w.resent += 1
        self.broadcast(self.engine.oldest.data)
        self.w.at(RESEND, self.watch, life, watching)

    def on_reply(self, reply: StepResult | StepFailure) -> None:
        if self.alive and self.engine.on_reply(reply) is not None:
            self.take_settled()

    def take_settled(self) -> None:
        """Take the oldest steps while they are settled (a later step may settle first: it
        waits), each applied before the next step goes out and its answers are sent."""
        while self.engine.in_flight and self.engine.oldest.settled:
            n, epoch = self.engine.oldest.number, self.stepper.epoch
            try:
                result, events = self.engine.take_settled()
            except GroupFailure as failure:
                return self.reset(failure.code)
            except ValueError as e:
                raise self.w.violation(f"step ({epoch}, {n}): {e}") from None
            self.w.check_settled(epoch, n, result)
            self.loop()  # the next step goes out before the answers
            for seq, token, reason in events:
                if seq.aborted and seq.finished and reason is None:
                    continue  # as ``emit``: aborted since (its end is out), nothing follows it
                self.w.answer(seq.rid, token, reason)
            self.watch_oldest()

    def reset(self, code: ErrorCode) -> None:
        """As ``reset_group``: the flight is dropped with the epoch, what was running ends
        with an error, the waiting requests stay, and a new epoch starts."""
        self.w.resets += 1
        self.w.reset_at.append((self.w.t, code))
        self.watched = None
        self.watching += 1
        for seq in self.engine.on_failure(GroupFailure(code, "the group reset")):
            self.w.ended(seq.rid, "error")
        self.loop()


@dataclass
class StepWorld:
    seed: int
    faults: StepFaults = field(default_factory=StepFaults)
    nodes: int = 2
    depth: int = 0  # steps in flight; 0: DEPTH, or 3 in one seed of four
    prefix_cache: bool | None = None  # None: on in odd seeds
    pages: int = 0  # KV pages of the group; 0: chosen by the seed

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.depth = self.depth or (3 if self.seed % 4 == 3 else DEPTH)
        self.prefix_cache = self.seed % 2 == 1 if self.prefix_cache is None else self.prefix_cache
        self.pages = self.pages or self.rng.choice((8, 10, 13))
        self.t, self.n = 0.0, 0
        self.events: list = []
        self.sent: dict[tuple[int, int], bytes] = {}  # every step the publishers sent
        self.runs: dict[tuple[int, int], set[int]] = {}  # (epoch, seq) -> nodes that ran it
        self.digests: dict[tuple[int, int], str] = {}  # (epoch, seq) -> the digest of its tokens
        self.taken: tuple[int, int] = (0, 0)  # the last step the publisher took
        self.settled: list[tuple[float, int, int]] = []
        self.requests: dict[str, Request] = {}
        self.reset_at: list = []
        self.resets = self.overlapped = self.deepest = self.resent = self.replayed = self.tokens = self.refused = 0
        self.preemptions = self.hit_tokens = 0
        self.workers: list[Worker] = []
        self.workers = [Worker(self, node) for node in range(self.nodes)]
        self.publisher = Publisher(self)

    def at(self, delay: float, fn, *args) -> None:
        self.n += 1
        heapq.heappush(self.events, (self.t + delay, self.n, fn, args))

    def faulty(self) -> bool:
        return self.t < FAULTS_UNTIL

    def network(self, to, fn, *args) -> None:
        """Deliver ``fn(*args)`` to ``to``, late, twice or never while faulty; never to a
        later life of ``to`` (as NATS: a message published before a process subscribed
        does not reach it)."""
        copies = 2 if self.faulty() and self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            if self.faulty() and self.rng.random() < self.faults.drop:
                continue
            slow = self.faulty() and self.rng.random() < self.faults.slow
            self.at(self.rng.uniform(0.02, 0.3) if slow else self.rng.uniform(0.0005, 0.003),
                    self.deliver, to, to.life, fn, args)

    @staticmethod
    def deliver(to, life: int, fn, args) -> None:
        if to.life == life:
            fn(*args)

    def fault(self) -> None:
        if not self.faulty() or not self.faults.kill:
            return
        victim = self.rng.choice([*self.workers, self.publisher])
        if victim.alive:
            victim.kill()
        self.at(self.rng.uniform(0.3, 1.5), self.fault)

    def client(self) -> None:
        """Send a request now and then (and abort one, rarely) while faulty."""
        if not self.faulty():
            return
        pub = self.publisher
        if pub.alive:
            self.send_request()
            live = [*pub.sched.waiting, *pub.sched.running]
            if live and self.rng.random() < 0.05:
                pub.abort(self.rng.choice(live).rid)
        self.at(self.rng.expovariate(12.0), self.client)

    def send_request(self) -> None:
        pub = self.publisher
        rid = f"r{len(self.requests) + self.refused}"
        prompt = self.prompt()
        sampling = SamplingParams(max_new_tokens=self.rng.randint(1, 10), temperature=0.0, seed=1,
                                  stop_token_ids=[STOP])
        # three clients: the scheduler's fair share (admission order, preemption for a
        # newcomer) runs under overlapped steps and faults too
        client = f"_INBOX.c{self.rng.randrange(3)}"
        seq = Sequence(rid, prompt, sampling, self.t, client=client)
        want, reason = alone(prompt, sampling.max_new_tokens)
        self.requests[rid] = Request(prompt, want, reason, pub.life, self.t)
        if not pub.add(seq):
            del self.requests[rid]
            self.refused += 1

    def prompt(self) -> list[int]:
        """A random prompt; with the prefix cache on, often one that begins like an
        earlier request's prompt and answer (a conversation going on)."""
        n = self.rng.randint(1, MAX_LEN - 2)
        fresh = [self.rng.randrange(3, 3 + VOCAB) for _ in range(n)]
        if not self.prefix_cache or not self.requests or self.rng.random() < 0.4:
            return fresh
        old = self.rng.choice(list(self.requests.values()))
        history = (old.prompt + old.want)[:self.rng.randint(1, MAX_LEN - 2)]
        return history + fresh[:self.rng.randint(1, MAX_LEN - 1 - len(history))]

    # ---- invariants -------------------------------------------------------------------
    def violation(self, what: str) -> Violation:
        return Violation(f"t={self.t:.3f} {what}")

    def check_run(self, worker: Worker, epoch: int, seq: int, data: bytes) -> None:
        last = worker.ran.get(epoch, 0)
        if seq != last + 1:
            raise self.violation(f"node {worker.node} ran step {seq} of epoch {epoch} after step {last}")
        if self.sent.get((epoch, seq)) != data:
            raise self.violation(f"node {worker.node} ran ({epoch}, {seq}) not as the publisher sent it")
        worker.ran[epoch] = seq
        self.runs.setdefault((epoch, seq), set()).add(worker.node)

    def check_digest(self, worker: Worker, step: Step, digest: str) -> None:
        first = self.digests.setdefault((step.epoch, step.seq), digest)
        if first != digest:
            raise self.violation(f"node {worker.node} sampled step ({step.epoch}, {step.seq}) differently from "
                                 f"another member (or an earlier life)")

    def check_unanswered(self, worker: Worker, epoch: int, seq: int) -> None:
        """A worker that ran a step must answer its repeat while the publisher waits for it."""
        stepper = self.publisher.stepper
        waited = self.publisher.alive and stepper.epoch == epoch and seq in stepper.flight \
            and not stepper.settled(seq)
        if waited and worker.ran.get(epoch, 0) >= seq:
            raise self.violation(f"node {worker.node} ran step ({epoch}, {seq}) and does not answer it again, "
                                 f"while the publisher waits for it")

    def check_settled(self, epoch: int, seq: int, result: StepResult) -> None:
        ran = self.runs.get((epoch, seq), set())
        if len(ran) < self.nodes:
            raise self.violation(f"step ({epoch}, {seq}) settled, but only nodes {sorted(ran)} ran it")
        if (result.epoch, result.seq) != (epoch, seq):
            raise self.violation(f"step ({epoch}, {seq}) taken with the result of ({result.epoch}, {result.seq})")
        if self.taken[0] == epoch and seq != self.taken[1] + 1 or self.taken[0] != epoch and seq != 1:
            raise self.violation(f"step ({epoch}, {seq}) taken after step {self.taken}")
        self.taken = (epoch, seq)
        self.settled.append((self.t, epoch, seq))

    def answer(self, rid: str, token: int, reason: FinishReason | None) -> None:
        r = self.requests[rid]
        if r.end:
            raise self.violation(f"{rid}: token {token} after its end ({r.end})")
        r.tokens.append(token)
        self.tokens += 1
        if r.tokens != r.want[:len(r.tokens)]:
            raise self.violation(f"{rid}: answered {r.tokens}, alone it samples {r.want}")
        if reason is not None:
            if (reason, len(r.tokens)) != (r.reason, len(r.want)):
                raise self.violation(f"{rid}: ended ({reason.value}) after {r.tokens}; alone it ends "
                                     f"({r.reason.value}) after {r.want}")
            r.end = reason.value

    def ended(self, rid: str, how: str) -> None:
        """``rid`` ends without its last token: an error or an abort."""
        r = self.requests[rid]
        if r.end:
            raise self.violation(f"{rid}: a second end ({how}) after {r.end}")
        r.end = how

    def lose(self, publisher_life: int) -> None:
        """A publisher was killed: the requests it held get no answer in this world."""
        for r in self.requests.values():
            if r.publisher_life == publisher_life and not r.end:
                r.end = "lost"

    def run(self) -> "StepWorld":
        self.at(self.rng.uniform(0.2, 1.0), self.fault)
        self.at(0.0, self.client)
        for i in range(3):
            self.at(QUIET + 0.05 * i, self.send_request)
        while self.events and self.events[0][0] <= END:
            self.t, _, fn, args = heapq.heappop(self.events)
            fn(*args)
        self.count_scheduler(self.publisher.sched)
        resets = [t for t, _ in self.reset_at if t >= QUIET]
        if resets:
            raise Violation(f"the group reset at t={resets} although the faults stopped at t={FAULTS_UNTIL}")
        late = {rid: r.end for rid, r in self.requests.items() if r.sent_at >= QUIET}
        if len(late) < 3 or any(end not in ("stop", "length") for end in late.values()):
            raise Violation(f"no progress once the faults stopped: requests sent after t={QUIET:.1f} ended {late}")
        open_ = [rid for rid, r in self.requests.items() if not r.end]
        if open_:
            raise Violation(f"requests never ended once the faults stopped: {open_}")
        return self

    def count_scheduler(self, sched: Scheduler) -> None:
        """Add what a publisher's scheduler did to the totals (when it is killed, and at the end)."""
        self.preemptions += sched.preemptions
        self.hit_tokens += sched.hit_tokens

    def totals(self) -> dict[str, int]:
        out = {"steps settled": len(self.settled), "resets": self.resets, "overlapped steps": self.overlapped,
               "deepest flight": self.deepest, "steps re-sent": self.resent, "steps replayed": self.replayed,
               "tokens": self.tokens, "preemptions": self.preemptions, "prefix-cache hit tokens": self.hit_tokens,
               "requests": len(self.requests), "refused (queue full)": self.refused}
        for r in self.requests.values():
            out[f"ended {r.end or 'never'}"] = out.get(f"ended {r.end or 'never'}", 0) + 1
        return out
