"""The whole path through real processes: a real nats-server, ingest, two publishers and
two JAX workers (2 DP groups x 2 devices), driven by a plain NATS client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import msgspec
import nats
import pytest

from dpbus.schemas import AbortAck, Accepted, Chunk, Done, Error
from tests.conftest import CLUSTER_SETTINGS, client_of
from dpbus.schemas.codec import decode_answer

pytestmark = pytest.mark.e2e


async def ask(nc, body: bytes, linger: float = 0.3, timeout: float = 120.0) -> list[bytes]:
    """Publish one raw body with a reply inbox; return every message received until the
    terminal one, plus whatever arrives within ``linger`` seconds after it."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    got: list[bytes] = []
    try:
        await nc.publish("dpbus.generate", body, reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=timeout)
            got.append(msg.data)
            if msg.data[:1] == b"{" and json.loads(msg.data)["type"] in ("done", "error"):
                break
            if msg.data[:1] != b"{" and msgspec.msgpack.decode(msg.data)["type"] in ("done", "error"):
                break
        try:
            while True:
                got.append((await sub.next_msg(timeout=linger)).data)
        except nats.errors.TimeoutError:
            pass
    finally:
        await sub.unsubscribe()
    return got


def body(req: dict, packed: bool = False) -> bytes:
    return msgspec.msgpack.encode(req) if packed else json.dumps(req).encode()


def terminal_of(msgs: list[bytes]):
    answers = [decode_answer(m) for m in msgs]
    terminals = [a for a in answers if isinstance(a, (Done, Error))]
    assert len(terminals) == 1, f"expected exactly one terminal message, got {len(terminals)}: {terminals}"
    assert isinstance(answers[-1], (Done, Error)), "nothing may follow the terminal message"
    return [a for a in answers if isinstance(a, Chunk)], terminals[0]


async def connect(cluster):
    return await client_of(cluster)


async def test_twenty_concurrent_requests_json_and_msgpack(cluster):
    nc = await connect(cluster)
    reqs = [({"rid": f"r{i}", "text": f"request number {i} " * (1 + i % 4),
              "sampling": {"max_new_tokens": 4 + i % 7, "temperature": 0.0 if i % 2 else 0.8, "seed": i}},
             i % 2 == 1) for i in range(20)]
    results = await asyncio.gather(*(ask(nc, body(r, packed)) for r, packed in reqs))
    await nc.close()
    groups = set()
    for (req, packed), msgs in zip(reqs, results):
        for m in msgs:  # the answer uses the request's encoding
            assert (m[:1] == b"{") != packed
        chunks, done = terminal_of(msgs)
        assert isinstance(done, Done), done
        assert done.rid == req["rid"]
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert len(chunks) == done.completion_tokens >= 1
        assert done.completion_tokens <= req["sampling"]["max_new_tokens"]
        assert done.prompt_tokens == len(req["text"].encode()) + 1  # BOS + bytes
        assert done.timings.total_ms >= done.timings.ttft_ms > 0
        groups.add(done.dp_rank)
    assert groups == {0, 1}, f"both DP groups should serve, got {groups}"


@pytest.mark.parametrize("rank", [0, 1])
async def test_dp_rank_pin_is_honoured(cluster, rank):
    nc = await connect(cluster)
    outs = await asyncio.gather(*(ask(nc, body({"text": f"pinned {i}", "dp_rank": rank,
                                                 "sampling": {"max_new_tokens": 3}})) for i in range(4)))
    await nc.close()
    assert {terminal_of(m)[1].dp_rank for m in outs} == {rank}


async def test_bad_requests_get_error_answers_and_service_continues(cluster):
    nc = await connect(cluster)
    cases = [
        (json.dumps({"text": "x", "dp_rank": 2}).encode(), "unknown_dp_rank"),
        (b'{"text": "unterminated', "bad_request"),
        (b"", "bad_request"),
        (b"\xff\xfe\x00", "bad_request"),
        (b'{"text": "x", "color": "blue"}', "bad_request"),
        (b'{"text": "x", "sampling": {"max_new_tokens": 0}}', "bad_request"),
        (json.dumps({"text": "y" * 600}).encode(), "prompt_too_long"),
        (json.dumps({"input_ids": [1, 2, 100000]}).encode(), "bad_request"),
        (msgspec.msgpack.encode({"text": 7}), "bad_request"),
    ]
    for raw, code in cases:
        _, err = terminal_of(await ask(nc, raw))
        assert isinstance(err, Error) and err.code.value == code, (raw[:30], err)
        assert err.message
    _, done = terminal_of(await ask(nc, body({"text": "still serving", "sampling": {"max_new_tokens": 2}})))
    await nc.close()
    assert isinstance(done, Done)


async def test_non_streaming_request_gets_only_the_terminal_with_the_output(cluster):
    nc = await connect(cluster)
    msgs = await ask(nc, body({"text": "whole answer", "stream": False,
                               "sampling": {"max_new_tokens": 5, "temperature": 0}}))
    await nc.close()
    chunks, done = terminal_of(msgs)
    assert chunks == [] and isinstance(done, Done)
    assert len(done.token_ids) == done.completion_tokens and done.text is not None


@pytest.mark.parametrize("packed", [False, True])
async def test_ack_asks_for_accepted_before_anything_else_and_only_then(cluster, packed):
    """With ``ack``: one ``accepted`` first, naming the group that holds the request (the
    pinned one) and how many wait ahead of it; without, no ``accepted`` at all."""
    nc = await connect(cluster)
    try:
        with_ack, without = await asyncio.gather(
            ask(nc, body({"rid": f"acked-{packed}", "text": "tell me", "dp_rank": 1, "ack": True,
                          "sampling": {"max_new_tokens": 4}}, packed)),
            ask(nc, body({"rid": f"unacked-{packed}", "text": "tell me", "sampling": {"max_new_tokens": 4}}, packed)))
    finally:
        await nc.close()
    answers = [decode_answer(m) for m in with_ack]
    first, rest = answers[0], with_ack[1:]
    assert isinstance(first, Accepted), answers
    assert (first.rid, first.dp_rank) == (f"acked-{packed}", 1) and first.position >= 0
    assert (with_ack[0][:1] == b"{") is not packed  # in the request's encoding, as every answer
    chunks, done = terminal_of(rest)
    assert isinstance(done, Done) and done.dp_rank == 1 and len(chunks) == done.completion_tokens
    assert not any(isinstance(decode_answer(m), Accepted) for m in without)
    terminal_of(without)


async def test_max_new_tokens_past_the_context_is_clamped_and_done_says_so(cluster):
    max_seq_len = int(CLUSTER_SETTINGS["DPBUS_MAX_SEQ_LEN"])
    nc = await connect(cluster)
    long, fits = await asyncio.gather(
        ask(nc, body({"text": "clamp me", "stream": False,
                      "sampling": {"max_new_tokens": 60000, "temperature": 0, "ignore_eos": True}})),
        ask(nc, body({"text": "fits", "stream": False, "sampling": {"max_new_tokens": 4, "temperature": 0}})))
    await nc.close()
    _, done = terminal_of(long)
    assert isinstance(done, Done), done
    assert done.clamped_max_new_tokens == max_seq_len - done.prompt_tokens
    assert done.completion_tokens == done.clamped_max_new_tokens and done.finish_reason.value == "length"
    _, small = terminal_of(fits)
    assert small.clamped_max_new_tokens is None and b"clamped" not in fits[-1]


def test_generate_sends_only_the_sampling_fields_its_flags_set(cluster):
    """No flags: the wire's defaults apply (temperature 1.0, a random seed, 32 tokens)."""
    env = {**os.environ, "DPBUS_NATS_USER": "client", "DPBUS_NATS_PASSWORD": cluster.credentials.passwords["client"]}
    outs = [subprocess.run([sys.executable, "-m", "dpbus.services.cli", "generate", "--nats-url", cluster.nats_url, "--raw",
                            "--no-stream", "defaults"] + extra, env=env, capture_output=True, text=True, timeout=120)
            for extra in ([], [], ["--temperature", "0"], ["--temperature", "0"])]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    done = [json.loads(o.stdout.splitlines()[-1]) for o in outs]
    assert done[2]["token_ids"] == done[3]["token_ids"]  # greedy when asked
    assert done[0]["token_ids"] != done[1]["token_ids"]  # sampled with fresh seeds by default
    assert all(d["completion_tokens"] <= 32 for d in done)


async def test_greedy_output_is_the_same_in_both_groups_and_missing_rid_is_assigned(cluster):
    nc = await connect(cluster)
    req = {"text": "same weights everywhere", "sampling": {"max_new_tokens": 8, "temperature": 0.0}}
    a, b = await asyncio.gather(ask(nc, body({**req, "dp_rank": 0})), ask(nc, body({**req, "dp_rank": 1})))
    await nc.close()
    (ca, da), (cb, db) = terminal_of(a), terminal_of(b)
    assert [c.token_ids for c in ca] == [c.token_ids for c in cb]
    assert da.rid and db.rid and da.rid != db.rid


async def test_seeded_sampling_is_reproducible(cluster):
    nc = await connect(cluster)
    req = body({"text": "roll the dice", "sampling": {"max_new_tokens": 8, "temperature": 1.0, "seed": 1234}})
    first, second = await asyncio.gather(ask(nc, req), ask(nc, req))
    await nc.close()
    assert [c.token_ids for c in terminal_of(first)[0]] == [c.token_ids for c in terminal_of(second)[0]]


async def test_abort_a_running_request_and_an_unknown_rid(cluster):
    nc = await connect(cluster)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("dpbus.generate", body({"rid": "long-one", "text": "go on",
                                             "sampling": {"max_new_tokens": 400, "ignore_eos": True}}), reply=inbox)
    first = decode_answer((await sub.next_msg(timeout=60)).data)
    assert isinstance(first, Chunk)
    ack = msgspec.json.decode((await nc.request("dpbus.abort", body({"rid": "long-one", "reply": inbox}),
                                                timeout=10)).data, type=AbortAck)
    assert ack.found and ack.dp_rank in (0, 1)
    while True:
        ans = decode_answer((await sub.next_msg(timeout=30)).data)
        if not isinstance(ans, Chunk):
            break
    assert isinstance(ans, Done) and ans.finish_reason.value == "abort" and ans.completion_tokens < 400
    unknown = msgspec.json.decode((await nc.request("dpbus.abort", body({"rid": "never-seen", "reply": inbox}),
                                                    timeout=10)).data,
                                  type=AbortAck)
    assert unknown.found is False
    bad = decode_answer((await nc.request("dpbus.abort", b'{"id": 1}', timeout=10)).data)
    await nc.close()
    assert isinstance(bad, Error) and bad.code.value == "bad_request"


async def test_every_service_answers_micro_discovery(cluster):
    nc = await connect(cluster)
    inbox = nc.new_inbox()
    names: list[str] = []

    async def on_pong(msg):
        if msg.data:
            names.append(json.loads(msg.data)["name"])

    await nc.subscribe(inbox, cb=on_pong)
    await nc.publish("$SRV.PING", b"", reply=inbox)
    for _ in range(40):
        if len(names) >= 5:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    await nc.close()
    assert sorted(names) == ["dpbus-ingest", "dpbus-publisher", "dpbus-publisher", "dpbus-worker", "dpbus-worker"]


def test_generate_command_streams_an_answer(cluster):
    out = subprocess.run([sys.executable, "-m", "dpbus.services.cli", "generate", "--nats-url", cluster.nats_url,
                          "--max-new-tokens", "6", "--raw", "hello there"],
                         env={**os.environ, "DPBUS_NATS_USER": "client",
                              "DPBUS_NATS_PASSWORD": cluster.credentials.passwords["client"]},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    # it asks for `accepted` (the retry rule, docs/guarantees.md), and --raw prints it
    assert [d["type"] for d in lines] == ["accepted"] + ["chunk"] * (len(lines) - 2) + ["done"]
    assert lines[0]["dp_rank"] == lines[-1]["dp_rank"] and lines[0]["rid"] == lines[-1]["rid"]


@pytest.mark.parametrize("stream", [True, False])
async def test_stop_strings_end_the_answer_before_the_stop(cluster, stream):
    """Greedy output once without stop strings, then again with a piece of its middle as a
    stop string: the answer is the text before it, finish_reason stop, never the stop itself."""
    from dpbus.services.client import generate

    nc = await connect(cluster)
    try:
        base = {"text": "stop strings", "stream": stream,
                "sampling": {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}}
        full = await generate(nc, base)
        text = full.text
        assert isinstance(full.terminal, Done)
        # the built-in model's dummy weights say random bytes: stop at two plain characters
        at = next(i for i in range(5, len(text) - 1) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2])
        stop = text[at:at + 2]
        first = text.find(stop)
        stopped = await generate(nc, {**base, "sampling": {**base["sampling"], "stop": ["never-there", stop]}})
    finally:
        await nc.close()
    assert isinstance(stopped.terminal, Done), stopped.terminal
    assert stopped.terminal.finish_reason.value == "stop"
    assert stopped.text == text[:first]
    assert stop not in stopped.text
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]
