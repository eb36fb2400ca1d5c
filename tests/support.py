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
