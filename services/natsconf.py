"""The NATS server configuration and its per-role users, derived from the subjects.

Every permission below is built from ``dpbus.schemas.subjects.Subjects`` for the configured
prefix(es) and the deployment's layout, never copied by hand: ``dpbus nats-config``
writes the files, ``dpbus up`` writes a fresh set for each run, and the files shipped in
``infra/nats/`` are this module's output for compose's layout (a test compares).

Users, one per role (``g`` = a DP group):

=================  ==========================================================================
``client``, ...    client applications; each may publish requests and aborts only on its own
                   subjects (``dpbus.generate.<name>``, ``dpbus.abort.<name>``; ``client``
                   also on the plain ones) and read only its own inbox ``_INBOX.<name>.>``:
                   the server vouches who sent a request and nobody reads another's answers
``gateway``        the HTTP front: a client of the bus like any other
``ingest``         routes requests to groups; asks publishers what they hold; the ledger
``ingest-answers`` ingest's second connection: answers clients, may publish nothing else
``publisher-g``    schedules group g, sends its steps, answers clients, moves requests
                   to other groups' ``submit``
``worker-g-r``     worker r (a member of group g): runs group g's steps, answers them and
                   beats on its own subjects only (no member speaks for another)
``node-g``         ``publisher-g`` + a worker of group g in one process (``dpbus node`` on the leader)
``operator``       watches: load reports, ``$SRV`` discovery and stats (``dpbus up`` uses it)
``admin``          everything
``sys``            the server's system account (monitoring of the server itself)
=================  ==========================================================================

Services publish answers to every client inbox (they answer reply subjects carried
inside internal messages, which ``allow_responses`` cannot follow); everyone else
answers only the requests it received (``allow_responses``).

Accounts: every client (``gateway`` included) has a NATS account of its own,
``CLIENT_<name>``; the services, ``operator`` and ``admin`` share ``DPBUS``. A client's
account exports to ``DPBUS`` only the subjects that client may publish (its requests,
aborts and ``$SRV`` discovery pings) and imports from it only its own inbox
``_INBOX.<name>.>``: nothing else of the services' account exists for it, so a reply
subject it names can only ever lead back into its own inbox, and the server, not the
message, says which client a request came from (the account it crossed over from). The
account also carries the client's own limits (``Limits.client_*``): connections,
subscriptions per connection and message size. Stream imports keep reply subjects as
they are, so answers need no per-request state in the server (service imports would
rewrite them to ``_R_`` subjects that expire after a silence).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from dpbus.schemas.subjects import Subjects

INBOX_ROOT = "_INBOX"
SERVICE_ROLES = ("ingest", "publisher", "worker", "node")
RESERVED = re.compile(r"^(ingest|gateway|operator|admin|sys|publisher|worker|node)(-.*)?$")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DISCOVERY = ["$SRV.PING", "$SRV.PING.>", "$SRV.INFO", "$SRV.INFO.>"]
DEFAULT_CLIENT = "client"  # the client whose requests may come on the plain subjects


def inbox_prefix(user: str) -> str:
    """Where ``user`` receives answers and replies; the only inbox it may subscribe to."""
    return f"{INBOX_ROOT}.{user}"


def user_for(role: str, group: int | None = None) -> str:
    """The user name of a service role (``worker`` of group 1 -> ``worker-1``)."""
    return f"{role}-{group}" if role in ("publisher", "worker", "node") else role


@dataclass
class Permissions:
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    allow_responses: bool = False

    def __or__(self, other: "Permissions") -> "Permissions":
        def union(a: list[str], b: list[str]) -> list[str]:
            return [*a, *(x for x in b if x not in a)]

        return Permissions(union(self.publish, other.publish), union(self.subscribe, other.subscribe),
                           self.allow_responses or other.allow_responses)


def _publisher(s: Subjects, g: int, dp_size: int) -> Permissions:
    return Permissions(
        publish=[s.step(g), s.load(g),
                 *(s.submit(x) for x in range(dp_size) if x != g),  # moving a request elsewhere
                 *(s.group_abort(x) for x in range(dp_size) if x != g),  # and an abort after it
                 f"{INBOX_ROOT}.>"],  # chunks and terminal answers to every client
        subscribe=[s.submit(g), s.group_abort(g), s.results(g), s.heartbeats(g), s.replay(g)],
    )


def _worker(s: Subjects, g: int, r: int | str) -> Permissions:
    """Member ``r`` of group ``g`` (``r`` "*": any member, for the group's leader host,
    which runs the group's publisher and so decides everything about the group anyway)."""
    return Permissions(
        publish=[s.result(g, r), s.heartbeat(g, r), s.replay(g)],
        subscribe=[s.step(g), s.all_heartbeats, s.worker_status(g, "*")],  # (a world watches all members)
        allow_responses=True,
    )


def member_user(group: int, node_rank: int) -> str:
    """The NATS user of worker ``node_rank`` (a member of ``group``): ``worker-<g>-<r>``."""
    return f"worker-{group}-{node_rank}"


def ledger_access(prefix: str, group: int | None = None) -> Permissions:
    """What a user of the request ledger (``services/ledger.py``, a JetStream KV bucket)
    needs, for that bucket only: create/look up its stream, read, write and watch keys.
    ``group``: a publisher of that group writes its own group's request entries and leases
    only (no publisher settles, takes over or renews another group's); ingest (None) any
    key, names included.
    Replies come to the user's own inbox (granted to everyone)."""
    from dpbus.services.ledger import bucket_name

    bucket = bucket_name(prefix)
    stream = f"KV_{bucket}"
    writes = [f"$KV.{bucket}.>"] if group is None else [f"$KV.{bucket}.r.{group}.>", f"$KV.{bucket}.lease.{group}.>"]
    return Permissions(publish=[
        *writes,
        f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",  # flow control of a watch
    ])


def _ingest(s: Subjects, dp_size: int) -> Permissions:
    """Ingest's main connection: no client inbox (its answers go as ``ingest-answers``)."""
    groups = range(dp_size)
    return Permissions(
        publish=[*(s.submit(g) for g in groups), *(s.group_abort(g) for g in groups)],
        subscribe=[s.generate, s.all_generate, s.abort, s.all_abort, s.all_loads],
    )


ANSWERS = Permissions(publish=[f"{INBOX_ROOT}.>"])  # answering clients, and nothing else


def is_client(user: str) -> bool:
    """Whether ``user`` is a client application (``gateway`` is one): an account of its own."""
    return user == "gateway" or not RESERVED.match(user)


def client_account(user: str) -> str:
    return f"CLIENT_{user}"


def _client(s: Subjects, user: str) -> Permissions:
    """A client publishes requests only on its own subjects (so the subject a request comes
    on says who sent it: ``services/identity.py``); the default client also on the plain ones."""
    own = [s.generate_for(user), s.abort_for(user)]
    return Permissions(publish=[s.generate, s.abort, *own] if user == DEFAULT_CLIENT else own)


def permissions(user: str, prefixes: list[str], dp_size: int) -> Permissions:
    """What ``user`` may publish and subscribe to, for every prefix in ``prefixes``."""
    if user == "admin":
        return Permissions([">"], [">"])
    kind, _, rank = user.partition("-")
    g = int(rank) if rank.isdigit() and kind in ("publisher", "node") else None
    member = re.fullmatch(r"(\d+)-(\d+)", rank) if kind == "worker" else None
    if member:
        g = int(member.group(1))
    out = Permissions()
    for prefix in prefixes:
        s = Subjects(prefix)
        if kind == "ingest" and not rank:
            out = out | _ingest(s, dp_size) | ledger_access(prefix)
        elif user == "ingest-answers":
            out = out | ANSWERS
        elif kind == "publisher" and g is not None:
            out = out | _publisher(s, g, dp_size) | ledger_access(prefix, g)
        elif member:
            out = out | _worker(s, g, int(member.group(2)))
        elif kind == "node" and g is not None:
            out = out | _publisher(s, g, dp_size) | ledger_access(prefix, g) | _worker(s, g, "*")
        elif user == "operator":
            out = out | Permissions(publish=["$SRV.>"], subscribe=[s.all_loads])
        else:  # a client application (the gateway is one)
            out = out | _client(s, user)
    service = kind in SERVICE_ROLES and (g is not None or user == "ingest")
    if service:
        out = out | Permissions(subscribe=["$SRV.>"], allow_responses=True)  # nats.micro discovery
    elif user not in ("operator", "ingest-answers"):
        out = out | Permissions(publish=list(DISCOVERY))
    # everyone's own inbox: replies to its requests (and a client's answers)
    return out | Permissions(subscribe=[inbox_prefix(user) + ".>"])


def layout_members(dp_size: int, nnodes: int | None = None) -> list[tuple[int, int]]:
    """(group, node rank) of every worker of a layout (``nnodes`` defaults to ``dp_size``)."""
    from dpbus.services.topology import place_node

    nnodes = nnodes or dp_size
    return [(place_node(r, nnodes, dp_size).dp_rank, r) for r in range(nnodes)]


def layout_users(dp_size: int, clients: list[str], members: list[tuple[int, int]] | None = None) -> list[str]:
    """Every user a deployment of ``dp_size`` groups needs, clients last: ``members`` are
    the (group, node rank) of its workers (default: one per group), each its own user."""
    for c in clients:
        if not NAME.match(c) or RESERVED.match(c):
            raise ValueError(f"client name {c!r}: use letters, digits, '-' or '_', and not a role's name "
                             "(ingest, gateway, operator, admin, sys, publisher-N, worker-N, node-N)")
    groups = range(dp_size)
    members = members if members is not None else layout_members(dp_size)
    return ["ingest", "ingest-answers", *(f"publisher-{g}" for g in groups), *(member_user(g, r) for g, r in members),
            *(f"node-{g}" for g in groups), "gateway", "operator", "admin", *clients]


def new_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str) -> str:
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


def check_password(password: str, hashed: str) -> bool:
    import bcrypt

    return bcrypt.checkpw(password.encode(), hashed.encode())


# Passwords that examples, defaults and habit put in configs: whoever has read one can log
# in with it. `dpbus nats-config` will not write them and services will not connect with
# them (services/bus/auth.py). Compared without case, spaces, '-', '_' or '.'.
PLACEHOLDER_PASSWORDS = frozenset({
    "changeme", "changeit", "changethis", "replaceme", "password", "passwd", "pass", "passw0rd", "pwd",
    "secret", "s3cret", "s3cr3t", "admin", "administrator", "root", "toor", "guest", "user", "default",
    "test", "testing", "example", "sample", "placeholder", "nats", "dpbus", "letmein", "welcome", "qwerty",
    "123456", "12345678", "123456789", "0000", "1234", "xxx", "foo", "bar", "foobar", "none", "null",
})


def _folded(password: str) -> str:
    return re.sub(r"[\s_.-]", "", password).lower()


def placeholder(password: str, user: str = "") -> str:
    """Why ``password`` is no secret ("" when it may be one): empty, a known placeholder,
    or the user's own name. The reason never contains the password unless it is public."""
    folded = _folded(password)
    if not folded:
        return "an empty password"
    if folded in PLACEHOLDER_PASSWORDS:
        return f"the placeholder password {password.strip()!r}"
    if user and folded == _folded(user):
        return "the user's own name as password"
    return ""


def refuse_placeholders(passwords: dict[str, str]) -> None:
    """ValueError naming every user of ``passwords`` whose password is a placeholder."""
    reasons: dict[str, list[str]] = {}
    for user, password in sorted(passwords.items()):
        if why := placeholder(password, user):
            reasons.setdefault(why, []).append(user)
    if reasons:
        said = "; ".join(f"{why} for {', '.join(users)}" for why, users in reasons.items())
        raise ValueError(f"refusing {said}: anyone who has read an example could log in as them. Leave --password "
                         "out for random passwords (written to credentials.json and compose.env)")


# ---- rendering ----------------------------------------------------------------------------
def _list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def new_nkey() -> tuple[str, str]:
    """A fresh user nkey: (seed, public key)."""
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode(), nkeys.from_seed(bytearray(seed)).public_key.decode()


def _user_entry(user: str, p: Permissions, hashes: dict[str, str], nkeys: dict[str, str],
                indent: str) -> list[str]:
    who = [f"{indent}  nkey: {json.dumps(nkeys[user])}  # {user}"] if user in nkeys else [
        f"{indent}  user: {json.dumps(user)}", f"{indent}  password: {json.dumps(hashes[user])}"]
    lines = [
        f"{indent}{{",
        *who,
        f"{indent}  permissions: {{",
        f"{indent}    publish: {{ allow: {_list(p.publish)} }}",
        f"{indent}    subscribe: {{ allow: {_list(p.subscribe)} }}",
    ]
    if p.allow_responses:
        lines.append(f"{indent}    allow_responses: true")
    return lines + [f"{indent}  }}", f"{indent}}}"]


def render_auth(users: list[str], hashes: dict[str, str], prefixes: list[str], dp_size: int,
                sys_hash: str, nkeys: dict[str, str] | None = None, limits: Limits | None = None) -> str:
    """``hashes``: user -> bcrypt hash; ``nkeys``: user -> public nkey (instead of a password)."""
    nkeys = nkeys or {}
    limits = limits or Limits()
    services = [u for u in users if not is_client(u)]
    clients = {u: permissions(u, prefixes, dp_size) for u in users if is_client(u)}
    lines = [
        "# dpbus NATS users, one per role: written by `dpbus nats-config`; do not edit by hand",
        "# (regenerate instead, so the permissions keep matching schemas/subjects.py).",
        f"# layout: dp_size {dp_size}; prefixes {', '.join(prefixes)}. Passwords are bcrypt hashes;",
        "# the clear passwords (or nkey seeds) are in credentials.json next to this file (keep it secret).",
        "# Each client has an account of its own (CLIENT_<name>): it reaches the services' account",
        "# DPBUS only through the subjects it exports, and hears back only on its own inbox.",
        "",
        "accounts {",
        "  DPBUS {",
        "    jetstream: enabled",
        "    users: [",
    ]
    for user in services:
        lines += _user_entry(user, permissions(user, prefixes, dp_size), hashes, nkeys, "      ")
    lines.append("    ]")
    if clients:
        lines.append("    imports: [  # what each client may send in")
        for user, p in clients.items():
            for subject in p.publish:
                lines.append(f"      {{ stream: {{ account: {client_account(user)}, subject: {json.dumps(subject)} }} }}")
        lines += ["    ]", "    exports: [  # and where it hears back"]
        for user in clients:
            lines.append(f"      {{ stream: {json.dumps(inbox_prefix(user) + '.>')}, accounts: [{client_account(user)}] }}")
        lines.append("    ]")
    lines.append("  }")
    for user, p in clients.items():
        lines += [
            f"  {client_account(user)} {{",
            "    users: [",
            *_user_entry(user, p, hashes, nkeys, "      "),
            "    ]",
            f"    exports: [ {', '.join(f'{{ stream: {json.dumps(x)}, accounts: [DPBUS] }}' for x in p.publish)} ]",
            f"    imports: [ {{ stream: {{ account: DPBUS, subject: {json.dumps(inbox_prefix(user) + '.>')} }} }} ]",
            f"    limits: {{ max_connections: {limits.client_connections}, "
            f"max_subscriptions: {limits.client_subscriptions}, max_payload: {_size_text(limits.client_payload or limits.max_payload)} }}",
            "  }",
        ]
    lines += [
        "  SYS {",
        f"    users: [ {{ user: \"sys\", password: {json.dumps(sys_hash)} }} ]",
        "  }",
        "}",
        "system_account: SYS",
        "",
    ]
    return "\n".join(lines)


KB = 1024
MB = 1024 * KB
MAX_PAYLOAD_CEILING = 64 * MB  # nats-server refuses a max_payload above its max_pending (64 MB)


@dataclass
class Limits:
    """What the server lets connections hold. A server configured from files (no JWT)
    has no per-user limits: a user entry takes only a password or nkey, permissions and
    connection types, while ``limits`` exist per account. The server's own limits apply
    to every connection alike:

    ``max_connections``   connections to the server, all users together (a new one past
                          it is refused with "maximum connections exceeded")
    ``max_subscriptions`` subscriptions of one connection (0: no limit); one past it is
                          refused with "maximum subscriptions exceeded", the connection stays
    ``max_payload``       bytes of one message; a bigger one closes the sender's connection

    and each client's account (one per client, see the module's docs) has its own:

    ``client_connections``   connections of that client at once (past it: "maximum account
                             active connections exceeded"), so that no client holds the
                             server's whole ``max_connections``
    ``client_subscriptions`` subscriptions of one of its connections (0: no limit)
    ``client_payload``       bytes of one of its messages (at most ``max_payload``, which
                             is what 0 means)

    The defaults let a single client use the whole system: dpbus's own clients hold one
    connection each and one subscription per request in flight, services a handful each
    (past ``max_connections`` the server's limit is the one that bites)."""

    max_connections: int = 4096
    max_subscriptions: int = 65536
    max_payload: int = 8 * MB
    client_connections: int = 256
    client_subscriptions: int = 65536
    client_payload: int = 0  # 0: max_payload

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        if self.max_subscriptions < 0:
            raise ValueError(f"max_subscriptions must be 0 (no limit) or more, not {self.max_subscriptions}")
        if not 1 <= self.max_payload <= MAX_PAYLOAD_CEILING:
            raise ValueError(f"max_payload must be between 1 byte and 64MB, not {self.max_payload} bytes")
        if self.client_connections < 1:
            raise ValueError(f"client_connections must be at least 1, not {self.client_connections}")
        if self.client_subscriptions < 0:
            raise ValueError(f"client_subscriptions must be 0 (no limit) or more, not {self.client_subscriptions}")
        if not 0 <= self.client_payload <= self.max_payload:
            raise ValueError(f"client_payload must be between 1 byte and max_payload ({_size_text(self.max_payload)}), "
                             f"not {self.client_payload} bytes")


def size(text: str | int) -> int:
    """Bytes from ``8MB``, ``512KB`` or a plain number (units of 1024, as nats-server reads them)."""
    m = re.fullmatch(r"\s*(\d+)\s*(B|KB|MB|)\s*", str(text), re.I)
    if not m:
        raise ValueError(f"size {text!r}: give bytes, or a number with KB or MB")
    return int(m.group(1)) * {"": 1, "B": 1, "KB": KB, "MB": MB}[m.group(2).upper()]


def _size_text(n: int) -> str:
    for unit, scale in (("MB", MB), ("KB", KB)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


MONITOR = "127.0.0.1:8222"  # the server's HTTP monitoring, unless asked otherwise


def monitor_address(http: str | None) -> str | None:
    """Where the HTTP monitoring listens (None: nowhere). ``host:port`` stays as given; a
    bare port or ``:port`` gets 127.0.0.1, where nats-server would take the client listen
    address (often 0.0.0.0)."""
    if not http:
        return None
    host, sep, port = http.rpartition(":")
    if not sep:
        host, port = "", http
    if not port.isdigit():
        raise ValueError(f"monitoring address {http!r}: give host:port or a port")
    return f"{host or '127.0.0.1'}:{port}"


def loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass
class Tls:
    """Server-side TLS: files as the server will see them (paths relative to the config work)."""

    ca: str
    cert: str
    key: str
    verify: bool = False  # also require client certificates signed by the CA


@dataclass
class Peer:
    """One server of a NATS cluster: its name, where clients and other servers reach it
    (``host:port`` each), its monitoring address and its own JetStream store."""

    name: str
    listen: str
    route: str
    http: str | None = None
    store_dir: str = "jetstream"

    @property
    def conf(self) -> str:
        return f"{self.name}.conf"


ROUTE_USER = "route"


def render_cluster(me: Peer, peers: list[Peer], route_password: str, name: str = "dpbus",
                   route_hash: str = "") -> str:
    """The ``cluster`` block of ``me``: routes to every other peer, each authenticated with
    the route user's password (routes are never open). ``route_hash``: what the server
    checks instead of the clear password (a bcrypt hash); an empty ``route_password`` then
    leaves the credentials out of the route URLs (a sealed config: no route can join)."""
    port = me.route.rsplit(":", 1)[-1]
    listen = me.route if me.route.startswith("127.") else f"0.0.0.0:{port}"
    who = f"{ROUTE_USER}:{route_password}@" if route_password else ""
    routes = [f"nats-route://{who}{p.route}" for p in peers if p.name != me.name]
    return "\n".join([
        "cluster {",
        f"  name: {json.dumps(name)}",
        f"  listen: {json.dumps(listen)}",
        f"  authorization {{ user: {json.dumps(ROUTE_USER)}, password: {json.dumps(route_hash or route_password)}, "
        "timeout: 2 }",
        f"  routes: {_list(routes)}",
        "}",
    ])


def render_server(listen: str, http: str | None, store_dir: str, tls: Tls | None = None,
                  cluster: str = "", server_name: str = "dpbus-nats", conf: str = "nats.conf",
                  limits: Limits | None = None) -> str:
    limits = limits or Limits()
    http = monitor_address(http)
    lines = [
        "# dpbus NATS server: written by `dpbus nats-config`. JetStream, per-role users (auth.conf).",
        f"# Check it with:  nats-server -t -c {conf}   (from this directory)",
        "",
        f"server_name: {server_name}",
        f"listen: {json.dumps(listen)}",
    ]
    if http:
        lines += [
            "# HTTP monitoring has no authentication, and /connz and /subsz list every connection's",
            "# user, subjects and inbox: keep it on loopback (the system account `sys` sees the same",
            "# through $SYS.REQ.SERVER.PING.CONNZ, behind its password).",
            f"http: {json.dumps(http)}",
        ]
    lines += [
        "# limits of every connection alike; each client's account has its own too (auth.conf)",
        f"max_payload: {_size_text(limits.max_payload)}",
        f"max_connections: {limits.max_connections}  # all users together",
        f"max_subscriptions: {limits.max_subscriptions}  # per connection{' (0: no limit)' if not limits.max_subscriptions else ''}",
        'ping_interval: "20s"',
        "ping_max: 3",
        'write_deadline: "10s"',
        "",
        "jetstream {",
        f"  store_dir: {json.dumps(store_dir)}  # relative: where the server is started",
        "  max_memory_store: 256MB",
        "  max_file_store: 4GB",
        "  sync_interval: always  # fsync every write: no acknowledged write lost to a power cut",
        "}",
    ]
    if tls:
        lines += [
            "",
            "tls {",
            f"  ca_file: {json.dumps(tls.ca)}",
            f"  cert_file: {json.dumps(tls.cert)}",
            f"  key_file: {json.dumps(tls.key)}",
            f"  verify: {'true' if tls.verify else 'false'}",
            "  timeout: 2",
            "}",
        ]
    if cluster:
        lines += ["", cluster]
    lines += ["", 'include "auth.conf"', ""]
    return "\n".join(lines)


@dataclass
class Credentials:
    """Who connects as whom: what ``dpbus nats-config`` and ``dpbus up`` write next to the
    server config (``credentials.json``, mode 0600) and services read with ``--nats-credentials``."""

    url: str = ""
    passwords: dict[str, str] = field(default_factory=dict)
    tls_ca: str = ""
    nkey_seeds: dict[str, str] = field(default_factory=dict)  # user -> file holding its nkey seed

    def save(self, path: Path) -> None:
        _write_private(Path(path), json.dumps({"url": self.url, "passwords": self.passwords, "tls_ca": self.tls_ca,
                                               "nkey_seeds": self.nkey_seeds}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> "Credentials":
        raw = json.loads(Path(path).read_text())
        return cls(raw.get("url", ""), dict(raw.get("passwords", {})), raw.get("tls_ca", ""),
                   dict(raw.get("nkey_seeds", {})))

    def user(self, name: str) -> tuple[str, str]:
        """(name, password); the password is empty for an nkey user (see ``nkey_seeds``)."""
        if name not in self.passwords and name not in self.nkey_seeds:
            have = sorted({*self.passwords, *self.nkey_seeds})
            raise ValueError(f"no credentials for NATS user {name!r} (have: {', '.join(have)})")
        return name, self.passwords.get(name, "")


def _write_private(path: Path, text: str) -> None:
    """Write a secret file only its owner may read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


SEALED_NOTE = ("# SEALED: every password of this config was thrown away when it was written, so nobody can\n"
               "# log in. Write your own with `dpbus nats-config --out DIR` (random passwords).\n")


def write_config(out: Path, *, dp_size: int, clients: list[str], prefixes: list[str],
                 passwords: dict[str, str] | None = None, listen: str = "0.0.0.0:4222",
                 http: str | None = MONITOR, store_dir: str = "jetstream", tls: Tls | None = None,
                 url: str = "", existing_hashes: dict[str, str] | None = None, cluster: str = "",
                 nkey_users: bool = False, peers: list[Peer] | None = None, limits: Limits | None = None,
                 sealed: bool = False, nnodes: int | None = None, members: list[tuple[int, int]] | None = None) -> Credentials:
    """Write ``nats.conf``, ``auth.conf``, ``credentials.json`` and ``compose.env`` into ``out``,
    and ``hosts/<user>.json``: one credentials file per user, holding only what the process
    connecting as that user needs (copy each host only its own).

    ``passwords`` fixes some users' passwords (the rest are random; a known placeholder is
    refused with ValueError); ``existing_hashes`` are kept for users whose password still
    matches them (so regenerating with the same passwords changes nothing). ``nkey_users``:
    every user but ``sys`` authenticates with an nkey instead, its seed in ``out/nkeys/<user>.nk``.

    ``peers``: a NATS cluster; one ``<peer>.conf`` each (instead of ``nats.conf``), sharing
    ``auth.conf``; their routes authenticate with the password of ``route``.

    ``http``: the monitoring address (a bare port binds 127.0.0.1; None: no monitoring).
    ``sealed``: write the server files only, every password random and thrown away (no
    credentials.json, no compose.env, no password in route URLs): a config that checks but
    that nobody can log in to until it is regenerated, as ``infra/nats/`` ships."""
    refuse_placeholders({u: p for u, p in (passwords or {}).items() if p})
    if sealed and (passwords or nkey_users):
        raise ValueError("a sealed config throws every secret away: give it no passwords and no nkey users")
    users = layout_users(dp_size, clients, members if members is not None else layout_members(dp_size, nnodes))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, str] = {}
    public: dict[str, str] = {}
    if nkey_users:
        for u in users:
            seed, public[u] = new_nkey()
            seeds[u] = str((out / "nkeys" / f"{u}.nk").resolve())
            _write_private(Path(seeds[u]), seed + "\n")
    pw = {u: (passwords or {}).get(u) or new_password() for u in [*users, "sys"] if u not in public}
    hashes = {}
    for u, p in pw.items():
        old = (existing_hashes or {}).get(u)
        hashes[u] = old if old and check_password(p, old) else hash_password(p)
    route_password = (passwords or {}).get(ROUTE_USER) or new_password()
    route_hash = hash_password(route_password)
    note = SEALED_NOTE if sealed else ""
    for p in peers or ():
        block = render_cluster(p, peers, "" if sealed else route_password, route_hash=route_hash)
        text = note + render_server(p.listen, p.http, p.store_dir, tls, block, p.name, p.conf, limits)
        if sealed:
            (out / p.conf).write_text(text)
        else:  # its route URLs carry the route password
            _write_private(out / p.conf, text)
    if not peers:
        (out / "nats.conf").write_text(note + render_server(listen, http, store_dir, tls, cluster, limits=limits))
    (out / "auth.conf").write_text(note + render_auth(users, hashes, prefixes, dp_size, hashes.pop("sys"), public,
                                                       limits))
    if sealed:
        return Credentials(url, tls_ca=tls.ca if tls else "")
    creds = Credentials(url, pw, tls.ca if tls else "", seeds)
    creds.save(out / "credentials.json")
    for user in users:  # one file a host: only the users the process it runs connects as
        mine = [user, *COMPANIONS.get(user, ())]
        Credentials(url, {u: pw[u] for u in mine if u in pw}, creds.tls_ca,
                    {u: seeds[u] for u in mine if u in seeds}).save(out / "hosts" / f"{user}.json")
    env = ["# `docker compose --env-file THIS_FILE up`: the passwords of credentials.json, per role"]
    env += [f"DPBUS_{u.upper().replace('-', '_')}_PASSWORD={p}" for u, p in pw.items() if u != "sys"]
    env.append(f"DPBUS_NATS_CONF_DIR={out.resolve()}")
    _write_private(out / "compose.env", "\n".join(env) + "\n")
    return creds


# users a process connects as besides its own (ingest answers clients as ingest-answers)
COMPANIONS = {"ingest": ("ingest-answers",)}


def read_hashes(auth_conf: Path) -> dict[str, str]:
    """The bcrypt hash of each user in an ``auth.conf`` this module wrote."""
    text = Path(auth_conf).read_text()
    return dict(re.findall(r'user:\s*"([^"]+)"[^}]*?password:\s*"([^"]+)"', text))
