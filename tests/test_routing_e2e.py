"""Routing through real processes: ingest with ``--policy least_tokens``, two publishers and
two workers (2 DP groups x 1 device) on the session's nats-server, loopback only.

Requests spread over both groups, ``dp_rank`` pins win, and once a group's publisher is
stopped (SIGTERM to the process this test started) and its load reports go stale, new
requests all go to the other group and a request pinned to the dead one is answered
``unavailable`` at once."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from dpbus.schemas import Done, Error, Subjects
from dpbus.services.client import generate
from tests.conftest import client_of, start_cluster
from tests.support import service_stats

pytestmark = pytest.mark.e2e

PREFIX = "dpbusrt"  # its own subjects, apart from any other cluster on the session's server
STALE_AFTER = 1.5   # load_stale_after; publishers report every 0.5 s


routed_cluster: list = []  # the module's cluster, for the stats helper


@pytest.fixture(scope="module")
def routed(nats_server, tmp_path_factory):
    c = start_cluster(nats_server, tmp_path_factory.mktemp("dpbus-routing-logs"), dp_size=2, nnodes=2,
                      local_devices=1, prefix=PREFIX,
                      extra={"DPBUS_POLICY": "least_tokens", "DPBUS_LOAD_STALE_AFTER": str(STALE_AFTER),
                             "DPBUS_MAX_PREFILL_TOKENS": "64", "DPBUS_MAX_SEQ_LEN": "512"})
    routed_cluster[:] = [c]
    try:
        yield c
    finally:
        c.stop()


async def ask(nc, request: dict):
    out = await generate(nc, request, subjects=Subjects(PREFIX), timeout=60)
    return out.terminal


async def ingest_stats(nc) -> dict:
    """This module's ingest's stats (other deployments share the NATS server)."""
    (stats,) = await service_stats(routed_cluster[0], "dpbus-ingest", PREFIX, endpoint="generate")
    return stats


def test_requests_spread_over_both_groups_and_pins_win(routed):
    async def main():
        nc = await client_of(routed)
        try:
            free = [{"text": f"spread {i} " + "x" * (5 + 37 * (i % 4)), "sampling": {"max_new_tokens": 2 + i % 9}}
                    for i in range(16)]
            pinned = [{"text": f"pinned {i}", "dp_rank": i % 2, "sampling": {"max_new_tokens": 3}} for i in range(8)]
            answers = await asyncio.gather(*(ask(nc, r) for r in free + pinned))
            return answers, await ingest_stats(nc)
        finally:
            await nc.close()

    answers, stats = asyncio.run(main())
    assert all(isinstance(a, Done) for a in answers), answers
    spread = [a.dp_rank for a in answers[:16]]
    assert min(spread.count(0), spread.count(1)) >= 3, spread
    assert [a.dp_rank for a in answers[16:]] == [i % 2 for i in range(8)]
    assert stats["policy"] == "least_tokens"
    assert stats["dispatched"]["0"] >= 7 and stats["dispatched"]["1"] >= 7, stats
    assert stats["dispatched"]["0"] + stats["dispatched"]["1"] == stats["forwarded"] == 24


def test_a_stopped_group_gets_nothing_new_and_pins_to_it_fail_fast(routed):
    proc = next(p for p in routed.procs if p.name == "publisher-1")
    proc.popen.send_signal(signal.SIGTERM)
    proc.popen.wait(timeout=30)

    async def main():
        nc = await client_of(routed)
        try:
            deadline = time.monotonic() + STALE_AFTER + 5
            while (await ingest_stats(nc))["groups"]["1"]["available"]:
                assert time.monotonic() < deadline, "ingest still counts group 1 as available"
                await asyncio.sleep(0.2)
            free = await asyncio.gather(*(ask(nc, {"text": f"after {i} " * (1 + i % 3),
                                                   "sampling": {"max_new_tokens": 3}}) for i in range(8)))
            t0 = time.monotonic()
            pinned = await ask(nc, {"text": "to the dead group", "dp_rank": 1})
            return free, pinned, time.monotonic() - t0, await ingest_stats(nc)
        finally:
            await nc.close()

    free, pinned, took, stats = asyncio.run(main())
    assert all(isinstance(a, Done) and a.dp_rank == 0 for a in free), free
    assert isinstance(pinned, Error) and pinned.code.value == "unavailable", pinned
    assert "group 1" in pinned.message and "no load report" in pinned.message
    assert took < 1.0, f"the pinned request took {took:.2f}s to be refused"
    assert stats["groups"]["1"]["available"] is False and stats["groups"]["0"]["available"] is True
