"""The deterministic protocol simulation (tests/sim): thousands of seeded worlds of
ingests, publishers and a ledger, with a faulty network, kills, restarts, group failures,
lease outages and clock jumps, checked after every event. Production decides
(``dpbus.services.ownership``, the publisher's ``answers``, ``LeaseClock``, ``SweepView``);
the simulation sequences.

A failing seed replays exactly: ``DPBUS_SIM_SEED=<seed> pytest tests/test_simulation.py -k replay``.
``DPBUS_SIM_SEEDS`` sets how many seeds the sweep runs (``DPBUS_SIM_FIRST`` the first)."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from dpbus.services import ledger as ledger_module
from dpbus.services import ownership
from tests.sim.checker import Violation
from tests.sim.world import Faults, World

SEEDS = int(os.environ.get("DPBUS_SIM_SEEDS", "4000"))
FIRST = int(os.environ.get("DPBUS_SIM_FIRST", "0"))


def replay_hint(seed: int) -> str:
    return f"replay it: DPBUS_SIM_SEED={seed} pytest tests/test_simulation.py -k replay"


def first_violation(seeds: range, faults: Faults | None = None) -> tuple[int, str] | None:
    for seed in seeds:
        try:
            World(seed, faults or Faults()).run()
        except Violation as e:
            return seed, str(e)
    return None


def test_every_seed_sends_exactly_one_terminal_and_nothing_after_it():
    seen: Counter[str] = Counter()
    for seed in range(FIRST, FIRST + SEEDS):
        world = World(seed)
        try:
            check = world.run()
        except Violation as e:
            pytest.fail(f"seed {seed}: {e}\n{replay_hint(seed)}")
        seen["accepted"] += len(world.accepted)
        seen["refused"] += len(check.refused)
        for answers in check.terminals.values():
            seen.update(a.split(" by ")[0] for a in answers)
    # the worlds reached every way a request ends, or the sweep proves little
    assert seen["accepted"] > SEEDS and seen["done"] > SEEDS
    assert seen["error"] > 0 and seen["publisher_lost"] > 0 and seen["refused"] > 0, seen


def test_replay():
    """One seed, twice: the same sends in the same order (and no violation)."""
    seed = int(os.environ.get("DPBUS_SIM_SEED", "96"))
    try:
        first = World(seed).run().sent
    except Violation as e:
        pytest.fail(f"seed {seed}: {e}")
    assert first and World(seed).run().sent == first


LEDGER_SEEDS = int(os.environ.get("DPBUS_SIM_LEDGER_SEEDS", "1000"))


def test_ledger_calls_that_time_out_lose_no_answer():
    """Ledger calls lost, or applied with their answer lost (a JetStream request timing
    out), on top of every other fault. A write whose outcome is unknown is read back until
    the ledger answers: a claim that landed is run (the publisher does not answer the
    submit meanwhile), a compare-and-set to answered that landed is answered (late), an
    ingest's refusal that landed is answered. The exceptions the checker allows, each a
    fault on top of a death and counted here: an ingest that won a terminal answer dying
    before it learnt it won (silence), and a publisher whose settling write was lost dying
    before it wrote it again, after its answer went (two terminal answers)."""
    paths: Counter[str] = Counter()
    died_winning = heard_twice = accepted = 0
    for seed in range(LEDGER_SEEDS):
        world = World(seed, Faults(ledger=0.05))
        try:
            check = world.run()
        except Violation as e:
            pytest.fail(f"seed {seed} with ledger faults: {e}\n{replay_hint(seed)} (with Faults(ledger=0.05))")
        paths.update(world.paths)
        died_winning += len(check.died_winning)
        heard_twice += len(check.heard_twice)
        accepted += len(world.accepted)
    print(f"\n{LEDGER_SEEDS} worlds with ledger faults: {accepted} accepted, {died_winning} answers won by a service "
          f"that died before learning it, {heard_twice} answered twice; ways through: {dict(paths)}")
    for path in ("claim resolved: ours", "settle landed unanswered: ours", "sweep resolved: ours", "refusal recorded",
                 "refusal found the name taken"):
        assert paths[path] > 0, f"no world went through '{path}': {dict(paths)}"
    assert died_winning < accepted / 100, (died_winning, accepted)
    assert heard_twice < accepted / 100, (heard_twice, accepted)


def careless_settle(got, instance):
    return True  # a lost compare-and-set taken for a win: answers without owning the request


def takes_any_name(theirs, attempt):
    return True  # a submit takes over whatever holds the name: a copy runs twice


def never_ours(got, mine):
    return False  # a write whose answer was lost is taken for failed: what landed is never acted on


def always_ours(got, mine):
    return got is not None  # whatever is read back is taken for our own write


LEDGER_FAULTS = Faults(ledger=0.05)


@pytest.mark.parametrize("target, name, broken, faults", [
    (ownership, "own_write_landed", careless_settle, LEDGER_FAULTS),
    (ownership, "may_take_over", takes_any_name, None),
    (ledger_module, "MARGIN", -0.5, None),  # the holder speaks on after ingest answers for it
    (ownership, "landed", never_ours, LEDGER_FAULTS),
    (ownership, "landed", always_ours, LEDGER_FAULTS),
], ids=["answer-without-winning-the-cas", "take-over-any-name", "no-lease-margin", "unknown-write-taken-for-failed",
        "anything-read-back-taken-for-ours"])
def test_a_broken_rule_is_caught_by_some_seed(monkeypatch, target, name, broken, faults):
    assert first_violation(range(200), faults) is None
    monkeypatch.setattr(target, name, broken)
    assert first_violation(range(2000), faults) is not None, f"no seed caught a broken {name}"
