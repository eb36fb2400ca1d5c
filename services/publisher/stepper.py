"""Ordered step delivery, the publisher's side, without I/O: numbering steps in epochs,
the window of recent steps kept for replay, which acknowledgements count, and what a
settled step means.

The publisher service publishes, waits and re-sends; the step simulation
(``tests/sim/steps.py``) drives the same object on virtual time. Its rules:

* steps are numbered 1, 2, 3... within an epoch; a new epoch (the first step after a
  start or a reset) is numbered above every epoch this publisher used and every epoch its
  workers report, so no clock is involved;
* one step is in flight at a time; only a reply about *that* step, from a member of the
  group, counts: anything about an earlier step or epoch was settled already;
* the step is settled by a failure from any member, or by an acknowledgement from every
  member; the acknowledgements must carry the same digest (else the group diverged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from schemas.errors import ErrorCode
from schemas.internal import Replay, StepFailure, StepResult
from services.errors import GroupFailure

REPLAY_BYTES = 512 * 1024  # a replay answer holds steps up to this size (always one at least)


class Stepper:
    def __init__(self, group: int, members: list[int], replay_window: int) -> None:
        self.group, self.members, self.replay_window = group, members, replay_window
        self.epoch = 0  # chosen when an epoch's first step goes out
        self.seq = 0  # the step in flight (or last settled); 0: the next step starts an epoch
        self.sent: dict[int, bytes] = {}  # recent steps of this epoch, for replay
        self.acks: dict[int, StepResult] = {}
        self.failure: StepFailure | None = None
        self.in_flight = False

    def next_step(self, pack_step: Callable[[int, int], bytes], epochs_seen: Iterable[int]) -> bytes:
        """Number the next step (starting an epoch when due) and keep it for replay:
        ``pack_step(epoch, seq)`` makes its bytes."""
        if self.seq == 0:
            self.epoch = max(self.epoch, max(epochs_seen, default=0)) + 1
        self.seq += 1
        data = pack_step(self.epoch, self.seq)
        self.sent[self.seq] = data
        self.sent.pop(self.seq - self.replay_window, None)
        self.acks, self.failure, self.in_flight = {}, None, True
        return data

    def on_reply(self, reply: StepResult | StepFailure) -> bool:
        """Take one reply; True when it settles the step in flight."""
        if not self.in_flight or reply.epoch != self.epoch or reply.seq != self.seq:
            return False  # about a step settled already (or a late copy)
        if reply.node_rank not in self.members:
            return False
        if isinstance(reply, StepFailure):
            self.failure, self.in_flight = reply, False
            return True
        self.acks[reply.node_rank] = reply
        if len(self.acks) == len(self.members):
            self.in_flight = False
            return True
        return False

    def silent(self) -> list[int]:
        """Members that have not acknowledged the step in flight."""
        return [n for n in self.members if n not in self.acks]

    def outcome(self, digest: Callable[[StepResult], str]) -> StepResult:
        """The settled step's result (the leader's, which carries the tokens); raises
        ``GroupFailure`` for a failure or for acknowledgements that disagree."""
        if self.failure is not None:
            raise GroupFailure(self.failure.code, f"node {self.failure.node_rank}: {self.failure.message}")
        leader = self.acks[self.members[0]]
        want = digest(leader)
        odd = [n for n, r in self.acks.items() if r.digest != want]
        if odd:
            raise GroupFailure(ErrorCode.DIVERGED, f"group {self.group} diverged at step {self.seq}: node(s) {odd} "
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
        """Forget this epoch: the next step starts a new one."""
        self.seq, self.in_flight = 0, False
        self.sent.clear()
