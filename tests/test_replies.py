"""bus.Replies, ingest's request/reply: answers, no responders, time-outs, late replies."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from dpbus.services.bus import Replies


async def test_replies_answer_refuse_and_time_out(nats_server):
    nc = await nats_server.connect("admin")
    replies = Replies(nc, tick=0.01)
    await replies.start()
    held: list = []

    async def echo(msg):
        await msg.respond(b"re:" + msg.data)

    async def slow(msg):  # answers only when told to
        held.append(msg)

    await nc.subscribe("test.replies.echo", cb=echo)
    await nc.subscribe("test.replies.slow", cb=slow)
    await nc.flush()
    got = await asyncio.gather(*(replies.request("test.replies.echo", str(i).encode(), 2.0) for i in range(50)))
    assert got == [f"re:{i}".encode() for i in range(50)]
    with pytest.raises(nats.errors.NoRespondersError):
        await replies.request("test.replies.nobody", b"x", 2.0)
    with pytest.raises(nats.errors.TimeoutError):
        await replies.request("test.replies.slow", b"late", 0.1)
    await held[0].respond(b"too late")  # dropped: nobody waits for it any more
    await nc.flush()
    heard: list = []
    await replies.send("test.replies.echo", b"cb", 2.0, heard.append)  # the callback form
    for _ in range(200):
        if heard:
            break
        await asyncio.sleep(0.01)
    assert heard == [b"re:cb"] and replies.waiting == {}
    replies.stop()
    await nc.close()
