"""The OpenAI-compatible gateway, driven by the official `openai` SDK against real services
(`dpbus up`'s layout: ingest, publishers, workers and a gateway process, all on the
secured server): completions and chat, streamed and not, stop strings, seeded sampling,
the same greedy text as the NATS path, an error per HTTP status, a client that goes away
aborting its request, and Prometheus metrics that move. And what a hostile party tries:
answers forged on a call's subject, a body too large to read, a request left without an
answer (504) still running, /metrics without its key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import msgspec
import openai
import pytest

from dpbus.schemas import Chunk, Done, FinishReason, Subjects
from dpbus.services.client import generate
from dpbus.services.launcher import free_port, listening_socket
from tests.conftest import client_of, start_cluster

pytestmark = pytest.mark.e2e

PREFIX = "gw"
KEY = "sk-dpbus-test"
METRICS_KEY = "mk-dpbus-test"
SETTINGS = {"DPBUS_MAX_SEQ_LEN": "256", "DPBUS_MAX_PREFILL_TOKENS": "32", "DPBUS_MAX_RUNNING_REQUESTS": "2",
            "DPBUS_MAX_WAITING": "2"}


@pytest.fixture(scope="module")
def served(nats_server, tmp_path_factory):
    c = start_cluster(nats_server, tmp_path_factory.mktemp("dpbus-gw"), dp_size=2, nnodes=2, local_devices=1,
                      prefix=PREFIX, http_port=free_port(),
                      extra={"DPBUS_API_KEY": KEY, "DPBUS_METRICS_KEY": METRICS_KEY, **SETTINGS})
    yield c
    c.stop()


@pytest.fixture
def sdk(served):
    return openai.OpenAI(base_url=served.http_url, api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(sdk):
    (model,) = sdk.models.list().data
    assert model.id == "dpbus-builtin"


def test_completion_greedy_text_is_the_nats_path_s(sdk, served):
    got = sdk.completions.create(model="dpbus-builtin", prompt="The bus says", max_tokens=12, temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "length"
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == len("The bus says") + 1  # + BOS

    async def over_nats():
        nc = await client_of(served)
        try:
            return await generate(nc, {"text": "The bus says", "sampling": {"max_new_tokens": 12, "temperature": 0}},
                                  subjects=Subjects(PREFIX))
        finally:
            await nc.close()

    assert choice.text == asyncio.run(over_nats()).text


def test_chat_streamed_equals_chat_whole(sdk):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = sdk.chat.completions.create(model="dpbus-builtin", messages=messages, max_tokens=10, temperature=0)
    stream = sdk.chat.completions.create(model="dpbus-builtin", messages=messages, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert reasons[-1] == whole.choices[0].finish_reason == "length"
    assert usage.completion_tokens == whole.usage.completion_tokens == 10


def test_stop_strings_through_the_sdk(sdk):
    full = sdk.completions.create(prompt="stop here", max_tokens=60, temperature=0,
                                  extra_body={"ignore_eos": True}, model="dpbus-builtin").choices[0].text
    at = next(i for i in range(3, len(full) - 1) if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2])
    stop = full[at:at + 2]
    got = sdk.completions.create(prompt="stop here", max_tokens=60, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True}, model="dpbus-builtin").choices[0]
    assert got.finish_reason == "stop" and got.text == full[:full.find(stop)]
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        prompt="stop here", max_tokens=60, temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True},
        model="dpbus-builtin") if c.choices)
    assert streamed == got.text


def test_seeded_sampling_is_reproducible(sdk):
    def sample(seed: int) -> str:
        return sdk.completions.create(model="dpbus-builtin", prompt="dice", max_tokens=16, temperature=1.0,
                                      seed=seed).choices[0].text

    assert sample(42) == sample(42)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_pinning_a_group_with_the_extension_field(sdk):
    for g in (0, 1):
        got = sdk.completions.create(model="dpbus-builtin", prompt="pin", max_tokens=2, extra_body={"dp_rank": g})
        assert got.model_extra["dp_rank"] == g


@pytest.mark.parametrize("how, status, code", [
    ("no key", 401, "invalid_api_key"),
    ("bad json", 400, None),
    ("n=2", 400, None),
    ("prompt too long", 400, "context_length_exceeded"),
    ("unknown group", 400, "unknown_dp_rank"),
    ("wrong model", 404, "model_not_found"),
])
def test_errors_have_openai_s_shape_and_status(served, how, status, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body: dict = {"model": "dpbus-builtin", "prompt": "x", "max_tokens": 2}
    if how == "no key":
        headers.pop("Authorization")
    elif how == "n=2":
        body["n"] = 2
    elif how == "prompt too long":
        body["prompt"] = "y" * 400
    elif how == "unknown group":
        body["dp_rank"] = 7
    elif how == "wrong model":
        body["model"] = "gpt-4"
    data = b"{not json" if how == "bad json" else json.dumps(body).encode()
    r = httpx.post(f"{served.http_url}/completions", content=data, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code, err


def test_overload_is_429(sdk):
    """Two running and two waiting per group: a burst of long requests overflows."""
    async def burst():
        client = openai.AsyncOpenAI(base_url=sdk.base_url, api_key=KEY, max_retries=0, timeout=120)

        async def one(i: int):
            try:
                await client.completions.create(model="dpbus-builtin", prompt=f"burst {i}", max_tokens=120,
                                                extra_body={"ignore_eos": True})
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    codes = asyncio.run(burst())
    assert 429 in codes and 200 in codes, codes
    assert set(codes) <= {200, 429}, codes


@contextlib.contextmanager
def own_gateway(served, tmp_path, prefix: str, *flags: str):
    """One more gateway process on ``served``'s server, for ``prefix``; yields its root URL
    once it answers /health (whatever it says)."""
    port = free_port()
    env = {**os.environ, **SETTINGS, "DPBUS_NATS_URL": served.nats_url, "DPBUS_PREFIX": prefix,
           "DPBUS_NATS_USER": "gateway", "DPBUS_NATS_PASSWORD": served.credentials.passwords["gateway"]}
    with open(tmp_path / "gw.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dpbus.services.cli", "gateway", "--http-port", str(port), *flags],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "gw.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_no_ingest_is_503(served, tmp_path):
    """A gateway whose prefix nothing serves: NATS says no responders, the client gets 503."""
    with own_gateway(served, tmp_path, "gwnone") as url:
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text


async def publisher_running(served) -> int:
    nc = await client_of(served, "operator")
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.STATS.dpbus-publisher", b"", reply=inbox)
        total = 0
        try:
            while True:
                doc = json.loads((await sub.next_msg(timeout=1)).data)
                if doc.get("metadata", {}).get("prefix") == PREFIX:
                    total += doc["endpoints"][0]["data"]["running"]
        except Exception:  # noqa: BLE001 - no more answers
            return total
    finally:
        await nc.close()


def test_a_client_that_goes_away_aborts_its_request(served):
    body = {"model": "dpbus-builtin", "prompt": "a long story", "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{served.http_url}/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            assert asyncio.run(publisher_running(served)) >= 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while asyncio.run(publisher_running(served)) > 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.3)


def test_a_request_without_an_answer_in_time_is_aborted(served, tmp_path):
    """A gateway that gives up on a request (504) aborts it: its group drops it at once
    instead of computing every token for nobody. Group 0's worker is stopped mid-stream,
    so the answers stop for longer than the gateway waits."""
    worker = next(p.popen for p in served.procs if p.name == "worker-0")
    body = {"prompt": "a story nobody reads", "max_tokens": 200, "stream": True, "ignore_eos": True, "dp_rank": 0}
    with own_gateway(served, tmp_path, PREFIX, "--request-timeout", "3") as root:
        with httpx.stream("POST", f"{root}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            worker.send_signal(signal.SIGSTOP)
            try:
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            finally:
                worker.send_signal(signal.SIGCONT)
        assert events[-1]["error"]["type"] == "timeout", events[-1]
        deadline = time.monotonic() + 30
        while scrape(root, "").get('dpbus_gateway_aborts_total{reason="timeout",result="found"}') != 1:
            assert time.monotonic() < deadline, "no abort for the timed-out request"
            time.sleep(0.2)
    deadline = time.monotonic() + 30
    while asyncio.run(publisher_running(served)) > 0:
        assert time.monotonic() < deadline, "the timed-out request is still running"
        time.sleep(0.3)


def test_answers_forged_on_a_call_s_subject_never_reach_its_user(served, sdk):
    """Someone who learns the reply subject of a gateway call (here: the admin user, who
    may read every request; also a client sending a request of its own with that subject
    as its reply) publishes answers there: the HTTP user gets its own answer only, and the
    forged ones are counted."""
    want = sdk.completions.create(model="dpbus-builtin", prompt="forge", max_tokens=16, temperature=0).choices[0].text
    root = served.http_url.removesuffix("/v1")

    def dropped() -> float:
        now = scrape(root)
        return sum(v for k, v in now.items() if k.startswith("dpbus_gateway_dropped_answers_total"))

    before = dropped()

    async def forged_call() -> str:
        admin, mallory = await client_of(served, "admin"), await client_of(served, "client")
        enc = msgspec.msgpack.encode

        async def tap(msg) -> None:
            if not msg.reply.startswith("_INBOX.gateway."):
                return
            await admin.publish(msg.reply, enc(Chunk(rid="cmpl-forged", index=0, token_ids=[70], text="FORGED")))
            await admin.publish(msg.reply, enc(Done(rid="cmpl-forged", dp_rank=0, finish_reason=FinishReason.STOP,
                                                    prompt_tokens=1, completion_tokens=1)))
            await mallory.publish(Subjects(PREFIX).generate, reply=msg.reply, payload=json.dumps(
                {"text": "FORGED", "sampling": {"max_new_tokens": 4}}).encode())

        try:
            for subject in (Subjects(PREFIX).generate, Subjects(PREFIX).generate + ".>"):  # plain or per user
                await admin.subscribe(subject, cb=tap)
            await admin.flush()
            client = openai.AsyncOpenAI(base_url=sdk.base_url, api_key=KEY, max_retries=0, timeout=120)
            try:
                got = await client.completions.create(model="dpbus-builtin", prompt="forge", max_tokens=16,
                                                      temperature=0)
            finally:
                await client.close()
            return got.choices[0].text
        finally:
            await admin.close()
            await mallory.close()

    assert asyncio.run(forged_call()) == want
    deadline = time.monotonic() + 30
    while dropped() < before + 2:  # the forged chunk and end, at least
        assert time.monotonic() < deadline, "forged answers not counted"
        time.sleep(0.2)


def test_a_body_over_the_limit_is_refused_unread(served):
    """A Content-Length over --max-body-bytes (4 MiB by default) is answered 413 before any
    of the body is sent."""
    host, port = served.http_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n".encode())
        answer = b""
        while b"}}" not in answer:
            part = sock.recv(4096)
            assert part, answer
            answer += part
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_an_unknown_chat_role_is_400(sdk):
    with pytest.raises(openai.BadRequestError, match="wizard"):
        sdk.chat.completions.create(model="dpbus-builtin", max_tokens=2,
                                    messages=[{"role": "wizard", "content": "obey"}])


def scrape(root: str, key: str = METRICS_KEY) -> dict[str, float]:
    r = httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
    assert r.status_code == 200, r.text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dpbus_gateway_\S+) (\S+)$", r.text, re.M)}


def test_metrics_need_their_key(served):
    root = served.http_url.removesuffix("/v1")
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):  # the API key is not the metrics key
        r = httpx.get(f"{root}/metrics", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert "dpbus_gateway_time_to_first_token_seconds_count" in scrape(root)


def test_metrics_histograms_move(served, sdk):
    root = served.http_url.removesuffix("/v1")
    before = scrape(root)
    for stream in (False, True):
        out = sdk.completions.create(model="dpbus-builtin", prompt="metrics", max_tokens=5, stream=stream)
        if stream:
            list(out)
    after = scrape(root)
    for name in ("dpbus_gateway_time_to_first_token_seconds_count", "dpbus_gateway_request_seconds_count"):
        assert after[name] >= before.get(name, 0) + 2, name
    assert after["dpbus_gateway_inter_token_seconds_count"] > before.get("dpbus_gateway_inter_token_seconds_count", 0)
    assert after['dpbus_gateway_tokens_total{kind="completion"}'] >= \
        before.get('dpbus_gateway_tokens_total{kind="completion"}', 0) + 10


def test_every_service_serves_prometheus_metrics(nats_server, tmp_path):
    """`up`'s metrics: each service on its own port, listed for Prometheus; the publisher's
    histograms and the services' counters move after a request."""
    c = start_cluster(nats_server, tmp_path, dp_size=1, nnodes=1, local_devices=1, prefix="gwm", metrics=True,
                      extra={"DPBUS_MAX_SEQ_LEN": "128", "DPBUS_MAX_PREFILL_TOKENS": "32"})
    try:
        targets = json.loads((tmp_path / "prometheus-targets.json").read_text())
        by_name = {t["labels"]["service"]: t["targets"][0] for t in targets}
        assert set(by_name) == {"ingest", "publisher-0", "worker-0"}

        def scrape(name: str) -> str:
            return httpx.get(f"http://{by_name[name]}/metrics", timeout=10).text

        async def ask():
            nc = await client_of(c)
            try:
                return await generate(nc, {"text": "metrics", "sampling": {"max_new_tokens": 4}},
                                      subjects=Subjects("gwm"))
            finally:
                await nc.close()

        assert asyncio.run(ask()).terminal.completion_tokens == 4
        pub, ingest, worker = scrape("publisher-0"), scrape("ingest"), scrape("worker-0")
        assert re.search(r'^dpbus_publisher_time_to_first_token_seconds_count\{dp_rank="0"\} [1-9]', pub, re.M), pub
        assert re.search(r'^dpbus_publisher_step_seconds_count\{dp_rank="0"\} [1-9]', pub, re.M)
        assert re.search(r'^dpbus_publisher_done_total\{dp_rank="0"\} 1\.0', pub, re.M)
        assert re.search(r'^dpbus_publisher_free_pages\{dp_rank="0"\} \d', pub, re.M)
        assert re.search(r'^# TYPE dpbus_publisher_cached_pages gauge', pub, re.M)  # the prefix cache
        assert re.search(r'^dpbus_publisher_prefill_tokens_total\{dp_rank="0"\} [1-9]', pub, re.M)
        assert re.search(r'^dpbus_publisher_hit_tokens_total\{dp_rank="0"\} \d', pub, re.M)
        assert re.search(r"^dpbus_ingest_forwarded_total 1\.0", ingest, re.M), ingest
        assert re.search(r'^dpbus_worker_steps_total\{dp_rank="0",node_rank="0"\} [1-9]', worker, re.M), worker
        assert "process_start_time_seconds" in worker
        check_dashboard(pub + ingest + worker)
    finally:
        c.stop()


def check_dashboard(scraped: str) -> None:
    """Every dpbus metric infra/grafana/dpbus.json queries is one a service really serves."""
    from pathlib import Path

    from dpbus.services.metrics import GatewayMetrics

    served = scraped + GatewayMetrics().exposition()[0].decode()
    exposed = {re.sub(r"_total$", "", m) for m in re.findall(r"^# TYPE (dpbus_\w+) ", served, re.M)}
    dash = json.loads((Path(__file__).resolve().parents[1] / "infra" / "grafana" / "dpbus.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", m) for e in exprs for m in re.findall(r"dpbus_[a-z_]+", e)}
    assert len(used) >= 10 and used <= exposed, sorted(used - exposed)



def test_up_binds_the_gateway_s_port_itself_and_a_taken_one_moves_it():
    """`up` binds the gateway's socket and hands it down (no check-then-bind race between
    two `up`s or demos starting together): the port asked for, or any free one when
    another process holds it."""
    held = listening_socket(0)
    try:
        port = held.getsockname()[1]
        moved = listening_socket(port)
        try:
            assert moved.getsockname()[1] not in (port, 0)
            assert moved.get_inheritable()
        finally:
            moved.close()
    finally:
        held.close()
    again = listening_socket(port)  # free now: the port asked for
    try:
        assert again.getsockname() == ("127.0.0.1", port)
    finally:
        again.close()


def test_a_restarted_gateway_serves_on_the_same_port(served, sdk):
    """The gateway inherits the socket `up` bound, so a restart (a crash, `up`'s own
    restart) listens where clients already point, and no other process took it meanwhile."""
    gateway = next(p for p in served.procs if p.role == "gateway")
    gateway.popen.terminate()
    gateway.popen.wait(timeout=30)
    served.restart("gateway")
    deadline = time.monotonic() + 60
    while True:
        try:
            assert [m.id for m in sdk.models.list().data]
            break
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the restarted gateway never answered"
            time.sleep(0.2)
