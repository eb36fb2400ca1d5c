"""A DP group that spans two worker processes (one JAX job over gloo, 2 x 2 devices)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dpbus.schemas import Done, Error, Subjects
from dpbus.services import tokenizer
from dpbus.services.client import generate
from tests.conftest import client_of, start_cluster
from tests.test_engine_e2e import reference_tokens

pytestmark = pytest.mark.e2e
PREFIX = "span"


@pytest.fixture(scope="module")
def spanning(nats_server, tmp_path_factory):
    c = start_cluster(nats_server, tmp_path_factory.mktemp("dpbus-span"), dp_size=1, nnodes=2, local_devices=2,
                      prefix=PREFIX, extra={"DPBUS_MAX_SEQ_LEN": "256", "DPBUS_MAX_PREFILL_TOKENS": "32",
                                            "DPBUS_HEARTBEAT_TIMEOUT": "2"})
    yield c
    c.stop()


async def test_group_of_two_processes_gives_the_single_process_tokens(spanning):
    texts = [f"span test {i} " + "abc " * (i * 5) for i in range(6)]  # up to ~110 tokens: several chunks
    nc = await client_of(spanning)
    outs = await asyncio.gather(*(generate(nc, {"text": t, "sampling": {"max_new_tokens": 10, "temperature": 0,
                                                                        "ignore_eos": True}},
                                           subjects=Subjects(PREFIX)) for t in texts))
    await nc.close()
    want = reference_tokens([tokenizer.ByteTokenizer().encode(t) for t in texts], 10, 256)
    for out, ref in zip(outs, want):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.token_ids == ref


async def test_killing_one_member_ends_in_flight_requests_with_an_error(spanning):
    """Runs last: it breaks the group."""
    nc = await client_of(spanning)
    tasks = [asyncio.create_task(generate(nc, {"text": f"long {i}", "sampling": {"max_new_tokens": 400,
                                                                                  "ignore_eos": True}},
                                          subjects=Subjects(PREFIX), timeout=60)) for i in range(4)]
    await asyncio.sleep(1.0)  # let them start streaming
    member = next(p for p in spanning.procs if p.name == "worker-1")
    killed_at = time.monotonic()
    member.popen.kill()
    outs = await asyncio.gather(*tasks)
    answered_in = time.monotonic() - killed_at
    await nc.close()
    print(f"every in-flight request answered {answered_in:.1f}s after the member was killed")
    for out in outs:
        assert isinstance(out.terminal, Error), out.terminal
        assert out.terminal.code.value == "worker_lost", out.terminal
        assert out.chunks, "the requests were streaming before the kill"
    assert answered_in < 15


def test_a_node_whose_group_never_forms_names_the_missing_member(nats_server):
    import os
    import subprocess
    import sys

    from dpbus.services.launcher import free_port

    out = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "worker", "--node-rank", "0", "--nnodes", "3",
                          "--dp-size", "1", "--coordinator", f"127.0.0.1:{free_port()}", "--join-timeout", "2",
                          "--nats-url", nats_server.url, "--prefix", "lonely"],
                         env={**os.environ, **{f"DPBUS_{k.upper()}": v for k, v in nats_server.settings("worker-0-0").items()}},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "node(s) [1, 2] did not join within 2s" in out.stderr, out.stderr[-500:]
