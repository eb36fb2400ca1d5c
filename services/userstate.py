"""Where a running ``dpbus up`` can be found: a small per-user state file.

``dpbus up`` writes the URL of the NATS server it runs and the credentials of its
``client`` user there (mode 0600) and removes it when it stops; ``dpbus generate`` and
the other client commands read it when no ``--nats-url`` / ``NATS_URL`` is given, so the
README's commands work as written against a secured server.

The file is ``$XDG_STATE_HOME/dpbus/up.json`` (default ``~/.local/state/dpbus/up.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.bus import NatsAuth

DEFAULT_URL = "nats://127.0.0.1:4222"


def state_path() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "dpbus" / "up.json"


def write_state(url: str, auth: NatsAuth, pid: int) -> Path:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "user": auth.user, "password": auth.password, "tls_ca": auth.tls_ca, "pid": pid}, f)
    return path


def read_state() -> dict | None:
    try:
        state = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state.get("pid", 0)), 0)  # the `dpbus up` that wrote it is gone: stale
    except (OSError, ValueError):
        return None
    return state


def clear_state(pid: int) -> None:
    """Remove the state file if the `dpbus up` with ``pid`` wrote it."""
    path = state_path()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def client_target(url: str | None = None, user: str = "", password: str = "", credentials: str = "",
                  tls_ca: str = "") -> tuple[str, NatsAuth]:
    """Where a client command connects, and as whom: an explicit URL (credentials in it,
    or from ``credentials``), else the running ``dpbus up`` (state file), else 4222."""
    url = url or os.environ.get("NATS_URL") or os.environ.get("DPBUS_NATS_URL")
    user = user or os.environ.get("DPBUS_NATS_USER", "")
    password = password or os.environ.get("DPBUS_NATS_PASSWORD", "")
    credentials = credentials or os.environ.get("DPBUS_NATS_CREDENTIALS", "")
    tls_ca = tls_ca or os.environ.get("DPBUS_TLS_CA", "")
    if credentials and not password:
        from services.natsconf import Credentials

        from services.bus import auth_for

        creds = Credentials.load(credentials)
        auth = auth_for(creds, user or "client")
        auth.tls_ca = tls_ca or auth.tls_ca
        return url or creds.url or DEFAULT_URL, auth
    if url:
        return url, NatsAuth(user, password, tls_ca=tls_ca)
    state = read_state()
    if state:
        return state["url"], NatsAuth(state.get("user", ""), state.get("password", ""),
                                      tls_ca=state.get("tls_ca", ""))
    return DEFAULT_URL, NatsAuth(user, password, tls_ca=tls_ca)
