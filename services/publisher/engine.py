"""One DP group's step core, without I/O: the scheduler, the row tables and the stepper
behind one small API, driven by the publisher service, by ``dpbus bench --engine-only``
and by the step simulation (``tests/sim/steps.py``) alike.

* ``add`` queues a request, ``abort`` marks one, ``take_aborted`` removes the marked ones;
* ``plan`` builds, numbers and packs the next step while fewer than ``steps_in_flight``
  are out: the caller sends what it returns (``InFlight.data``, or ``InFlight.step``
  unpacked), and may re-send it while the step is not settled;
* ``on_reply`` takes the members' acknowledgements (``InFlight.settled`` once all are in);
* ``take_settled`` applies the oldest step once settled: its result and the events it
  makes, ``(sequence, token, finish reason or None)`` in step order;
* ``on_failure`` ends the epoch: the steps in flight are dropped (each one says why) and
  the running requests are returned to the caller to answer or move.

One step out is one ``InFlight`` record (``stepper.py``): its number, plan, bytes, when it
went out, the acknowledgements, and whether it was dropped. A caller that gathers several
groups' plans into one forward would take ``plan`` from each engine and send them together.
"""

from __future__ import annotations

from collections.abc import Iterable

from dpbus.schemas import FinishReason
from dpbus.schemas.internal import Step, StepFailure, StepResult, pack, token_digest
from dpbus.services.errors import GroupFailure
from dpbus.services.publisher.scheduler import Scheduler, Sequence
from dpbus.services.publisher.stepper import InFlight, Stepper
from dpbus.services.publisher.tables import RowTables

Event = tuple[Sequence, int, FinishReason | None]  # a token sampled for a sequence, and whether it ended it


def leader_digest(leader: StepResult) -> str:
    return token_digest(leader.prefill_tokens, leader.decode_tokens)


class GroupEngine:
    def __init__(self, sched: Scheduler, tables: RowTables, stepper: Stepper, steps_in_flight: int) -> None:
        self.sched, self.tables, self.stepper = sched, tables, stepper
        self.steps_in_flight = steps_in_flight

    # ---- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> bool:
        """Queue ``seq``; False when the queue is full."""
        return self.sched.add(seq)

    @staticmethod
    def abort(seq: Sequence) -> None:
        """Mark ``seq`` aborted: it leaves the batch at the next ``take_aborted``."""
        seq.abort()

    def take_aborted(self) -> list[Sequence]:
        return self.sched.take_aborted()

    def has_work(self) -> bool:
        return self.sched.has_work()

    # ---- steps ----------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Steps out and not taken yet."""
        return len(self.stepper.flight)

    @property
    def oldest(self) -> InFlight | None:
        return next(iter(self.stepper.flight.values()), None)

    def plan(self, now: float, epochs_seen: Iterable[int] = ()) -> InFlight | None:
        """The next step to send, numbered and packed, if one may go (fewer than
        ``steps_in_flight`` out) and the scheduler has something for it."""
        if self.in_flight >= self.steps_in_flight or not self.sched.has_work():
            return None
        plan = self.sched.build_step(now)
        if not plan:
            return None
        made: list[Step] = []
        self.stepper.next_step(self.pack_step(plan, made), epochs_seen)
        out = self.stepper.flight[self.stepper.seq]
        out.plan, out.step = plan, made[0]
        return out

    def pack_step(self, plan, made: list | None = None):
        """How to pack ``plan`` as step (epoch, number): only what changed in the rows'
        tables (an epoch's first step starts with no rows). The ``Step`` goes to ``made``."""
        def pack_as(epoch: int, number: int) -> bytes:
            if number == 1:
                self.tables.reset()
            step = self.tables.step(epoch, number, plan, self.sched.running)
            if made is not None:
                made.append(step)
            return pack(step)
        return pack_as

    def on_reply(self, reply: StepResult | StepFailure) -> int | None:
        """A member's reply; the number of the step it settles, if it settles one."""
        return self.stepper.on_reply(reply)

    def take_settled(self) -> tuple[StepResult, list[Event]]:
        """Apply the oldest step (settled): its result (the leader's) and its events.
        Raises ``GroupFailure`` when a member failed it or the members disagree."""
        out = self.oldest
        result = self.stepper.outcome(out.number, leader_digest)
        return result, self.sched.apply(out.plan, result.prefill_tokens, result.decode_tokens)

    def on_failure(self, failure: GroupFailure) -> list[Sequence]:
        """End the epoch: drop the steps in flight (what they would have sampled is lost)
        and take every running request out; those are returned. Waiting ones stay."""
        self.drop(failure)
        return self.sched.take_all()

    def drop(self, failure: GroupFailure) -> None:
        """Forget the steps in flight: the next step starts a new epoch."""
        for out in self.stepper.flight.values():
            out.dropped = failure
        self.stepper.reset()
