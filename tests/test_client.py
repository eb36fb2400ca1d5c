"""client.Streams / client.stream, the one streaming client, on a real nats-server with the
test playing ingest: answers in order to the terminal one, others' answers dropped, and a
request left early (time-out, cancelled reader) aborted on the bus."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from dpbus.schemas import Chunk, Done, FinishReason, Subjects
from dpbus.services.client import NoResponders, Streams, stream

PREFIX = "gwnone"  # a prefix of the test server's config that nothing serves


class Ingest:
    """Takes the client's requests and aborts on ``PREFIX``, as ingest would."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.requests: asyncio.Queue = asyncio.Queue()  # (request, reply subject)
        self.aborts: asyncio.Queue = asyncio.Queue()

    async def on_msg(self, msg) -> None:
        if msg.subject.split(".")[1] == "generate":
            decode = msgspec.json.decode if msg.data[:1] == b"{" else msgspec.msgpack.decode
            self.requests.put_nowait((decode(msg.data), msg.reply))
            return
        doc = json.loads(msg.data)
        self.aborts.put_nowait(doc)
        await self.nc.publish(msg.reply, json.dumps({"type": "abort", "rid": doc["rid"], "found": True}).encode())

    async def answer(self, reply: str, *answers) -> None:
        for a in answers:
            await self.nc.publish(reply, msgspec.json.encode(a))
        await self.nc.flush()


@pytest.fixture
async def ingest(nats_server):
    nc = await nats_server.connect("admin")
    got = Ingest(nc)
    await nc.subscribe(f"{PREFIX}.>", cb=got.on_msg)
    await nc.flush()
    yield got
    await nc.close()


@pytest.fixture
async def nc(nats_server):
    conn = await nats_server.connect("gateway")
    yield conn
    await conn.close()


def chunk(rid: str, token: int, text: str) -> Chunk:
    return Chunk(rid=rid, index=0, token_ids=[token], text=text)


def done(rid: str) -> Done:
    return Done(rid=rid, dp_rank=0, finish_reason=FinishReason.LENGTH, prompt_tokens=2, completion_tokens=2)


async def test_answers_come_in_order_and_another_rid_is_dropped(nc, ingest):
    drops = []
    streams = await Streams(nc, Subjects(PREFIX), 10, on_drop=lambda *a, **kw: drops.append(a[0])).start()
    answers = await streams.send({"rid": "mine", "text": "hi"}, msgpack=False)
    req, reply = await asyncio.wait_for(ingest.requests.get(), 30)
    assert req["rid"] == "mine" and reply.startswith(streams.prefix + ".") and len(reply) > len(streams.prefix) + 30
    await ingest.answer(reply, chunk("theirs", 9, "x"), chunk("mine", 1, "a"), done("mine"))
    got = [a async for a in answers]
    assert [type(a).__name__ for a in got] == ["Chunk", "Done"] and got[0].text == "a"
    assert drops == ["wrong_rid"] and answers.arrived > 0
    await ingest.answer(reply, done("mine"))  # after the end: nobody's
    await asyncio.sleep(0.2)
    assert drops == ["wrong_rid", "no_call"] and ingest.aborts.empty()
    await streams.stop()


async def test_a_request_without_a_rid_takes_the_rid_of_its_first_answer(nc, ingest):
    async def read() -> list:
        return [a async for a in stream(nc, {"text": "hi"}, subjects=Subjects(PREFIX), timeout=10)]

    reading = asyncio.create_task(read())
    _, reply = await asyncio.wait_for(ingest.requests.get(), 30)
    await ingest.answer(reply, chunk("given", 1, "a"), chunk("other", 2, "b"), done("given"))
    assert [a.rid for a in await asyncio.wait_for(reading, 30)] == ["given", "given"]


async def test_a_cancelled_reader_aborts_its_request(nc, ingest):
    async def read() -> None:
        async for _ in stream(nc, {"rid": "left", "text": "hi"}, subjects=Subjects(PREFIX), timeout=60):
            pass

    reading = asyncio.create_task(read())
    _, reply = await asyncio.wait_for(ingest.requests.get(), 30)
    await ingest.answer(reply, chunk("left", 1, "a"))
    await asyncio.sleep(0.2)
    reading.cancel()
    assert await asyncio.wait_for(ingest.aborts.get(), 30) == {"rid": "left", "reply": reply}
    with pytest.raises(asyncio.CancelledError):
        await reading


async def test_no_answer_in_time_raises_and_aborts(nc, ingest):
    outcomes = []
    streams = await Streams(nc, Subjects(PREFIX), 0.3, on_abort=lambda s, reason, found, e: outcomes.append(
        (reason, found))).start()
    answers = await streams.send({"rid": "slow", "text": "hi"})
    _, reply = await asyncio.wait_for(ingest.requests.get(), 30)
    with pytest.raises(TimeoutError, match="within 0.3s"):
        await answers.next()
    assert await asyncio.wait_for(ingest.aborts.get(), 30) == {"rid": "slow", "reply": reply}
    await streams.stop()
    assert outcomes == [("timeout", True)]


async def test_nothing_serving_the_subject_is_no_responders(nc):
    with pytest.raises(NoResponders, match="nothing serves"):
        async for _ in stream(nc, {"text": "hi"}, subjects=Subjects(PREFIX), timeout=10):
            pass
