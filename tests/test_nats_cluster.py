"""A NATS cluster of 3 servers loses one server (SIGKILL, mid-load) and no request.

dpbus runs on an embedded 3-server cluster (``Cluster(nats_cluster=3)``: routes with their
own password, JetStream and the request ledger replicated 3 times, ``sync_interval: always``);
its services prefer different servers, and so do the three clients. The server that ingest
does not use is SIGKILLed while requests stream (SIGTERM would let it hand over cleanly),
restarted a few seconds later, and the cluster must be whole again. Then, listening past
the publisher time-out after the last terminal answer: every accepted request got exactly
one terminal and nothing after it, and no client on a surviving server missed an answer.

Core NATS delivers at most once: what a service wrote to the killed server and the server
had not yet handled is gone. Terminal answers are therefore confirmed and, if lost with
the connection, sent again (``bus.ClientOutbox``); ledger writes whose answers are lost
while the bucket elects a new leader are read back (``dpbus.services.ownership``)."""

from __future__ import annotations

import asyncio
import signal

import nats
import pytest

from dpbus.services import bus
from dpbus.services.launcher import Cluster, wait_nats_cluster
from dpbus.services.ledger import Ledger, bucket_name
from tests.test_chaos import SETTINGS, Load, assert_nothing_lost, serving

VICTIM = 1  # the server killed: publisher-0 and worker-1 prefer it, ingest does not


class ClusterLoad(Load):
    async def open_ledger(self, admin) -> Ledger:
        """The replicated bucket the services made (bound, not created)."""
        return Ledger(await admin.jetstream().key_value(bucket_name("dpbus")))


class Via:
    """What ``Load.report`` needs of a server: an admin connection (to read the ledger)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def connect(self, user: str):
        return await connect(self.cluster, user, first=0)


async def connect(cluster: Cluster, user: str, first: int):
    """A connection as ``user`` to every server of ``cluster``, trying server ``first`` first."""
    async def quiet(_: Exception) -> None:
        return None

    urls = bus.servers(cluster.nats_url)
    order = urls[first:] + urls[:first]
    return await nats.connect(servers=order, dont_randomize=True, reconnect_time_wait=0.3,
                              max_reconnect_attempts=-1, error_cb=quiet,
                              **cluster.auth(user).kwargs(cluster.nats_url))


def server_of(nc) -> int:
    return nc.connected_url.port


def start(cluster: Cluster) -> None:
    try:
        asyncio.run(cluster.start(timeout=300))
    except BaseException:
        cluster.stop()
        raise


def test_up_and_demo_take_nats_cluster():
    from dpbus.services.cli import cluster_from, parser

    for command in ("up", "demo"):
        c = cluster_from(parser().parse_args([command, "--nats-cluster", "3", "--nnodes", "2"]))
        assert c.nats_cluster == 3
        c.stop()


@pytest.mark.e2e
async def test_a_cluster_loses_a_server_and_no_request(tmp_path):
    cluster = Cluster(dp_size=2, nnodes=2, local_devices=1, nats_cluster=3, log_dir=tmp_path,
                      extra=dict(SETTINGS), say=lambda _: None)
    await asyncio.to_thread(start, cluster)
    ports = [int(u.rsplit(":", 1)[1]) for u in bus.servers(cluster.nats_url)]
    try:
        clients = [await connect(cluster, "client", first=i) for i in range(3)]
        assert [server_of(nc) for nc in clients] == ports  # one client on each server
        loads = [ClusterLoad(nc, tag=f"on{i}") for i, nc in enumerate(clients)]
        # a request in flight through the server that dies may be lost (its client is not held to
        # the rule): waiting as long for it as for the others would only add idle time
        running = [asyncio.create_task(load.run(150, every=0.1, timeout=20 if i == VICTIM else 60))
                   for i, load in enumerate(loads)]
        await asyncio.sleep(3.0)
        victim = next(p for p in cluster.procs if p.name == f"nats-server-{VICTIM}")
        victim.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.popen.wait, 10)
        await asyncio.sleep(6.0)  # past the ledger's new leader: requests are accepted meanwhile
        cluster.restart(victim.name)  # same ports, same store
        await asyncio.gather(*running)
        await wait_nats_cluster(cluster.nats_url, cluster.auth("sys"), cluster.auth("admin"))
        back = [await serving(nc, 60) for nc in clients]
        reports = [await load.report(Via(cluster)) for load in loads]
        for nc in clients:
            await nc.close()
    finally:
        problems = cluster.stop()
    print("\nNATS cluster of 3, one server SIGKILLed mid-load and restarted:")
    for i, report in enumerate(reports):
        print(f"  client on server {i}{' (killed)' if i == VICTIM else ''}: {report}")
        for rid, got, entry in report["lost_examples"]:
            print(f"    lost {rid}: got {got}; ledger: {entry}")
    for i, report in enumerate(reports):
        assert report["more_than_one_terminal"] == 0 and report["after_terminal"] == 0, report
        if i != VICTIM:  # a client on a surviving server receives every answer
            assert_nothing_lost(report)
            assert report.get("never_reached_a_group", 0) == 0, report
    assert all(back), back
    assert not problems, problems
