"""Shared fixtures: a real nats-server on a free loopback port, and a running dpbus.

XLA's virtual CPU devices must be requested before JAX is imported, so it happens here,
at import time, before any test module imports JAX.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# The tests' own runners compile many small programs once each: without LLVM's optimisations
# that costs ~25% less CPU (test_moe: 76 -> 55 CPU-s on a cold cache). The services the tests
# start run many steps of few programs, where the optimisations pay (the NATS cluster test:
# 60 -> 40 CPU-s with them): ``_jax_compiles_quickly`` gives the flags to this process only.
QUICK_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# every service the tests start keeps what XLA compiled here: deployments of the same shapes
# after the first skip compiling (the suite runs ~30 of them)
os.environ.setdefault("DPBUS_COMPILE_CACHE",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "dpbus-jax"))
# ... and so do the tests' own runners: a test that builds a new runner of shapes compiled
# before (a new jitted function, so JAX's in-memory cache misses) loads them instead (the
# model, checkpoint and family tests: 15% less CPU)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["DPBUS_COMPILE_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import asyncio  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nats  # noqa: E402
import pytest  # noqa: E402

from dpbus.services.bus import NatsAuth  # noqa: E402
from dpbus.services.launcher import Cluster, free_port, nats_server_binary  # noqa: E402
from dpbus.services.natsconf import Credentials, write_config  # noqa: E402


# every prefix a test cluster or stand-in uses on a shared server (permissions are per prefix)
TEST_PREFIXES = ["dpbus", "small", "span", "robust", "dpbusrt", "silent", "move", "deliv", "gap", "lonely",
                 "resend", "diverge", "gw", "gwnone", "gwm", "stop", "once", "ledger", "world"]
CLIENTS = ["client", "alice", "bob"]


class NatsServer:
    """A nats-server process owned by a test; stopped by its PID only.

    Secured as a deployment is (``services/natsconf.py``): one user per role with a fresh
    password, private client inboxes; ``secure=False`` gives an open server."""

    def __init__(self, secure: bool = True, dp_size: int = 2) -> None:
        self.port = free_port()
        self.store = Path(tempfile.mkdtemp(prefix="dpbus-test-nats-"))
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.credentials: Credentials | None = None
        self.argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        if secure:
            conf = self.store / "conf"
            # a worker user for every (group, node rank) the tests' layouts use (up to 8 nodes)
            members = [(g, r) for g in range(dp_size) for r in range(8)]
            self.credentials = write_config(conf, dp_size=dp_size, clients=CLIENTS, prefixes=TEST_PREFIXES,
                                            members=members,
                                            listen=f"127.0.0.1:{self.port}", http=None,
                                            store_dir=str(self.store / "js"), url=self.url)
            self.argv = [nats_server_binary(), "-c", str(conf / "nats.conf")]
        self.log = self.store / "server.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start on port {self.port}")

    def auth(self, user: str = "client") -> NatsAuth:
        if self.credentials is None:
            return NatsAuth()
        name, password = self.credentials.user(user)
        return NatsAuth(name, password)

    def settings(self, user: str) -> dict:
        """The connection part of a service's settings, as ``user`` (ingest: and the user
        it answers clients as)."""
        auth = self.auth(user)
        out = {"nats_url": self.url, "nats_user": auth.user, "nats_password": auth.password}
        if user == "ingest" and self.credentials is not None:
            out["answer_nats_password"] = self.auth("ingest-answers").password
        return out

    async def connect(self, user: str = "client", **kw):
        """A nats-py connection as ``user`` (quiet about its errors unless given error_cb)."""
        async def quiet(_: Exception) -> None:
            return None

        kw.setdefault("error_cb", quiet)
        return await nats.connect(self.url, **self.auth(user).kwargs(self.url), **kw)

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


def start_cluster(server: NatsServer, log_dir: Path, **kw) -> Cluster:
    """Start a dpbus Cluster on ``server``, each service as its role's user; the caller stops it.

    Without warm-up unless ``extra`` asks for it: each shape is then compiled (or read from
    the tests' compile cache) when a step first needs it, which halves a deployment's
    start-up (measured: 2 groups ready in 4.2 s and 5 s of CPU instead of 7 s and 11 s)
    and leaves warm-up to the tests of warm-up and compile counts."""
    kw["extra"] = {"DPBUS_WARMUP": "false", **kw.get("extra", {})}
    c = Cluster(nats_url=server.url, credentials=server.credentials, log_dir=log_dir, say=lambda _: None, **kw)
    try:
        asyncio.run(c.start(timeout=300))
    except BaseException:
        c.stop()
        raise
    return c


# what the shared 2 x 2 cluster runs with (tests build references from the same numbers)
CLUSTER_SETTINGS = {"DPBUS_MAX_PREFILL_TOKENS": "64", "DPBUS_MAX_SEQ_LEN": "512",
                    "DPBUS_WARMUP": "true"}  # test_engine_e2e counts what warm-up compiled


@pytest.fixture(scope="session", autouse=True)
def _jax_compiles_quickly():
    """XLA reads its flags once, when JAX's backend starts: start it here with QUICK_COMPILE,
    then take the flags back out of the environment the services inherit."""
    plain = os.environ["XLA_FLAGS"]
    if "xla_backend_optimization_level" not in plain:
        os.environ["XLA_FLAGS"] = plain + QUICK_COMPILE
        try:
            import jax

            jax.devices()
        finally:
            os.environ["XLA_FLAGS"] = plain
    yield


@pytest.fixture(scope="session")
def cluster(nats_server, tmp_path_factory):
    """dpbus with 2 DP groups, each one worker process with 2 devices, on the session's NATS:
    one for every module of a pytest process that only sends it requests (a test that kills
    or stops a service starts its own)."""
    c = start_cluster(nats_server, tmp_path_factory.mktemp("dpbus-logs"), dp_size=2, nnodes=2, local_devices=2,
                      extra=dict(CLUSTER_SETTINGS))
    yield c
    c.stop()


async def client_of(cluster: Cluster, user: str = "client", **kw):
    """A nats-py connection to ``cluster``'s server as ``user`` (a client by default)."""
    async def quiet(_: Exception) -> None:
        return None

    kw.setdefault("error_cb", quiet)
    return await nats.connect(cluster.nats_url, **cluster.auth(user).kwargs(cluster.nats_url), **kw)


def lines_until_ready(proc: subprocess.Popen, timeout: float = 300.0) -> list[str]:
    """What `dpbus up` (started with stdout piped, text mode) prints up to its "dpbus ready"
    line; fails with everything it printed if it exits or says nothing of the kind in time."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "dpbus up exited early:\n" + "".join(lines)
        lines.append(line)
        if line.startswith("dpbus ready"):
            return lines
    raise AssertionError("dpbus up was not ready in time:\n" + "".join(lines))


@pytest.fixture(scope="module", autouse=True)
def _cpu_per_module(request):
    """With DPBUS_TEST_CPU_LOG=FILE: each module's wall time and CPU seconds (this process's
    and its services', counted when they are reaped) appended to FILE, to find what makes
    the suite slow on a machine that is CPU-bound."""
    where = os.environ.get("DPBUS_TEST_CPU_LOG")
    if not where:
        yield
        return
    import resource

    def cpu(who: int) -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    t0, own0, kids0 = time.monotonic(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    yield
    with open(where, "a") as f:
        f.write(f"{request.module.__name__}\t{time.monotonic() - t0:.1f}\t{cpu(resource.RUSAGE_SELF) - own0:.1f}\t"
                f"{cpu(resource.RUSAGE_CHILDREN) - kids0:.1f}\n")
