"""Ordered step delivery, the publisher's side, without I/O: numbering steps in epochs,
the window of recent steps kept for replay, which acknowledgements count, and what a
settled step means.

The publisher service publishes, waits and re-sends; the step simulation
(``tests/sim/steps.py``) drives the same object on virtual time. Its rules:

* steps are numbered 1, 2, 3... within an epoch; a new epoch (the first step after a
  start or a reset) is numbered above every epoch this publisher used and every epoch its
  workers report, so no clock is involved. A worker reports the epoch it has taken, not
  one whose first step still waits in its queue (or on the wire) when the publisher that
  sent it dies: a restarted publisher's first epoch jumps a random gap above the reported
  ones, so that it does not take that number again (the worker would run the dead
  publisher's step as the new one's, then answer the new one with its reply);
* several steps may be in flight at once (overlapped steps: the next one is on the wire
  while the group computes the one before); workers run them strictly in order, so they
  settle in order too;
* only a reply about a step in flight, from a member of the group, counts: anything
  about an earlier step or epoch was settled already;
* a step is settled by a failure from any member, or by an acknowledgement from every
  member; the acknowledgements must carry the same digest (else the group diverged).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dpbus.schemas.errors import ErrorCode
from dpbus.schemas.internal import Replay, StepFailure, StepResult
from dpbus.services.errors import GroupFailure

REPLAY_BYTES = 512 * 1024  # a replay answer holds steps up to this size (always one at least)


@dataclass(eq=False)
class InFlight:
    """One step sent and not taken yet: what it is, and what the members said of it."""

    number: int = 0
    data: bytes = b""  # as sent (and re-sent while acknowledgements are late)
    plan: Any = None  # the scheduler's plan it was packed from (``GroupEngine``)
    step: Any = None  # the wire ``Step`` before packing
    sent_at: float = 0.0  # when it first went out (monotonic), set by whoever sends it
    acks: dict[int, StepResult] = field(default_factory=dict)
    failure: StepFailure | None = None
    settled: bool = False
    dropped: GroupFailure | None = None  # given up with its epoch: why


EPOCH_GAP = 1 << 24  # a publisher's first epoch is 1..EPOCH_GAP above the ones its workers report


class Stepper:
    def __init__(self, group: int, members: list[int], replay_window: int,
                 rng: random.Random | None = None) -> None:
        self.group, self.members, self.replay_window = group, members, replay_window
        self.first_gap = (rng or random.Random()).randrange(1, EPOCH_GAP + 1)
        self.epoch = 0  # chosen when an epoch's first step goes out
        self.seq = 0  # the last step numbered; 0: the next step starts an epoch
        self.sent: dict[int, bytes] = {}  # recent steps of this epoch, for replay
        self.flight: dict[int, InFlight] = {}  # steps sent and not yet taken by ``outcome``, by number

    def next_step(self, pack_step: Callable[[int, int], bytes], epochs_seen: Iterable[int]) -> bytes:
        """Number the next step (starting an epoch when due) and keep it for replay:
        ``pack_step(epoch, seq)`` makes its bytes."""
        if self.seq == 0:
            gap = 1 if self.epoch else self.first_gap
            self.epoch = max(self.epoch, max(epochs_seen, default=0)) + gap
        self.seq += 1
        data = pack_step(self.epoch, self.seq)
        self.sent[self.seq] = data
        self.sent.pop(self.seq - self.replay_window, None)
        self.flight[self.seq] = InFlight(self.seq, data)
        return data

    def on_reply(self, reply: StepResult | StepFailure) -> int | None:
        """Take one reply; the number of the step it settles, if it settles one."""
        step = self.flight.get(reply.seq) if reply.epoch == self.epoch else None
        if step is None or step.settled or reply.node_rank not in self.members:
            return None  # about a step settled already (or a late copy), or not from the group
        if isinstance(reply, StepFailure):
            step.failure, step.settled = reply, True
            return reply.seq
        step.acks[reply.node_rank] = reply
        if len(step.acks) == len(self.members):
            step.settled = True
            return reply.seq
        return None

    def settled(self, seq: int) -> bool:
        return seq in self.flight and self.flight[seq].settled

    def silent(self, seq: int) -> list[int]:
        """Members that have not acknowledged step ``seq``."""
        acks = self.flight[seq].acks if seq in self.flight else {}
        return [n for n in self.members if n not in acks]

    def outcome(self, seq: int, digest: Callable[[StepResult], str]) -> StepResult:
        """Settled step ``seq``'s result (the leader's, which carries the tokens), which
        leaves the flight; raises ``GroupFailure`` for a failure or for acknowledgements
        that disagree."""
        step = self.flight.pop(seq)
        if step.failure is not None:
            raise GroupFailure(step.failure.code, f"node {step.failure.node_rank}: {step.failure.message}")
        leader = step.acks[self.members[0]]
        want = digest(leader)
        odd = [n for n, r in step.acks.items() if r.digest != want]
        if odd:
            raise GroupFailure(ErrorCode.DIVERGED, f"group {self.group} diverged at step {seq}: node(s) {odd} "
                                                   f"sampled differently from the leader")
        return leader

    def replay(self, ask: Replay, limit: int = REPLAY_BYTES) -> list[bytes]:
        """The first steps ``ask`` names that fit in ``limit`` bytes (one at least), in
        order, if this epoch still holds every step it names; else none. The worker asks
        again for the rest."""
        wanted = range(ask.first, ask.last + 1)
        if ask.epoch != self.epoch or not all(n in self.sent for n in wanted):
            return []
        steps, size = [], 0
        for n in wanted:
            if steps and size + len(self.sent[n]) > limit:
                break
            steps.append(self.sent[n])
            size += len(self.sent[n])
        return steps

    def reset(self) -> None:
        """Forget this epoch (and every step in flight): the next step starts a new one."""
        self.seq = 0
        self.sent.clear()
        self.flight.clear()
