"""Where a running ``dpbus up`` can be found: a small per-user state file.

``dpbus up`` writes it as soon as its NATS server listens, before the services have
warmed up, and removes it when it stops. It holds the server's URL, whether every group
is ready yet (``ready``, and ``progress``: what `up` last said while waiting), the log
directory, the HTTP API's URL, and the passwords of the users a local user needs:
``client`` (``dpbus generate``, ``bench``), ``operator`` (``dpbus status``: it may read
the groups' load reports) and ``gateway`` (``dpbus gateway``). It holds passwords, so it
is written with mode 0600, replaced in one rename.

The file is ``$XDG_STATE_HOME/dpbus/up.json`` (default ``~/.local/state/dpbus/up.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dpbus.services.bus import NatsAuth

DEFAULT_URL = "nats://127.0.0.1:4222"
STATE_USERS = ("client", "operator", "gateway")  # what a local user runs next to `up`


class WarmingUp(RuntimeError):
    """The `dpbus up` found is still starting: its groups are not all ready."""


def state_path() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "dpbus" / "up.json"


def write_state(state: dict[str, Any]) -> Path:
    """Write ``state`` (mode 0600) in place of the file, atomically."""
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".up.json.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)
    return path


def new_state(url: str, users: dict[str, NatsAuth], pid: int, **more: Any) -> dict[str, Any]:
    """The state of an `up` whose server listens at ``url``; the top-level ``user`` and
    ``password`` are the client's (what the plain nats-py client in docs/wire-contract.md reads)."""
    client = users.get("client", NatsAuth())
    return {"url": url, "user": client.user, "password": client.password, "tls_ca": client.tls_ca, "pid": pid,
            "ready": False, "progress": "starting", "users": {u: a.password for u, a in users.items()}, **more}


def is_up_process(pid: int) -> bool:
    """Whether ``pid`` is alive and is a `dpbus up` (not another process that got its pid)."""
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc here: alive is all we can tell
    names = [os.path.basename(a.decode(errors="replace")) for a in args]
    return "up" in names and any(n in ("dpbus", "dpbus.services.cli") for n in names)


def read_raw() -> dict | None:
    """The state file as written, live or stale (None when missing or unreadable)."""
    try:
        state = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def read_state() -> dict | None:
    """The state of the running `dpbus up`, or None (no file, or its `up` is gone)."""
    state = read_raw()
    if state is None or not is_up_process(int(state.get("pid", 0) or 0)):
        return None
    return state


def describe(state: dict) -> str:
    """One line naming a running `up`: its pid, where it listens, its logs."""
    parts = [f"pid {state.get('pid')}", f"NATS at {state.get('url')}"]
    if state.get("http_url"):
        parts.append(f"HTTP at {state['http_url']}")
    if state.get("log_dir"):
        parts.append(f"logs in {state['log_dir']}")
    return ", ".join(parts)


def clear_state(pid: int) -> None:
    """Remove the state file if the `dpbus up` with ``pid`` wrote it."""
    path = state_path()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def state_auth(state: dict, user: str) -> NatsAuth:
    """How ``user`` connects to the `up` of ``state`` (anonymous on its open server)."""
    users = state.get("users") or {}
    if user not in users:
        if users:
            raise ValueError(f"the state file of dpbus up ({state_path()}) holds no password for user {user!r} "
                             f"(it has {', '.join(sorted(users))}); give --nats-credentials")
        return NatsAuth(tls_ca=state.get("tls_ca", ""))  # an open (--insecure) server
    return NatsAuth(user, users[user], tls_ca=state.get("tls_ca", ""))


def ready_or_warn(state: dict, command: str) -> None:
    """Raise WarmingUp unless the `up` of ``state`` serves every group already."""
    if not state.get("ready"):
        raise WarmingUp(f"dpbus up is still warming up ({state.get('progress', 'starting')}; {describe(state)}); "
                        f"`dpbus status` waits until it is ready, then run `dpbus {command}` again")


def client_target(url: str | None = None, user: str = "", password: str = "", credentials: str = "",
                  tls_ca: str = "", default_user: str = "client") -> tuple[str, NatsAuth, dict | None]:
    """Where a client command connects, and as whom: an explicit URL (credentials in it,
    or from ``credentials``), else the running ``dpbus up`` (its state file, as
    ``user or default_user``), else 4222. The third item is the state used, if any."""
    url = url or os.environ.get("NATS_URL") or os.environ.get("DPBUS_NATS_URL")
    user = user or os.environ.get("DPBUS_NATS_USER", "")
    password = password or os.environ.get("DPBUS_NATS_PASSWORD", "")
    credentials = credentials or os.environ.get("DPBUS_NATS_CREDENTIALS", "")
    tls_ca = tls_ca or os.environ.get("DPBUS_TLS_CA", "")
    if credentials and not password:
        from dpbus.services.natsconf import Credentials

        from dpbus.services.bus import auth_for

        creds = Credentials.load(credentials)
        auth = auth_for(creds, user or default_user)
        auth.tls_ca = tls_ca or auth.tls_ca
        return url or creds.url or DEFAULT_URL, auth, None
    if url:
        return url, NatsAuth(user, password, tls_ca=tls_ca), None
    state = read_state()
    if state:
        return state["url"], state_auth(state, user or default_user), state
    return DEFAULT_URL, NatsAuth(user, password, tls_ca=tls_ca), None
