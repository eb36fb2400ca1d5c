"""The step protocol simulation (``tests/sim/steps.py``): a publisher and the workers of
its group over a network that drops, duplicates, delays and reorders, with workers and
the publisher killed and restarted and steps failing. Decided by the production code
(``Stepper``, ``StepOrder``); checked after every event. A failing seed replays exactly:
``DPBUS_SIM_SEED=<seed> pytest tests/test_step_simulation.py -k replay``."""

from __future__ import annotations

import os

import pytest

from services.publisher import stepper
from services.worker import ordering
from tests.sim.checker import Violation
from tests.sim import steps as steps_world
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
    settled = resets = 0
    for seed in range(SEEDS):
        try:
            world = StepWorld(seed).run()
        except Violation as e:
            pytest.fail(f"seed {seed}: {e}\nreplay it: DPBUS_SIM_SEED={seed} pytest tests/test_step_simulation.py -k replay")
        settled += len(world.settled)
        resets += world.resets
    print(f"\n{SEEDS} step worlds: {settled} steps settled, {resets} resets into a new epoch")
    assert settled > 100 * SEEDS and resets > 0


def test_replay():
    seed = int(os.environ.get("DPBUS_SIM_SEED", "7"))
    first = StepWorld(seed).run().settled
    assert first and StepWorld(seed).run().settled == first


class CountsAnyReply(stepper.Stepper):
    def on_reply(self, reply):
        self.seq = reply.seq if reply.epoch == self.epoch else self.seq  # a reply about any step counts
        return super().on_reply(reply)


def repeats_run_again(self, epoch, seq):
    kind = original_classify(self, epoch, seq)
    return ordering.NEXT if kind == ordering.REPEAT else kind


def takes_a_lost_epoch_again(self, epoch, seq):
    if epoch == self.epoch and not self.in_sync:  # as the worker did: start the lost epoch over
        self.begin_epoch(epoch)
        return ordering.NEXT if seq == 1 else ordering.GAP
    return original_classify(self, epoch, seq)


original_classify = ordering.StepOrder.classify


@pytest.mark.parametrize("target, name, broken", [
    (steps_world, "Stepper", CountsAnyReply),
    (ordering.StepOrder, "classify", repeats_run_again),
    (ordering.StepOrder, "classify", takes_a_lost_epoch_again),
], ids=["a-reply-about-another-step-counts", "a-repeated-step-runs-again", "a-failed-epoch-is-run-again"])
def test_a_broken_rule_is_caught_by_some_seed(monkeypatch, target, name, broken):
    assert first_violation(range(100)) is None
    monkeypatch.setattr(target, name, broken)
    assert first_violation(range(500)) is not None, f"no seed caught a broken {name}"
