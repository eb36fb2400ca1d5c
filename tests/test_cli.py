"""The command line as a user runs it: `dpbus demo`, `dpbus up` (embedded NATS, the node
layout, SIGTERM), `dpbus schemas`, and refusal of bad layouts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import lines_until_ready
from tests.support import port_open, processes_using

DPBUS = [sys.executable, "-m", "dpbus.services.cli"]


@pytest.mark.e2e
def test_up_with_node_processes_serves_and_stops_everything_on_sigterm(tmp_path):
    """`dpbus up` secures its server; `dpbus generate` finds it (and its credentials) with no flags."""
    # warm-up is not what this tests (test_first_day and test_sigterm do): each node compiles
    # what it runs, not every shape, at its start and at its restart
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "DPBUS_WARMUP": "false"}
    logs = tmp_path / "logs"
    proc = subprocess.Popen([*DPBUS, "up", "--dp-size", "2", "--nnodes", "2", "--local-devices", "1",
                             "--node-processes", "--log-dir", str(logs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = lines_until_ready(proc)
        url = re.search(r"at (nats://127\.0\.0\.1:\d+)", lines[-1]).group(1)
        assert sorted(p.name for p in logs.glob("*.log")) == ["gateway.log", "ingest.log", "nats-server.log",
                                                               "node-0.log", "node-1.log"]
        state = json.loads((tmp_path / "state" / "dpbus" / "up.json").read_text())
        assert state["url"] == url and state["user"] == "client" and state["password"]
        assert (tmp_path / "state" / "dpbus" / "up.json").stat().st_mode & 0o077 == 0
        anonymous = subprocess.run([*DPBUS, "generate", "--nats-url", url, "hi"], capture_output=True, text=True,
                                   timeout=60)
        assert anonymous.returncode == 1 and "Authorization Violation" in anonymous.stderr, anonymous.stderr
        for rank in (0, 1):
            gen = subprocess.run([*DPBUS, "generate", "--raw", "--dp-rank", str(rank),
                                  "--max-new-tokens", "4", "hi"], capture_output=True, text=True, timeout=120, env=env)
            assert gen.returncode == 0, gen.stderr
            done = json.loads(gen.stdout.splitlines()[-1])
            assert done["type"] == "done" and done["dp_rank"] == rank
        assert len(processes_using(url)) == 5  # nats-server, ingest, the HTTP gateway, two nodes
        node1 = next(int(p) for p in processes_using(url) if b"--node-rank\x001" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(node1, signal.SIGKILL)  # `up` restarts what dies
        said: list[str] = []
        while len(said) < 5 and not any("exited" in line for line in said):  # the HTTP line may come first
            said.append(proc.stdout.readline())
        restarted = [line for line in said if "exited" in line]
        assert restarted and "node-1 exited" in restarted[0] and "restarted node-1" in restarted[0], said
        for _ in range(60):
            gen = subprocess.run([*DPBUS, "generate", "--raw", "--dp-rank", "1",
                                  "--max-new-tokens", "2", "hi"], capture_output=True, text=True, timeout=60, env=env)
            if gen.returncode == 0:
                break
            time.sleep(1)
        assert json.loads(gen.stdout.splitlines()[-1])["dp_rank"] == 1, gen.stderr
        assert proc.stdout.readline().strip() == "group 1 ready again"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
        assert "stopped" in rest
        assert not port_open(url) and processes_using(url) == []
        assert not (tmp_path / "state" / "dpbus" / "up.json").exists(), "the state file outlived `up`"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_schemas_command_prints_every_public_message():
    out = subprocess.run([*DPBUS, "schemas"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert set(doc) == {"GenerateRequest", "AbortRequest", "Accepted", "Chunk", "Done", "Error", "AbortAck"}
    accepted = doc["Accepted"]["$defs"]["Accepted"]
    assert accepted["properties"]["type"]["enum"] == ["accepted"]
    assert set(accepted["required"]) >= {"rid", "dp_rank", "position"}
    assert doc["GenerateRequest"]["$defs"]["GenerateRequest"]["properties"]["ack"]["default"] is False
    done = doc["Done"]["$defs"]["Done"]
    assert done["properties"]["type"]["enum"] == ["done"]
    assert {"rid", "dp_rank", "finish_reason"} <= set(done["required"])


@pytest.mark.parametrize("args, numbers", [
    (["up", "--dp-size", "3", "--nnodes", "4"], ["3", "4"]),
    (["node", "--node-rank", "5", "--nnodes", "4", "--dp-size", "2"], ["5", "4"]),
    (["worker", "--dp-size", "0"], ["dp_size"]),
])
def test_bad_layouts_are_refused_with_the_numbers(args, numbers):
    out = subprocess.run([*DPBUS, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    for n in numbers:
        assert n in out.stderr


def test_up_restarts_a_spanning_group_as_a_whole(tmp_path):
    from dpbus.services.launcher import Cluster, Proc

    def proc(role: str, rank: int | None) -> Proc:
        return Proc(role, rank, None, tmp_path)

    c = Cluster(dp_size=2, nnodes=4, local_devices=1, log_dir=tmp_path, say=lambda _: None)
    assert c._peers(proc("worker", 3)) == ["worker-2", "worker-3"]
    assert c._peers(proc("node", 0)) == ["node-0", "node-1"]
    assert c._peers(proc("publisher", 1)) == ["publisher-1"] and c._peers(proc("ingest", None)) == ["ingest"]
    assert [c.group_of(proc(*p)) for p in (("worker", 3), ("node", 0), ("publisher", 1), ("ingest", None))] \
        == [1, 0, 1, None]
    one_per_group = Cluster(dp_size=2, nnodes=2, local_devices=1, log_dir=tmp_path, say=lambda _: None)
    assert one_per_group._peers(proc("worker", 1)) == ["worker-1"]


@pytest.mark.e2e
@contextlib.contextmanager
def up_process(args: list[str], env: dict[str, str]):
    """`dpbus up` with one group of one device on a free NATS port, and ``args``; killed
    with its process group at the end if it is still running."""
    proc = subprocess.Popen([*DPBUS, "up", "--dp-size", "1", "--local-devices", "1", "--nats-port", "0", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.e2e
def test_up_over_tls_serves_a_client_that_found_it_through_the_state_file(tmp_path):
    """`dpbus up --tls-*` with the dev CA of infra/tls: every service and `dpbus generate`
    (which learns the URL, the user and the CA from the state file) speak TLS."""
    certs = tmp_path / "certs"
    made = subprocess.run(["bash", "infra/tls/make-dev-certs.sh", str(certs)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "DPBUS_WARMUP": "false"}
    with up_process(["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "server.pem"),
                     "--tls-key", str(certs / "server-key.pem"), "--log-dir", str(tmp_path / "logs")], env) as proc:
        lines = lines_until_ready(proc)
        assert re.search(r"at tls://127\.0\.0\.1:\d+ as user 'client'", lines[-1]), lines[-1]
        gen = subprocess.run([*DPBUS, "generate", "--raw", "--max-new-tokens", "3", "hi"], capture_output=True,
                             text=True, timeout=120, env=env)
        assert gen.returncode == 0, gen.stderr
        assert json.loads(gen.stdout.splitlines()[-1])["type"] == "done"
        url = json.loads((tmp_path / "state" / "dpbus" / "up.json").read_text())["url"]
        no_ca = subprocess.run([*DPBUS, "generate", "--nats-url", url, "hi"], capture_output=True, text=True,
                               timeout=60, env={**env, "XDG_STATE_HOME": str(tmp_path / "elsewhere")})
        assert no_ca.returncode == 1 and "certificate verify failed" in no_ca.stderr.lower(), no_ca.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_the_prefix_cache_is_on_by_default_and_no_prefix_cache_turns_it_off():
    from dpbus.services import settings as st
    from dpbus.services.cli import parser

    for role in ("publisher", "node"):
        assert st.build(st.PublisherSettings, parser().parse_args([role]), env={}).prefix_cache is True
        off = parser().parse_args([role, "--no-prefix-cache"])
        assert st.build(st.PublisherSettings, off, env={}).prefix_cache is False
    assert st.build(st.PublisherSettings, env={"DPBUS_PREFIX_CACHE": "false"}).prefix_cache is False
    assert st.service_env(parser().parse_args(["up", "--no-prefix-cache"])) == {"DPBUS_PREFIX_CACHE": "false"}


def test_up_takes_the_service_settings_and_passes_them_on():
    """`dpbus up --model-path DIR --max-seq-len N ...` (every engine's flags) reach the services."""
    from dpbus.services import settings as st
    from dpbus.services.cli import parser

    a = parser().parse_args(["up", "--model-path", "/models/llama", "--max-seq-len", "2048",
                             "--max-running-requests", "8", "--policy", "least_tokens", "--no-warmup",
                             "--api-key", "k", "--dtype", "bfloat16", "--stream-interval", "4"])
    assert st.service_env(a) == {"DPBUS_MODEL_PATH": "/models/llama", "DPBUS_MAX_SEQ_LEN": "2048",
                                 "DPBUS_MAX_RUNNING_REQUESTS": "8", "DPBUS_POLICY": "least_tokens",
                                 "DPBUS_WARMUP": "false", "DPBUS_API_KEY": "k", "DPBUS_DTYPE": "bfloat16",
                                 "DPBUS_STREAM_INTERVAL": "4"}
    for role in ("worker", "node"):  # the worker's weights and KV pages
        assert st.build(st.WorkerSettings, parser().parse_args([role]), env={}).dtype == "auto"  # bfloat16 on TPU
        bf16 = parser().parse_args([role, "--dtype", "bfloat16"])
        assert st.build(st.WorkerSettings, bf16, env={}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="valid values: auto, float32, bfloat16"):
        st.build(st.WorkerSettings, env={"DPBUS_DTYPE": "float16"})
    bad = subprocess.run([*DPBUS, "up", "--policy", "fastest"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "valid values: round_robin" in bad.stderr, bad.stderr


def test_ready_again_needs_a_not_ready_report_or_a_new_publisher():
    from dpbus.schemas.internal import LoadReport
    from dpbus.services.launcher import ReadyAgain

    def report(g: int, seq: int, ready: bool) -> LoadReport:
        return LoadReport(g, seq, 0.0, ready, 0, 0, 1, 0)

    watch = ReadyAgain()
    assert not watch.report(report(1, 10, True))  # nothing restarted
    watch.restarted({1})
    assert not watch.report(report(1, 11, True))  # the old view: the dead member not missed yet
    assert not watch.report(report(0, 11, True))  # another group
    assert not watch.report(report(1, 12, False))
    assert watch.report(report(1, 13, True))
    assert not watch.report(report(1, 14, True))  # said once
    watch.restarted({1})
    assert watch.report(report(1, 1, True))  # a restarted publisher: its reports start over


@pytest.mark.e2e
def test_bench_runs_twice_against_the_same_deployment(tmp_path):
    """`dpbus bench` as a user runs it against `dpbus up`, twice in a row with the same seed:
    the second run's requests are new requests, not duplicates of the first's (a duplicate
    is never answered twice, so its client used to wait out the time-out). The deployment
    streams 3 tokens per chunk (`--stream-interval 3`), as `dpbus generate` shows."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    with up_process(["--max-running-requests", "4", "--max-prefill-tokens", "32", "--max-seq-len", "128",
                     "--stream-interval", "3", "--log-dir", str(tmp_path / "logs")], env) as proc:
        lines_until_ready(proc)
        gen = subprocess.run([*DPBUS, "generate", "--raw", "--max-new-tokens", "4", "--temperature", "0", "hi"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert gen.returncode == 0, gen.stderr
        answers = [json.loads(line) for line in gen.stdout.splitlines() if line.startswith("{")]
        accepted, *chunks, done = answers
        assert accepted["type"] == "accepted" and accepted["dp_rank"] == done["dp_rank"], answers
        n = done["completion_tokens"]
        assert done["type"] == "done" and n > 3, answers  # greedy: no end of sequence in the first 4 here
        assert [(c["index"], len(c["token_ids"])) for c in chunks] == [(i, min(3, n - 3 * i)) for i in range(-(-n // 3))]
        for run in (1, 2):
            out = tmp_path / f"bench{run}.json"
            bench = subprocess.run([*DPBUS, "bench", "--requests", "6", "--concurrency", "3", "--input-len", "8",
                                    "--output-len", "4", "--seed", "1", "--json", str(out)],
                                   capture_output=True, text=True, timeout=120, env=env)
            assert bench.returncode == 0, bench.stderr
            result = json.loads(out.read_text())
            assert (result["completed"], result["errors"]) == (6, {}), result
            assert result["output_tokens_per_s"] > 0 and "out tok/s" in bench.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
