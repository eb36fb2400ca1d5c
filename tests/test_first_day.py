"""A newcomer's first day with `dpbus up`, each step the real CLI as processes.

One `dpbus up` (2 groups, secured embedded server, the HTTP gateway) is shared by the
module. It runs as a terminal runs it: its own session (process group) with its output
piped into `tee`, so that the last test can send Ctrl-C as a terminal does: SIGINT to
up's whole group (`os.killpg`) and to tee. The tests run in file order:

* while it warms up: the state file is there already (0600, not ready, the users a local
  user needs), `dpbus generate` says it is warming up, `dpbus status` waits for it, and a
  `dpbus gateway` started by hand finds its credentials and answers /ready 503, then 200;
* a second `dpbus up` refuses, naming the first; a stale state file was replaced with a note;
* a bad --model-path is one line and exit code 2, before anything starts;
* Ctrl-C: an open HTTP stream ends with its terminal event, `up` exits 0 without a
  traceback, every service stopped cleanly (its temporary log dir is gone), no state left.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dpbus.services.demo import curl_command
from dpbus.services.launcher import free_port

DPBUS = [sys.executable, "-m", "dpbus.services.cli"]
SMALL = {"DPBUS_MAX_PREFILL_TOKENS": "16", "DPBUS_MAX_RUNNING_REQUESTS": "2", "DPBUS_MAX_SEQ_LEN": "512"}
START_S = 400.0  # bound on warm-up (a small shared machine)


def wait_for(what: str, check, timeout: float, every: float = 0.2):
    """``check()``'s first truthy value, polled until ``timeout``; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


# `tee OUT` as a terminal starts it: Ctrl-C ends it. A test run started in the background
# by a non-interactive shell (`make test &`) ignores SIGINT, and every child inherits that:
# coreutils' tee then ran on to up's end of output and exited 0. This one puts SIGINT's
# default back first (`dpbus up` sets its own handlers, so it is not affected).
TEE = ("import os, signal, sys\n"
       "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
       "out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
       "while chunk := os.read(0, 65536):\n"
       "    os.write(out, chunk)\n")


class Up:
    """`dpbus up ... | tee OUT` in a session of its own (what a terminal starts)."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.tmp = tmp
        self.state_file = tmp / "state" / "dpbus" / "up.json"
        self.env = {**os.environ, **SMALL, "XDG_STATE_HOME": str(tmp / "state")}
        self.out, self.err = tmp / "up.out", tmp / "up.err"
        self.http_port = free_port()
        self.dead_pid = self.stale_state()
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([*DPBUS, "up", "--dp-size", "2", "--local-devices", "1", "--nats-port", "0",
                                          "--http-port", str(self.http_port), *flags], env=self.env, stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        # (a process cannot join a group of another session: tee gets the signal by its pid)
        self.tee = subprocess.Popen([sys.executable, "-c", TEE, str(self.out)], stdin=self.proc.stdout,
                                    stdout=subprocess.DEVNULL)
        self.proc.stdout.close()  # tee is its only reader: when tee goes, up's writes fail

    def stale_state(self) -> int:
        """The state file of an `up` that died without cleaning up (a pid that is gone)."""
        gone = subprocess.Popen(["true"])
        gone.wait()
        self.state_file.parent.mkdir(parents=True)
        self.state_file.write_text(json.dumps({"url": "nats://127.0.0.1:1", "pid": gone.pid, "ready": True}))
        return gone.pid

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def state(self) -> dict | None:
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return doc if doc.get("pid") == self.proc.pid else None

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*DPBUS, *args], env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)

    def said(self) -> str:
        """What up printed so far (stdout, through tee, and stderr)."""
        return "\n".join(f.read_text(errors="replace") for f in (self.out, self.err) if f.exists())

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to every process of the foreground job."""
        os.killpg(self.proc.pid, signal.SIGINT)
        self.tee.send_signal(signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its services die with it (see launcher._die_with_parent)
        for p in (self.proc, self.tee):
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    deployment = Up(tmp_path_factory.mktemp("first-day"))
    try:
        yield deployment
    finally:
        deployment.kill()


def ready_status(port: int) -> tuple[int, dict]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    except httpx.TransportError:
        return 0, {}
    return r.status_code, r.json()


@pytest.mark.e2e
def test_while_up_warms_up_clients_are_told_and_status_waits(up, tmp_path):
    state = wait_for("up.json written once NATS listens", up.state, 60)
    assert not state["ready"], "the state file comes before the groups are ready"
    assert up.state_file.stat().st_mode & 0o777 == 0o600
    assert set(state["users"]) == {"client", "operator", "gateway"} and all(state["users"].values())
    assert state["user"] == "client" and state["password"] == state["users"]["client"]
    assert Path(state["log_dir"]).is_dir() and state["dp_size"] == 2
    assert f"note: replacing {up.state_file}, left by a dpbus up that is gone (pid {up.dead_pid})" in up.output()

    gen = up.run("generate", "hi")
    if not up.state()["ready"]:  # still warming up after it ran (warm-up takes far longer here)
        assert gen.returncode == 1, gen.stderr
        assert "dpbus up is still warming up (" in gen.stderr and "dpbus status" in gen.stderr, gen.stderr
        assert "Authorization" not in gen.stderr

    # `dpbus gateway` next to `up`, with no flags but its port: it finds up's gateway user
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as f:
        gateway = subprocess.Popen([*DPBUS, "gateway", "--http-port", str(port)], env=up.env, stdout=f,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        answers = []
        # no flags: up's operator user, up's number of groups; it waits while up warms up
        status = subprocess.Popen([*DPBUS, "status", "--wait", str(START_S)], env=up.env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def settled() -> bool:  # /ready, asked all along, until status is done and it says 200
            assert gateway.poll() is None, log.read_text()[-3000:]
            answers.append(ready_status(port))
            return status.poll() is not None and answers[-1][0] == 200

        try:
            wait_for("status done and the hand-started gateway ready", settled, START_S + 30)
        finally:
            if status.poll() is None:
                status.kill()
            out, err = status.communicate()
        assert status.returncode == 0, out[-2000:] + err[-2000:]
        assert "ready: 2 group(s)" in out and "dpbus up found (pid" in out, out
        warm = [body for code, body in answers if code == 503]
        assert warm, f"/ready never said 503 during warm-up: {answers[:5]}"
        assert all(body["groups_ready"] == 0 and body["status"] == "unavailable" for body in warm), warm
        code, body = answers[-1]
        assert body["groups_ready"] >= 1 and body["dp_size"] == 2 and body["status"] == "ready", body
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        done = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1, done.text
        assert "using the running dpbus up (pid" in log.read_text() and "as user 'gateway'" in log.read_text()
    finally:
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0, log.read_text()[-3000:]

    wait_for("up.json says ready", lambda: up.state()["ready"], 60)
    # the curl line `dpbus demo` prints runs as printed
    body = {"messages": [{"role": "user", "content": "it's [me]"}], "max_tokens": 3, "stream": True}
    sent = subprocess.run(shlex.split(curl_command(f"http://127.0.0.1:{up.http_port}/v1/chat/completions", body)),
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0 and sent.stdout.rstrip().endswith("data: [DONE]"), sent.stdout + sent.stderr
    gen = up.run("generate", "--raw", "--max-new-tokens", "3", "hi")
    assert gen.returncode == 0 and json.loads(gen.stdout.splitlines()[-1])["type"] == "done", gen.stderr


@pytest.mark.e2e
def test_a_second_up_refuses_and_names_the_running_one(up):
    # the HTTP address is in the state once the gateway's socket is bound (right after start)
    state = wait_for("up.json naming the HTTP address", lambda: (doc := up.state()) and doc.get("http_url") and doc, 60)
    before = up.state_file.read_text()
    second = up.run("up", "--dp-size", "1", "--local-devices", "1", "--nats-port", "0", "--http-port", "0",
                    timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr
    said = second.stderr
    assert f"another dpbus up is running (pid {up.proc.pid}, NATS at {state['url']}" in said, said
    assert f"logs in {state['log_dir']}" in said and f"HTTP at http://127.0.0.1:{up.http_port}/v1" in said, said
    assert "listening" not in second.stdout, "it started something"
    assert up.state_file.read_text() == before


def test_a_bad_model_path_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    for args in (["up"], ["node", "--node-rank", "0"], ["demo"]):
        out = subprocess.run([*DPBUS, *args, "--model-path", str(bad)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"--model-path {bad}: {bad}/config.json not found" in out.stderr, out.stderr
        assert out.stdout == "" and not (tmp_path / "state").exists(), "something started"


@pytest.mark.e2e
def test_ctrl_c_drains_an_open_stream_and_stops_every_service_cleanly(up):
    """Ctrl-C in the terminal: SIGINT to up's whole process group (up and tee; the services
    run in groups of their own). The open stream gets its terminal event; up exits 0."""
    state = wait_for("up ready", lambda: (up.state() or {}).get("ready") and up.state(), START_S)
    log_dir = Path(state["log_dir"])
    body = {"prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"http://127.0.0.1:{up.http_port}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 1:
                up.ctrl_c()
    assert up.proc.wait(timeout=60) == 0, up.err.read_text()[-3000:]
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert "error" in last or last["choices"][0]["finish_reason"] in ("length", "stop", "abort"), last
    assert "Traceback" not in up.err.read_text() and "BrokenPipe" not in up.err.read_text(), up.err.read_text()
    assert up.tee.wait(timeout=10) == -signal.SIGINT  # the reader went with the same Ctrl-C
    assert not up.state_file.exists(), "the state file outlived up"
    assert not log_dir.exists(), "a service did not stop cleanly (its logs were kept)"


def services_of(pid: int) -> list[int]:
    """The processes ``pid`` started and that are still there (Linux: /proc)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids if Path(f"/proc/{k}").exists()]


def argv_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def state_of(pid: int) -> str:
    """The process's state letter (R running, S sleeping, T stopped, Z zombie; '' if none)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def gone(pid: int) -> bool:
    """No such process, or only its zombie left (its parent has not waited for it yet)."""
    return state_of(pid) in ("", "Z")


@pytest.mark.e2e
def test_a_second_ctrl_c_kills_what_the_first_is_still_stopping(tmp_path):
    """A service that does not stop on SIGTERM (frozen here with SIGSTOP, as a hung one
    would be) keeps the first Ctrl-C waiting out its grace period; a second Ctrl-C kills
    every process `up` started at once and `up` exits, leaving no state file. (The grace
    period is long here: a loaded machine may take a while to stop the rest, and the frozen
    worker must still be waited for when the second Ctrl-C comes.)"""
    up = Up(tmp_path, "--stop-grace", "300")
    try:
        wait_for("up's state file", up.state, 60)
        # nats-server, ingest, two publishers, two workers, the gateway
        def started() -> list[int] | None:
            kids = services_of(up.proc.pid)
            workers = [p for p in kids if " worker" in argv_of(p)]
            return kids if len(kids) >= 7 and len(workers) == 2 else None

        kids = wait_for("every service started", started, 60)
        worker, other = [p for p in kids if " worker" in argv_of(p)]
        os.kill(worker, signal.SIGSTOP)
        # stopped for certain before up's SIGTERM comes: a signal sent to a process busy in
        # the kernel waits, and of two pending SIGTERM (15) goes before SIGSTOP (19), which a
        # worker still importing (no handler yet) does not survive
        wait_for("the worker frozen", lambda: state_of(worker) == "T", 30)
        up.ctrl_c()  # (tee goes with it, and what up prints from now on with tee)
        wait_for("up stopping (its state file cleared first)", lambda: not up.state_file.exists(), 30)
        wait_for("the other worker stopped", lambda: gone(other), 30)
        # up waits out the frozen worker's grace period before it stops NATS
        assert up.proc.poll() is None and not gone(worker), up.said()
        os.killpg(up.proc.pid, signal.SIGINT)  # the second Ctrl-C
        up.proc.wait(timeout=10)
        assert gone(worker) and all(gone(p) for p in kids), [argv_of(p) for p in kids if not gone(p)]
    finally:
        up.kill()
