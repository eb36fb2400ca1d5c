"""The page pool and prefix index alone (``services/publisher/pages.py``), and property
tests (hypothesis) that pages never leak or get freed twice, for the pool under random
operations and for the scheduler under random workloads."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dpbus.schemas.internal import PAGE_HASH_BYTES, page_hashes
from dpbus.services.publisher.pages import PagePool
from tests.test_scheduler import random_workload


def test_page_hashes_chain_over_whole_pages():
    a = page_hashes(list(range(10)), 4)
    assert len(a) == 2 and all(len(h) == PAGE_HASH_BYTES for h in a)  # 2 whole pages of 4, 2 tokens left over
    assert page_hashes(list(range(8)) + [99], 4) == a  # only whole pages count
    b = page_hashes([0, 1, 2, 3, 9, 5, 6, 7], 4)
    assert b[0] == a[0] and b[1] != a[1]
    c = page_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)
    assert c[1] != a[1]  # page 1 has the same tokens, but a different prefix: a different hash
    assert page_hashes(list(range(8)), 2)[1] != a[0]  # the page size is part of the chain
    known = page_hashes(list(range(12)), 4, pages=1)
    assert page_hashes(list(range(12)), 4, known) == page_hashes(list(range(12)), 4) and len(known) == 3


def test_take_prefers_clean_pages_then_evicts_the_least_recently_used():
    pool = PagePool(7, 4)
    a, b = pool.take(2), pool.take(2)
    for page, h in zip(a + b, (b"a1", b"a2", b"b1", b"b2")):
        pool.publish(page, h)
    pool.release(a)
    pool.release(b)
    assert pool.available() == 6 and pool.cached_pages() == 4 and pool.evictions == 0
    assert pool.take(2) == [5, 6]  # the clean ones first
    assert pool.take(3) == [a[1], a[0], b[1]]  # then the oldest cached: each request's last page first
    assert pool.evictions == 3 and pool.lookup([b"b1", b"b2"]) == [b[0]] and pool.lookup([b"a1"]) == []
    assert pool.take(2) is None


def test_hold_takes_a_cached_page_out_of_eviction_and_release_only_drops_references():
    pool = PagePool(4, 4)
    [p] = pool.take(1)
    pool.publish(p, b"h")
    pool.hold([p])
    pool.release([p])  # the writer leaves, the reader still holds it
    assert pool.refs[p] == 1 and pool.available() == 2 and pool.take(3) is None
    pool.release([p])
    assert pool.refs[p] == 0 and pool.available() == 3 and pool.lookup([b"h"]) == [p]
    with pytest.raises(ValueError, match="released more often"):
        pool.release([p])


def test_the_same_content_twice_stays_one_cached_page():
    pool = PagePool(4, 4)
    p, q = pool.take(2)
    pool.publish(p, b"h")
    pool.publish(q, b"h")  # computed again by a concurrent request: stays private
    pool.release([p, q])
    assert pool.cached_pages() == 1 and pool.lookup([b"h"]) == [p] and q in pool._free


def test_without_the_cache_nothing_is_kept_and_forget_drops_everything():
    off = PagePool(4, 4, cache=False)
    [p] = off.take(1)
    off.publish(p, b"h")
    off.release([p])
    assert off.cached_pages() == 0 and off.lookup([b"h"]) == [] and off.digest() == b""
    on = PagePool(4, 4)
    p, q = on.take(2)
    on.publish(p, b"h1")
    on.publish(q, b"h2")
    on.release([p])
    assert on.digest() == b"h1h2"
    on.forget()
    assert on.cached_pages() == 0 and on.lookup([b"h1"]) == [] and on.refs[q] == 1 and p in on._free
    on.release([q])
    assert sorted(on.unheld()) == [1, 2, 3]


class PoolMachine(RuleBasedStateMachine):
    """Random takes, holds, publishes, releases and forgets against a simple model: who
    holds what. After every operation each page is exactly one of held / cached / free,
    counts match the holders, and nothing leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(9, 2)
        self.holders: list[list[int]] = []  # each a "request": the pages it holds

    @rule(n=st.integers(0, 4))
    def take(self, n):
        before = self.pool.available()
        got = self.pool.take(n)
        assert (got is None) == (n > before)
        if got:
            assert all(self.pool.refs[p] == 1 for p in got)
            self.holders.append(got)

    @rule(data=st.data())
    def hold_cached(self, data):
        key = data.draw(st.sampled_from([b"x%d" % i for i in range(6)]))
        pages = self.pool.lookup([key])
        self.pool.hold(pages)
        if pages:
            self.holders.append(pages)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def publish(self, data):
        pages = data.draw(st.sampled_from(self.holders))
        key = data.draw(st.sampled_from([b"x%d" % i for i in range(6)]))
        self.pool.publish(data.draw(st.sampled_from(pages)), key)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.holders) - 1))
        self.pool.release(self.holders.pop(i))

    @rule()
    def forget(self):
        self.pool.forget()

    @invariant()
    def consistent(self):
        pool = self.pool
        held = Counter(p for pages in self.holders for p in pages)
        assert [pool.refs[p] for p in range(1, 9)] == [held[p] for p in range(1, 9)]
        unheld = pool.unheld()
        assert len(unheld) == len(set(unheld)) and not set(unheld) & set(held)
        assert len(unheld) + len(held) == 8 and 0 not in unheld and 0 not in held
        assert set(pool._idle) <= set(pool._hash_of) and set(pool._free).isdisjoint(pool._hash_of)
        assert {v: k for k, v in pool._hash_of.items()} == pool._page_of


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), page_size=st.sampled_from([1, 2, 3, 4, 8]), spare=st.integers(0, 12),
       max_running=st.integers(1, 5), budget=st.integers(1, 24), cache=st.booleans())
def test_scheduler_pages_never_leak_or_double_free(seed, page_size, spare, max_running, budget, cache):
    """Random workloads (shared prefixes, multi-turn histories, aborts, pools from one
    context up): ``random_workload`` checks the pages after every step (reference counts
    equal the page tables, every page held or unheld exactly once, writes only to private
    uncached pages, reads only of the same context) and every output; at the end every
    page is back (a release past zero raises)."""
    max_len = 24
    num_pages = -(-max_len // page_size) + 1 + spare
    random_workload(seed, 120, max_running=max_running, budget=budget, max_len=max_len, num_pages=num_pages,
                    page_size=page_size, prefix_cache=cache)
