"""Faults while serving, loopback only and bounded in time: nats-server restarts, workers
killed or frozen, a publisher killed and restarted. Every accepted request must end with
exactly one terminal answer (lost == 0), and the system must serve afterwards."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import time

import nats
import pytest

from dpbus.services.ledger import Ledger, request_key
from tests.conftest import NatsServer, start_cluster
from tests.test_robustness_e2e import TERMINAL, decode_any

pytestmark = pytest.mark.e2e
INBOX = "_INBOX.client"  # the test client's inbox prefix: (INBOX, rid) names its requests
SETTINGS = {"DPBUS_MAX_SEQ_LEN": "256", "DPBUS_MAX_PREFILL_TOKENS": "32", "DPBUS_HEARTBEAT_TIMEOUT": "2",
            "DPBUS_STEP_TIMEOUT": "10", "DPBUS_PUBLISHER_TIMEOUT": "2", "DPBUS_RECONCILE_INTERVAL": "0.5",
            "DPBUS_LOAD_STALE_AFTER": "2", "DPBUS_WARMUP": "true"}


@pytest.fixture
def own_nats():
    server = NatsServer()
    server.start()
    yield server
    server.cleanup()


# how long to keep listening after the last terminal answer: a late ``publisher_lost`` comes
# up to publisher_timeout + reconcile_interval (+ the ledger's margin) after a publisher dies
LISTEN_PAST = float(SETTINGS["DPBUS_PUBLISHER_TIMEOUT"]) + float(SETTINGS["DPBUS_RECONCILE_INTERVAL"]) + 1.5
# a request still unanswered this long after it was sent, with no entry in any group's part of
# the ledger, never reached a group (its ingest died first): waiting out its whole time-out
# would only stretch the test. ``report`` looks again at the end, so one that reaches a group
# after all is counted as lost, never passed over.
UNTRACED_AFTER = 10.0
RESEND_AFTER = 2.0  # the retry rule: a request unheard this long is sent again (then 4 s, 8 s, ...)


class Load:
    """Sends requests at a steady pace and records, for each, every answer it received,
    listening on every inbox until ``LISTEN_PAST`` seconds after the last terminal answer."""

    def __init__(self, nc, tag: str = "chaos", server: NatsServer | None = None) -> None:
        self.nc = nc
        self.tag = tag  # names its requests: tag-0, tag-1, ...
        self.answers: dict[str, list[dict]] = {}
        self.subs: list = []
        self.sent = 0
        self.resent = 0  # copies sent by the retry rule (docs/guarantees.md)
        self.server = server  # given: stop waiting for requests the ledger never saw (UNTRACED_AFTER)
        self.ledger: Ledger | None = None

    async def one(self, i: int, timeout: float) -> None:
        rid = f"{self.tag}-{i}"
        inbox = self.nc.new_inbox()
        got = self.answers.setdefault(rid, [])

        async def on_answer(msg) -> None:
            got.append(decode_any(msg.data) if msg.data else {"type": "no_responders"})

        self.subs.append(await self.nc.subscribe(inbox, cb=on_answer))
        request = {"rid": rid, "text": f"chaos {i} " + "x" * random.randrange(40), "ack": True,
                   "sampling": {"max_new_tokens": random.randrange(20, 120), "ignore_eos": True}}
        await self.nc.publish("dpbus.generate", json.dumps(request).encode(), reply=inbox)
        self.sent += 1
        sent = time.monotonic()
        look_at = sent + UNTRACED_AFTER
        resend_at, pause = sent + RESEND_AFTER, RESEND_AFTER
        copies = 0

        def ended() -> bool:  # a terminal answer; or NATS's 503 to the first send (no ingest at all)
            return any(a["type"] in TERMINAL or a["type"] == "no_responders" and not copies for a in got)

        while time.monotonic() < sent + timeout and not ended():
            await asyncio.sleep(0.1)
            heard = [a for a in got if a["type"] != "no_responders"]  # a 503 to a copy: an ingest restarting
            if time.monotonic() >= resend_at and not heard:  # the retry rule: nothing at all came back yet
                copies += 1
                await self.nc.publish("dpbus.generate", json.dumps({**request, "resend": copies}).encode(),
                                      reply=inbox)
                self.resent += 1
                pause *= 2
                resend_at = time.monotonic() + pause
            if self.ledger is not None and time.monotonic() >= look_at:
                look_at = time.monotonic() + 2.0
                try:
                    seen = await self.entry_of(self.ledger, rid)
                except Exception:  # noqa: BLE001 - the server restarting: look again later
                    continue
                if seen is None:
                    return

    async def run(self, n: int, every: float, timeout: float) -> None:
        admin = await self.server.connect("admin") if self.server else None
        try:
            if admin is not None:
                self.ledger = await self.open_ledger(admin)
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(self.one(i, timeout)))
                await asyncio.sleep(every)
            await asyncio.gather(*tasks)
        finally:
            self.ledger = None
            if admin is not None:
                await admin.close()
        await asyncio.sleep(LISTEN_PAST)  # anything after a terminal answer counts too
        for sub in self.subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - reconnecting
                pass

    async def open_ledger(self, admin) -> Ledger:
        return await Ledger.open(admin, "dpbus")

    @staticmethod
    async def entry_of(ledger: Ledger, rid: str):
        """The request's entry in either group's part of the ledger (every chaos deployment
        has two groups), None if neither has one."""
        found = None
        for g in range(2):
            found = await ledger.get(request_key(g, INBOX, rid)) or found
        return found

    async def accepted(self, server: NatsServer, rids: list[str]) -> dict[str, str]:
        """Which of ``rids`` a publisher accepted or ingest refused in the ledger (entries stay
        two minutes after their answer), with what their entry says: a request without a
        terminal answer and without an entry never reached a group (no ingest got it, or it
        died first)."""
        admin = await server.connect("admin")
        try:
            ledger = await self.open_ledger(admin)
            found = {rid: await self.entry_of(ledger, rid) for rid in rids}
            return {rid: f"{got[1].state} by {got[1].owner} in group {got[1].group} (revision {got[0]})"
                    for rid, got in found.items() if got is not None}
        finally:
            await admin.close()

    async def report(self, server: NatsServer) -> dict:
        silent = [rid for rid, got in self.answers.items()
                  if not any(a["type"] in (*TERMINAL, "no_responders") for a in got)]
        self.silent_accepted = await self.accepted(server, silent)
        outcome: collections.Counter[str] = collections.Counter()
        bad, after, lost = [], [], []
        for rid, got in self.answers.items():
            refused = any(a["type"] == "no_responders" for a in got)  # a 503 (NATS): no ingest saw it
            got = [a for a in got if a["type"] != "no_responders"]  # a 503 for a resent copy is no answer
            terminals = [i for i, a in enumerate(got) if a["type"] in TERMINAL]
            chunks = [a["index"] for a in got if a["type"] == "chunk"]
            if not terminals:
                if refused and not got:
                    outcome["not_accepted_no_responders"] += 1
                elif rid not in self.silent_accepted:
                    outcome["never_reached_a_group"] += 1
                else:
                    outcome["lost"] += 1
                    lost.append((rid, [a["type"] for a in got][-4:], self.silent_accepted[rid]))
                continue
            if len(terminals) > 1:
                bad.append((rid, [a["type"] for a in got][-4:]))
            elif terminals[0] != len(got) - 1:
                after.append((rid, [a["type"] for a in got][-4:]))
            else:
                outcome[got[terminals[0]].get("code", "done")] += 1
            if chunks != sorted(set(chunks)):
                outcome["chunks_out_of_order"] += 1
        return {"sent": self.sent, "resent": self.resent, **outcome, "more_than_one_terminal": len(bad), "after_terminal": len(after),
                "examples": (bad + after)[:3], "lost_examples": lost[:3]}


def assert_nothing_lost(report: dict) -> None:
    assert report.get("lost", 0) == 0, report
    assert report["more_than_one_terminal"] == 0 and report["after_terminal"] == 0, report


async def serving(nc, within: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("dpbus.generate", b'{"text": "ok?", "sampling": {"max_new_tokens": 2}}', reply=inbox)
        try:
            while True:
                doc = decode_any((await sub.next_msg(timeout=10)).data)
                if doc["type"] in TERMINAL:
                    break
            if doc["type"] == "done":
                return True
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            pass
        finally:
            await sub.unsubscribe()
        await asyncio.sleep(0.5)
    return False


async def connect(server: NatsServer):
    return await server.connect("client", reconnect_time_wait=0.3, max_reconnect_attempts=-1)


async def killed_and_restarted(cluster, proc) -> None:
    """SIGKILL one service, and a second later start it again (as `dpbus up` would)."""
    proc.popen.kill()
    await asyncio.to_thread(proc.popen.wait, 10)
    await asyncio.sleep(1)
    cluster.restart(proc.name)


async def test_a_nats_server_restart_loses_no_accepted_request(own_nats, tmp_path):
    cluster = await asyncio.to_thread(start_cluster, own_nats, tmp_path, dp_size=2, nnodes=2, local_devices=1,
                                      extra=dict(SETTINGS))
    try:
        nc = await connect(own_nats)
        load = Load(nc, server=own_nats)
        running = asyncio.create_task(load.run(40, every=0.05, timeout=60))
        await asyncio.sleep(1.0)
        own_nats.stop()
        await asyncio.sleep(1.0)
        own_nats.start()  # same port, same store
        await running
        back = await serving(nc, 60)
        await nc.close()
    finally:
        cluster.stop()
    report = await load.report(own_nats)
    print(f"nats-server restart: {report}")
    assert_nothing_lost(report)
    assert back


async def test_chaos(own_nats, tmp_path):
    cluster = await asyncio.to_thread(start_cluster, own_nats, tmp_path, dp_size=2, nnodes=2, local_devices=1,
                                      extra=dict(SETTINGS))
    timings: dict[str, float] = {}
    try:
        nc = await connect(own_nats)
        load = Load(nc, server=own_nats)
        running = asyncio.create_task(load.run(300, every=0.1, timeout=90))
        proc = {p.name: p for p in cluster.procs}

        await asyncio.sleep(4)  # 1. a worker killed outright, then replaced
        proc["worker-1"].popen.kill()
        await asyncio.to_thread(proc["worker-1"].popen.wait, 10)
        cluster.restart("worker-1")
        await asyncio.sleep(8)
        proc = {p.name: p for p in cluster.procs}

        await killed_and_restarted(cluster, proc["publisher-0"])  # 2. a publisher killed and restarted
        await asyncio.sleep(6)
        proc = {p.name: p for p in cluster.procs}

        os.kill(proc["worker-0"].popen.pid, signal.SIGSTOP)  # 3. a worker frozen past the timeout
        await asyncio.sleep(4)
        os.kill(proc["worker-0"].popen.pid, signal.SIGCONT)
        await asyncio.sleep(6)

        own_nats.stop()  # 4. the NATS server restarted
        await asyncio.sleep(1)
        own_nats.start()
        await running
        t0 = time.monotonic()
        back = await serving(nc, 90)
        timings["serving_again_s"] = time.monotonic() - t0
        await nc.close()
    finally:
        cluster.stop()
    report = await load.report(own_nats)
    print(f"chaos: {report} {timings}")
    assert_nothing_lost(report)
    assert report.get("done", 0) > report["sent"] // 3, report
    assert back


async def test_chaos_in_a_world(own_nats, tmp_path):
    """The chaos table for ``--mlp-scope world`` (two groups, one JAX job), a load for each
    fault, each fault once requests stream: a worker of group 1 killed (the world breaks:
    every group's running requests end with one terminal answer, new ones are refused
    ``unavailable`` until the world, restarted as one as `dpbus up` does, is whole again),
    then group 0's publisher killed and restarted (its own group's requests only; the
    world steps on)."""
    cluster = await asyncio.to_thread(start_cluster, own_nats, tmp_path, dp_size=2, nnodes=2, local_devices=1,
                                      extra={**SETTINGS, "DPBUS_MLP_SCOPE": "world"})
    restarted: list[str] = []
    timings: dict[str, float] = {}
    reports = {}
    try:
        nc = await connect(own_nats)
        broken = Load(nc, tag="world-broken", server=own_nats)
        running = asyncio.create_task(broken.run(60, every=0.1, timeout=120))
        await streaming(broken, 2)
        t0 = time.monotonic()
        proc = {p.name: p for p in cluster.procs}
        proc["worker-1"].popen.kill()
        await asyncio.to_thread(proc["worker-1"].popen.wait, 10)
        assert await asyncio.to_thread(proc["worker-0"].popen.wait, 30) == 70  # it left the broken world
        for _ in range(60):
            restarted += cluster.supervise(min_interval=0)
            if any("worker-0" in line and "worker-1" in line for line in restarted):
                break
            await asyncio.sleep(0.5)
        assert await serving(nc, 180)  # its warm-up compiles again (here: 24 s alone, 63 s in CI)
        timings["world_serving_again_s"] = round(time.monotonic() - t0, 1)
        await running

        publisher_lost = Load(nc, tag="world-publisher", server=own_nats)
        running = asyncio.create_task(publisher_lost.run(60, every=0.1, timeout=120))
        await streaming(publisher_lost, 2)
        await killed_and_restarted(cluster, {p.name: p for p in cluster.procs}["publisher-0"])
        await running
        back = await serving(nc, 90)
        await nc.close()
        reports = {"world broken": await broken.report(own_nats),
                   "publisher killed": await publisher_lost.report(own_nats)}
    finally:
        cluster.stop()
    print(f"chaos in a world: {reports} {timings}; {restarted}")
    for report in reports.values():
        assert_nothing_lost(report)
        outcomes = {k for k, v in report.items() if isinstance(v, int) and v and k not in ("sent", "resent")}
        assert outcomes <= {"done", "worker_lost", "unavailable", "publisher_lost"}, report
    assert reports["world broken"].get("worker_lost", 0) >= 2, reports  # what streamed when the world broke
    assert reports["publisher killed"].get("done", 0) >= 1, reports  # group 1 (and group 0 after) ran on
    assert back


async def streaming(load: Load, n: int, within: float = 60.0) -> None:
    """Until ``n`` requests of ``load`` have had a chunk (so a fault now hits them running)."""
    count = lambda: sum(any(a["type"] == "chunk" for a in got) for got in load.answers.values())  # noqa: E731
    deadline = time.monotonic() + within
    while count() < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert count() >= n, load.answers


async def killed_mid_load(server: NatsServer, log_dir, victims: list[str], after: float,
                          restart: bool) -> tuple[Load, dict, bool]:
    """Two ingests, two groups; 80 requests at 20/s; ``victims`` SIGKILLed together
    ``after`` seconds in (and started again a second later, if ``restart``). The load,
    its report, and whether dpbus serves afterwards."""
    cluster = await asyncio.to_thread(start_cluster, server, log_dir, dp_size=2, nnodes=2, local_devices=1,
                                      ingests=2, extra=dict(SETTINGS))
    try:
        nc = await connect(server)
        load = Load(nc, server=server)
        running = asyncio.create_task(load.run(80, every=0.05, timeout=60))
        await asyncio.sleep(after)
        proc = {p.name: p for p in cluster.procs}
        for name in victims:
            proc[name].popen.kill()
        for name in victims:
            await asyncio.to_thread(proc[name].popen.wait, 10)
        if restart:
            await asyncio.sleep(1.0)
            for name in victims:
                cluster.restart(name)
        await running
        back = await serving(nc, 60)
        await nc.close()
    finally:
        cluster.stop()
    return load, await load.report(server), back


async def test_killing_one_of_two_ingests_loses_nothing_it_handed_over(own_nats, tmp_path):
    load, report, back = await killed_mid_load(own_nats, tmp_path, ["ingest-1"], after=1.5, restart=False)
    heard = {rid for rid, got in load.answers.items() if got}
    print(f"one of two ingests killed: {report}")
    assert report["more_than_one_terminal"] == 0 and report["after_terminal"] == 0, report
    for rid in heard:  # everything that reached a group was answered, exactly once
        got = load.answers[rid]
        assert got[-1]["type"] in (*TERMINAL, "no_responders"), (rid, got[-1])
    # only a request caught between reaching the dead ingest and being handed over can go
    # unanswered (documented); at this pace that is at most one or two
    assert report.get("lost", 0) <= 2, report
    # the load follows the retry rule: what the dead ingest took unread runs from a copy; only
    # one whose name it recorded and handed to no group stays silent (docs/guarantees.md)
    assert report.get("never_reached_a_group", 0) <= 1, report
    assert back


async def test_a_publisher_and_the_ingest_that_fed_it_killed_together_lose_nothing(own_nats, tmp_path):
    """A publisher and an ingest SIGKILLed at the same moment: the requests the publisher
    held (whichever ingest handed them over) are answered once, by the surviving ingest,
    once the dead publisher's lease lapses; the restarted publisher serves again."""
    _, report, back = await killed_mid_load(own_nats, tmp_path, ["publisher-0", "ingest-1"], after=2.0,
                                            restart=True)
    print(f"a publisher and an ingest killed together: {report}")
    assert_nothing_lost(report)
    assert report.get("publisher_lost", 0) > 0, report  # the dead publisher held requests: answered for it
    assert back


async def test_a_client_following_the_retry_rule_gets_what_a_dead_ingest_took_with_it(own_nats, tmp_path):
    """Two requests reach an ingest that is frozen (SIGSTOP: they sit unread in its socket)
    and then SIGKILLed. The client that follows the retry rule (``ack``, the same request
    sent again to the same reply subject while nothing came back) is served, once, by the
    restarted ingest; the one sent once hears nothing (what the rule is for)."""
    from dpbus.schemas import Done
    from dpbus.services.client import Streams

    cluster = await asyncio.to_thread(start_cluster, own_nats, tmp_path, dp_size=1, nnodes=1, local_devices=1,
                                      extra=dict(SETTINGS))
    nc = await connect(own_nats)
    dropped: list[tuple] = []  # what the client set aside, and why
    streams = await Streams(nc, timeout=60, on_drop=lambda *a, **kw: dropped.append(a)).start()
    try:
        ingest = next(p for p in cluster.procs if p.role == "ingest")
        ingest.popen.send_signal(signal.SIGSTOP)
        request = {"text": "kept", "sampling": {"max_new_tokens": 5, "ignore_eos": True}}
        retrying = await streams.send({**request, "rid": "retried"}, ack_timeout=1.0)
        once = await streams.send({**request, "rid": "sent-once"})
        await nc.flush()
        await asyncio.sleep(0.3)  # in the frozen ingest's socket
        ingest.popen.kill()
        await asyncio.to_thread(ingest.popen.wait, 10)
        assert cluster.supervise(min_interval=0)  # `dpbus up` restarts it
        answers = [a async for a in retrying]
        once.close()  # from now on, anything for either one is late
        await asyncio.sleep(LISTEN_PAST)  # a late publisher_lost would come by now
    finally:
        await streams.stop()
        await nc.close()
        await asyncio.to_thread(cluster.stop)
    assert retrying.resent >= 1 and [a.rid for a in retrying.accepted] == ["retried"], retrying.accepted
    assert isinstance(answers[-1], Done) and answers[-1].completion_tokens == 5, answers[-1]
    assert sum(isinstance(a, Done) for a in answers) == 1 and len(answers) == 6  # 5 chunks, one done
    # a copy resent while no ingest ran hears NATS say so (set aside: the next copy tries
    # again); anything else set aside came after an end (a second run, a late terminal)
    late = [d for d in dropped if d[0] != "no_responders_to_a_copy"]
    assert not once.answered and once.queue.empty() and not late, dropped
