"""Paths that used to give a request zero or two terminal answers, each driven on a real
nats-server against the real publisher, worker or outbox; the other side of each exchange
is played by the test with the real message types."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from dpbus.schemas import Chunk, Done, Error, SamplingParams, Subjects
from dpbus.schemas.codec import Encoding
from dpbus.schemas.internal import (
    GroupAbort, Heartbeat, LoadReport, Step, StepFailure, StepResult, Submit, SubmitAck, pack, token_digest,
)
from dpbus.services import bus, logs
from dpbus.services.client import decode_answer
from dpbus.services.errors import Rejected, SendDataError
from dpbus.services.ingest.service import Ingest
from dpbus.services.publisher.service import Publisher
from dpbus.services.publisher.stepper import EPOCH_GAP
from dpbus.services.settings import IngestSettings, PublisherSettings, WorkerSettings
from dpbus.services.worker.service import Worker

pytestmark = pytest.mark.slow  # a real publisher and workers taking steps: not in `make test-fast`

LOG = logs.configure("warning", json=True)
PREFIX = "once"
SUBJ = Subjects(PREFIX)


def publisher(server, g: int = 0, **kw) -> Publisher:
    s = msgspec.convert({**server.settings(f"publisher-{g}"), "prefix": PREFIX, "dp_size": 2, "nnodes": 2,
                         "dp_rank": g, "max_seq_len": 64, "max_prefill_tokens": 16, "heartbeat_timeout": 1.0,
                         "resend_interval": 0.3, "load_interval": 0.1, **kw}, PublisherSettings)
    return Publisher(s, LOG)


def submit(rid: str, inbox: str, g: int = 0, tokens: int = 3) -> Submit:
    return Submit(rid, [1, 2, 3], SamplingParams(max_new_tokens=tokens, temperature=0.0), True, inbox,
                  Encoding.JSON, time.time(), g, client=inbox.rsplit(".", 1)[0])


async def ack_of(nc, g: int, sub: Submit) -> SubmitAck:
    return msgspec.msgpack.decode((await nc.request(SUBJ.submit(g), pack(sub), timeout=5)).data, type=SubmitAck)


class Answers:
    """Everything that arrives on one inbox, kept (not stopping at the terminal answer)."""

    def __init__(self) -> None:
        self.got: list = []

    async def on(self, msg) -> None:
        self.got.append(decode_answer(msg.data))

    def terminals(self) -> list:
        return [a for a in self.got if isinstance(a, (Done, Error))]

    async def until_terminal(self, within: float) -> None:
        deadline = time.monotonic() + within
        while not self.terminals() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def check_one_terminal_last(self) -> None:
        assert len(self.terminals()) == 1, self.got
        assert self.got[-1] is self.terminals()[0], self.got
        chunks = [a.index for a in self.got if isinstance(a, Chunk)]
        assert chunks == list(range(len(chunks))), chunks


async def answers_on(nc) -> tuple[str, Answers]:
    """A new inbox of ``nc`` and what arrives there, subscribed at the server on return."""
    inbox, answers = nc.new_inbox(), Answers()
    await nc.subscribe(inbox, cb=answers.on)
    await bus.at_server(nc)
    return inbox, answers


async def beat(nc, g: int, stop: asyncio.Event, epoch: int = 0, node: int | None = None) -> None:
    node = g if node is None else node
    while not stop.is_set():
        await nc.publish(SUBJ.heartbeat(g, node), pack(Heartbeat(node, g, 0, True, epoch, 0, time.time())))
        await asyncio.sleep(0.1)


def answer(step: Step, node: int) -> StepResult:
    pre = [7 if item.sample else -1 for item in step.prefill]
    dec = [7] * len(step.decode)
    return StepResult(step.epoch, step.seq, node, pre, dec, 1.0, token_digest(pre, dec))


async def wait_ready(pub: Publisher) -> None:
    for _ in range(100):
        if pub.ready():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("publisher never saw its group whole")


async def one_request(nc, pub: Publisher, task: asyncio.Task, stop: asyncio.Event, on_step, rid: str,
                      epoch: int = 0, tokens: int = 3) -> "Answers":
    """Group 0's publisher ``pub`` (running as ``task``) with one stand-in worker answering
    steps with ``on_step`` and beating at ``epoch``: one request of ``tokens`` new tokens
    through it, listened to for 0.5 s past its terminal answer; then everything stops. Its
    answers (one terminal)."""
    await nc.subscribe(SUBJ.step(0), cb=on_step)
    beating = asyncio.create_task(beat(nc, 0, stop, epoch=epoch))
    await wait_ready(pub)
    inbox, answers = await answers_on(nc)
    assert (await ack_of(nc, 0, submit(rid, inbox, tokens=tokens))).accepted
    await answers.until_terminal(10)
    await asyncio.sleep(0.5)
    stop.set()
    await task
    beating.cancel()
    await nc.close()
    answers.check_one_terminal_last()
    return answers


async def test_a_failure_reported_for_an_earlier_step_does_not_fail_the_current_one(nats_server):
    """A late StepFailure about step n-1 (e.g. a replay that came too late) used to fail
    step n and every request running in it."""
    pub, stop = publisher(nats_server), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")

    async def on_step(msg):
        step = msgspec.msgpack.decode(msg.data, type=Step)
        if step.seq > 1:
            late = StepFailure(step.epoch, step.seq - 1, 0, "diverged", "a late complaint about the previous step")
            await nc.publish(SUBJ.result(0, 0), pack(late))
        await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    answers = await one_request(nc, pub, task, stop, on_step, "late-failure")
    assert isinstance(answers.got[-1], Done), answers.got[-1]
    assert pub.counts["group_failures"] == 0


async def test_a_new_publisher_numbers_its_epoch_above_its_workers_even_when_its_clock_is_behind(nats_server,
                                                                                              monkeypatch):
    """Epochs came from the wall clock: a publisher whose clock stepped back sent steps of
    an epoch older than its workers', which they drop as stale, and the group stalled."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_000_000_000)  # 1970: far behind the workers
    pub = publisher(nats_server, step_timeout=3.0)
    monkeypatch.undo()
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    worker_epoch = time.time_ns() // 1000  # where the previous publisher left the worker

    async def on_step(msg):  # drops stale epochs as the real worker does
        step = msgspec.msgpack.decode(msg.data, type=Step)
        if step.epoch > worker_epoch:
            await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    answers = await one_request(nc, pub, task, stop, on_step, "clock", epoch=worker_epoch)
    assert isinstance(answers.got[-1], Done), answers.got[-1]
    assert worker_epoch < pub.stepper.epoch <= worker_epoch + EPOCH_GAP


async def test_a_request_aborted_while_its_step_is_computed_gets_nothing_after_its_end(nats_server):
    """With overlapped steps the publisher takes step n's tokens, sends the next step and
    only then streams step n's tokens; a request aborted while step n was computed got its
    ``done`` first and then step n's chunk (found by the step simulation). Now step n's
    chunk goes out, then the ``done`` that counts it, and nothing after."""
    pub, stop = publisher(nats_server), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    first: list[Step] = []

    async def on_step(msg):  # step 1 is answered once step 2 is out, and the request aborted
        step = msgspec.msgpack.decode(msg.data, type=Step)
        if step.seq == 1:
            first.append(step)
            return
        if step.seq == 2:
            [seq] = pub.sched.running
            await nc.request(SUBJ.group_abort(0), pack(GroupAbort(seq.rid, seq.delivery.reply)), timeout=5)
            await nc.publish(SUBJ.result(0, 0), pack(answer(first[0], 0)))
        await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    answers = await one_request(nc, pub, task, stop, on_step, "aborted-in-flight")
    *chunks, done = answers.got
    assert done.finish_reason == "abort", answers.got
    assert done.completion_tokens == len(chunks) == 1, "the token sampled before the abort was seen goes out first"


async def test_a_terminal_answer_reaches_the_server_ahead_of_its_settling_write(nats_server):
    """A publisher killed between winning a request's terminal answer in the ledger and
    sending it left the entry answered and the client with nothing (the chaos test caught
    it once in about 15 runs). Now the answer goes first and the write right behind it,
    on the same connection: the server handles them in that order, so it cannot take the
    write without the answer. One subscription to every subject sees what the server
    routes in the order it routes it: the ``done``, then the entry becoming answered."""
    pub, stop = publisher(nats_server), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    routed: list[tuple[str, str]] = []
    ledger = f"$KV.{PREFIX}_requests.r."
    inbox = nc.new_inbox()

    async def on_any(msg) -> None:  # one subscription: one queue, in the server's order
        if msg.subject == inbox:
            routed.append(("answer", type(decode_answer(msg.data)).__name__))
        elif msg.subject.startswith(ledger) and msg.data:
            routed.append(("ledger", msgspec.msgpack.decode(msg.data)["state"]))

    async def on_step(msg):
        await nc.publish(SUBJ.result(0, 0), pack(answer(msgspec.msgpack.decode(msg.data, type=Step), 0)))

    await nc.subscribe(">", cb=on_any)
    await nc.subscribe(SUBJ.step(0), cb=on_step)
    beating = asyncio.create_task(beat(nc, 0, stop))
    try:
        await wait_ready(pub)
        assert (await ack_of(nc, 0, submit("ahead", inbox, tokens=3))).accepted
        deadline = time.monotonic() + 10
        while ("ledger", "answered") not in routed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        beating.cancel()
        await nc.close()
    assert routed[0] == ("ledger", "held"), routed  # claimed before it was acknowledged
    assert routed[-2:] == [("answer", "Done"), ("ledger", "answered")], routed
    assert routed.count(("answer", "Chunk")) == 3, routed


async def streamed_with_interval(server, rid: str, tokens: int, abort_at_step: int = 0) -> Answers:
    """One request of ``tokens`` new tokens through a publisher streaming 4 tokens per
    chunk, with a stand-in worker; aborted once step ``abort_at_step`` is asked for (0: not)."""
    pub, stop = publisher(server, stream_interval=4), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await server.connect("admin")

    async def on_step(msg):
        step = msgspec.msgpack.decode(msg.data, type=Step)
        if step.seq == abort_at_step:
            [seq] = pub.sched.running
            await nc.request(SUBJ.group_abort(0), pack(GroupAbort(seq.rid, seq.delivery.reply)), timeout=5)
        await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    return await one_request(nc, pub, task, stop, on_step, rid, tokens=tokens)


async def test_a_stream_interval_sends_several_tokens_per_chunk(nats_server):
    """``--stream-interval 4``: chunks of 4 tokens numbered 0, 1, 2, the last one shorter,
    and the ``done`` counting every token the chunks carried."""
    answers = await streamed_with_interval(nats_server, "interval", tokens=10)
    *chunks, done = answers.got
    assert [len(c.token_ids) for c in chunks] == [4, 4, 2], answers.got
    assert [c.index for c in chunks] == [0, 1, 2]
    assert done.completion_tokens == 10 and done.finish_reason == "length"


async def test_tokens_held_for_the_next_chunk_go_out_before_an_abort_s_done(nats_server):
    """Tokens sampled but not streamed yet (fewer than the interval) are streamed before
    the terminal answer of a request that ends otherwise than by its last token."""
    answers = await streamed_with_interval(nats_server, "interval-abort", tokens=40, abort_at_step=4)
    *chunks, done = answers.got
    assert done.finish_reason == "abort", answers.got
    sizes = [len(c.token_ids) for c in chunks]
    assert sum(sizes) == done.completion_tokens > 0, answers.got
    assert all(n == 4 for n in sizes[:-1]) and 0 < sizes[-1] <= 4, sizes


def queue_while_not_whole(pub: Publisher, sub: Submit) -> None:
    """A request queued in a group that then lost a node (accepted while it was whole)."""
    assert not pub.ready()
    assert pub.sched.add(pub.new_sequence(sub))


async def test_a_queued_request_offered_to_another_group_cannot_also_start_here(nats_server):
    """Housekeeping offered a queued request to another group and only then took it out of
    the queue: when the group became whole during the offer, the request started here *and*
    was accepted there, and ``waiting.remove`` raised and ended the housekeeping task (load
    reports stopped)."""
    pub, stop = publisher(nats_server, heartbeat_timeout=0.5), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    stepped: list[list[int]] = []
    offered: list[Submit] = []
    reports: list[LoadReport] = []
    group_whole = asyncio.Event()

    async def on_step(msg):
        step = msgspec.msgpack.decode(msg.data, type=Step)
        stepped.extend(item.token_ids for item in step.prefill)
        await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    async def other_group_takes_it_slowly(msg):
        offered.append(msgspec.msgpack.decode(msg.data, type=Submit))
        group_whole.set()  # group 0 becomes whole while it waits for this acknowledgement
        await asyncio.sleep(1.0)
        await msg.respond(pack(SubmitAck(True, instance=5)))

    async def on_load(msg):
        reports.append(msgspec.msgpack.decode(msg.data, type=LoadReport))

    async def beat_once_whole():
        await group_whole.wait()
        await beat(nc, 0, stop)

    await nc.subscribe(SUBJ.step(0), cb=on_step)
    await nc.subscribe(SUBJ.submit(1), cb=other_group_takes_it_slowly)
    await nc.subscribe(SUBJ.load(0), cb=on_load)
    beating = asyncio.create_task(beat_once_whole())
    inbox, answers = await answers_on(nc)
    queue_while_not_whole(pub, submit("race", inbox))
    await asyncio.sleep(2.5)
    n_reports = len(reports)
    await asyncio.sleep(0.5)
    stop.set()
    await task
    beating.cancel()
    await nc.close()
    assert [s.rid for s in offered] == ["race"]
    assert stepped == [], "the request ran here while another group took it"
    assert answers.got == []  # the other group answers it (played by nobody here)
    assert len(reports) > n_reports, "load reports stopped: the housekeeping task died"


async def test_an_abort_that_comes_while_a_request_moves_follows_it(nats_server):
    pub, stop = publisher(nats_server, heartbeat_timeout=0.5), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    aborts: list[GroupAbort] = []
    offered = asyncio.Event()

    async def other_group_takes_it_slowly(msg):
        offered.set()
        await asyncio.sleep(0.8)
        await msg.respond(pack(SubmitAck(True, instance=5)))

    async def other_group_abort(msg):
        aborts.append(msgspec.msgpack.decode(msg.data, type=GroupAbort))
        await msg.respond(b"\x80")

    await nc.subscribe(SUBJ.submit(1), cb=other_group_takes_it_slowly)
    await nc.subscribe(SUBJ.group_abort(1), cb=other_group_abort)
    inbox, answers = await answers_on(nc)
    queue_while_not_whole(pub, submit("moving", inbox))
    await asyncio.wait_for(offered.wait(), 5)
    still_ours = (inbox.rsplit(".", 1)[0], "moving") in pub.moving  # listed while offered elsewhere
    await nc.request(SUBJ.group_abort(0), pack(GroupAbort("moving", inbox)), timeout=2)
    await asyncio.sleep(1.5)
    stop.set()
    await task
    await nc.close()
    assert still_ours
    assert [a.rid for a in aborts] == ["moving"]
    assert answers.got == []  # answered by the group that took it


async def test_copies_and_retries_of_a_request_run_once(nats_server):
    """The same (client, rid) submitted again, while held or after its answer, from the
    same or another inbox of the client: acknowledged as a duplicate, run once."""
    pub, stop = publisher(nats_server), asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    nc = await nats_server.connect("admin")
    runs: list[list[int]] = []

    async def on_step(msg):
        step = msgspec.msgpack.decode(msg.data, type=Step)
        runs.extend(item.token_ids for item in step.prefill)
        await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    await nc.subscribe(SUBJ.step(0), cb=on_step)
    beating = asyncio.create_task(beat(nc, 0, stop))
    await wait_ready(pub)
    inbox, answers = await answers_on(nc)
    first = await ack_of(nc, 0, submit("again", inbox))
    second = await ack_of(nc, 0, submit("again", inbox))  # a retried submit while it runs
    await answers.until_terminal(10)
    other_inbox, other = await answers_on(nc)  # the same client, a new inbox, after the answer
    third = await ack_of(nc, 0, submit("again", other_inbox))
    await asyncio.sleep(1.0)
    stop.set()
    await task
    beating.cancel()
    await nc.close()
    assert first.accepted and not first.duplicate
    assert second.accepted and second.duplicate and third.accepted and third.duplicate
    assert runs == [[1, 2, 3]]
    answers.check_one_terminal_last()
    assert other.got == []


async def test_a_worker_whose_result_cannot_be_sent_keeps_taking_steps(nats_server, monkeypatch):
    """A SendDataError used to end the worker's step loop while its heartbeats still said
    ready: the group looked whole and never stepped again."""
    from tests.test_step_delivery import collect_results, start_worker, steps_for

    subj = Subjects("deliv")
    worker, stop, task = await start_worker(nats_server, "deliv")
    nc = await nats_server.connect("admin")
    results = await collect_results(nc, subj)
    real_publish, failed = bus.publish, []

    async def publish_failing_once(nc_, subject, data, **kw):
        if not failed:
            failed.append(subject)
            raise SendDataError(None, "NATS would not take it (test)")
        await real_publish(nc_, subject, data, **kw)

    monkeypatch.setattr(bus, "publish", publish_failing_once)
    steps = steps_for(epoch=3)
    for step in steps[:2]:
        await nc.publish(subj.step(0), pack(step))
        await nc.flush()
        await asyncio.sleep(0.5)
    for _ in range(50):
        if results:
            break
        await asyncio.sleep(0.1)
    beat = worker.heartbeat()
    stop.set()
    await task
    await nc.close()
    assert failed and [r.seq for r in results] == [2]
    assert worker.counts["unsent"] == 1 and beat.ready


async def test_a_worker_leaves_a_broken_job_even_when_it_cannot_say_so(nats_server):
    s = msgspec.convert({**nats_server.settings("worker-0-0"), "prefix": PREFIX}, WorkerSettings)
    worker = Worker(s, LOG)
    worker.nc = await nats_server.connect("worker-0-0")
    await worker.nc.close()  # publish and flush now raise
    exits: list[int] = []
    worker.exit = exits.append
    await worker.leave_broken_job(StepFailure(1, 1, 0, "internal", "boom"), SUBJ.result(0, 0))
    assert exits == [70]


async def test_the_client_outbox_never_drops_an_answer(nats_server):
    nc = await nats_server.connect("admin")
    inbox, answers = await answers_on(nc)
    outbox = bus.ClientOutbox(nc, LOG, limit=3)
    outbox.hold_until = asyncio.get_running_loop().time() + 60  # as if NATS had just come back
    sending = asyncio.create_task(_send_all(outbox, inbox, 10))
    await asyncio.sleep(0.5)
    blocked, held = not sending.done(), len(outbox.held)
    outbox.hold_until = 0.0
    await asyncio.wait_for(sending, 5)
    await outbox.drain(5)
    await nc.flush()
    await asyncio.sleep(0.2)
    await nc.close()
    assert blocked and held == 3  # the sender waits for room instead of dropping
    assert [a.index for a in answers.got] == list(range(10))


async def _send_all(outbox: bus.ClientOutbox, inbox: str, n: int) -> None:
    for i in range(n):
        await outbox.send(inbox, msgspec.json.encode(Chunk("r", i, [i], "x")))


def test_without_dp_attention_there_is_one_group_whatever_dp_size():
    """``enable_dp_attention=False`` with ``dp_size=2``: the workers form one JAX job (one
    group), so ingest routes to one group and there is one publisher."""
    base = {"dp_size": 2, "nnodes": 2, "enable_dp_attention": False}
    ingest = Ingest(msgspec.convert(base, IngestSettings), LOG)
    assert ingest.groups == 1 and ingest.router.dp_size == 1
    with pytest.raises(Rejected) as refused:
        asyncio.run(ingest.admit(b'{"text": "hi", "dp_rank": 1}', "_INBOX.client.x", "_INBOX.client"))
    assert refused.value.code.value == "unknown_dp_rank"
    assert Publisher(msgspec.convert({**base, "dp_rank": 0}, PublisherSettings), LOG).members == [0, 1]
    with pytest.raises(ValueError, match="1 DP group"):
        Publisher(msgspec.convert({**base, "dp_rank": 1}, PublisherSettings), LOG)
    worker = Worker(msgspec.convert({**base, "node_rank": 1, "coordinator": "127.0.0.1:1"}, WorkerSettings), LOG)
    assert worker.members == [0, 1]


def test_a_text_too_long_for_any_tokenizer_is_refused_before_tokenizing():
    """A 4 MiB text used to be tokenized (~125 ms of ingest's serial handler) before its
    length was looked at; no tokenizer fits more than 8 characters in a token, so a text
    above max_seq_len x 8 characters is refused at once."""
    ingest = Ingest(msgspec.convert({"dp_size": 1, "nnodes": 1, "max_seq_len": 512}, IngestSettings), LOG)

    def never(text: str) -> list[int]:
        raise AssertionError("tokenized")

    ingest.tokenizer.encode = never
    body = msgspec.json.encode({"text": "x" * (512 * 8 + 1)})
    with pytest.raises(Rejected) as refused:
        asyncio.run(ingest.admit(body, "_INBOX.client.x", "_INBOX.client"))
    assert refused.value.code.value == "prompt_too_long" and "4096 characters" in refused.value.message
