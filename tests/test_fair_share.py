"""Fair share at ingest: a client's requests in flight and tokens per second are bounded,
and only that client is refused (``overloaded`` with ``retry_after_ms``). The scheduler's
side (who is admitted first, preemption for a newcomer) is in test_scheduler.py; the
figures with a real flood are ``make bench``'s ``fairness`` part."""

from __future__ import annotations

import asyncio

import msgspec

from dpbus.schemas import Error
from dpbus.services import logs
from dpbus.services.ingest.service import Ingest, TokenBuckets
from dpbus.services.settings import IngestSettings

LOG = logs.configure("warning", json=True)


def ingest(**kw) -> Ingest:
    return Ingest(msgspec.convert({"dp_size": 1, "nnodes": 1, **kw}, IngestSettings), LOG)


def submit(front: Ingest, client: str, tokens: int = 10, new: int = 10):
    body = msgspec.json.encode({"input_ids": [1] * tokens, "sampling": {"max_new_tokens": new}})
    sub, _ = asyncio.run(front.admit(body, f"{client}.x", client))
    return sub


def test_a_client_over_its_in_flight_share_is_refused_and_another_is_not():
    front = ingest(max_inflight_per_client=3)
    front.view.per_client["_INBOX.alice"] = 2  # held by publishers, as the ledger says
    front.client_handing["_INBOX.alice"] = 1  # being handed over now
    why, wait = front.over_share(submit(front, "_INBOX.alice"))
    assert "3 requests in flight" in why and wait > 0
    assert front.over_share(submit(front, "_INBOX.bob")) == ("", 0)
    assert ingest(max_inflight_per_client=0).over_share(submit(front, "_INBOX.alice")) == ("", 0)


def test_a_client_over_its_token_rate_is_told_when_to_come_back():
    front = ingest(client_tokens_per_s=100, client_burst_s=1.0)
    assert front.over_share(submit(front, "_INBOX.alice", 40, 40)) == ("", 0)  # 80 of 100
    why, wait = front.over_share(submit(front, "_INBOX.alice", 40, 40))  # 80 more: 60 short
    assert "100 tokens" in why and 550 <= wait <= 650
    assert front.over_share(submit(front, "_INBOX.bob", 40, 40)) == ("", 0)  # bob has his own bucket
    error = Error("overloaded", why, rid="r", retry_after_ms=wait)
    assert msgspec.json.decode(msgspec.json.encode(error))["retry_after_ms"] == wait


def test_token_buckets_refill_and_a_request_above_the_burst_passes_when_full():
    b = TokenBuckets()
    assert b.take("a", 50, rate=10, burst=100, now=0.0) == 0
    assert b.take("a", 80, rate=10, burst=100, now=0.0) == 3.0  # 50 left, 30 short at 10/s
    assert b.take("a", 80, rate=10, burst=100, now=3.0) == 0  # refilled
    assert b.take("b", 500, rate=10, burst=100, now=0.0) == 0  # full: even a huge one goes
    assert b.take("b", 1, rate=10, burst=100, now=0.0) > 0  # and is paid back before the next
