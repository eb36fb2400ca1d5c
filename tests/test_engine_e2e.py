"""The engine through the whole system: exact greedy tokens under concurrency, running
out of KV pages (queueing and preemption), abort wherever a request is."""

from __future__ import annotations

import asyncio
import json

import jax
import msgspec
import pytest

from dpbus.schemas import Chunk, Done
from dpbus.schemas.internal import DecodeItem, PrefillItem, RowSampling
from dpbus.services import tokenizer
from dpbus.services.client import decode_answer, generate
from dpbus.services.model_config import ModelConfig
from dpbus.services.worker.model import dummy_weights
from dpbus.services.worker.runner import ModelRunner, make_group_mesh
from tests.conftest import CLUSTER_SETTINGS, client_of, start_cluster
from tests.support import service_stats

pytestmark = pytest.mark.e2e
GREEDY = RowSampling(0.0, 1.0, 0, 0)


def reference_tokens(prompts: list[list[int]], n: int, max_seq_len: int) -> list[list[int]]:
    """Greedy tokens of each prompt alone, on one device, prefilled in one piece."""
    cfg = ModelConfig(max_seq_len=max_seq_len)
    per_seq = -(-max_seq_len // 16)
    runner = ModelRunner(cfg, make_group_mesh(jax.devices()[:1]), num_pages=per_seq + 1, page_size=16,
                         max_running_requests=1, max_prefill_tokens=max_seq_len, host_weights=dummy_weights(cfg, 0))
    pages = list(range(1, per_seq + 1))
    out = []
    for prompt in prompts:
        token, _ = runner.prefill(PrefillItem(0, prompt, True, pages, GREEDY))
        toks = [token]
        while len(toks) < n:
            (token,), _ = runner.decode([DecodeItem(token, len(prompt) + len(toks) - 1, len(toks), pages, GREEDY)])
            toks.append(token)
        out.append(toks)
    return out


def prompt_text(i: int) -> str:
    return f"prompt {i}: " + "lorem ipsum dolor sit amet " * (i % 9) + "x" * (i * 7 % 23)


async def test_32_concurrent_greedy_requests_match_the_single_device_reference(cluster):
    texts = [prompt_text(i) for i in range(32)]
    n = 12
    nc = await client_of(cluster)
    outs = await asyncio.gather(*(generate(nc, {"text": t, "sampling": {"max_new_tokens": n, "temperature": 0,
                                                                        "ignore_eos": True}}) for t in texts))
    await nc.close()
    lengths = [len(tokenizer.ByteTokenizer().encode(t)) for t in texts]
    assert max(lengths) > int(CLUSTER_SETTINGS["DPBUS_MAX_PREFILL_TOKENS"])  # some prompts span several chunks
    want = reference_tokens([tokenizer.ByteTokenizer().encode(t) for t in texts], n,
                            int(CLUSTER_SETTINGS["DPBUS_MAX_SEQ_LEN"]))
    assert {o.terminal.dp_rank for o in outs} == {0, 1}
    for text, out, ref in zip(texts, outs, want):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.token_ids == ref, f"{text!r}: {out.token_ids} != {ref}"


@pytest.fixture(scope="module")
def small_pool(nats_server, tmp_path_factory):
    """One group whose KV pool holds about four of the requests below, not eight."""
    c = start_cluster(nats_server, tmp_path_factory.mktemp("dpbus-small"), dp_size=1, nnodes=1,
                      local_devices=2, prefix="small",
                      extra={"DPBUS_MAX_SEQ_LEN": "256", "DPBUS_PAGE_SIZE": "16", "DPBUS_NUM_PAGES": "41",
                             "DPBUS_MAX_RUNNING_REQUESTS": "8", "DPBUS_MAX_PREFILL_TOKENS": "64",
                             "DPBUS_WARMUP": "true"})  # its compile counts are checked below
    yield c
    c.stop()


async def publisher_stats(cluster, prefix: str = "small") -> dict:
    (stats,) = await service_stats(cluster, "dpbus-publisher", prefix)
    return stats


async def test_running_out_of_pages_queues_and_preempts_but_every_answer_is_exact(small_pool):
    from dpbus.schemas import Subjects

    subjects = Subjects("small")
    prompts = [tokenizer.ByteTokenizer().encode(f"request {i} " + "abc" * (10 + i)) for i in range(8)]
    n = 100  # prompt ~45-65 + 100 tokens: ~10 pages each, 80 wanted from a pool of 40
    nc = await client_of(small_pool)
    outs = await asyncio.gather(*(generate(nc, {"input_ids": p, "sampling": {"max_new_tokens": n, "temperature": 0,
                                                                             "ignore_eos": True}},
                                           subjects=subjects, timeout=180) for p in prompts))
    stats = await publisher_stats(small_pool)
    await nc.close()
    want = reference_tokens(prompts, n, 256)
    for out, ref in zip(outs, want):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.token_ids == ref
        assert [c.index for c in out.chunks] == list(range(n))
    print(f"out of pages: {stats['preemptions']} preemptions for 8 requests")
    assert stats["preemptions"] > 0, stats
    assert stats["free_pages"] == 40 and stats["running"] == 0 and stats["waiting"] == 0, stats


async def test_abort_reaches_queued_and_running_requests_and_frees_their_pages(small_pool):
    from dpbus.schemas import Subjects

    subjects = Subjects("small")
    nc = await client_of(small_pool)
    inboxes = []
    for i in range(12):  # more than the batch (8) and the pool: some wait in the queue
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(subjects.generate, json.dumps({"rid": f"ab-{i}", "text": "y" * 60, "sampling": {
            "max_new_tokens": 150, "ignore_eos": True}}).encode(), reply=inbox)
        inboxes.append(sub)
    first = decode_answer((await inboxes[0].next_msg(timeout=60)).data)
    assert isinstance(first, Chunk)
    for i in reversed(range(12)):  # the queued ones first: aborting a running one lets a queued one in
        abort = {"rid": f"ab-{i}", "reply": inboxes[i].subject}
        ack = msgspec.json.decode((await nc.request(subjects.abort, json.dumps(abort).encode(), timeout=10)).data)
        assert ack["found"] is True, (i, ack)
    reasons = []
    for sub in inboxes:
        while True:
            ans = decode_answer((await sub.next_msg(timeout=60)).data)
            if not isinstance(ans, Chunk):
                break
        assert isinstance(ans, Done)
        reasons.append((ans.finish_reason.value, ans.completion_tokens))
    await asyncio.sleep(0.2)
    stats = await publisher_stats(small_pool)
    await nc.close()
    assert all(r == "abort" for r, _ in reasons)
    assert any(t == 0 for _, t in reasons), f"some requests were aborted while still queued: {reasons}"
    assert stats["free_pages"] == 40 and stats["running"] == 0 and stats["waiting"] == 0, stats


async def test_shared_prefixes_come_from_the_prefix_cache_and_answers_stay_exact(small_pool):
    """The prefix cache is on by default: requests that share an 80-token prefix (five
    whole pages) compute it once, and every answer equals the reference (one-piece
    prefill, no cache)."""
    from dpbus.schemas import Subjects

    subjects = Subjects("small")
    prefix = tokenizer.ByteTokenizer().encode("You are a terse assistant. " * 3)[:80]
    prompts = [prefix + tokenizer.ByteTokenizer().encode(f"question {i}?" * (1 + i % 3)) for i in range(7)]
    req = lambda p: {"input_ids": p, "sampling": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}  # noqa: E731
    nc = await client_of(small_pool)
    before = await publisher_stats(small_pool)
    outs = [await generate(nc, req(prompts[0]), subjects=subjects, timeout=120)]
    outs += await asyncio.gather(*(generate(nc, req(p), subjects=subjects, timeout=120) for p in prompts[1:]))
    after = await publisher_stats(small_pool)
    await nc.close()
    for out, ref in zip(outs, reference_tokens(prompts, 12, 256)):
        assert isinstance(out.terminal, Done) and out.token_ids == ref
    print(f"prefix cache: {after['hit_tokens'] - before['hit_tokens']} hit tokens, {after['cached_pages']} pages "
          f"cached, {after['evictions']} evictions")
    assert after["hit_tokens"] - before["hit_tokens"] >= 6 * 80
    assert after["prefill_tokens"] - before["prefill_tokens"] <= sum(map(len, prompts)) - 6 * 80
    assert after["cached_pages"] >= 5 and after["running"] == 0 and after["free_pages"] == 40, after


async def test_no_compilation_after_warmup_whatever_the_workload(cluster, small_pool):
    """A varied workload of its own (prompt lengths across every prefill bucket, batches
    of every size), after whatever the other tests ran, then the compile counts."""
    from dpbus.schemas import Subjects

    for c, prefix in ((cluster, "dpbus"), (small_pool, "small")):
        nc = await client_of(c)
        for batch in (1, 3, 7):
            await asyncio.gather(*(generate(nc, {"input_ids": list(range(1, 2 + 13 * i % 150)),
                                                 "sampling": {"max_new_tokens": 3 + i, "temperature": 0.7}},
                                            subjects=Subjects(prefix)) for i in range(batch)))
        workers = await service_stats(c, "dpbus-worker", prefix)
        await nc.close()
        assert workers and all(w["steps"] > 0 for w in workers), workers
        for w in workers:
            print(f"{prefix}: compiled at warm-up {w['compiled_at_warmup']}, after the workload {w['compiled_now']}")
            assert w["compiled_now"] == w["compiled_at_warmup"] > 0, w
