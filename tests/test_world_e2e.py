"""``--mlp-scope world`` through the real services: two groups of one worker process with
two devices each, the two processes one JAX job (gloo collectives between them), every
world step run by both. Greedy answers must be the single-device reference's, whichever
group serves them, and a group with no work must not hold up the other."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time

import pytest

from dpbus.schemas import Chunk, Done, Error, Subjects
from dpbus.services import tokenizer
from dpbus.services.client import Streams, generate
from tests.conftest import client_of, start_cluster
from tests.support import service_docs
from tests.test_engine_e2e import prompt_text, reference_tokens

pytestmark = pytest.mark.e2e
PREFIX = "world"
SETTINGS = {"DPBUS_MLP_SCOPE": "world", "DPBUS_MAX_PREFILL_TOKENS": "64", "DPBUS_MAX_SEQ_LEN": "512",
            "DPBUS_HEARTBEAT_TIMEOUT": "2", "DPBUS_PUBLISHER_TIMEOUT": "2", "DPBUS_RECONCILE_INTERVAL": "0.5",
            "DPBUS_WORLD_LAYOUT": "per_step"}  # (on a CPU, auto is always MAX_LEN)
LISTEN_PAST = 4.0  # after the last terminal: a second one (a late publisher_lost) would come by now


@pytest.fixture(scope="module")
def world(nats_server, tmp_path_factory):
    c = start_cluster(nats_server, tmp_path_factory.mktemp("dpbus-world"), dp_size=2, nnodes=2, local_devices=2,
                      prefix=PREFIX, extra=dict(SETTINGS))
    yield c
    c.stop()


async def worker_stats(cluster) -> dict[int, dict]:
    """Each worker's stats, by group."""
    return {int(doc["metadata"]["dp_rank"]): doc["endpoints"][0]["data"]
            for doc in await service_docs(cluster, "dpbus-worker", PREFIX)}


async def test_both_groups_answer_what_one_device_alone_gives(world):
    texts = [prompt_text(i) for i in range(12)]
    n = 10
    nc = await client_of(world)
    try:
        outs = await asyncio.gather(*(
            generate(nc, {"text": t, "rid": f"w{i}", "dp_rank": i % 2,
                          "sampling": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}},
                     subjects=Subjects(PREFIX), timeout=120)
            for i, t in enumerate(texts)))
    finally:
        await nc.close()
    want = reference_tokens([tokenizer.ByteTokenizer().encode(t) for t in texts], n, 512)
    for i, (out, ref) in enumerate(zip(outs, want)):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.terminal.dp_rank == i % 2
        assert out.token_ids == ref, f"{texts[i]!r}: {out.token_ids} != {ref}"
    stats = await worker_stats(world)
    assert sorted(stats) == [0, 1]
    for g, s in stats.items():  # every world step is both groups': the same count on each side
        assert s["world"]["ran"] > 0, (g, s["world"])
    assert stats[0]["world"]["world_steps"] == stats[1]["world"]["world_steps"]


async def test_a_request_pinned_to_one_group_is_answered_while_the_other_has_no_work(world):
    before = await worker_stats(world)
    nc = await client_of(world)
    try:
        out = await generate(nc, {"text": "only group one", "rid": "w-pinned", "dp_rank": 1,
                                  "sampling": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}},
                             subjects=Subjects(PREFIX), timeout=60)
    finally:
        await nc.close()
    assert isinstance(out.terminal, Done) and out.terminal.dp_rank == 1 and len(out.token_ids) == 8
    after = await worker_stats(world)
    ran = after[1]["world"]["ran"] - before[1]["world"]["ran"]
    sat_out = after[0]["world"]["sat_out"] - before[0]["world"]["sat_out"]
    assert ran >= 8 and sat_out >= 8, (before, after)  # group 0 took part in each, with an empty batch
    # ... and only group 1's real tokens went through the MLP (SUM_LEN: end to end, no padding)
    assert after[1]["world"]["sum_len"] - before[1]["world"]["sum_len"] >= 8, (before, after)


def test_status_shows_each_group_s_part_of_the_world_steps(world, nats_server):
    out = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "status", "--dp-size", "2", "--prefix", PREFIX,
                          "--nats-url", world.nats_url, "--wait", "60",
                          "--nats-credentials", str(nats_server.store / "conf" / "credentials.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for g in (0, 1):
        line = next(x for x in out.stdout.splitlines() if f"world, group {g} (node {g})" in x)
        assert re.search(r"\d+ world steps: ran [1-9]\d*, sat out \d+, idle \d+, MLP on tokens end to end "
                         r"[1-9]\d* \(padded \d+\); last: sizes per group \[.*(sum_len|max_len)$", line), line


async def test_a_publisher_killed_mid_stream_costs_its_own_group_s_requests_once_and_stops_nothing_else(world):
    """Group 1's publisher SIGKILLed while requests stream in both groups. Its workers go on
    taking part in every world step (with empty parts), so group 0's requests run to their
    end; group 1's each get exactly one terminal answer (``publisher_lost``, from ingest
    once the dead publisher's lease lapsed) and nothing after it; the restarted publisher
    (alone: the world's job is whole) serves group 1 again."""
    nc = await client_of(world)
    dropped: list[tuple] = []  # anything for a request after its terminal
    streams = await Streams(nc, Subjects(PREFIX), timeout=60, on_drop=lambda *a, **kw: dropped.append(a)).start()
    publisher = next(p for p in world.procs if p.name == "publisher-1")
    try:
        running = [await streams.send({"text": f"busy {i}", "rid": f"w-pub-{i}", "dp_rank": i % 2,
                                       "sampling": {"max_new_tokens": 150, "ignore_eos": True}}) for i in range(4)]
        answers = [[await s.__anext__()] for s in running]  # streaming in both groups
        publisher.popen.kill()
        await asyncio.to_thread(publisher.popen.wait, 10)
        for got, s in zip(answers, running):
            got += [a async for a in s]
        await asyncio.sleep(LISTEN_PAST)
        restarted = world.supervise(min_interval=0)
        for attempt in range(120):  # `unavailable` until the new publisher has its workers
            again = [a async for a in await streams.send({"text": "back", "rid": f"w-pub-back-{attempt}", "dp_rank": 1,
                                                           "sampling": {"max_new_tokens": 4, "ignore_eos": True}})]
            if not (isinstance(again[-1], Error) and again[-1].code.value == "unavailable"):
                break
            await asyncio.sleep(0.5)
    finally:
        await streams.stop()
        await nc.close()
    for i, got in enumerate(answers):
        chunks, terminal = got[:-1], got[-1]
        assert chunks and isinstance(chunks[0], Chunk), f"request {i} was streaming before the kill"
        if i % 2 == 0:
            assert isinstance(terminal, Done) and terminal.completion_tokens == 150, (i, terminal)
        else:
            assert isinstance(terminal, Error) and terminal.code.value == "publisher_lost", (i, terminal)
    assert not dropped, dropped
    assert len(restarted) == 1 and "publisher-1" in restarted[0], restarted  # the world's workers go on
    assert isinstance(again[-1], Done) and again[-1].dp_rank == 1, again[-1]


async def test_a_worker_of_either_group_killed_mid_stream_ends_the_world_step_for_all(world):
    """Runs last: it breaks the world. Requests stream in both groups; group 1's worker is
    frozen (SIGSTOP: its sockets stay open, so group 0's worker waits in a collective that
    never ends, the case gloo cannot see), then killed. Every request ends with one terminal
    answer (``worker_lost`` where it was running, in either group), group 0's worker leaves
    the broken world by itself (exit 70) once its peer's heartbeats stop, and once the world
    is restarted as one (what `dpbus up` does), both groups serve."""
    nc = await client_of(world)
    streams = await Streams(nc, Subjects(PREFIX), timeout=90).start()
    try:
        running = [await streams.send({"text": f"long {i}", "rid": f"w-long-{i}", "dp_rank": i % 2,
                                       "sampling": {"max_new_tokens": 400, "ignore_eos": True}}) for i in range(4)]
        firsts = [await s.__anext__() for s in running]  # streaming in both groups
        procs = {p.name: p for p in world.procs}
        killed_at = time.monotonic()
        procs["worker-1"].popen.send_signal(signal.SIGSTOP)
        try:
            outs = [[a async for a in s] for s in running]
        finally:
            procs["worker-1"].popen.kill()
        answered_in = time.monotonic() - killed_at
        print(f"every request answered {answered_in:.1f}s after group 1's worker was frozen")
        for i, (first, out) in enumerate(zip(firsts, outs)):
            assert isinstance(first, Chunk), (i, first)
            assert isinstance(out[-1], Error) and out[-1].code.value == "worker_lost", (i, out[-1])
        assert await asyncio.to_thread(procs["worker-0"].popen.wait, 60) == 70  # left the broken world
        left = [line for line in (world.log_dir / "worker-0.log").read_text().splitlines()
                if "leaving_broken_world" in line]
        assert left and "node(s) [1] silent" in left[0], left
        deadline = time.monotonic() + 240
        restarted: list[str] = []
        while time.monotonic() < deadline:
            restarted += world.supervise(min_interval=0)
            if any("worker-0" in line for line in restarted) and any("worker-1" in line for line in restarted):
                break
            await asyncio.sleep(0.5)
        for g in (0, 1):  # refused (`unavailable`) until the world is whole again
            for attempt in range(240):
                out = await generate(nc, {"text": f"again {g}", "rid": f"w-again-{g}-{attempt}", "dp_rank": g,
                                          "sampling": {"max_new_tokens": 4, "ignore_eos": True}},
                                     subjects=Subjects(PREFIX), timeout=60)
                if not (isinstance(out.terminal, Error) and out.terminal.code.value == "unavailable"):
                    break
                await asyncio.sleep(1.0)
            assert isinstance(out.terminal, Done), (g, out.terminal, restarted)
    finally:
        await streams.stop()
        await nc.close()
