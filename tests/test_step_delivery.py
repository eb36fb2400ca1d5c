"""Ordered, gap-free step delivery, checked against a real nats-server: a real worker that
misses steps fetches them from the publisher's replay window, runs nothing twice and
answers repeats with its earlier result; a real publisher re-sends late steps and
detects a diverging or silent worker. The other side of each exchange is played by the
test, on the wire, with the real message types."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import msgspec
import pytest

from dpbus.schemas import Done, Error, SamplingParams, Subjects
from dpbus.schemas.codec import Encoding
from dpbus.schemas.internal import (
    LAST_TOKEN, DecodeRow, Heartbeat, PrefillChunk, Replay, ReplayReply, RowPages, RowSampling, RowStart, Step, StepFailure,
    StepReply, StepResult, Submit, SubmitAck, client_of, pack, token_digest,
)
from dpbus.services import bus, logs
from dpbus.schemas.codec import decode_answer
from dpbus.services.publisher.service import Publisher
from dpbus.services.publisher.stepper import Stepper
from dpbus.services.settings import PublisherSettings, WorkerSettings
from dpbus.services.worker.ordering import NEXT, REPEAT, STALE, StepOrder
from dpbus.services.worker.service import Worker, load_runner

pytestmark = pytest.mark.slow  # a real publisher and workers taking steps: not in `make test-fast`

G = RowSampling(0.0, 1.0, 0, 0)
LOG = logs.configure("warning", json=True)


def steps_for(epoch: int) -> list[Step]:
    """A prompt prefilled in two chunks (row 0, pages of 16: one page, then a second),
    then three decode steps (tokens fed are arbitrary)."""
    prompt = list(range(1, 21))
    return [
        Step(epoch, 1, started=[RowStart(0, [1], G)], prefill=[PrefillChunk(0, 0, prompt[:16], False)]),
        Step(epoch, 2, grown=[RowPages(0, [2])], prefill=[PrefillChunk(0, 16, prompt[16:], True)]),
        Step(epoch, 3, decode=[DecodeRow(0, 65, 20, 1)]),
        Step(epoch, 4, decode=[DecodeRow(0, 66, 21, 2)]),
        Step(epoch, 5, decode=[DecodeRow(0, 67, 22, 3)]),
    ]


async def start_worker(server, prefix: str) -> tuple[Worker, asyncio.Event, asyncio.Task]:
    s = msgspec.convert({**server.settings("worker-0-0"), "prefix": prefix, "max_seq_len": 64, "max_prefill_tokens": 16,
                         "max_running_requests": 2, "warmup": False, "heartbeat_interval": 0.2}, WorkerSettings)
    worker, stop = Worker(s, LOG), asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(600):
        if worker.ready:
            return worker, stop, task
        await asyncio.sleep(0.1)
    raise TimeoutError("worker did not get ready")


async def collect_results(nc, subj: Subjects) -> list:
    """Every StepResult / StepFailure published for group 0, as it arrives."""
    results: list = []
    decode = msgspec.msgpack.Decoder(StepReply)

    async def on_result(m):
        results.append(decode.decode(m.data))

    await nc.subscribe(subj.results(0), cb=on_result)
    return results


async def test_worker_replays_missed_steps_and_never_runs_a_step_twice(nats_server):
    subj = Subjects("deliv")
    worker, stop, task = await start_worker(nats_server, "deliv")
    nc = await nats_server.connect("admin")  # plays every other role
    results = await collect_results(nc, subj)
    steps = steps_for(epoch=7)
    replays: list[Replay] = []

    async def on_replay(msg):
        ask = msgspec.msgpack.decode(msg.data, type=Replay)
        replays.append(ask)
        await msg.respond(pack(ReplayReply([pack(s) for s in steps if ask.first <= s.seq <= ask.last])))

    await nc.subscribe(subj.replay(0), cb=on_replay)
    await bus.at_server(nc)
    for seq in (1, 3, 3, 4):  # step 2 is "lost"; step 3 arrives twice
        await nc.publish(subj.step(0), pack(steps[seq - 1]))
        await nc.flush()
        await asyncio.sleep(0.3)
    for _ in range(100):
        if len(results) >= 5:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    await nc.close()
    assert replays == [Replay(7, 2, 2)]
    assert [r.seq for r in results] == [1, 2, 3, 3, 4]  # the repeat of 3 is answered again, not re-run
    assert results[2] == results[3]
    assert worker.counts["steps"] == 4 and worker.counts["gaps"] == 1 and worker.counts["replayed"] == 1
    assert {row: r.pages for row, r in worker.tables.rows.items()} == {0: [1, 2]}  # step 2's page came by replay
    assert all(isinstance(r, StepResult) and r.digest == token_digest(r.prefill_tokens, r.decode_tokens)
               for r in results)


async def test_a_worker_that_joins_midway_rebuilds_its_tables_from_the_first_step(nats_server):
    """Its first step is the third of the epoch: it fetches steps 1..2, one per answer (as
    when steps are too big to replay together), then later fills a gap the same way."""
    subj = Subjects("deliv")
    worker, stop, task = await start_worker(nats_server, "deliv")
    nc = await nats_server.connect("admin")  # plays every other role
    results = await collect_results(nc, subj)
    steps = steps_for(epoch=3)
    replays: list[Replay] = []

    async def on_replay(msg):  # answers the first step asked for only
        ask = msgspec.msgpack.decode(msg.data, type=Replay)
        replays.append(ask)
        await msg.respond(pack(ReplayReply([pack(steps[ask.first - 1])])))

    await nc.subscribe(subj.replay(0), cb=on_replay)
    await bus.at_server(nc)
    for n, seq in enumerate((3, 5)):
        await nc.publish(subj.step(0), pack(steps[seq - 1]))
        await nc.flush()
        for _ in range(300):  # every step up to this one answered, in order
            if len(results) >= seq:
                break
            await asyncio.sleep(0.05)
    stop.set()
    await task
    await nc.close()
    assert replays == [Replay(3, 1, 2), Replay(3, 2, 2), Replay(3, 4, 4)]
    assert [r.seq for r in results] == [1, 2, 3, 4, 5] and all(isinstance(r, StepResult) for r in results)
    assert {row: r.pages for row, r in worker.tables.rows.items()} == {0: [1, 2]}


def held_steps(epoch: int) -> list[Step]:
    """``steps_for`` whose decode rows feed the token their row sampled last (LAST_TOKEN),
    as overlapped steps do."""
    return [msgspec.structs.replace(s, decode=[msgspec.structs.replace(r, token=LAST_TOKEN) for r in s.decode])
            for s in steps_for(epoch)]


def watch_launches(worker: Worker, hold: int | None = None, fail: int | None = None) -> list[tuple[str, int]]:
    """Record, in order, when the worker launches each step and when that step's tokens
    are fetched. Step ``hold``'s tokens (or step ``fail``'s error) wait until the step after
    it has been launched (at most 10 s)."""
    events: list[tuple[str, int]] = []
    next_launched = threading.Event()
    real_launch = worker.runner.launch

    def launch(prefill, decode):
        launched = real_launch(prefill, decode)
        seq = sum(1 for kind, _ in events if kind == "launch") + 1
        events.append(("launch", seq))
        if seq - 1 in (hold, fail):
            next_launched.set()
        real_tokens = launched.tokens

        def tokens():
            if seq in (hold, fail):
                next_launched.wait(10)
            events.append(("fetched", seq))
            if seq == fail:
                raise RuntimeError("the device lost step (test)")
            return real_tokens()

        launched.tokens = tokens
        return launched

    worker.runner.launch = launch
    return events


async def watched_worker(server, **watch) -> tuple:
    """A real worker whose launches are watched (``watch_launches``), a connection playing
    every other role and the results it collects."""
    subj = Subjects("deliv")
    worker, stop, task = await start_worker(server, "deliv")
    nc = await server.connect("admin")
    results = await collect_results(nc, subj)
    return subj, worker, stop, task, nc, results, watch_launches(worker, **watch)


async def send_steps(nc, subj: Subjects, steps: list[Step], results: list, want: int) -> None:
    for step in steps:
        await nc.publish(subj.step(0), pack(step))
    await nc.flush()
    for _ in range(300):
        if len(results) >= want:
            break
        await asyncio.sleep(0.05)


async def test_a_worker_launches_the_next_step_while_the_one_before_computes(nats_server):
    """Step 4 is launched before step 3's tokens are fetched (the host's work for a step
    overlaps the forward before it); the answers still come in order, with the tokens of
    the same steps run one at a time."""
    subj, worker, stop, task, nc, results, events = await watched_worker(nats_server, hold=3)
    await send_steps(nc, subj, held_steps(epoch=4), results, 5)
    stop.set()
    await task
    await nc.close()
    assert [r.seq for r in results] == [1, 2, 3, 4, 5] and all(isinstance(r, StepResult) for r in results)
    assert events.index(("launch", 4)) < events.index(("fetched", 3))
    alone = Worker(worker.s, LOG)  # the same steps, one at a time, on a model of the same weights
    alone.runner = load_runner(worker.s, LOG)
    for step in held_steps(epoch=4):
        alone.order.classify(step.epoch, step.seq)
        want = alone.run_step(step)
        got = results[step.seq - 1]
        assert (got.prefill_tokens, got.decode_tokens, got.digest) == \
            (want.prefill_tokens, want.decode_tokens, want.digest)


async def test_steps_launched_after_one_that_fails_are_not_answered(nats_server):
    """Step 3 fails when its tokens are fetched, after step 4 was launched on top of it:
    the worker reports step 3's failure, says nothing of step 4 (its forward followed a
    broken one), runs nothing more of the epoch and takes the next one."""
    subj, worker, stop, task, nc, results, events = await watched_worker(nats_server, fail=3)
    await send_steps(nc, subj, held_steps(epoch=4), results, 3)
    await asyncio.sleep(0.5)  # step 4 (and 5) had time to be answered, wrongly
    answered_in_epoch_4 = [(type(r).__name__, r.seq) for r in results]
    seen_in_epoch_4 = list(events)
    await send_steps(nc, subj, held_steps(epoch=5)[:1], results, 4)
    stop.set()
    await task
    await nc.close()
    assert answered_in_epoch_4 == [("StepResult", 1), ("StepResult", 2), ("StepFailure", 3)]
    # 4 was launched on top of 3 and never fetched; 5 waited for room, then saw the failure
    assert seen_in_epoch_4 == [("launch", 1), ("fetched", 1), ("launch", 2), ("fetched", 2), ("launch", 3),
                               ("launch", 4), ("fetched", 3)]
    assert isinstance(results[-1], StepResult) and (results[-1].epoch, results[-1].seq) == (5, 1)
    assert worker.counts["failures"] == 1


def test_replay_answers_hold_the_first_steps_that_fit():
    stepper = Stepper(0, [0], replay_window=6)
    for _ in range(8):
        stepper.next_step(lambda epoch, seq: bytes(100), [])  # steps 1..8 of one epoch; the window keeps 3..8
    e = stepper.epoch
    assert stepper.replay(Replay(e, 3, 8), limit=250) == [bytes(100)] * 2
    assert stepper.replay(Replay(e, 3, 8), limit=50) == [bytes(100)]  # one step at least, however big
    assert stepper.replay(Replay(e, 5, 8)) == [bytes(100)] * 4
    assert stepper.replay(Replay(e, 2, 8)) == []  # step 2 is no longer held
    assert stepper.replay(Replay(e + 1, 5, 8)) == []  # another epoch


def test_a_worker_that_failed_a_step_still_answers_the_steps_it_ran_before_it():
    """With overlapped steps the publisher may wait for step n while a member has run n and
    failed n + 1. That member took every step of the epoch as stale and never answered a
    re-sent step n: the publisher waited out its step timeout before it took the failure
    (found by the step simulation)."""
    order = StepOrder()
    assert order.classify(5, 1) == NEXT
    order.ran(1, b"reply to 1")
    assert order.classify(5, 2) == NEXT
    order.lose_sync()  # step 2 failed
    assert order.classify(5, 1) == REPEAT and order.reply_to_repeat(1) == b"reply to 1"
    assert order.classify(5, 2) == STALE and order.classify(5, 3) == STALE  # nothing new of this epoch
    assert order.classify(6, 1) == NEXT


def test_a_restarted_publisher_does_not_take_again_an_epoch_its_predecessor_started():
    """Workers report the epoch they have taken. A publisher that dies right after the
    first step of a new epoch leaves that step in a worker's queue (or on the wire) with
    nobody reporting its epoch yet; its successor numbered its first epoch just above the
    reported ones, the same number: the worker ran the dead publisher's step as the new
    one's step 1, then answered the real step 1 with that step's kept reply (found by the
    step simulation)."""
    def nothing(epoch: int, seq: int) -> bytes:
        return b""

    dead = Stepper(0, [0, 1], 8)
    dead.next_step(nothing, [])
    taken = dead.epoch  # the workers took its first epoch...
    dead.reset()
    dead.next_step(nothing, [taken])  # ...not yet its next one when it died
    for seed in range(100):
        new = Stepper(0, [0, 1], 8, random.Random(seed))
        new.next_step(nothing, [taken])
        first = new.epoch
        assert taken < first != dead.epoch
        new.reset()
        new.next_step(nothing, [taken])
        assert new.epoch == first + 1  # its own later epochs follow one by one


async def test_worker_reports_a_gap_it_cannot_fill_and_waits_for_a_new_epoch(nats_server):
    subj = Subjects("gap")
    worker, stop, task = await start_worker(nats_server, "gap")
    nc = await nats_server.connect("admin")  # plays every other role
    results = await collect_results(nc, subj)

    async def on_replay(msg):  # the window no longer holds the missing steps
        await msg.respond(pack(ReplayReply([])))

    await nc.subscribe(subj.replay(0), cb=on_replay)
    await bus.at_server(nc)
    old, new = steps_for(epoch=1), steps_for(epoch=2)
    for n, step in enumerate((old[0], old[3], new[0]), 1):  # gap 2..3 cannot be filled; then a new epoch
        await nc.publish(subj.step(0), pack(step))
        await nc.flush()
        for _ in range(300):  # one answer per step, in order, however busy the machine is
            if len(results) >= n:
                break
            await asyncio.sleep(0.05)
    stop.set()
    await task
    await nc.close()
    assert isinstance(results[1], StepFailure) and results[1].code.value == "diverged"
    assert "no longer holds steps 2..3" in results[1].message
    assert isinstance(results[2], StepResult) and (results[2].epoch, results[2].seq) == (2, 1)
    assert worker.counts["steps"] == 2
    assert {row: r.pages for row, r in worker.tables.rows.items()} == {0: [1]}  # the new epoch's, from scratch


class FakeWorker:
    """Plays the group's only worker on the wire: beats, and answers steps as told."""

    def __init__(self, nc, subj: Subjects, behaviour: str) -> None:
        self.nc, self.subj, self.behaviour = nc, subj, behaviour
        self.seen: list[tuple[int, int]] = []

    async def beat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.nc.publish(self.subj.heartbeat(0, 0), pack(Heartbeat(0, 0, 0, True, 0, 0, time.time())))
            await asyncio.sleep(0.2)

    async def on_step(self, msg) -> None:
        step = msgspec.msgpack.decode(msg.data, type=Step)
        self.seen.append((step.epoch, step.seq))
        if self.behaviour == "ignore_first" and self.seen.count((step.epoch, step.seq)) == 1:
            return  # as if the step never arrived: the publisher must send it again
        pre = [7 if item.sample else -1 for item in step.prefill]
        dec = [7] * len(step.decode)
        digest = "not-the-same" if self.behaviour == "diverge" else token_digest(pre, dec)
        await self.nc.publish(self.subj.result(0, 0), pack(StepResult(step.epoch, step.seq, 0, pre, dec, 1.0, digest)))


async def run_publisher_with(server, behaviour: str, prefix: str) -> tuple[list, Publisher, FakeWorker]:
    subj = Subjects(prefix)
    s = msgspec.convert({**server.settings("publisher-0"), "prefix": prefix, "max_seq_len": 64, "max_prefill_tokens": 16,
                         "resend_interval": 0.3, "heartbeat_timeout": 2.0}, PublisherSettings)
    pub, stop = Publisher(s, LOG), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await server.connect("admin")  # plays every other role
    fake = FakeWorker(nc, subj, behaviour)
    await nc.subscribe(subj.step(0), cb=fake.on_step)
    beating = asyncio.create_task(fake.beat(stop))
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    for _ in range(100):
        if pub.ready():
            break
        await asyncio.sleep(0.1)
    sub = Submit("r1", [1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0.0), True, inbox, Encoding.JSON,
                 time.time(), 0, client=client_of(inbox))
    ack = msgspec.msgpack.decode((await nc.request(subj.submit(0), pack(sub), timeout=5)).data, type=SubmitAck)
    assert ack.accepted
    got = []
    while not got or not isinstance(got[-1], (Done, Error)):
        got.append(decode_answer((await answers.next_msg(timeout=10)).data))
    stop.set()
    await task
    beating.cancel()
    await nc.close()
    return got, pub, fake


async def test_publisher_resends_a_step_nobody_acknowledged(nats_server):
    got, pub, fake = await run_publisher_with(nats_server, "ignore_first", "resend")
    assert isinstance(got[-1], Done) and got[-1].completion_tokens == 3
    assert pub.counts["resent"] >= 3  # each of the 3 steps was sent twice
    assert len(fake.seen) >= 2 * len(set(fake.seen))  # every step arrived (at least) twice


async def test_publisher_detects_a_diverging_worker(nats_server):
    got, pub, _ = await run_publisher_with(nats_server, "diverge", "diverge")
    assert isinstance(got[-1], Error) and got[-1].code.value == "diverged", got[-1]
    assert pub.counts["group_failures"] == 1 and pub.stepper.epoch > 0


@pytest.mark.parametrize("silent_after", [0])
async def test_publisher_detects_a_silent_worker(nats_server, silent_after):
    """A worker that stops beating: the running request ends with worker_lost."""
    subj = Subjects("silent")
    s = msgspec.convert({**nats_server.settings("publisher-0"), "prefix": "silent", "max_seq_len": 64,
                         "heartbeat_timeout": 1.0}, PublisherSettings)
    pub, stop = Publisher(s, LOG), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")  # plays every other role
    for _ in range(3):  # three beats, then silence; steps are never answered
        await nc.publish(subj.heartbeat(0, 0), pack(Heartbeat(0, 0, 0, True, 0, 0, time.time())))
        await asyncio.sleep(0.1)
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    sub = Submit("r2", [1, 2, 3], SamplingParams(max_new_tokens=3), True, inbox, Encoding.JSON, time.time(), 0,
                 client=client_of(inbox))
    await nc.request(subj.submit(0), pack(sub), timeout=5)
    t0 = time.monotonic()
    err = decode_answer((await answers.next_msg(timeout=10)).data)
    detected = time.monotonic() - t0
    stop.set()
    await task
    await nc.close()
    print(f"silent worker detected in {detected:.2f}s (heartbeat timeout 1.0s)")
    assert isinstance(err, Error) and err.code.value == "worker_lost"
    assert detected < 3.0


async def test_a_request_that_streamed_nothing_moves_to_another_group_when_its_group_fails(nats_server):
    """Group 0 diverges on the request's first step (its prefill: nothing streamed yet),
    so its publisher hands it to group 1, which completes it; a pinned one gets the error."""
    subj = Subjects("move")
    base = {"prefix": "move", "dp_size": 2, "nnodes": 2, "max_seq_len": 64,
            "max_prefill_tokens": 16, "heartbeat_timeout": 2.0}
    stop = asyncio.Event()
    pubs = [Publisher(msgspec.convert({**base, **nats_server.settings(f"publisher-{g}"), "dp_rank": g},
                                      PublisherSettings), LOG) for g in (0, 1)]
    tasks = [asyncio.create_task(p.run(stop)) for p in pubs]
    nc = await nats_server.connect("admin")  # plays every other role
    fakes = []
    for g, behaviour in ((0, "diverge"), (1, "fine")):
        fake = FakeWorker(nc, subj, behaviour)
        fake.group = g
        fakes.append(fake)

    async def beat_both():
        while not stop.is_set():
            for g in (0, 1):
                await nc.publish(subj.heartbeat(g, g), pack(Heartbeat(g, g, 0, True, 0, 0, time.time())))
            await asyncio.sleep(0.2)

    def on_step_for(g: int, fake: FakeWorker):
        async def on_step(msg):
            step = msgspec.msgpack.decode(msg.data, type=Step)
            pre = [7 if item.sample else -1 for item in step.prefill]
            dec = [7] * len(step.decode)
            digest = "bad" if fake.behaviour == "diverge" else token_digest(pre, dec)
            await nc.publish(subj.result(g, g), pack(StepResult(step.epoch, step.seq, g, pre, dec, 1.0, digest)))
        return on_step

    for g, fake in enumerate(fakes):
        await nc.subscribe(subj.step(g), cb=on_step_for(g, fake))
    beating = asyncio.create_task(beat_both())
    for _ in range(100):
        if all(p.ready() for p in pubs):
            break
        await asyncio.sleep(0.1)
    outcomes = {}
    for rid, pinned in (("free", False), ("pinned", True)):
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox)
        sub = Submit(rid, [1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0.0), True, inbox, Encoding.JSON,
                     time.time(), 0, pinned=pinned, client=client_of(inbox))
        ack = msgspec.msgpack.decode((await nc.request(subj.submit(0), pack(sub), timeout=5)).data, type=SubmitAck)
        assert ack.accepted
        got = []
        while not got or not isinstance(got[-1], (Done, Error)):
            got.append(decode_answer((await answers.next_msg(timeout=10)).data))
        await asyncio.sleep(1.5)  # keep listening: anything after the terminal answer counts too
        while answers.pending_msgs:
            got.append(decode_answer((await answers.next_msg(timeout=1)).data))
        outcomes[rid] = got
    stop.set()
    await asyncio.gather(*tasks)
    beating.cancel()
    await nc.close()
    assert isinstance(outcomes["free"][-1], Done) and outcomes["free"][-1].dp_rank == 1
    for got in outcomes.values():  # one terminal answer each, and nothing after it
        assert [isinstance(a, (Done, Error)) for a in got].count(True) == 1 and isinstance(got[-1], (Done, Error))
    assert isinstance(outcomes["pinned"][-1], Error) and outcomes["pinned"][-1].code.value == "diverged"
    assert pubs[0].counts["requeued"] == 1


async def test_a_member_s_heartbeat_or_result_in_another_s_name_is_dropped_and_counted(nats_server):
    """Members publish on their own subjects (``heartbeat.<rank>``, ``result.<rank>``), each
    its own NATS user's: a member host is refused another's subject by the server, and a
    message whose body names another member than its subject is dropped by the publisher.
    Here the admin user plays a member that forges: group 0 of 2 members stays not whole."""
    subj = Subjects("silent")
    s = msgspec.convert({**nats_server.settings("publisher-0"), "prefix": "silent", "max_seq_len": 64, "nnodes": 2,
                         "heartbeat_timeout": 1.0}, PublisherSettings)
    pub, stop = Publisher(s, LOG), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e).lower())

    forger = await nats_server.connect("worker-0-1", error_cb=on_error)
    try:
        for _ in range(30):
            await nc.publish(subj.heartbeat(0, 0), pack(Heartbeat(0, 0, 0, True, 0, 0, time.time())))  # member 0
            # member 1 beats in member 0's name on its own subject, and for itself on member 0's
            await nc.publish(subj.heartbeat(0, 1), pack(Heartbeat(0, 0, 0, True, 0, 0, time.time())))
            await forger.publish(subj.heartbeat(0, 0), pack(Heartbeat(1, 0, 1, True, 0, 0, time.time())))
            await nc.publish(subj.result(0, 1), pack(StepResult(0, 1, 0, [1], [], 1.0, "x")))
            await asyncio.sleep(0.05)
            if pub.counts["forged"] >= 20 and any("permissions violation" in e for e in errors):
                break
        assert pub.counts["forged"] >= 20  # every heartbeat and result in another's name
        assert any("permissions violation" in e and "heartbeat.0" in e for e in errors), errors
        assert not pub.ready() and 1 not in pub.beats  # member 1 never counted as beating
    finally:
        stop.set()
        await task
        for c in (nc, forger):
            await c.close()
