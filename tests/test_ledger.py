"""The request ledger (services/ledger.py): its decisions without I/O, and ingest and
publishers using it on a real nats-server (JetStream), the other roles played by the test."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import nats.errors
import pytest

from dpbus.schemas import AbortAck, Done, Error, Subjects
from dpbus.schemas.internal import GroupAbort, Heartbeat, LoadReport, Step, Submit, SubmitAck, pack
from dpbus.services import bus, logs, ownership
from dpbus.services.ingest.service import Ingest
from dpbus.services.ledger import (
    ANSWERED, HELD, KEEP_ANSWERED, MARGIN, MOVED, Entry, Lease, LeaseClock, Ledger, SweepView, encode, lease_key,
    ledger_full, name_key, request_key, stream_sequence,
)
from dpbus.services.publisher.service import Publisher
from dpbus.services.settings import IngestSettings, PublisherSettings
from tests.test_one_terminal import answer, answers_on, submit

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

LOG = logs.configure("warning", json=True)
PREFIX = "ledger"
SUBJ = Subjects(PREFIX)


async def test_a_sweep_whose_view_missed_a_change_looks_again_and_answers(nats_server):
    """The view follows the bucket, but a change can slip past it (seen in the chaos test
    after a NATS restart: a request whose holder died kept a revision the view did not
    have). The compare-and-set then lost at every sweep and nobody answered the request;
    and a delete on a stale revision raised (nats-py does not name that error for a
    delete), ending every sweep there. Now the sweep reads such a key again and answers
    it at the next sweep."""
    from dpbus.services import ownership

    nc = await nats_server.connect("admin")
    try:
        ledger = await Ledger.open(nc, "stale-view")
        view = SweepView(fallback_ttl=1.0)
        held = Entry(HELD, 7, 0, "a", "c", "_INBOX.c.1")
        first = await ledger.kv.create("r.0.a", encode(held))
        view.update("r.0.a", first, encode(held), now=0.0)
        await ledger.kv.update("r.0.a", encode(held), last=first)  # the same holder writes again: the view misses it
        done = Entry(ANSWERED, 7, 0, "b", "c")
        seen = await ledger.kv.create("r.0.b", encode(done))
        view.update("r.0.b", seen, encode(done), now=0.0)
        await ledger.kv.update("r.0.b", encode(done), last=seen)  # a settled entry the view has at an old revision
        answered: list[str] = []

        async def answer_lost(entry: Entry) -> None:
            answered.append(entry.rid)

        late = KEEP_ANSWERED + 10.0
        await ownership.sweep(ledger, view, {}, 1, late, answer_lost)  # loses the compare-and-set, looks again
        assert answered == []
        await ownership.sweep(ledger, view, {}, 1, late + 0.5, answer_lost)
        assert answered == ["a"]
        rev, entry = await ledger.get("r.0.a")
        assert entry.state == ANSWERED and entry.owner == 1
    finally:
        await nc.close()


# ---- decisions, no I/O ---------------------------------------------------------------------
def test_a_holder_is_silent_before_anyone_answers_for_it():
    clock = LeaseClock(ttl=4.0)
    assert not clock.valid(0.0)  # no lease before the first acknowledged renewal
    clock.renewed(sent_at=10.0)
    view = SweepView(fallback_ttl=4.0)
    view.update(lease_key(7, 0), 1, encode(Lease(7, 0, 4.0)), now=10.2)  # seen after it was sent
    view.update("r.0.a", 2, encode(Entry(HELD, 7, 0, "a", "c", "_INBOX.c.1")), now=10.3)
    last_send = 10.0 + 4.0 - MARGIN
    assert clock.valid(last_send - 0.01) and not clock.valid(last_send)
    assert view.orphans(10.2 + 4.0 + MARGIN) == []
    assert [k for k, _, _ in view.orphans(10.2 + 4.0 + MARGIN + 0.01)] == ["r.0.a"]
    view.update(lease_key(7, 0), 3, encode(Lease(7, 0, 4.0)), now=13.0)  # renewed in time: not an orphan
    assert view.orphans(15.0) == []


def test_a_held_entry_of_a_holder_never_seen_renewing_expires_from_when_it_was_seen():
    view = SweepView(fallback_ttl=2.0)
    view.update("r.0.a", 5, encode(Entry(HELD, 9, 1, "a", "c", "_INBOX.c.1")), now=100.0)
    assert view.orphans(102.4) == [] and len(view.orphans(102.6)) == 1


def test_settled_entries_are_kept_for_duplicates_then_deleted_and_dead_leases_go():
    view = SweepView(fallback_ttl=2.0)
    view.update("r.0.a", 5, encode(Entry(HELD, 9, 1, "a", "c")), now=0.0)
    view.update("r.0.a", 6, encode(Entry(ANSWERED, 9, 1, "a", "c")), now=1.0)
    view.update(lease_key(9, 1), 7, encode(Lease(9, 1, 2.0)), now=1.0)
    assert view.held == {} and view.stale_settled(1.0 + KEEP_ANSWERED) == []
    assert view.stale_settled(1.0 + KEEP_ANSWERED + 0.1) == [("r.0.a", 6)]
    assert view.dead_leases(3.0) == [] and view.dead_leases(3.6) == [(lease_key(9, 1), 7)]
    view.update("r.0.a", 8, None, now=200.0)
    assert view.settled == {}


def test_a_sweep_goes_by_holder_and_expires_settled_entries_oldest_first():
    view = SweepView(fallback_ttl=2.0)
    for i, owner in enumerate((1, 2, 1, 3)):
        view.update(f"r.0.{i}", i + 1, encode(Entry(HELD, owner, 0, str(i), "c")), now=0.0)
    view.update(lease_key(2, 0), 9, encode(Lease(2, 0, 2.0)), now=5.0)  # only holder 2 still renews
    assert sorted(k for k, _, _ in view.orphans(5.0)) == ["r.0.0", "r.0.2", "r.0.3"]
    view.update("r.0.0", 10, encode(Entry(ANSWERED, 1, 0, "0", "c")), now=6.0)
    view.update("r.0.2", 11, None, now=6.0)
    assert view.holding == {2: {"r.0.1"}, 3: {"r.0.3"}} and [k for k, _, _ in view.orphans(6.0)] == ["r.0.3"]
    view.update("r.0.1", 12, encode(Entry(ANSWERED, 2, 0, "1", "c")), now=7.0)
    assert view.stale_settled(6.0 + KEEP_ANSWERED + 0.5) == [("r.0.0", 10)]  # r.0.1 was settled later
    assert [k for k, _ in view.stale_settled(7.0 + KEEP_ANSWERED + 0.5)] == ["r.0.0", "r.0.1"]


def test_the_revision_of_a_delivery_is_read_from_either_form_of_its_reply_subject():
    assert stream_sequence("$JS.ACK.KV_x.consumer.1.42.7.1700000000000000000.0") == 42
    assert stream_sequence("$JS.ACK.domain.ACCOUNTHASH.KV_x.consumer.1.43.7.1700000000000000000.0.rand") == 43


def test_request_keys_name_client_and_rid_together_and_the_group():
    assert request_key(0, "_INBOX.alice", "x") != request_key(0, "_INBOX.bob", "x")
    assert request_key(0, "_INBOX.alice", "x") == request_key(0, "_INBOX.alice", "x")
    assert request_key(0, "_INBOX.alice", "x").startswith("r.0.") and request_key(1, "_INBOX.alice", "x").startswith("r.1.")
    assert name_key("_INBOX.alice", "x").split(".")[1] == request_key(1, "_INBOX.alice", "x").split(".")[2]


# ---- on the wire ---------------------------------------------------------------------------
def ingest(server, **kw) -> Ingest:
    s = msgspec.convert({**server.settings("ingest"), "prefix": PREFIX, "dp_size": 2, "nnodes": 2,
                         "submit_timeout": 0.3, "reconcile_interval": 0.2, "publisher_timeout": 2.0, **kw},
                        IngestSettings)
    return Ingest(s, LOG)


def publisher(server, g: int, **kw) -> Publisher:
    s = msgspec.convert({**server.settings(f"publisher-{g}"), "prefix": PREFIX, "dp_size": 2, "nnodes": 2,
                         "dp_rank": g, "max_seq_len": 64, "max_prefill_tokens": 16, "heartbeat_timeout": 1.0,
                         "publisher_timeout": 2.0, "load_interval": 0.1, **kw}, PublisherSettings)
    return Publisher(s, LOG)


async def sweeping_ingest(server):
    """An ingest whose sweeps the test calls itself (not running): its admin connection,
    a client's, the ingest and the ledger."""
    nc = await server.connect("admin")
    client = await server.connect("client")
    ing = ingest(server)
    ing.nc, ing.outbox = nc, bus.ClientOutbox(nc, LOG)
    ing.ledger = await Ledger.open(nc, PREFIX)
    return nc, client, ing, ing.ledger


class Running:
    """Services run in this process, stopped (and awaited) at the end."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self, service) -> None:
        self.tasks.append(asyncio.create_task(service.run(self.stop)))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def fake_workers(nc, groups, stop: asyncio.Event, slow: float = 0.0) -> None:
    """Beat for every group and answer its steps (after ``slow`` seconds each)."""
    async def on_step_of(g):
        async def on_step(msg):
            step = msgspec.msgpack.decode(msg.data, type=Step)
            await asyncio.sleep(slow)
            await nc.publish(SUBJ.result(g, g), pack(answer(step, g)))
        return on_step

    for g in groups:
        await nc.subscribe(SUBJ.step(g), cb=await on_step_of(g))

    async def beat():
        while not stop.is_set():
            for g in groups:
                await nc.publish(SUBJ.heartbeat(g, g), pack(Heartbeat(g, g, 0, True, 0, 0, time.time())))
            await asyncio.sleep(0.1)

    asyncio.ensure_future(beat())


async def request(nc, inbox: str, rid: str, tokens: int = 3, **extra) -> None:
    body = {"rid": rid, "input_ids": [1, 2, 3], "sampling": {"max_new_tokens": tokens, "temperature": 0.0}, **extra}
    await nc.publish(bus.request_subjects(nc, SUBJ)[0], json.dumps(body).encode(), reply=inbox)


async def until(cond, within: float) -> None:
    deadline = time.monotonic() + within
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_no_acknowledgement_from_a_publisher_that_holds_the_request_is_not_an_error(nats_server):
    """Ingest answered ``unavailable`` when a submit got no acknowledgement, although the
    publisher held the request and answered it too: two terminal answers."""
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    ledger = await Ledger.open(nc, PREFIX)

    async def holds_without_acknowledging(msg):  # a publisher whose acknowledgements are lost
        sub = msgspec.msgpack.decode(msg.data, type=Submit)
        key = request_key(0, sub.client, sub.rid)
        if await ledger.get(key) is None:
            rev, _ = await ledger.claim(key, Entry(HELD, 77, 0, sub.rid, sub.client, sub.reply, sub.encoding))
            await asyncio.sleep(1.5)
            await ledger.swap(key, Entry(ANSWERED, 77, 0, sub.rid, sub.client), rev)
            await nc.publish(sub.reply, msgspec.json.encode(Done(sub.rid, 0, "length", 3, 0)))

    await nc.subscribe(SUBJ.submit(0), cb=holds_without_acknowledging)
    inbox, answers = await answers_on(nc)
    await until(front.listening.is_set, 5)
    await request(nc, inbox, "unacked")
    await answers.until_terminal(5)
    await asyncio.sleep(1.5)  # past every retry and time-out of ingest
    await run.close()
    await nc.close()
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Done), answers.got


async def test_no_acknowledgement_and_nobody_holds_it_is_answered_once_and_a_late_copy_never_runs(nats_server):
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    late: list[bytes] = []

    async def deaf(msg):  # the submit reaches nobody in time
        late.append(msg.data)

    await nc.subscribe(SUBJ.submit(0), cb=deaf)
    inbox, answers = await answers_on(nc)
    await until(front.listening.is_set, 5)
    await request(nc, inbox, "unheard")
    await answers.until_terminal(5)
    pub = publisher(nats_server, 0)  # the publisher comes up and gets the late copy
    run.start(pub)
    await fake_workers(nc, [0], run.stop)
    await until(pub.ready, 5)
    ack = msgspec.msgpack.decode((await nc.request(SUBJ.submit(0), late[0], timeout=5)).data, type=SubmitAck)
    await asyncio.sleep(0.5)
    await run.close()
    await nc.close()
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Error) and answers.got[-1].code.value == "unavailable"
    assert ack.accepted and ack.duplicate and pub.counts["steps"] == 0


async def test_a_retry_of_a_request_refused_for_want_of_an_acknowledgement_is_answered_too(nats_server):
    """Ingest recorded ``refused`` for a submit nobody acknowledged and answered
    ``unavailable``; the client's retry (same rid: a new attempt) went unacknowledged too,
    and its refusal found the first attempt's entry, took it for someone else's and
    answered nobody: silence for 120 s. Now a refusal takes an earlier attempt's over."""
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    submits: list[Submit] = []

    async def deaf(msg):  # the group never acknowledges
        submits.append(msgspec.msgpack.decode(msg.data, type=Submit))

    await nc.subscribe(SUBJ.submit(0), cb=deaf)
    await until(front.listening.is_set, 5)
    ledger = await Ledger.open(nc, PREFIX)
    got = []
    for _ in range(2):
        inbox, answers = await answers_on(nc)
        await request(nc, inbox, "refused-twice")
        await answers.until_terminal(5)
        answers.check_one_terminal_last()
        got.append(answers.got[-1])
    _, entry = await ledger.get(request_key(0, submits[-1].client, "refused-twice"))
    await run.close()
    await nc.close()
    assert [a.code.value for a in got] == ["unavailable", "unavailable"], got
    assert len({s.attempt for s in submits}) == 2  # two attempts, each refused
    assert entry.state == "refused" and entry.attempt == submits[-1].attempt


async def group_refusing_its_first_offer(nc, code: str, why: str) -> list[str]:
    """Group 0, played here: its first submit refused with ``code``, every later one
    taken and answered ``done`` at once. The rids offered to it, as they come."""
    offers: list[str] = []

    async def on_submit(msg):
        sub = msgspec.msgpack.decode(msg.data, type=Submit)
        offers.append(sub.rid)
        if len(offers) == 1:
            await msg.respond(pack(SubmitAck(False, code, why)))
            return
        await msg.respond(pack(SubmitAck(True, instance=5)))
        await nc.publish(sub.reply, msgspec.json.encode(Done(sub.rid, 0, "length", 3, 0)))

    await nc.subscribe(SUBJ.submit(0), cb=on_submit)
    return offers


async def test_a_retry_after_overloaded_on_the_same_inbox_is_a_new_attempt(nats_server):
    """The same bytes on the same reply subject were dropped for 120 s as a redelivered
    copy: a client retrying after ``overloaded`` heard nothing more."""
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    offers = await group_refusing_its_first_offer(nc, "overloaded", "group 0 has 9 requests waiting")
    inbox, answers = await answers_on(nc)
    await until(front.listening.is_set, 5)
    for _ in range(2):
        await request(nc, inbox, "retry")
        await until(lambda: len(answers.terminals()) == len(offers), 3)
        await asyncio.sleep(0.3)
    await run.close()
    await nc.close()
    assert [type(a).__name__ for a in answers.got] == ["Error", "Done"], answers.got
    assert answers.got[0].code.value == "overloaded"


async def test_a_copy_crossing_a_refusal_is_dropped_and_a_new_send_runs(nats_server):
    """The retry rule's crossing: a copy (``resend`` 1) reaching ingest after the first
    attempt was refused outright ran as a new attempt on the same inbox, so the client got
    the refusal and then a whole run (two terminals). A request sent anew (``resend`` 0)
    after the refusal is still a new attempt."""
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    offers = await group_refusing_its_first_offer(nc, "unavailable", "group 0 is not whole")
    inbox, answers = await answers_on(nc)
    await until(front.listening.is_set, 5)
    await request(nc, inbox, "crossing")
    await until(lambda: len(answers.terminals()) == 1, 3)
    await request(nc, inbox, "crossing", resend=1)  # the copy, arriving after the refusal went out
    await until(lambda: front.errors["duplicate_request"] == 1, 3)
    dropped = (len(offers), len(answers.got))
    await request(nc, inbox, "crossing")  # sent anew after the answer
    await until(lambda: len(answers.terminals()) == 2, 3)
    await run.close()
    await nc.close()
    assert dropped == (1, 1), dropped
    assert [type(a).__name__ for a in answers.got] == ["Error", "Done"], answers.got
    assert answers.got[0].code.value == "unavailable" and offers == ["crossing", "crossing"]


async def test_a_copy_crossing_a_refusal_made_before_any_name_is_dropped(nats_server):
    """A refusal ingest makes before naming the request (here: no group is ready) left
    nothing in the ledger, so a copy that crossed it (answers held after a reconnection
    arrive late) ran once a group was back: the client had the error, then a whole run.
    Ingest remembers what it refused: the copy is dropped; a request sent anew runs."""
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    inbox, answers = await answers_on(nc)
    await until(front.listening.is_set, 5)
    front.router.on_load(LoadReport(0, 1, time.time(), False, 0, 0, 16, 0))  # group 0 says: not ready
    await request(nc, inbox, "early")  # `unavailable` at once, before any name is recorded
    await until(lambda: len(answers.terminals()) == 1, 3)
    offers = await group_refusing_its_first_offer(nc, "unavailable", "unused")
    offers.append("(the first is refused: taken from here on)")
    front.router.on_load(LoadReport(0, 2, time.time(), True, 0, 0, 16, 0))  # ... and ready again
    await request(nc, inbox, "early", resend=1)  # the copy, arriving once group 0 is back
    await until(lambda: front.errors["copy_of_refused"] == 1, 3)
    dropped = (len(offers), len(answers.got))
    await request(nc, inbox, "early")  # sent anew after the answer: runs
    await until(lambda: len(answers.terminals()) == 2, 3)
    await run.close()
    await nc.close()
    assert dropped == (1, 1), dropped
    assert [type(a).__name__ for a in answers.got] == ["Error", "Done"], answers.got
    assert answers.got[0].code.value == "unavailable"


async def test_copies_and_retries_through_other_ingests_and_groups_run_once(nats_server):
    """A copy of a request (or the client's retry with the same rid, from another inbox)
    reaching another ingest instance, even after the answer, even routed to another group:
    run once. Each retry from the other inbox (a new send, after the answer) gets that
    answer again, kept with the ledger entry (it heard nothing before)."""
    run, nc = Running(), await nats_server.connect("admin")
    client = await nats_server.connect("client")
    fronts = [ingest(nats_server), ingest(nats_server)]
    pubs = [publisher(nats_server, 0), publisher(nats_server, 1)]
    for service in (*fronts, *pubs):
        run.start(service)
    await fake_workers(nc, [0, 1], run.stop)
    await until(lambda: all(p.ready() for p in pubs), 5)
    await until(lambda: all(not f.router.unavailable_reason(g) and f.listening.is_set() for f in fronts
                            for g in (0, 1)), 5)
    inbox, answers = await answers_on(client)
    retry_inbox, retried = await answers_on(client)
    for copy in range(6):  # round robin spreads the copies over both groups
        await request(client, inbox if copy < 3 else retry_inbox, "once-only")
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.0)
    await run.close()
    await nc.close()
    await client.close()
    answers.check_one_terminal_last()
    assert retried.got == [answers.got[-1]] * 3, retried.got  # in the retries' own encoding (JSON, as sent)
    assert sum(p.counts["accepted"] for p in pubs) == 1
    assert sum(f.errors["answered_again"] for f in fronts) == 3
    # the copies stop at ingest: their name is in the ledger (whichever ingest recorded it)
    assert sum(f.errors["duplicate_request"] for f in fronts) == 5, ([f.errors for f in fronts], [p.counts for p in pubs])


async def test_another_client_retrying_a_rid_never_gets_the_answer_kept_for_it(nats_server):
    """The kept answer goes only to a retry from the client that sent the request (the
    name is (client, rid), the client vouched for by its inbox): another user sending the
    same rid runs a request of its own, and the first client's inbox hears nothing more."""
    run, nc = Running(), await nats_server.connect("admin")
    owner, other = await nats_server.connect("client"), await nats_server.connect("gateway")
    front, pubs = ingest(nats_server), [publisher(nats_server, 0), publisher(nats_server, 1)]
    for service in (front, *pubs):
        run.start(service)
    await fake_workers(nc, [0, 1], run.stop)
    await until(lambda: all(p.ready() for p in pubs) and front.listening.is_set()
                and not any(front.router.unavailable_reason(g) for g in (0, 1)), 5)
    inbox, answers = await answers_on(owner)
    other_inbox, theirs = await answers_on(other)
    await request(owner, inbox, "mine")
    await until(lambda: len(answers.terminals()) == 1, 5)
    await request(other, other_inbox, "mine")  # the same rid, from another user's inbox
    await until(lambda: len(theirs.terminals()) == 1, 5)
    await asyncio.sleep(0.5)  # anything more for the owner would come by now
    await run.close()
    for conn in (nc, owner, other):
        await conn.close()
    answers.check_one_terminal_last()
    theirs.check_one_terminal_last()
    assert sum(p.counts["accepted"] for p in pubs) == 2, [p.counts for p in pubs]
    assert front.errors["answered_again"] == 0 and front.errors["duplicate_request"] == 0, front.errors


async def test_a_moved_request_whose_second_publisher_goes_silent_is_answered_once(nats_server):
    """A request moved to another group lost ingest's tracking: when the second
    publisher died, nobody answered. Now its holder is in the ledger; when that holder's
    lease lapses it stops answering, and an ingest (not the one that handed it over: it
    is gone too) answers ``publisher_lost``."""
    run, nc = Running(), await nats_server.connect("admin")
    client = await nats_server.connect("client")
    second = publisher(nats_server, 1)
    run.start(second)
    await fake_workers(nc, [1], run.stop, slow=0.3)  # 40 tokens take ~12 s
    await until(second.ready, 5)
    ledger = await Ledger.open(nc, PREFIX)
    inbox, answers = await answers_on(client)
    sub = submit("moved", inbox, g=1, tokens=40)
    key = request_key(0, sub.client, sub.rid)
    # group 0 held it and moved it to group 1
    await ledger.claim(key, Entry(MOVED, 12345, 0, sub.rid, sub.client, sub.reply, sub.encoding, to=1))
    sub.moved_from, sub.moved_group = 12345, 0
    ack = msgspec.msgpack.decode((await nc.request(SUBJ.submit(1), pack(sub), timeout=5)).data, type=SubmitAck)
    await until(lambda: len(answers.got) >= 2, 5)

    async def cannot_renew(*_):
        raise ConnectionError("the publisher is gone (test)")

    second.ledger.renew = cannot_renew  # from the ledger's side, exactly a dead publisher
    silent_from = time.monotonic()
    run.start(ingest(nats_server))  # a survivor that never handled this request
    await answers.until_terminal(10)
    answered_after = time.monotonic() - silent_from
    await asyncio.sleep(1.0)
    await run.close()
    await nc.close()
    await client.close()
    assert ack.accepted and not ack.duplicate
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Error) and answers.got[-1].code.value == "publisher_lost", answers.got[-1]
    assert answered_after < 2.0 + 2 * MARGIN + 1.0
    assert second.counts["abandoned"] == 1


async def test_a_group_runs_a_moved_request_only_when_the_movers_entry_says_so(nats_server):
    """A publisher of group 0 cannot make group 1 run a request group 0 still holds (or
    one it never held) by naming itself as the mover: group 1 claims its own entry only
    while group 0's says ``moved`` to group 1 by that instance. Refused outright, so the
    mover keeps it."""
    run, nc = Running(), await nats_server.connect("admin")
    target = publisher(nats_server, 1)
    run.start(target)
    await fake_workers(nc, [1], run.stop)
    await until(target.ready, 5)
    ledger = await Ledger.open(nc, PREFIX)
    inbox, answers = await answers_on(nc)
    sub = submit("forged-move", inbox, g=1, tokens=2)
    source = request_key(0, sub.client, sub.rid)
    held = Entry(HELD, 777, 0, sub.rid, sub.client, sub.reply, sub.encoding, sub.attempt)
    rev, _ = await ledger.claim(source, held)
    sub.moved_from, sub.moved_group = 777, 0

    async def offer() -> SubmitAck:
        return msgspec.msgpack.decode((await nc.request(SUBJ.submit(1), pack(sub), timeout=5)).data, type=SubmitAck)

    still_held = await offer()
    other_mover = Entry(MOVED, 778, 0, sub.rid, sub.client, sub.reply, sub.encoding, sub.attempt, to=1)
    rev = await ledger.swap(source, other_mover, rev)
    by_another_instance = await offer()
    await ledger.swap(source, ownership.moved_to(held, 1), rev)
    moved_here = await offer()
    await answers.until_terminal(5)
    await run.close()
    await nc.close()
    assert not still_held.accepted and not by_another_instance.accepted
    assert moved_here.accepted and not moved_here.duplicate
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Done) and answers.got[-1].dp_rank == 1


async def test_a_move_its_target_never_took_is_revoked_and_answered_once(nats_server):
    """A group moved a request (its entry says ``moved`` to group 1) and heard nothing back.
    Past ``move_grace`` ingest closes group 1's entry (group 1 can no longer claim it),
    wins the mover's entry and answers ``unavailable`` once; a move whose target took it is
    left to its holder."""
    nc, client, ing, ledger = await sweeping_ingest(nats_server)
    inbox, answers = await answers_on(client)
    entries = {}
    for rid in ("never-taken", "taken"):
        moved = Entry(MOVED, 4343, 0, rid, "_INBOX.client", inbox, to=1)
        key = request_key(0, "_INBOX.client", rid)
        rev, _ = await ledger.claim(key, moved)
        ing.view.update(key, rev, encode(moved), now=0.0)
        entries[rid] = (key, moved)
    taker = Entry(HELD, 5454, 1, "taken", "_INBOX.client", inbox)
    taken_key = request_key(1, "_INBOX.client", "taken")
    rev, _ = await ledger.claim(taken_key, taker)
    assert [k for k, _, _ in ing.view.stale_moves(ing.view.move_grace + 1)] == [entries[rid][0] for rid in entries]
    await ing.sweep(now=ing.view.move_grace + 1)  # the view has not seen the claim: the sweep finds it
    await answers.until_terminal(5)
    late_claim = await ownership.claim(ledger, request_key(1, "_INBOX.client", "never-taken"),
                                       Entry(HELD, 6565, 1, "never-taken", "_INBOX.client", inbox), "",
                                       (entries["never-taken"][0], 4343))
    await ing.sweep(now=ing.view.move_grace + 2)
    await asyncio.sleep(0.5)
    _, closed = await ledger.get(request_key(1, "_INBOX.client", "never-taken"))
    _, still = await ledger.get(taken_key)
    await nc.close()
    await client.close()
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Error) and answers.got[-1].code.value == "unavailable"
    assert answers.got[-1].rid == "never-taken" and ing.orphaned == 1
    assert late_claim is None and closed.state == ANSWERED and closed.owner == ing.instance
    assert still == taker and ing.view.stale_moves(100.0) == []


async def test_a_move_acknowledged_late_runs_in_one_group_only(nats_server):
    """Group 0, not whole, offered a queued request to group 1, whose submit endpoint was
    stalled past the mover's 2 s wait. Group 0 used to put the request back in its queue
    without a word to the ledger, and once group 1 claimed it late and group 0 was whole
    again, both ran it: two streams, two terminals. Now group 0's entry says ``moved`` to
    group 1 before the offer, so group 0 drops a move it heard nothing back from; group 1's
    late claim wins and the client gets one stream and one terminal."""
    run, nc = Running(), await nats_server.connect("admin")
    mover, target = publisher(nats_server, 0), publisher(nats_server, 1)
    take = target.on_submit

    async def stalled(req):  # the target's submit endpoint is backed up
        await asyncio.sleep(3.0)
        await take(req)

    target.on_submit = stalled
    run.start(mover)
    run.start(target)
    await fake_workers(nc, [1], run.stop)
    await until(lambda: target.ready() and mover.lease.valid(time.monotonic()), 5)
    ledger = await Ledger.open(nc, PREFIX)
    inbox, answers = await answers_on(nc)
    sub = submit("late-ack", inbox, g=0, tokens=3)
    seq = mover.new_sequence(sub)  # held by group 0, queued while it is not whole
    rev, _ = await ledger.claim(request_key(0, sub.client, sub.rid), ownership.held_by(mover.instance, 0, sub))
    seq.delivery.ledger_rev, seq.delivery.owner = rev, mover.instance
    mover.sched.waiting.append(seq)
    await until(lambda: mover.counts["moves_unanswered"] == 1, 10)
    stepped: list[int] = []

    async def on_step(msg):  # group 0 is whole again: a worker runs whatever it is given
        step = msgspec.msgpack.decode(msg.data, type=Step)
        stepped.extend(len(item.token_ids) for item in step.prefill)
        await nc.publish(SUBJ.result(0, 0), pack(answer(step, 0)))

    async def beat():
        while not run.stop.is_set():
            await nc.publish(SUBJ.heartbeat(0, 0), pack(Heartbeat(0, 0, 0, True, 0, 0, time.time())))
            await asyncio.sleep(0.1)

    await nc.subscribe(SUBJ.step(0), cb=on_step)
    beating = asyncio.create_task(beat())
    await answers.until_terminal(10)
    await asyncio.sleep(1.5)  # a second stream or terminal would have come by now
    whole = mover.ready()
    _, source = await ledger.get(request_key(0, sub.client, sub.rid))
    _, taken = await ledger.get(request_key(1, sub.client, sub.rid))
    await run.close()
    beating.cancel()
    await nc.close()
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Done) and answers.got[-1].dp_rank == 1, answers.got
    assert whole and stepped == [], "group 0 ran the request it had moved"
    assert source.state == MOVED and source.to == 1 and taken.state == ANSWERED and taken.owner == target.instance


async def test_a_lagging_watch_does_not_answer_for_a_holder_that_renews(nats_server):
    """While a NATS cluster elects the bucket's new leader, ingest's watch may stall while
    a publisher's renewals are acknowledged: ingest answered ``publisher_lost`` for a
    publisher that went on streaming (chunks after the terminal, seen in
    tests/test_nats_cluster.py). Now it reads the lease itself before answering."""
    nc = await nats_server.connect("admin")
    ing = ingest(nats_server)
    ing.nc, ing.outbox = nc, bus.ClientOutbox(nc, LOG)
    ing.ledger = ledger = await Ledger.open(nc, PREFIX)
    lease = Lease(4242, 0, 2.0)
    old = await ledger.kv.put(lease_key(4242, 0), encode(lease))
    key = request_key(0, "_INBOX.client", "lagging")
    held = Entry(HELD, 4242, 0, "lagging", "_INBOX.client", "_INBOX.client.lagging")
    rev, _ = await ledger.claim(key, held)
    ing.view.update(lease_key(4242, 0), old, encode(lease), now=0.0)  # the last renewal the watch showed
    ing.view.update(key, rev, encode(held), now=0.0)
    await ledger.renew(lease)  # acknowledged, but the watch has not shown it
    await ing.sweep(now=100.0)
    _, entry = await ledger.get(key)
    await ledger.kv.delete(key)
    await nc.close()
    assert entry.state == HELD and ing.orphaned == 0


class AnswersLost:
    """A bucket whose chosen writes land and then time out, as a JetStream request does
    when its answer is lost (e.g. while a NATS cluster elects a new leader)."""

    def __init__(self, kv, method: str, times: int = 1) -> None:
        self.kv, self.method, self.left = kv, method, times

    def __getattr__(self, name):
        return getattr(self.kv, name)

    async def create(self, key, value):
        return self.lose("create", await self.kv.create(key, value))

    async def update(self, key, value, last):
        return self.lose("update", await self.kv.update(key, value, last=last))

    def lose(self, method: str, revision: int) -> int:
        if method == self.method and self.left:
            self.left -= 1
            raise nats.errors.TimeoutError
        return revision


class WritesLost(AnswersLost):
    """A bucket whose chosen writes time out *without* landing (the request never reached
    JetStream), ``times`` times."""

    async def update(self, key, value, last):
        if self.method == "update" and self.left:
            self.left -= 1
            raise nats.errors.TimeoutError
        return await self.kv.update(key, value, last=last)


async def one_request_whose_publisher_loses(nats_server, method: str, rid: str, bucket=AnswersLost
                                            ) -> tuple[Publisher, list]:
    """One group of one fake worker behind a real ingest and publisher, whose ledger loses
    the answer of its first ``method`` call; one request through it. The publisher and
    the answers the client got."""
    run, nc = Running(), await nats_server.connect("admin")
    client = await nats_server.connect("client")
    pub, front = publisher(nats_server, 0, dp_size=1, nnodes=1), ingest(nats_server, dp_size=1, nnodes=1)
    run.start(pub)
    run.start(front)
    await fake_workers(nc, [0], run.stop)
    await until(lambda: pub.ready() and front.listening.is_set() and front.router.groups[0].report is not None
                and front.router.available(0), 5)
    pub.ledger.kv = bucket(pub.ledger.kv, method)
    inbox, answers = await answers_on(client)
    await request(client, inbox, rid)
    await answers.until_terminal(10)
    await asyncio.sleep(2.0 + 0.2 + MARGIN + 0.5)  # past publisher_timeout + reconcile_interval: a late answer too
    await run.close()
    await nc.close()
    await client.close()
    answers.check_one_terminal_last()
    return pub, answers.got


async def test_a_claim_that_landed_unanswered_is_run_once(nats_server):
    """A publisher's claim landed but its answer was lost: the publisher refused the
    submit, ingest tried elsewhere, and the entry stayed held by a live publisher that did
    not hold the request: nobody answered. Now it does not answer the submit until it
    knows; the claim proves its own, and the request runs once."""
    pub, got = await one_request_whose_publisher_loses(nats_server, "create", "claim-unanswered")
    assert isinstance(got[-1], Done), got
    assert pub.counts["accepted"] == 1 and pub.ledger.kv.left == 0


async def test_a_settling_write_that_landed_unanswered_is_answered_once(nats_server):
    """The publisher's compare-and-set to answered landed and its answer was lost, then
    every retry found the entry answered... by itself. It answers (the write is read back
    as its own); nobody else could."""
    pub, got = await one_request_whose_publisher_loses(nats_server, "update", "settle-unanswered")
    assert isinstance(got[-1], Done), got
    assert pub.counts["done"] == 1 and pub.counts["taken"] == 0 and pub.ledger.kv.left == 0


async def test_a_settling_write_in_doubt_that_did_not_land_is_made_again(nats_server, monkeypatch):
    """Every try of the publisher's settling write timed out, and none had landed: the
    entry was still held by the publisher, which gave the request up without a word while
    renewing its lease, so ingest never answered for it either (a chaos run lost a request
    this way, after a NATS restart). Now it settles again and answers."""
    from functools import partial

    from dpbus.services import ownership

    monkeypatch.setattr(ownership.settle, "__defaults__", (3,))  # three tries before the write is in doubt
    pub, got = await one_request_whose_publisher_loses(nats_server, "update", "settle-not-landed",
                                                       bucket=partial(WritesLost, times=3))
    assert isinstance(got[-1], Done), got
    assert pub.counts["done"] == 1 and pub.ledger.kv.left == 0


async def test_a_sweep_whose_write_landed_unanswered_answers_once(nats_server):
    """Ingest's compare-and-set to answered (for a holder whose lease lapsed) landed with
    its answer lost; the sweep failed, and the next one saw the entry settled and moved
    on: nobody answered. Now the next sweep reads its own write back first and answers."""
    nc, client, ing, ledger = await sweeping_ingest(nats_server)
    inbox, answers = await answers_on(client)
    key = request_key(0, "_INBOX.client", "swept")
    held = Entry(HELD, 5151, 0, "swept", "_INBOX.client", inbox)
    rev, _ = await ledger.claim(key, held)
    ing.view.update(key, rev, encode(held), now=0.0)  # a holder never seen renewing
    ledger.kv = AnswersLost(ledger.kv, "update")
    try:
        await ing.sweep(now=100.0)
    except nats.errors.TimeoutError:
        pass  # as sweep_loop does: the next sweep carries on
    await ing.sweep(now=100.5)
    await answers.until_terminal(5)
    await asyncio.sleep(0.5)
    _, entry = await ledger.get(key)
    await ledger.kv.kv.delete(key)
    await nc.close()
    await client.close()
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Error) and answers.got[-1].code.value == "publisher_lost"
    assert entry.state == ANSWERED and entry.owner == ing.instance and ing.orphaned == 1


async def test_a_value_that_is_no_entry_is_taken_over_and_its_request_answered_once(nats_server):
    """Whatever lands at a request's key that dpbus did not write (a poisoned key) is a
    state of its own, ``corrupt``: the claim takes it over by compare-and-set and the
    request runs and is answered once (it used to be a claim retried for ever: silence).
    Ingest's view reads it without an error."""
    run, nc = Running(), await nats_server.connect("admin")
    front, pub = ingest(nats_server, dp_size=1), publisher(nats_server, 0)
    run.start(front)
    run.start(pub)
    await fake_workers(nc, [0], run.stop)
    await until(lambda: pub.ready() and not front.router.unavailable_reason(0), 10)
    await until(front.listening.is_set, 10)  # ingest hears load reports before its endpoints are up
    kv = await nc.jetstream().key_value(f"{PREFIX}_requests")
    inbox, answers = await answers_on(nc)
    client = inbox.rsplit(".", 1)[0]  # _INBOX.admin
    for rid, poison, key in (("poisoned-1", b'{"type":"error","code":"bad_request"}', request_key(0, client, "poisoned-1")),
                             ("poisoned-2", b"\x81\xa5state\xa3bad", request_key(0, client, "poisoned-2")),
                             ("poisoned-3", b"\x81\xa5state\xa3bad", name_key(client, "poisoned-3"))):
        await kv.put(key, poison)
        await request(nc, inbox, rid)
        await answers.until_terminal(10)
        answers.check_one_terminal_last()
        assert isinstance(answers.got[-1], Done) and answers.got[-1].rid == rid, answers.got
        answers.got.clear()
    await asyncio.sleep(2.0 + 1.5)  # past the publisher timeout: a second terminal would have come
    await run.close()
    await nc.close()
    assert not answers.got and pub.counts["accepted"] == 3
    assert front.errors["unreadable_ledger_entry"] == 0


async def test_a_full_ledger_refuses_with_overloaded_and_claims_nothing(nats_server):
    """A bucket at its size limit refuses a claim: the client hears ``overloaded`` (not
    ``unavailable``, not silence)."""
    from dpbus.services.ledger import Ledger as RealLedger

    nc = await nats_server.connect("admin")
    try:
        js = nc.jetstream()
        full = await js.create_key_value(bucket=f"{PREFIX}_full", max_bytes=1024, history=1)
        for i in range(100):
            try:
                await full.create(f"r.filler{i}", b"x" * 64)
            except Exception:  # noqa: BLE001 - full
                break
        ledger = RealLedger(full, js, f"{PREFIX}_full")
        with pytest.raises(Exception) as refused:
            await ledger.claim("r.one-more", Entry(HELD, 1, 0, "r", "c", "_INBOX.c.1"))
        assert ledger_full(refused.value) and ownership.certainly_not_applied(refused.value)
        # ingest recording a refusal into a full bucket answers the client at once
        assert await ownership.refuse(ledger, "r.refused", Entry("refused", rid="q"), asyncio.sleep) is True
    finally:
        await nc.close()


class Unreachable:
    """A bucket that does not answer (every call times out, nothing lands) while ``down``."""

    def __init__(self, kv) -> None:
        self.kv, self.down = kv, True

    def __getattr__(self, name):
        attr = getattr(self.kv, name)
        if not callable(attr):
            return attr

        async def call(*args, **kw):
            if self.down:
                raise nats.errors.TimeoutError
            return await attr(*args, **kw)
        return call


@pytest.mark.parametrize("group_says", ["not held", "held", "nothing"])
async def test_a_refusal_the_ledger_never_records_ends_with_an_answer(nats_server, monkeypatch, group_says):
    """No acknowledgement came and the ledger did not answer either: ingest retried the
    refusal for ever, holding one of its ``max_inflight`` slots, and the client heard
    nothing. Now, after a bounded number of tries, it asks the group: a group that does
    not hold the request (or no group at all, after ``REFUSE_ROUNDS`` rounds) gets the
    client ``unavailable``; a group that holds it ends it with its own terminal answer,
    so ingest says nothing."""
    from dpbus.services.ingest import service as ingest_service

    monkeypatch.setattr(ownership.refuse, "__defaults__", (3,))  # three tries a round
    run, nc = Running(), await nats_server.connect("admin")
    front = ingest(nats_server, dp_size=1)
    run.start(front)
    asks: list[GroupAbort] = []

    async def deaf(msg):  # the submit reaches a group that never acknowledges it; the ledger goes meanwhile
        if not isinstance(front.ledger.kv, Unreachable):  # (after ingest recorded the request's name)
            front.ledger.kv = Unreachable(front.ledger.kv)

    async def on_group_abort(msg):
        asks.append(msgspec.msgpack.decode(msg.data, type=GroupAbort))
        if group_says != "nothing":
            found = group_says == "held"
            await msg.respond(pack(AbortAck(rid=asks[-1].rid, found=found, dp_rank=0 if found else None)))

    await nc.subscribe(SUBJ.submit(0), cb=deaf)
    await nc.subscribe(SUBJ.group_abort(0), cb=on_group_abort)
    await until(front.listening.is_set, 5)
    inbox, answers = await answers_on(nc)
    rid = f"unrecorded-{group_says.replace(' ', '-')}"
    await request(nc, inbox, rid)
    await until(lambda: asks and not front.handing, 20)
    await asyncio.sleep(1.0)  # a second answer would come by now
    await run.close()
    await nc.close()
    assert not front.handing  # the slot is free again
    rounds = ingest_service.REFUSE_ROUNDS if group_says == "nothing" else 1
    assert [a.rid for a in asks] == [rid] * rounds and asks[0].reply == inbox
    assert front.errors["refusal_unrecorded"] == rounds
    if group_says == "held":
        assert answers.got == []  # its holder answers
    else:
        answers.check_one_terminal_last()
        assert isinstance(answers.got[-1], Error) and answers.got[-1].code.value == "unavailable"


async def test_an_abort_of_a_request_whose_claim_is_in_doubt_ends_it_once_the_claim_proves_ours(nats_server):
    """A submit whose claim did not answer is not acknowledged until the claim is known;
    an abort meanwhile (ingest giving up on recording a refusal) used to find nothing, and
    the request then ran when the ledger came back although ingest had answered. Now the
    abort finds it: once the claim proves ours, the request ends at once with one terminal
    answer and runs no step."""
    run, nc = Running(), await nats_server.connect("admin")
    pub = publisher(nats_server, 0, dp_size=1, nnodes=1)
    run.start(pub)
    await fake_workers(nc, [0], run.stop)
    await until(pub.ready, 10)
    pub.ledger.kv = bucket = Unreachable(pub.ledger.kv)
    inbox, answers = await answers_on(nc)
    sub = submit("in-doubt", inbox)
    with pytest.raises(nats.errors.TimeoutError):  # no acknowledgement while the claim is in doubt
        await nc.request(SUBJ.submit(0), pack(sub), timeout=0.5)
    assert sub.key in pub.doubtful
    got = await nc.request(SUBJ.group_abort(0), pack(GroupAbort(sub.rid, inbox)), timeout=5)
    assert msgspec.msgpack.decode(got.data, type=AbortAck).found
    bucket.down = False  # the ledger is back: the claim lands and proves ours
    await answers.until_terminal(10)
    await asyncio.sleep(1.0)
    await run.close()
    await nc.close()
    answers.check_one_terminal_last()
    assert isinstance(answers.got[-1], Done) and answers.got[-1].finish_reason == "abort", answers.got
    assert pub.counts["steps"] == 0 and not pub.doubtful
