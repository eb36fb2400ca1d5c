"""``GroupEngine``, the step core the publisher, ``bench_engine`` and the step simulation
drive: steps go out up to ``steps_in_flight``, each one record; a step is taken only
once every member acknowledged it, in order; a failure drops the flight and returns the
running requests."""

from __future__ import annotations

import pytest

from dpbus.schemas import ErrorCode, FinishReason
from dpbus.schemas.internal import StepFailure, StepResult, token_digest
from dpbus.services.errors import GroupFailure
from dpbus.services.publisher.engine import GroupEngine
from dpbus.services.publisher.stepper import Stepper
from dpbus.services.publisher.tables import RowTables
from tests.test_scheduler import TOKEN, mksched, mkseq


def engine(depth: int = 2, members: tuple[int, ...] = (0, 1)) -> GroupEngine:
    return GroupEngine(mksched(), RowTables(4), Stepper(0, list(members), 8), depth)


def acks(eng: GroupEngine, out, members=(0, 1)) -> list[int | None]:
    """Every member acknowledges step ``out`` (the leader, member 0, with the tokens)."""
    pre = [TOKEN if item.sample else -1 for _, item in out.plan.prefill]
    dec = [TOKEN] * len(out.plan.decode)
    digest = token_digest(pre, dec)
    return [eng.on_reply(StepResult(out.step.epoch, out.number, m, pre if m == 0 else [], dec if m == 0 else [],
                                    0.0, digest)) for m in members]


def test_steps_go_out_up_to_the_depth_and_are_taken_in_order():
    eng = engine(depth=2)
    assert eng.plan(0.0) is None  # nothing to do
    eng.add(mkseq("a", n_prompt=4, max_new_tokens=3))
    first, second = eng.plan(0.0), eng.plan(0.0)
    assert (first.number, second.number) == (1, 2) and eng.plan(0.0) is None and eng.in_flight == 2
    assert first.step.seq == 1 and first.data and eng.oldest is first
    assert acks(eng, second) == [None, 2] and not first.settled  # a later step settles first: it waits
    assert acks(eng, first) == [None, 1] and first.settled
    result, events = eng.take_settled()
    assert result.seq == 1 and [(s.rid, t, r) for s, t, r in events] == [("a", TOKEN, None)]
    assert eng.oldest is second
    _, events = eng.take_settled()
    assert [(t, r) for _, t, r in events] == [(TOKEN, None)]
    third = eng.plan(0.0)
    acks(eng, third)
    _, events = eng.take_settled()
    assert [(t, r) for _, t, r in events] == [(TOKEN, FinishReason.LENGTH)] and not eng.has_work()


def test_a_failed_step_fails_the_group_and_the_flight_is_dropped():
    eng = engine()
    eng.add(mkseq("a"))
    first, second = eng.plan(0.0), eng.plan(0.0)
    eng.on_reply(StepFailure(first.step.epoch, 1, 1, ErrorCode.INTERNAL, "boom"))
    with pytest.raises(GroupFailure):
        eng.take_settled()
    failure = GroupFailure(ErrorCode.INTERNAL, "boom")
    [a] = eng.on_failure(failure)
    assert a.rid == "a" and second.dropped is failure and eng.in_flight == 0 and eng.oldest is None
    eng.add(a)
    again = eng.plan(0.0)
    assert again.number == 1 and again.step.epoch == first.step.epoch + 1  # a new epoch


def test_an_aborted_request_leaves_and_its_late_token_is_dropped():
    eng = engine()
    eng.add(mkseq("a", max_new_tokens=8))
    out = eng.plan(0.0)
    [a] = eng.sched.running
    eng.abort(a)
    assert eng.take_aborted() == [a] and a.aborted and a.finished
    acks(eng, out)
    _, events = eng.take_settled()
    assert events == []  # sampled before the abort was seen: its end is out already, nothing follows
