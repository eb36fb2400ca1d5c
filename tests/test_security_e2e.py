"""Client applications side by side on the secured server, through the real services:
neither receives a single message of the other's (private inboxes), both may use the same
``rid``, and neither can abort the other's request. And the attacks of a hostile client:
reply subjects that point into the request ledger or another client's inbox, requests
published under another client's name (see services/identity.py)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import nats.js.errors
import pytest

from dpbus.schemas import AbortAck, Chunk, Done, Error
from dpbus.services.client import decode_answer
from dpbus.services.ledger import decode_entry, name_key, read_name, request_key
from dpbus.services.settings import PublisherSettings
from tests.conftest import client_of

pytestmark = pytest.mark.e2e


class Listener:
    """Everything that arrives on one client's whole inbox prefix."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.got: list[tuple[str, bytes]] = []
        self.errors: list[str] = []

    async def start(self) -> None:
        await self.nc.subscribe(self.nc._inbox_prefix.decode() + ".>",  # noqa: SLF001 - its own prefix
                                cb=self.on_msg)

    async def on_msg(self, msg) -> None:
        self.got.append((msg.subject, msg.data))


async def until(predicate, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_two_clients_side_by_side_see_only_their_own_answers_and_cannot_abort_each_other(cluster):
    errors: dict[str, list[str]] = {"alice": [], "bob": []}

    def collect(name):
        async def on_error(e: Exception) -> None:
            errors[name].append(str(e))
        return on_error

    alice = await client_of(cluster, "alice", error_cb=collect("alice"))
    bob = await client_of(cluster, "bob", error_cb=collect("bob"))
    try:
        a_all, b_all = Listener(alice), Listener(bob)
        await a_all.start()
        await b_all.start()
        # each may try to read the other's inbox: the server refuses
        await alice.subscribe("_INBOX.bob.>")
        await bob.subscribe("_INBOX.>")
        await alice.flush()
        await bob.flush()
        assert await until(lambda: any("permissions violation" in e.lower() for e in errors["alice"]), 5), errors
        assert await until(lambda: any("permissions violation" in e.lower() for e in errors["bob"]), 5), errors

        # the same rid from both, at once; alice's is long so that bob can try to abort it
        a_inbox, b_inbox = alice.new_inbox(), bob.new_inbox()
        long_req = {"rid": "1", "text": "alice asks", "sampling": {"max_new_tokens": 300, "ignore_eos": True}}
        short_req = {"rid": "1", "text": "bob asks", "sampling": {"max_new_tokens": 5, "ignore_eos": True}}
        await alice.publish("dpbus.generate.alice", json.dumps(long_req).encode(), reply=a_inbox)
        await bob.publish("dpbus.generate.bob", json.dumps(short_req).encode(), reply=b_inbox)

        def answers(listener: Listener, inbox: str) -> list:
            return [decode_answer(d) for s, d in listener.got if s == inbox]

        assert await until(lambda: any(isinstance(a, Done) for a in answers(b_all, b_inbox)), 60)
        assert await until(lambda: any(isinstance(a, Chunk) for a in answers(a_all, a_inbox)), 60)

        # bob aborts "1" naming his own reply subject: that is his own request, already done
        ack = msgspec.json.decode((await bob.request("dpbus.abort.bob", json.dumps(
            {"rid": "1", "reply": b_inbox}).encode(), timeout=10)).data, type=AbortAck)
        assert ack.found is False
        # bob guesses at alice's reply subject: no proof, no abort
        for guess in ("_INBOX.alice", "_INBOX.alice.x", a_inbox[:-1] + "Z"):
            ack = msgspec.json.decode((await bob.request("dpbus.abort.bob", json.dumps(
                {"rid": "1", "reply": guess}).encode(), timeout=10)).data, type=AbortAck)
            assert ack.found is False, guess
        assert not any(isinstance(a, (Done, Error)) for a in answers(a_all, a_inbox)), "alice's request was cut"
        # alice, who knows her reply subject, may abort it
        ack = msgspec.json.decode((await alice.request("dpbus.abort.alice", json.dumps(
            {"rid": "1", "reply": a_inbox}).encode(), timeout=10)).data, type=AbortAck)
        assert ack.found is True
        assert await until(lambda: any(isinstance(a, Done) for a in answers(a_all, a_inbox)), 30)
        done = [a for a in answers(a_all, a_inbox) if isinstance(a, Done)]
        assert len(done) == 1 and done[0].finish_reason.value == "abort" and done[0].rid == "1"
        await asyncio.sleep(1.0)  # anything stray would have arrived by now

        # not a single message of the other's: every subject is under one's own prefix and
        # every answer on a request inbox is about one's own request
        assert all(s.startswith("_INBOX.alice.") for s, _ in a_all.got), [s for s, _ in a_all.got]
        assert all(s.startswith("_INBOX.bob.") for s, _ in b_all.got), [s for s, _ in b_all.got]
        b_answers = answers(b_all, b_inbox)
        assert [type(a) for a in b_answers] == [Chunk] * 5 + [Done]
        assert b_answers[-1].completion_tokens == 5 and b_answers[-1].finish_reason.value == "length"
        a_chunks = [a for a in answers(a_all, a_inbox) if isinstance(a, Chunk)]
        assert [c.index for c in a_chunks] == list(range(len(a_chunks)))
    finally:
        await alice.close()
        await bob.close()


# ---- a hostile client ------------------------------------------------------------------------

async def ingest_errors(cluster) -> dict:
    operator = await client_of(cluster, "operator")
    try:
        msg = await operator.request("$SRV.STATS.dpbus-ingest", b"", timeout=5)
    finally:
        await operator.close()
    return next(e for e in json.loads(msg.data)["endpoints"] if e["name"] == "generate")["data"]["errors"]


async def ledger_value(cluster, key: str) -> bytes | None:
    admin = await client_of(cluster, "admin")
    try:
        kv = await admin.jetstream().key_value("dpbus_requests")
        try:
            return (await kv.get(key)).value
        except nats.js.errors.KeyNotFoundError:
            return None
    finally:
        await admin.close()


async def test_a_reply_subject_outside_the_sender_s_inbox_gets_no_answer_anywhere(cluster):
    """The reply subject a client names is never trusted: not the request ledger, not
    another client's inbox, not a group's step subject. Nothing is written there; the
    request is counted; the sender may still use its own inbox at once."""
    alice = await client_of(cluster, "alice")
    bob = await client_of(cluster, "bob")
    admin = await client_of(cluster, "admin")
    try:
        b_all = Listener(bob)
        await b_all.start()
        seen: list[tuple[str, bytes]] = []

        async def watch(msg) -> None:
            seen.append((msg.subject, msg.data))

        for root in ("$KV.>", "dpbus.dp.>", "_INBOX.bob.>"):
            await admin.subscribe(root, cb=watch)
        await admin.flush()
        before = (await ingest_errors(cluster)).get("foreign_reply", 0)
        # the poisoned keys of alice's own next rid (request_key and name_key are public code)
        poisoned = [request_key(g, "_INBOX.alice", "mine-1") for g in (0, 1)]
        name = name_key("_INBOX.alice", "mine-1")
        foreign = [*(f"$KV.dpbus_requests.{key}" for key in (*poisoned, name)), "$KV.dpbus_requests.r.x",
                   "_INBOX.bob.stolen", "dpbus.dp.0.step", "_INBOX.alice", "_INBOX.alice.*", "_INBOX.alice.>"]
        for reply in foreign:
            for body in (b"{}", b"not json", json.dumps({"rid": "mine-1", "text": "hi"}).encode()):
                await alice.publish("dpbus.generate.alice", body, reply=reply)
            await alice.publish("dpbus.abort.alice", json.dumps({"rid": "mine-1", "reply": reply}).encode(),
                                reply=reply)
        await alice.flush()
        want = before + 4 * len(foreign)
        deadline = asyncio.get_running_loop().time() + 20
        while (await ingest_errors(cluster)).get("foreign_reply", 0) < want:
            assert asyncio.get_running_loop().time() < deadline, await ingest_errors(cluster)
            await asyncio.sleep(0.1)
        # the same rid, sent for real: answered once, as if nothing had happened
        inbox = alice.new_inbox()
        sub = await alice.subscribe(inbox)
        await alice.publish("dpbus.generate.alice", json.dumps(
            {"rid": "mine-1", "text": "for real", "sampling": {"max_new_tokens": 3, "ignore_eos": True}}).encode(),
            reply=inbox)
        answers = []
        while not answers or not isinstance(answers[-1], (Done, Error)):
            answers.append(decode_answer((await sub.next_msg(timeout=60)).data))
        assert isinstance(answers[-1], Done) and answers[-1].completion_tokens == 3, answers
        # past the publisher timeout (5 s): a second terminal (publisher_lost) would have come by now
        await asyncio.sleep(PublisherSettings().publisher_timeout + 1.5)
        assert sub.pending_msgs == 0
        # nothing but the services' own ledger entries went to the ledger, nothing to bob
        assert not [s for s, _ in seen if s == "$KV.dpbus_requests.r.x"]
        for subject, data in seen:
            if subject.startswith("$KV.dpbus_requests.r.") and data:
                decode_entry(data)  # a ledger entry the services wrote, never an answer
        entries = [await ledger_value(cluster, key) for key in poisoned]
        assert [decode_entry(value).rid for value in entries if value is not None] == ["mine-1"]
        assert read_name(await ledger_value(cluster, name)) is not None
        assert not [s for s, _ in seen if s.startswith("_INBOX.bob.")]
        assert not b_all.got, b_all.got
    finally:
        for nc in (alice, bob, admin):
            await nc.close()


async def test_a_client_cannot_publish_under_another_client_s_name(cluster):
    """Only alice may publish on dpbus.generate.alice, only the default client on the
    plain subject: the server refuses the rest, so the subject vouches for the sender."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e).lower())

    bob = await client_of(cluster, "bob", error_cb=on_error)
    try:
        for subject in ("dpbus.generate.alice", "dpbus.abort.alice", "dpbus.generate", "dpbus.abort",
                        "dpbus.generate.client"):
            await bob.publish(subject, b"{}", reply=bob.new_inbox())
            assert await until(lambda: any("permissions violation" in e and subject in e for e in errors), 5), \
                (subject, errors)
    finally:
        await bob.close()
