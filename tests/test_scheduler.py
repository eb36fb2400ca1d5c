"""Unit tests of the publisher's continuous-batching scheduler (pure Python, no I/O)."""

from __future__ import annotations

import random

import pytest

from schemas import Encoding, FinishReason, SamplingParams
from services.publisher.scheduler import Plan, Scheduler, Sequence
from services.tokenizer import EOS_ID

TOKEN = 7  # what the fake model always answers (not EOS)


def mkseq(rid: str, n_prompt: int = 4, accepted_at: float = 0.0, **sampling) -> Sequence:
    sp = SamplingParams(**{"temperature": 0.0, "seed": 1, **sampling})
    prompt = [(i % 200) + 10 for i in range(n_prompt)]
    return Sequence(rid, prompt, sp, True, f"_INBOX.{rid}", Encoding.JSON, accepted_at)


def mksched(slots: int = 4, max_prefill: int = 64, max_waiting: int = 16, max_seq_len: int = 128) -> Scheduler:
    return Scheduler(slots, max_prefill, max_waiting, max_seq_len)


def answer(plan: Plan, token: int = TOKEN, decode: list[int] | None = None) -> tuple[list[int], list[int]]:
    """What a worker would send back: -1 for prefill chunks that are not the last."""
    pre = [token if item.last else -1 for _, item in plan.prefill]
    return pre, decode if decode is not None else [token] * len(plan.decode)


def step(sched: Scheduler, now: float = 0.0, token: int = TOKEN, decode: list[int] | None = None):
    plan = sched.build_step(now)
    events = sched.apply(plan, *answer(plan, token, decode))
    return plan, events


def rids(pairs) -> list[str]:
    return [seq.rid for seq, *_ in pairs]


# ---------------------------------------------------------------------------------------
# admission
# ---------------------------------------------------------------------------------------

def test_fifo_admission_into_free_slots():
    s = mksched(slots=2)
    for r in "abc":
        assert s.add(mkseq(r))
    assert s.has_work()
    plan = s.build_step(now=5.0)
    assert rids(plan.prefill) == ["a", "b"]
    assert sorted(s.running) == [0, 1] and s.free == []
    assert {seq.rid: seq.slot for seq in s.running.values()} == {"a": 0, "b": 1}
    assert [item.slot for _, item in plan.prefill] == [0, 1]
    assert [q.rid for q in s.waiting] == ["c"] and s.waiting[0].slot == -1
    assert all(seq.scheduled_at == 5.0 for seq in s.running.values())
    assert plan.decode == []


def test_add_refuses_when_the_queue_is_full():
    s = mksched(slots=1, max_waiting=2)
    assert s.add(mkseq("a")) and s.add(mkseq("b"))
    assert not s.add(mkseq("c"))
    assert [q.rid for q in s.waiting] == ["a", "b"]
    s.build_step(0.0)  # "a" takes the only slot: room for one more
    assert s.add(mkseq("c"))
    assert not s.add(mkseq("d"))


def test_new_requests_join_the_running_batch_at_the_next_step():
    s = mksched()
    s.add(mkseq("a", max_new_tokens=10))
    plan, events = step(s)
    assert rids(plan.prefill) == ["a"] and rids(events) == ["a"]
    s.add(mkseq("b", max_new_tokens=10))
    plan, _ = step(s)
    assert rids(plan.decode) == ["a"] and rids(plan.prefill) == ["b"]
    plan, _ = step(s)
    assert rids(plan.decode) == ["a", "b"] and plan.prefill == []
    s.add(mkseq("c", max_new_tokens=10))
    plan, _ = step(s)
    assert rids(plan.decode) == ["a", "b"] and rids(plan.prefill) == ["c"]
    assert len({item.slot for _, item in plan.decode + plan.prefill}) == 3


# ---------------------------------------------------------------------------------------
# chunked prefill
# ---------------------------------------------------------------------------------------

def test_chunked_prefill_respects_the_budget_offsets_and_last():
    s = mksched(max_prefill=8)
    a, b = mkseq("a", n_prompt=20), mkseq("b", n_prompt=5)
    s.add(a)
    s.add(b)
    chunks: dict[str, list] = {"a": [], "b": []}
    for _ in range(10):
        plan = s.build_step(0.0)
        assert sum(len(item.token_ids) for _, item in plan.prefill) <= 8
        for seq, item in plan.prefill:
            assert item.slot == seq.slot
            chunks[seq.rid].append((item.start, item.token_ids, item.last))
        before = {q.rid: len(q.output) for q in (a, b)}
        events = s.apply(plan, *answer(plan))
        # a token comes out only after the last chunk
        for seq, item in plan.prefill:
            assert (seq.rid in rids(events)) == item.last
            assert len(seq.output) == before[seq.rid] + item.last
        if not any(seq.prefilled < len(seq.prompt) for seq in (a, b)):
            break
    assert [(st, len(t), last) for st, t, last in chunks["a"]] == [(0, 8, False), (8, 8, False), (16, 4, True)]
    # "b" gets what "a" leaves of the third step's budget, then the rest
    assert [(st, len(t), last) for st, t, last in chunks["b"]] == [(0, 4, False), (4, 1, True)]
    for seq in (a, b):
        got = [tok for _, toks, _ in chunks[seq.rid] for tok in toks]
        assert got == seq.prompt and seq.prefilled == len(seq.prompt)
    assert a.output == [TOKEN, TOKEN] and b.output == [TOKEN]  # "a" decoded once while "b" finished


def test_prefilling_sequences_are_not_decoded():
    s = mksched(max_prefill=4)
    s.add(mkseq("a", n_prompt=2, max_new_tokens=50))
    step(s)
    s.add(mkseq("b", n_prompt=9, max_new_tokens=50))
    for start in (0, 4):
        plan, events = step(s)
        assert rids(plan.decode) == ["a"]
        assert [(seq.rid, item.start, item.last) for seq, item in plan.prefill] == [("b", start, False)]
        assert rids(events) == ["a"]
    plan, events = step(s)
    assert [(seq.rid, item.start, item.token_ids, item.last) for seq, item in plan.prefill] == \
        [("b", 8, [s.running[1].prompt[8]], True)]
    assert sorted(rids(events)) == ["a", "b"]
    plan, _ = step(s)
    assert rids(plan.decode) == ["a", "b"]


# ---------------------------------------------------------------------------------------
# decode rows
# ---------------------------------------------------------------------------------------

def test_decode_items_carry_token_position_and_counter():
    s = mksched()
    seq = mkseq("a", n_prompt=6, max_new_tokens=20, seed=77, temperature=0.5, top_p=0.9, top_k=3)
    s.add(seq)
    step(s, token=100)
    for i in range(5):
        plan = s.build_step(0.0)
        assert plan.prefill == []
        [(got, item)] = plan.decode
        assert got is seq and item.slot == seq.slot
        assert item.token == seq.output[-1] == 100 + i
        assert item.position == len(seq.prompt) + len(seq.output) - 1 == 6 + i
        assert item.counter == len(seq.output) == i + 1
        assert (item.sampling.temperature, item.sampling.top_p, item.sampling.top_k, item.sampling.seed) == \
            (0.5, 0.9, 3, 77)
        s.apply(plan, [], [101 + i])
    assert seq.output == list(range(100, 106))


# ---------------------------------------------------------------------------------------
# finishing
# ---------------------------------------------------------------------------------------

def run_to_end(s: Scheduler, tokens: list[int]) -> list[tuple]:
    """Step until nothing runs; the model answers ``tokens`` in order (then TOKEN)."""
    feed = iter(tokens)
    events = []
    for _ in range(200):
        if not s.running and not s.waiting:
            return events
        plan = s.build_step(0.0)
        pre = [next(feed, TOKEN) if item.last else -1 for _, item in plan.prefill]
        dec = [next(feed, TOKEN) for _ in plan.decode]
        events += s.apply(plan, pre, dec)
    raise AssertionError("never finished")


def test_finish_on_max_new_tokens():
    s = mksched()
    seq = mkseq("a", max_new_tokens=3)
    s.add(seq)
    events = run_to_end(s, [])
    assert [(e[1], e[2]) for e in events] == [(TOKEN, None), (TOKEN, None), (TOKEN, FinishReason.LENGTH)]
    assert seq.output == [TOKEN] * 3 and seq.outstanding_tokens == 0


def test_max_new_tokens_one_finishes_at_prefill():
    s = mksched()
    s.add(mkseq("a", max_new_tokens=1))
    plan, events = step(s)
    assert [e[2] for e in events] == [FinishReason.LENGTH]
    assert not s.running and sorted(s.free) == [0, 1, 2, 3]


def test_finish_on_eos_unless_ignored():
    s = mksched()
    s.add(mkseq("a", max_new_tokens=10))
    events = run_to_end(s, [TOKEN, EOS_ID, TOKEN])
    assert [e[1] for e in events] == [TOKEN, EOS_ID] and events[-1][2] == FinishReason.STOP

    s.add(mkseq("b", max_new_tokens=4, ignore_eos=True))
    events = run_to_end(s, [EOS_ID, EOS_ID, TOKEN])
    assert [e[1] for e in events] == [EOS_ID, EOS_ID, TOKEN, TOKEN]
    assert [e[2] for e in events] == [None, None, None, FinishReason.LENGTH]


def test_finish_on_stop_token_ids():
    s = mksched()
    s.add(mkseq("a", max_new_tokens=10, stop_token_ids=[9, 11]))
    events = run_to_end(s, [TOKEN, 8, 11, TOKEN])
    assert [e[1] for e in events] == [TOKEN, 8, 11] and events[-1][2] == FinishReason.STOP
    # a stop token at prefill ends it at once; stop ids apply with ignore_eos too
    s.add(mkseq("b", max_new_tokens=10, stop_token_ids=[9], ignore_eos=True))
    events = run_to_end(s, [9])
    assert [(e[1], e[2]) for e in events] == [(9, FinishReason.STOP)]


def test_finish_at_the_context_end():
    s = mksched(max_seq_len=10)
    seq = mkseq("a", n_prompt=6, max_new_tokens=100)
    s.add(seq)
    positions = []
    feed = iter(range(20, 40))
    while s.running or s.waiting:
        plan = s.build_step(0.0)
        positions += [item.position for _, item in plan.decode]
        events = s.apply(plan, [next(feed) for _ in plan.prefill], [next(feed) for _ in plan.decode])
    assert len(seq.prompt) + len(seq.output) == 10
    assert events[-1][2] == FinishReason.LENGTH
    assert positions and max(positions) < 10


def test_a_finished_slot_is_reused_by_the_next_waiting_request():
    s = mksched(slots=1)
    s.add(mkseq("a", max_new_tokens=2))
    s.add(mkseq("b", max_new_tokens=2))
    plan, _ = step(s)
    assert rids(plan.prefill) == ["a"]
    plan, events = step(s)
    assert rids(plan.decode) == ["a"] and events[-1][2] == FinishReason.LENGTH
    assert s.free == [0] and not s.running
    plan, _ = step(s)
    assert rids(plan.prefill) == ["b"] and plan.prefill[0][1].slot == 0


# ---------------------------------------------------------------------------------------
# abort, expiry, failures
# ---------------------------------------------------------------------------------------

def test_abort_running_and_waiting():
    s = mksched(slots=1)
    a, b, c = mkseq("a", max_new_tokens=50), mkseq("b"), mkseq("c")
    for q in (a, b, c):
        s.add(q)
    step(s)
    assert s.abort("a") is a and s.abort("c") is c
    assert s.abort("nobody") is None
    assert 0 in s.running  # aborted requests leave only at take_aborted
    gone = s.take_aborted()
    assert sorted(q.rid for q in gone) == ["a", "c"]
    assert not s.running and s.free == [0]
    assert [q.rid for q in s.waiting] == ["b"]
    assert s.take_aborted() == []
    plan, _ = step(s)
    assert rids(plan.prefill) == ["b"] and plan.decode == []


def test_take_expired_only_takes_old_waiting_requests():
    s = mksched(slots=1)
    for rid, t in (("run", 0.0), ("old", 1.0), ("older", 0.5), ("new", 9.0)):
        s.add(mkseq(rid, accepted_at=t))
    s.build_step(10.0)  # "run" is running: it never expires
    assert [q.rid for q in s.take_expired(now=12.0, queue_timeout=5.0)] == ["old", "older"]
    assert [q.rid for q in s.waiting] == ["new"]
    assert s.take_expired(now=12.0, queue_timeout=5.0) == []
    assert [q.rid for q in s.running.values()] == ["run"]


def test_take_all_frees_every_slot_and_keeps_the_queue():
    s = mksched(slots=2)
    for r in "abc":
        s.add(mkseq(r))
    s.build_step(0.0)
    assert sorted(q.rid for q in s.take_all()) == ["a", "b"]
    assert not s.running and sorted(s.free) == [0, 1]
    assert [q.rid for q in s.waiting] == ["c"]


@pytest.mark.parametrize("pre_delta, dec_delta", [(1, 0), (-1, 0), (0, 1), (0, -1)])
def test_apply_rejects_a_wrong_number_of_tokens(pre_delta, dec_delta):
    s = mksched()
    s.add(mkseq("a", max_new_tokens=10))
    step(s)
    s.add(mkseq("b", max_new_tokens=10))
    plan = s.build_step(0.0)
    assert len(plan.prefill) == 1 and len(plan.decode) == 1
    pre, dec = answer(plan)
    with pytest.raises(ValueError):
        s.apply(plan, pre + [TOKEN] * pre_delta if pre_delta > 0 else pre[:len(pre) + pre_delta],
                dec + [TOKEN] * dec_delta if dec_delta > 0 else dec[:len(dec) + dec_delta])
    # nothing was recorded
    assert [len(q.output) for q in s.running.values()] == [1, 0]
    assert s.running[1].prefilled == 0


# ---------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------

def test_a_given_seed_is_used():
    s = mksched()
    seq = mkseq("a", seed=12345, max_new_tokens=4)
    s.add(seq)
    seen = []
    while s.running or s.waiting:
        plan = s.build_step(0.0)
        seen += [item.sampling.seed for _, item in plan.prefill + plan.decode]
        s.apply(plan, *answer(plan))
    assert seen == [12345] * 4


def test_no_seed_draws_one_per_request_once():
    random.seed(0)
    s = mksched()
    a, b = mkseq("a", seed=None, max_new_tokens=5), mkseq("b", seed=None, max_new_tokens=5)
    assert a.seed != b.seed
    assert all(0 <= q.seed < 1 << 31 for q in (a, b))
    s.add(a)
    s.add(b)
    seen: dict[str, set[int]] = {"a": set(), "b": set()}
    while s.running or s.waiting:
        plan = s.build_step(0.0)
        for q, item in plan.prefill + plan.decode:
            seen[q.rid].add(item.sampling.seed)
        s.apply(plan, *answer(plan))
    assert seen == {"a": {a.seed}, "b": {b.seed}}


# ---------------------------------------------------------------------------------------
# a long random run against the invariants
# ---------------------------------------------------------------------------------------

def test_random_workload_invariants():
    rng = random.Random(3)
    slots, budget, max_len = 3, 10, 40
    s = mksched(slots=slots, max_prefill=budget, max_waiting=5, max_seq_len=max_len)
    done: dict[str, FinishReason] = {}
    added: list[Sequence] = []

    def record(events):
        for q, _, reason in events:
            assert q.rid not in done
            if reason is not None:
                done[q.rid] = reason
    for n in range(400):
        if rng.random() < 0.3:
            q = mkseq(f"r{n}", n_prompt=rng.randint(1, 30), max_new_tokens=rng.randint(1, 15),
                      stop_token_ids=[3])
            if s.add(q):
                added.append(q)
        plan = s.build_step(float(n))
        used = [item.slot for _, item in plan.prefill + plan.decode]
        assert len(used) == len(set(used)) and all(0 <= x < slots for x in used)
        assert sum(len(item.token_ids) for _, item in plan.prefill) <= budget
        assert len(s.running) + len(s.free) == slots
        for q, item in plan.decode:
            assert item.position == len(q.prompt) + len(q.output) - 1 < max_len
            assert s.running[item.slot] is q
        toks = [rng.choice([3, 4, 5, 6, 7, 8]) for _ in range(len(plan.prefill) + len(plan.decode))]
        pre = [t if item.last else -1 for t, (_, item) in zip(toks, plan.prefill)]
        record(s.apply(plan, pre, toks[len(plan.prefill):]))
    while s.has_work():
        plan = s.build_step(1e9)
        record(s.apply(plan, *answer(plan)))
    assert len(added) > 30 and sorted(s.free) == list(range(slots))
    assert sorted(done) == sorted(q.rid for q in added)
    for q in added:
        reason = done[q.rid]
        assert q.prefilled == len(q.prompt)
        if reason == FinishReason.STOP:
            assert q.output[-1] == 3 and 3 not in q.output[:-1]
        else:
            assert reason == FinishReason.LENGTH and 3 not in q.output
            assert len(q.output) == q.sampling.max_new_tokens or len(q.prompt) + len(q.output) == max_len
