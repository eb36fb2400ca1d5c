"""Helpers several test modules share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path



def processes_using(nats_url: str) -> list[int]:
    """PIDs of processes configured with ``nats_url`` or serving its port (scan of /proc)."""
    port = nats_url.rsplit(":", 1)[1]
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"DPBUS_NATS_URL={nats_url}".encode() in env or (b"nats-server" in cmd and f"\0{port}\0".encode() in cmd):
            found.append(int(d.name))
    return found


def port_open(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


async def service_docs(cluster, service: str, prefix: str) -> list[dict]:
    """The nats.micro STATS of every ``service`` instance serving ``prefix`` (other
    deployments share the tests' NATS server), asked as the operator: whole documents,
    ``metadata`` and ``endpoints``."""
    from dpbus.services import bus
    from tests.conftest import client_of

    nc = await client_of(cluster, "operator")
    try:
        return await bus.service_stats(nc, service, prefix)
    finally:
        await nc.close()


async def service_stats(cluster, service: str, prefix: str, endpoint: str | None = None) -> list[dict]:
    """The stats of ``endpoint`` (the first one by default) of every ``service`` instance
    serving ``prefix``."""
    return [next(e for e in doc["endpoints"] if endpoint in (None, e["name"]))["data"]
            for doc in await service_docs(cluster, service, prefix)]
