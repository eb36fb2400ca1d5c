"""The README and the docs/ pages as a new user follows them.

Every shell command in the fenced blocks of the README's "Quick start" and of "Several
hosts" (docs/operations.md), and the plain nats-py client (docs/wire-contract.md), is run
as written, in order:

* ``dpbus`` and ``nats-server`` are on PATH (what ``source .venv/bin/activate`` gives; the
  ``dpbus`` found there runs this checkout's code with the test's interpreter);
* ``make install`` runs with the stamp of the already installed environment (so it has
  nothing to do) and ``make demo`` runs its recipe with that ``dpbus``; ``make test`` is
  skipped (it is this suite);
* a command whose comment says "leave it running" runs in the background (``dpbus up``
  until it prints that it is ready, ``nats-server`` until it listens);
* ``curl`` lines go to the gateway that ``dpbus up`` started, at the address it printed
  (``127.0.0.1:8000`` unless that port was taken);
* "Several hosts" runs on one machine: every host is 127.0.0.1 and every ``host:port``
  gets a free port of its own (the two groups' coordinators both use 7070 on different
  hosts);
* HOME is a fresh directory (the state file of ``dpbus up`` goes there), and the services
  compile fewer shapes, share the suite's compile cache and skip warm-up (``DPBUS_*``
  variables, which any user may set).

Every background process must stop on a signal within 10 s with exit code 0. Every
relative link in the README and docs/ names a file that exists and, after ``#``, one of its
headings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpbus.schemas.public import wire_defaults_table
from dpbus.services.launcher import free_port, nats_server_binary
from tests.support import port_open, processes_using

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
WIRE = (DOCS / "wire-contract.md").read_text()
OPERATIONS = (DOCS / "operations.md").read_text()
SMALL = {"DPBUS_MAX_PREFILL_TOKENS": "16", "DPBUS_MAX_RUNNING_REQUESTS": "2", "DPBUS_MAX_SEQ_LEN": "512"}
SKIPPED = {"make test"}
STOP_BOUND_S = 10.0


def section(title: str, level: str = "##", text: str = README) -> str:
    start = text.index(f"\n{level} {title}\n")
    rest = text[start + 1:]
    ends = [m.start() for m in re.finditer(r"^#{2,3} |^\* \*\*", rest, re.M) if m.start() > 0]
    return rest[:min(ends)] if ends else rest


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(text: str) -> list[str]:
    """Each command of the ``sh`` blocks, a line ending in a backslash joined with the next."""
    return [line.strip() for block in blocks(text, "sh") for line in re.sub(r"\\\n\s*", "", block).splitlines()
            if line.strip()]


def without_comment(cmd: str) -> str:
    return re.sub(r"\s+#.*$", "", cmd)


def test_wire_defaults_table_is_the_one_generated_from_schemas():
    table = re.search(r"<!-- wire-defaults: begin -->\n(.*?)<!-- wire-defaults: end -->", WIRE, re.S)
    assert table, "docs/wire-contract.md lost its wire defaults table"
    assert table.group(1) == wire_defaults_table(), "regenerate it from schemas.public.wire_defaults_table()"


def test_wire_contract_names_every_error_code():
    from dpbus.schemas.errors import ErrorCode

    errors = section("Answers", text=WIRE)
    for code in ErrorCode:
        assert f"`{code.value}`" in errors, code


def test_the_runbook_sections_have_commands():
    assert "dpbus up" in map(without_comment, commands(section("Quick start")))
    hosts = commands(section("Several hosts", text=OPERATIONS))
    assert sum(without_comment(c).startswith("dpbus node") for c in hosts) == 4


@pytest.fixture
def user_env(tmp_path):
    """PATH with `dpbus` (this checkout) and `nats-server`, a fresh HOME, no test-only XLA flags."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dpbus = bin_dir / "dpbus"
    dpbus.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dpbus.services.cli "$@"\n')
    dpbus.chmod(0o755)
    (bin_dir / "nats-server").symlink_to(nats_server_binary())
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XDG_STATE_HOME", "NATS_URL")
           and not k.startswith("DPBUS_")}
    # the suite's compile cache, and no warm-up (what any user may set too): each runbook
    # deployment would otherwise compile every shape afresh in its new HOME
    env.update(SMALL, PATH=f"{bin_dir}:{env['PATH']}", HOME=str(home), PYTHONPATH=str(ROOT),
               DPBUS_COMPILE_CACHE=os.environ["DPBUS_COMPILE_CACHE"], DPBUS_WARMUP="false")
    return env, bin_dir


class Runner:
    """Runs README commands in one working directory; background ones are stopped at the end."""

    def __init__(self, env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.env, self.cwd, self.logs = env, cwd, logs  # logs: never the checkout itself
        self.background: list[tuple[str, subprocess.Popen, Path]] = []

    def run(self, cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        out = subprocess.run(["bash", "-c", cmd], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"`{cmd}` failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    def start(self, cmd: str) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"bg-{len(self.background)}.log"
        with open(log, "wb") as f:  # exec: the signal goes to the command itself, not to bash
            proc = subprocess.Popen(["bash", "-c", f"exec {without_comment(cmd)}"], cwd=self.cwd, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.background.append((cmd, proc, log))
        return proc, log

    def wait_for_line(self, proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, log.read_text(errors="replace"))
            if found:
                return found.group(0)
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{log.read_text()[-3000:]}")

    def stop_all(self, sig: signal.Signals = signal.SIGTERM) -> list[tuple[str, float, int]]:
        """Signal every background command at once, as a supervisor does (the NATS server after
        the services); each must exit within STOP_BOUND_S with code 0."""
        timings = []
        services = [b for b in self.background if not b[0].startswith("nats-server")]
        servers = [b for b in self.background if b[0].startswith("nats-server")]
        for batch in (services, servers):
            t0 = time.monotonic()
            for _, proc, _ in batch:
                proc.send_signal(sig)
            for cmd, proc, log in batch:
                try:
                    code = proc.wait(timeout=max(STOP_BOUND_S - (time.monotonic() - t0), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise AssertionError(f"`{cmd}` still running {STOP_BOUND_S}s after {sig.name}:\n"
                                         f"{log.read_text()[-3000:]}")
                timings.append((without_comment(cmd), time.monotonic() - t0, code))
                assert code == 0, f"`{cmd}` exited with {code} on {sig.name}:\n{log.read_text()[-3000:]}"
        self.background.clear()
        return timings

    def kill_all(self) -> None:
        for _, proc, _ in self.background:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def check_demo(stdout: str) -> None:
    """What `make demo` prints without a terminal: every request done, by both groups, in a
    table of 80 columns whose cells fold instead of being cut; a curl line whole and ready to
    paste; and, after it stops, no process, port or temp directory left behind."""
    done = re.search(r"(\d+)/(\d+) requests done; groups that served: \[0, 1\]", stdout)
    assert done and done[1] == done[2], stdout[-2000:]
    url = re.search(r"listening on (nats://127\.0\.0\.1:\d+)", stdout).group(1)
    assert not port_open(url) and processes_using(url) == []
    for i in range(int(done[2])):
        assert f"demo-{i}" in stdout
    assert "\u2026" not in stdout, stdout
    curl = next(line for line in stdout.splitlines() if line.startswith("curl "))
    argv = shlex.split(curl)
    assert argv[argv.index("-H") + 1] == "Content-Type: application/json", curl
    assert json.loads(argv[argv.index("-d") + 1])["stream"] is True, curl
    logs = Path(re.search(r"logs in (\S+)", stdout).group(1))
    assert not logs.exists(), "a clean stop leaves no temp directory behind"


@pytest.mark.e2e
def test_quick_start_as_written(user_env, tmp_path):
    env, bin_dir = user_env
    stamp = tmp_path / "installed"  # the environment running this test is installed already
    stamp.touch()
    runner = Runner(env, ROOT, tmp_path)
    up, http, curls = None, None, []
    try:
        for cmd in commands(section("Quick start")):
            plain = without_comment(cmd)
            if plain in SKIPPED:
                continue
            if plain == "source .venv/bin/activate":
                assert shutil.which("dpbus", path=env["PATH"]) and shutil.which("nats-server", path=env["PATH"])
                continue
            if plain.startswith("make "):
                out = runner.run(f"{plain} BIN={bin_dir} STAMP={stamp}", timeout=600)
                if plain == "make demo":
                    check_demo(out.stdout)
                continue
            if "leave it running" in cmd:
                up, log = runner.start(cmd)
                runner.wait_for_line(up, log, r"dpbus ready.*at nats://127\.0\.0\.1:\d+")
                assert (Path(env["HOME"]) / ".local/state/dpbus/up.json").exists()
                api = runner.wait_for_line(up, log, r"OpenAI-compatible API at http://127\.0\.0\.1:\d+/v1", timeout=30)
                http = re.search(r"127\.0\.0\.1:\d+", api).group(0)
                continue
            if plain.startswith("curl "):
                assert http, "a curl line before `dpbus up` started the gateway"
                out = runner.run(cmd.replace("127.0.0.1:8000", http), timeout=120)
                assert out.stdout.strip() and '"error"' not in out.stdout, out.stdout[-2000:]
                curls.append(out.stdout)
                continue
            out = runner.run(cmd, timeout=300)
            if plain.startswith("dpbus generate"):
                assert re.search(r"\[(length|stop): group \d", out.stderr), out.stderr
        assert up is not None, "the quick start never started `dpbus up`"
        assert len(curls) == 3 and '"choices"' in curls[1] and "data: [DONE]" in curls[2], curls
        (snippet,) = blocks(section("A plain nats-py client", text=WIRE), "python")
        script = tmp_path / "client.py"
        script.write_text(snippet)
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "'type': 'done'" in out.stdout.splitlines()[-1], out.stdout[-2000:]
        print(runner.stop_all(signal.SIGINT))  # Ctrl-C, as the README says
        assert not (Path(env["HOME"]) / ".local/state/dpbus/up.json").exists()
        assert re.search(r"logs in (\S+)", log.read_text())
        assert not Path(re.search(r"logs in (\S+)", log.read_text()).group(1)).exists()
    finally:
        runner.kill_all()


def on_localhost(cmd: str, ports: dict[tuple[str, int], int]) -> str:
    """Hosts become 127.0.0.1; each (host, port) a free port (one server port for all hosts;
    the server's own loopback too, so that its monitoring port is free)."""
    def swap(m: re.Match) -> str:
        host, port = m.group(1), int(m.group(2))
        key = (host if host in "abcd" else "*", port)
        if key not in ports:
            ports[key] = free_port()
        return f"127.0.0.1:{ports[key]}"

    return re.sub(r"(?<![\w.])(0\.0\.0\.0|127\.0\.0\.1|[abcdn]):(\d+)", swap, cmd)


@pytest.mark.e2e
def test_several_hosts_runbook_on_localhost(user_env, tmp_path):
    env, _ = user_env
    work = tmp_path / "work"
    work.mkdir()
    runner = Runner(env, work, tmp_path)
    ports: dict[tuple[str, int], int] = {}
    ran = []
    try:
        for cmd in commands(section("Several hosts", text=OPERATIONS)):
            cmd = on_localhost(cmd, ports)
            ran.append(without_comment(cmd))
            if "leave it running" in cmd:
                proc, log = runner.start(cmd)
                if without_comment(cmd).startswith("nats-server"):
                    port = ports[("*", 4222)]
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        try:
                            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                            break
                        except OSError:
                            assert proc.poll() is None, log.read_text()
                            time.sleep(0.1)
                continue
            out = runner.run(cmd, timeout=700)
            if cmd.startswith("dpbus generate"):
                assert re.search(r"\[(length|stop): group \d", out.stderr), out.stderr
        assert (work / "jetstream").is_dir(), "the server keeps its store where it starts"
        timings = runner.stop_all(signal.SIGTERM)
        print("\n| command | seconds to exit on SIGTERM | exit code |\n|---|---|---|")
        for cmd, seconds, code in timings:
            print(f"| `{cmd[:60]}` | {seconds:.2f} | {code} |")
    finally:
        runner.kill_all()
    assert any(c.startswith("dpbus status") for c in ran) and any(c.startswith("dpbus generate") for c in ran)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (outside code blocks)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = set()
    for title in re.findall(r"^#{1,6} (.+)$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_links_between_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 1, "docs/ is empty"
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_readme_links_every_doc():
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README))
    assert linked == {p.name for p in DOCS.glob("*.md")}, linked
