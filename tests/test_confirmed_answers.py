"""Terminal answers are confirmed (``bus.ClientOutbox``): a terminal answer written to a
server that dies before reading it goes out again after the reconnection, once; one
the server took is not sent again.

A loopback TCP proxy stands between the answering service and a real nats-server. It can
*swallow* what the service sends (the bytes vanish, as in the socket buffer of a server
that is SIGKILLed) and then cut the connection; nats-py reconnects through it."""

from __future__ import annotations

import asyncio

from dpbus.schemas import Done, Error, ErrorCode
from dpbus.schemas.codec import Encoding, encode_answer
from dpbus.services import bus, logs
from tests.test_one_terminal import answers_on

LOG = logs.configure("warning", json=True)


class Proxy:
    """Forwards 127.0.0.1:<port> to the server; ``swallow`` drops client-to-server bytes."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.swallow = False
        self.links: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.listener = await asyncio.start_server(self.on_client, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.listener.sockets[0].getsockname()[1]}"

    async def on_client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.server_port)
        self.links += [writer, up_writer]

        async def pump(src, dst, upstream: bool) -> None:
            try:
                while data := await src.read(65536):
                    if not (upstream and self.swallow):
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def cut(self) -> None:
        """The server dies: every link closes, and what was swallowed is gone."""
        for w in self.links:
            w.close()
        self.links.clear()
        self.swallow = False

    async def close(self) -> None:
        self.cut()
        self.listener.close()


async def outbox_behind(proxy: Proxy, server) -> tuple[bus.Client, bus.ClientOutbox, list]:
    """A service's answering connection (as ``ingest-answers``) through ``proxy``, its
    outbox, and its list of reconnection hooks."""
    hooks: list = []
    nc = await bus.connect(await proxy.start(), "confirm-test", LOG, on_reconnect_hooks=hooks,
                           auth=server.auth("ingest-answers"))
    outbox = bus.ClientOutbox(nc, LOG, hold=0.2)
    hooks.append(outbox.on_reconnect)
    return nc, outbox, hooks


async def listening_client(server):
    """A client connection, its inbox, and the answers arriving there (subscribed at the server)."""
    client = await server.connect("client")
    inbox, answers = await answers_on(client)
    return client, inbox, answers


async def until(cond, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond() and loop.time() < deadline:
        await asyncio.sleep(0.02)


async def test_a_terminal_answer_lost_with_its_server_is_sent_again_once(nats_server):
    proxy = Proxy(nats_server.port)
    nc, outbox, hooks = await outbox_behind(proxy, nats_server)
    client, inbox, answers = await listening_client(nats_server)
    await outbox.send(inbox, encode_answer(Done("taken", 0, "length", 3, 1), Encoding.JSON), terminal=True)
    await until(lambda: not outbox.unconfirmed, 5)
    taken_confirmed = not outbox.unconfirmed

    proxy.swallow = True  # the server stops reading: what is written now never arrives
    await outbox.send(inbox, encode_answer(Error(ErrorCode.TIMEOUT, "lost", rid="lost"), Encoding.JSON),
                      terminal=True)
    await asyncio.sleep(0.3)
    unconfirmed_while_swallowed = len(outbox.unconfirmed)
    proxy.cut()
    await until(lambda: len(answers.got) >= 2 and not outbox.unconfirmed, 10)
    await asyncio.sleep(0.5)  # anything sent twice would arrive by now
    got = [(type(a).__name__, a.rid) for a in answers.got]
    await client.close()
    await nc.close()
    await proxy.close()
    assert taken_confirmed and unconfirmed_while_swallowed == 1
    assert got == [("Done", "taken"), ("Error", "lost")], got
    assert outbox.resent == 1 and not outbox.unconfirmed


async def test_answers_the_server_took_are_not_sent_again_after_a_reconnection(nats_server):
    proxy = Proxy(nats_server.port)
    nc, outbox, hooks = await outbox_behind(proxy, nats_server)
    client, inbox, answers = await listening_client(nats_server)
    for i in range(20):
        await outbox.send(inbox, encode_answer(Done(f"r{i}", 0, "length", 3, 1), Encoding.JSON), terminal=True)
    await until(lambda: not outbox.unconfirmed, 5)
    reconnected: list[int] = []
    hooks.append(lambda: reconnected.append(1))
    proxy.cut()
    await until(lambda: reconnected and nc.is_connected and not outbox._tasks, 10)
    await outbox.send(inbox, encode_answer(Done("after", 0, "length", 3, 1), Encoding.JSON), terminal=True)
    await until(lambda: len(answers.got) >= 21 and not outbox.unconfirmed, 10)
    await asyncio.sleep(0.5)
    rids = [a.rid for a in answers.got]
    await client.close()
    await nc.close()
    await proxy.close()
    assert rids == [f"r{i}" for i in range(20)] + ["after"], rids
    assert outbox.resent == 0


async def test_a_probe_without_its_echo_is_sent_again_until_the_lost_answer_is_settled(nats_server):
    """After the reconnection the new connection swallows for a while too (a flapping link):
    the first probe never comes back. The outbox probes again on the same connection, and
    the lost terminal answer goes out once the link carries bytes again (it used to wait for
    the next reconnection, which may never come)."""
    proxy = Proxy(nats_server.port)
    nc, outbox, hooks = await outbox_behind(proxy, nats_server)
    outbox.confirm_timeout = 0.3
    client, inbox, answers = await listening_client(nats_server)
    proxy.swallow = True
    await outbox.send(inbox, encode_answer(Error(ErrorCode.TIMEOUT, "lost", rid="lost"), Encoding.JSON),
                      terminal=True)
    await asyncio.sleep(0.3)
    reconnected: list[float] = []

    def swallow_again() -> None:  # runs before the outbox's own hook: its first probe is swallowed
        reconnected.append(asyncio.get_running_loop().time())
        proxy.swallow = True

    hooks.insert(0, swallow_again)
    proxy.cut()
    await until(lambda: reconnected, 10)
    await asyncio.sleep(1.0)  # several probes swallowed
    swallowed = not answers.got and len(outbox.unconfirmed) == 1
    proxy.swallow = False
    await until(lambda: answers.got and not outbox.unconfirmed, 10)
    await asyncio.sleep(0.5)
    got = [(type(a).__name__, a.rid) for a in answers.got]
    await client.close()
    await nc.close()
    await proxy.close()
    assert swallowed and got == [("Error", "lost")], got
    assert outbox.resent == 1 and not outbox.unconfirmed
