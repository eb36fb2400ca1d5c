"""Shared fixtures: a real nats-server on a free loopback port, and a running dpbus.

XLA's virtual CPU devices must be requested before JAX is imported, so it happens here,
at import time, before any test module imports JAX.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import asyncio  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from services.launcher import Cluster, free_port, nats_server_binary  # noqa: E402


class NatsServer:
    """A nats-server process owned by a test; stopped by its PID only."""

    def __init__(self) -> None:
        self.port = free_port()
        self.store = Path(tempfile.mkdtemp(prefix="dpbus-test-nats-"))
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_server():
    server = NatsServer()
    server.start()
    yield server
    server.cleanup()


def start_cluster(nats_url: str, log_dir: Path, **kw) -> Cluster:
    """Start a dpbus Cluster on ``nats_url``; the caller stops it."""
    c = Cluster(nats_url=nats_url, log_dir=log_dir, say=lambda _: None, **kw)
    try:
        asyncio.run(c.start(timeout=300))
    except BaseException:
        c.stop()
        raise
    return c


# what the shared 2 x 2 cluster runs with (tests build references from the same numbers)
CLUSTER_SETTINGS = {"DPBUS_MAX_PREFILL_TOKENS": "64", "DPBUS_MAX_SEQ_LEN": "512"}


@pytest.fixture(scope="module")
def cluster(nats_server, tmp_path_factory):
    """dpbus with 2 DP groups, each one worker process with 2 devices, on the session's NATS."""
    c = start_cluster(nats_server.url, tmp_path_factory.mktemp("dpbus-logs"), dp_size=2, nnodes=2, local_devices=2,
                      extra=dict(CLUSTER_SETTINGS))
    yield c
    c.stop()
