"""The step protocol simulation (``tests/sim/steps.py``): a publisher and the workers of
its group over a network that drops, duplicates, delays and reorders, with workers and
the publisher killed and restarted and steps failing. The publisher keeps several steps
in flight; steps are real wire steps (row deltas) planned by the real scheduler, and the
workers rebuild their page tables and hold each row's last token. Decided by the
production code (``Stepper``, ``StepOrder``, ``Scheduler``, ``RowTables``,
``PageTables``); checked after every event. A failing seed replays exactly:
``DPBUS_SIM_SEED=<seed> pytest tests/test_step_simulation.py -k replay``."""

from __future__ import annotations

import os
from collections import Counter

import msgspec
import pytest

from dpbus.services.publisher import scheduler, stepper, tables
from dpbus.services.worker import ordering
from tests.sim import steps as steps_world
from tests.sim.checker import Violation
from tests.sim.steps import StepWorld

SEEDS = int(os.environ.get("DPBUS_STEP_SIM_SEEDS", "1000"))


def first_violation(seeds: range) -> tuple[int, str] | None:
    for seed in seeds:
        try:
            StepWorld(seed).run()
        except Violation as e:
            return seed, str(e)
    return None


def test_every_worker_runs_exactly_the_publisher_s_steps_in_order_once():
    totals: Counter = Counter()
    for seed in range(SEEDS):
        try:
            world = StepWorld(seed).run()
        except Violation as e:
            pytest.fail(f"seed {seed}: {e}\nreplay it: DPBUS_SIM_SEED={seed} pytest tests/test_step_simulation.py -k replay")
        deepest = max(totals["deepest flight"], world.deepest)
        totals.update(world.totals())
        totals["deepest flight"] = deepest
    print(f"\n{SEEDS} step worlds: " + ", ".join(f"{n} {what}" for what, n in sorted(totals.items())))
    assert totals["steps settled"] > 30 * SEEDS and totals["resets"] > 0 and totals["deepest flight"] == 3
    assert totals["overlapped steps"] > totals["steps settled"] // 2 and totals["steps replayed"] > 0
    assert totals["preemptions"] > 0 and totals["prefix-cache hit tokens"] > 0
    for end in ("stop", "length", "abort", "error", "lost"):
        assert totals[f"ended {end}"] > 0, end


def test_replay():
    seed = int(os.environ.get("DPBUS_SIM_SEED", "7"))
    first = StepWorld(seed).run()
    again = StepWorld(seed).run()
    assert first.settled and again.settled == first.settled
    assert {rid: r.tokens for rid, r in again.requests.items()} == {rid: r.tokens for rid, r in first.requests.items()}


# ---- broken rules: each must be caught by some seed ---------------------------------------
class CountsAnyReply(stepper.Stepper):
    def on_reply(self, reply):
        if reply.epoch == self.epoch and self.flight:  # a reply about any step counts for the oldest one
            reply = msgspec.structs.replace(reply, seq=min(self.flight))
        return super().on_reply(reply)


class TakesTheNewestSettledStep(stepper.Stepper):
    def outcome(self, seq, digest):
        return super().outcome(max(n for n, step in self.flight.items() if step.settled), digest)


def repeats_run_again(self, epoch, seq):
    kind = original_classify(self, epoch, seq)
    return ordering.NEXT if kind == ordering.REPEAT else kind


def takes_a_lost_epoch_again(self, epoch, seq):
    if epoch == self.epoch and not self.in_sync:  # as the worker did: start the lost epoch over
        self.begin_epoch(epoch)
        return ordering.NEXT if seq == 1 else ordering.GAP
    return original_classify(self, epoch, seq)


def keeps_only_the_last_reply(self, seq):
    return self.replies.get(seq) if seq == self.last_seq else None  # as before steps overlapped


def keeps_tokens_after_the_end(self, seq, token, events):
    seq.pending -= 1
    events.append(self._append(seq, token))  # even for a sequence that stopped at an earlier step


def sends_no_new_pages(self, step, seq, pages, sampling):
    row = self.row_of.get(id(seq))
    return self._start(step, seq, pages, sampling) if row is None else row


def holds_no_tokens(self, step, row):
    return 0  # LAST_TOKEN fed as a constant: the row's sampled token is not kept on the device


original_classify = ordering.StepOrder.classify


@pytest.mark.parametrize("target, name, broken", [
    (steps_world, "Stepper", CountsAnyReply),
    (steps_world, "Stepper", TakesTheNewestSettledStep),
    (ordering.StepOrder, "classify", repeats_run_again),
    (ordering.StepOrder, "classify", takes_a_lost_epoch_again),
    (ordering.StepOrder, "reply_to_repeat", keeps_only_the_last_reply),
    (scheduler.Scheduler, "_sampled", keeps_tokens_after_the_end),
    (tables.RowTables, "_place", sends_no_new_pages),
    (steps_world.Worker, "held_token", holds_no_tokens),
], ids=["a-reply-about-another-step-counts", "a-later-step-is-taken-first", "a-repeated-step-runs-again",
        "a-failed-epoch-is-run-again", "only-the-last-reply-is-kept", "a-token-after-a-stop-is-kept",
        "grown-pages-are-not-sent", "the-last-token-is-not-held"])
def test_a_broken_rule_is_caught_by_some_seed(monkeypatch, target, name, broken):
    assert first_violation(range(10)) is None
    monkeypatch.setattr(target, name, broken)
    caught = first_violation(range(500))
    assert caught is not None, f"no seed caught a broken {name}"
    print(f"\nbroken {name}: seed {caught[0]}: {caught[1]}")
