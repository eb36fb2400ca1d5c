"""client.Streams / client.stream, the one streaming client, on a real nats-server with the
test playing ingest: answers in order to the terminal one, others' answers dropped, and a
request left early (time-out, cancelled reader) aborted on the bus."""

from __future__ import annotations

import asyncio

import pytest

from dpbus.schemas import Chunk, Done, FinishReason, Subjects
from dpbus.services.client import NoResponders, Streams, stream
from tests.test_gateway_units import STAND_IN_PREFIX as PREFIX
from tests.test_gateway_units import stand_in  # noqa: F401 - a fixture: ingest played on PREFIX


@pytest.fixture
async def nc(nats_server):
    conn = await nats_server.connect("gateway")
    yield conn
    await conn.close()


def chunk(rid: str, token: int, text: str) -> Chunk:
    return Chunk(rid=rid, index=0, token_ids=[token], text=text)


def done(rid: str) -> Done:
    return Done(rid=rid, dp_rank=0, finish_reason=FinishReason.LENGTH, prompt_tokens=2, completion_tokens=2)


async def test_answers_come_in_order_and_another_rid_is_dropped(nc, stand_in):
    drops = []
    streams = await Streams(nc, Subjects(PREFIX), 10, on_drop=lambda *a, **kw: drops.append(a[0])).start()
    answers = await streams.send({"rid": "mine", "text": "hi"})
    req, reply = await stand_in.request()
    assert req["rid"] == "mine" and reply.startswith(streams.prefix + ".") and len(reply) > len(streams.prefix) + 30
    await stand_in.send(reply, chunk("theirs", 9, "x"), chunk("mine", 1, "a"), done("mine"))
    got = [a async for a in answers]
    assert [type(a).__name__ for a in got] == ["Chunk", "Done"] and got[0].text == "a"
    assert drops == ["wrong_rid"] and answers.arrived > 0
    await stand_in.send(reply, done("mine"))  # after the end: nobody's
    await asyncio.sleep(0.2)
    assert drops == ["wrong_rid", "no_call"] and stand_in.aborts.empty()
    await streams.stop()


async def test_a_request_without_a_rid_takes_the_rid_of_its_first_answer(nc, stand_in):
    async def read() -> list:
        return [a async for a in stream(nc, {"text": "hi"}, msgpack=True, subjects=Subjects(PREFIX), timeout=10)]

    reading = asyncio.create_task(read())
    _, reply = await stand_in.request()
    await stand_in.send(reply, chunk("given", 1, "a"), chunk("other", 2, "b"), done("given"))
    assert [a.rid for a in await asyncio.wait_for(reading, 30)] == ["given", "given"]


async def test_a_cancelled_reader_aborts_its_request(nc, stand_in):
    async def read() -> None:
        async for _ in stream(nc, {"rid": "left", "text": "hi"}, msgpack=True, subjects=Subjects(PREFIX),
                                timeout=60):
            pass

    reading = asyncio.create_task(read())
    _, reply = await stand_in.request()
    await stand_in.send(reply, chunk("left", 1, "a"))
    await asyncio.sleep(0.2)
    reading.cancel()
    assert await asyncio.wait_for(stand_in.aborts.get(), 30) == {"rid": "left", "reply": reply}
    with pytest.raises(asyncio.CancelledError):
        await reading


async def test_no_answer_in_time_raises_and_aborts(nc, stand_in):
    outcomes = []
    streams = await Streams(nc, Subjects(PREFIX), 0.3, on_abort=lambda s, reason, found, e: outcomes.append(
        (reason, found))).start()
    answers = await streams.send({"rid": "slow", "text": "hi"})
    _, reply = await stand_in.request()
    with pytest.raises(TimeoutError, match="within 0.3s"):
        await answers.next()
    assert await asyncio.wait_for(stand_in.aborts.get(), 30) == {"rid": "slow", "reply": reply}
    await streams.stop()
    assert outcomes == [("timeout", True)]


async def test_nothing_serving_the_subject_is_no_responders(nc):
    with pytest.raises(NoResponders, match="nothing serves"):
        async for _ in stream(nc, {"text": "hi"}, msgpack=True, subjects=Subjects(PREFIX), timeout=10):
            pass


async def test_a_request_unheard_is_sent_again_to_its_reply_subject_numbered_until_accepted(nc, stand_in):
    """The retry rule as the client follows it: copies go to the same reply subject with
    ``resend`` 1, 2, ... (so ingest never runs one as a new attempt), and stop once
    anything came back."""
    from dpbus.schemas import Accepted

    streams = await Streams(nc, Subjects(PREFIX), 10).start()
    answers = await streams.send({"rid": "kept", "text": "hi"}, ack_timeout=0.05)
    sent = [await stand_in.request() for _ in range(3)]  # the first send, then two copies (0.05 s, 0.1 s later)
    await stand_in.send(sent[0][1], Accepted(rid="kept", dp_rank=0, position=0), chunk("kept", 1, "a"), done("kept"))
    got = [a async for a in answers]
    copies = answers.resent  # two, or more if the answers were slow to come
    await asyncio.sleep(0.05 * 2 ** (copies + 1) + 0.3)  # past when the next copy was due
    await streams.stop()
    while not stand_in.requests.empty():
        sent.append(stand_in.requests.get_nowait())
    assert answers.resent == copies >= 2 and len(sent) == copies + 1, sent  # none once answered
    assert [r.get("resend", 0) for r, _ in sent] == list(range(copies + 1))
    assert {reply for _, reply in sent} == {sent[0][1]} and all(r["ack"] and r["rid"] == "kept" for r, _ in sent)
    assert [a.rid for a in answers.accepted] == ["kept"] and [type(a).__name__ for a in got] == ["Chunk", "Done"]
