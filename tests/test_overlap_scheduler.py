"""The scheduler with overlapped steps (pure Python, no I/O): step N+1 is planned before
step N's tokens are known, decode rows feed ``LAST_TOKEN`` (the token their row sampled
last, held by the workers), and steps are applied ``depth`` behind.

``HeldFake`` stands in for the workers: it runs each step as soon as it is planned, in
order (as workers do), keeps the token each run of a sequence sampled last (the held
token), and writes and reads "K/V" through the page lists like ``PagedFake`` of
``test_scheduler.py``. Every request must end with exactly the tokens it produces alone,
nothing may be reported after its end, and the pool must balance: overlap changes when
things are known, never what is computed.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dpbus.schemas import FinishReason
from dpbus.schemas.internal import LAST_TOKEN
from dpbus.services.publisher.scheduler import Plan, Scheduler, Sequence, Status
from tests.test_scheduler import all_free, expected_output, maybe_arrive, mksched, mkseq, token_fn


class HeldFake:
    """Slots hold (token, the whole context it ends); a read checks the context against
    the reader's own, so a page-table, overlap or sharing mistake changes a token or fails."""

    def __init__(self, page_size: int) -> None:
        self.ps = page_size
        self.pool: dict[tuple[int, int], tuple[int, tuple]] = {}
        self.held: dict[tuple[int, int], int] = {}  # (id(sequence), run) -> the token it sampled last
        self.context: dict[tuple[int, int], list[int]] = {}  # what each run of a sequence has fed so far

    def run(self, plan: Plan) -> tuple[list[int], list[int]]:
        pre, dec = [], []
        for seq, item in plan.prefill:
            run = (id(seq), plan.lives[id(seq)])
            ctx = self.context.setdefault(run, [])
            if item.start == 0 or len(ctx) != item.start:  # a new run, or one that starts after a cached prefix
                ctx[:] = self._read(item.pages, item.start)
            ctx += item.token_ids
            for i, tok in enumerate(item.token_ids):
                self._write(item.pages, item.start + i, tuple(ctx[:item.start + i + 1]))
            token = token_fn(self._read(item.pages, len(ctx)), 0) if item.sample else -1
            if item.sample:
                self.held[run] = token
            pre.append(token)
        for seq, item in plan.decode:
            run = (id(seq), plan.lives[id(seq)])
            token = self.held[run] if item.token == LAST_TOKEN else item.token
            ctx = self.context[run]
            assert len(ctx) == item.position, f"{seq.rid} feeds position {item.position} after {len(ctx)} positions"
            ctx.append(token)
            self._write(item.pages, item.position, tuple(ctx))
            self.held[run] = token_fn(self._read(item.pages, item.position + 1), item.counter)
            dec.append(self.held[run])
        return pre, dec

    def _write(self, pages: list[int], pos: int, context: tuple) -> None:
        page = pages[pos // self.ps]
        assert page != 0, "real tokens written to the trash page"
        self.pool[(page, pos % self.ps)] = (context[-1], context)

    def _read(self, pages: list[int], n: int) -> list[int]:
        out = []
        for pos in range(n):
            token, context = self.pool[(pages[pos // self.ps], pos % self.ps)]
            assert tuple(out) == context[:-1], f"position {pos} was written for another context"
            out.append(token)
        return out


def check_pool(s: Scheduler) -> None:
    held = Counter(p for q in s.running for p in q.pages)
    assert [s.pool.refs[p] for p in range(s.num_pages)] == [held[p] for p in range(s.num_pages)]
    assert len(held) + len(s.free_pages) == s.num_pages - 1, "a page leaked"
    assert all(not q.pages for q in s.waiting), "a waiting request holds pages"
    for q in s.running:  # pages for every position the steps sent so far write, no more
        assert len(q.pages) == -(-q.planned // s.page_size), (q.rid, len(q.pages), q.planned)


def check_plan(s: Scheduler, plan: Plan) -> None:
    named = [id(q) for q, _ in (*plan.prefill, *plan.decode)]
    assert len(named) == len(set(named)), "a sequence got two items in one step"
    for q, item in plan.prefill:
        end = item.start + len(item.token_ids)
        assert end == q.planned and item.token_ids == (q.prompt + q.output)[item.start:end]
    for q, item in plan.decode:
        assert item.position == q.planned - 1 == len(q.prompt) + q.generated - 2
        assert item.counter == q.generated - 1
        assert item.token == (LAST_TOKEN if q.pending > 1 else q.output[-1])  # known only when nothing was pending
        assert q.generated <= q.sampling.max_new_tokens, "a step went past the length limit"
        for page in {q.pages[item.position // s.page_size]}:
            assert s.pool.refs[page] == 1 and not s.pool.is_cached(page), f"{q.rid} writes a shared page"


def overlapped_workload(seed: int, steps: int, *, depth: int = 2, max_running: int = 4, budget: int = 10,
                        max_len: int = 40, num_pages: int = 13, page_size: int = 4, prefix_cache: bool = False,
                        failures: bool = False) -> dict:
    rng = random.Random(seed)
    s = mksched(max_running=max_running, max_prefill=budget, max_waiting=6, max_seq_len=max_len,
                num_pages=num_pages, page_size=page_size, prefix_cache=prefix_cache)
    model = HeldFake(page_size)
    done: dict[str, FinishReason] = {}
    added: list[Sequence] = []
    flight: list[tuple[Plan, tuple[list[int], list[int]]]] = []
    counts = Counter()

    def record(events):
        for q, _, reason in events:
            assert q.rid not in done, f"{q.rid}: a token after its end"
            counts["tokens"] += 1
            if reason is not None:
                done[q.rid] = reason

    n = 0
    while n < steps or s.has_work() or flight:
        if n < steps:
            maybe_arrive(rng, s, n, max_len, prefix_cache, added)
        live = [*s.waiting, *s.running]
        if n < steps and rng.random() < 0.04 and live:
            s.abort(rng.choice(live).rid)
        for q in s.take_aborted():
            assert q.pages == [] and q.rid not in done
            done[q.rid] = FinishReason.ABORT
        if failures and n < steps and flight and rng.random() < 0.01:  # the group fails: the steps in flight are lost
            counts["failures"] += 1
            for q in s.take_all():  # as the publisher does: answer (here: abort) what was running
                q.status = Status.FINISHED
                done[q.rid] = FinishReason.ABORT
            flight.clear()
            model = HeldFake(page_size)  # a new epoch: the workers start from nothing
        while len(flight) < depth:
            plan = s.build_step(float(n))
            if not plan:
                break
            check_plan(s, plan)
            flight.append((plan, model.run(plan)))  # the workers run steps as they come, in order
            counts["overlapped"] += len(flight) > 1
        check_pool(s)
        if flight:
            plan, tokens = flight.pop(0)
            record(s.apply(plan, *tokens))
            check_pool(s)
        n += 1
        assert n < steps + 3000, "never finished"
    assert all_free(s) and not s.running and not s.waiting
    if not counts["failures"]:  # (a failure loses what steps in flight owed requests that had ended)
        assert all(q.pending == 0 and q.ahead == 0 for q in added)
    assert sorted(done) == sorted(q.rid for q in added)
    for q in added:
        want, reason = expected_output(q, max_len)
        if done[q.rid] == FinishReason.ABORT:
            assert q.output == want[:len(q.output)], q.rid
        else:
            assert (q.output, done[q.rid]) == (want, reason), q.rid
    return {**counts, "added": len(added), "preemptions": s.preemptions, "steps": n,
            "stopped": sum(r == FinishReason.STOP for r in done.values()),
            "aborted": sum(r == FinishReason.ABORT for r in done.values()),
            "preempted_requests": sum(q.preempted > 0 for q in added), "hit_tokens": s.hit_tokens}


@pytest.mark.parametrize("seed, page_size, num_pages", [(3, 4, 13), (4, 1, 45), (5, 16, 4), (6, 4, 11)])
def test_overlapped_steps_give_the_same_tokens(seed, page_size, num_pages):
    stats = overlapped_workload(seed, 400, page_size=page_size, num_pages=num_pages)
    assert stats["added"] > 60 and stats["overlapped"] > 100
    assert stats["preemptions"] > 5 and stats["stopped"] > 0 and stats["aborted"] > 0


@pytest.mark.parametrize("seed, page_size, num_pages", [(3, 4, 13), (7, 2, 30), (8, 4, 21)])
def test_overlapped_steps_with_the_prefix_cache(seed, page_size, num_pages):
    stats = overlapped_workload(seed, 400, page_size=page_size, num_pages=num_pages, prefix_cache=True)
    assert stats["added"] > 60 and stats["hit_tokens"] > 0 and stats["overlapped"] > 100


@pytest.mark.parametrize("depth", [1, 3])
def test_other_depths(depth):
    """Depth 1 is the step-by-step loop; deeper pipelines keep the same results."""
    stats = overlapped_workload(11, 300, depth=depth)
    assert stats["added"] > 40 and (stats["overlapped"] > 100) == (depth > 1)


def test_a_group_failure_loses_the_steps_in_flight_and_nothing_else():
    stats = overlapped_workload(12, 600, failures=True)
    assert stats["failures"] > 0


def test_a_stop_token_is_seen_one_step_late_and_the_extra_token_dropped():
    s = mksched(max_running=1)
    a = mkseq("a", n_prompt=3, max_new_tokens=10, stop_token_ids=[5])
    s.add(a)
    first = s.build_step(0.0)  # the prompt; samples the first token
    second = s.build_step(0.0)  # planned before the first token is known
    assert [item.token for _, item in second.decode] == [LAST_TOKEN]
    assert s.apply(first, [5], []) == [(a, 5, FinishReason.STOP)]
    assert a.finished and a.pages == [] and all_free(s)
    assert s.apply(second, [], [9]) == [] and a.output == [5], "a token after a stop was kept"
    assert not s.build_step(0.0) and a.pending == 0


def test_no_step_goes_past_the_length_limit():
    s = mksched(max_running=1)
    a = mkseq("a", n_prompt=3, max_new_tokens=2)
    s.add(a)
    plans = [s.build_step(0.0) for _ in range(4)]
    assert [bool(p) for p in plans] == [True, True, False, False]  # the prompt, then one decode: two tokens
    assert s.apply(plans[0], [7], []) == [(a, 7, None)]
    assert s.apply(plans[1], [], [8]) == [(a, 8, FinishReason.LENGTH)] and all_free(s)
