"""Which of its group's steps a worker runs, and when, without I/O: exactly the
publisher's sequence of each epoch, in order, each step once.

The worker service fetches, runs and replies; the step simulation (``tests/sim/steps.py``)
drives the same object on virtual time. A step is

* ``next``: the one after the last run (or the first of a new epoch): run it;
* ``repeat``: run already; the publisher re-sent it because our reply was late or lost:
  send the kept reply again (the replies to the last ``KEPT_REPLIES`` steps are kept:
  with overlapped steps the publisher may wait for an older step than the last one run);
* ``gap``: steps are missing before it (lost, or this worker joined the epoch midway):
  fetch them from the publisher's replay window, run them in order, then it;
* ``stale``: from an older epoch, or a step not run yet of the epoch in which this worker
  failed a step (it reported the failure; the publisher starts a new epoch): drop it. A
  step it ran before the failure is still a ``repeat``: with overlapped steps the
  publisher may be waiting for it, and takes the failure only after it.
"""

from __future__ import annotations

from collections.abc import Callable

NEXT, REPEAT, GAP, STALE = "next", "repeat", "gap", "stale"
KEPT_REPLIES = 8  # more than the steps a publisher keeps in flight


class StepOrder:
    def __init__(self, on_new_epoch: Callable[[int], None] = lambda epoch: None) -> None:
        self.epoch = -1
        self.last_seq = 0  # the last step run in this epoch
        self.in_sync = False  # False after a failure: only a new epoch is taken
        self.replies: dict[int, bytes] = {}  # replies to the last KEPT_REPLIES steps run, by step
        self.on_new_epoch = on_new_epoch  # told when an epoch is taken from its first step

    def classify(self, epoch: int, seq: int) -> str:
        if epoch == self.epoch and seq <= self.last_seq:
            return REPEAT  # run already, even if a later step failed: the publisher may wait for it
        if epoch == self.epoch and self.in_sync:
            return NEXT if seq == self.last_seq + 1 else GAP
        if epoch <= self.epoch:
            return STALE  # older, or the epoch this worker lost track of: only a new one is taken
        self.begin_epoch(epoch)
        return NEXT if seq == 1 else GAP  # a new epoch from its start; or joined midway: fetch from step 1

    def begin_epoch(self, epoch: int) -> None:
        self.epoch, self.last_seq, self.in_sync = epoch, 0, True
        self.replies = {}
        self.on_new_epoch(epoch)

    def missing(self, seq: int) -> range:
        """The steps to fetch before running ``seq``."""
        return range(self.last_seq + 1, seq)

    def ran(self, seq: int, reply: bytes) -> None:
        self.launched(seq)
        self.answered(self.epoch, seq, reply)

    def launched(self, seq: int) -> None:
        """``seq`` is on its way through the model (its reply comes with ``answered``): the
        next step may follow it at once. A repeat of it meanwhile gets no reply yet."""
        self.last_seq = seq

    def answered(self, epoch: int, seq: int, reply: bytes) -> None:
        """Keep the reply to step ``seq`` of ``epoch`` (nothing if a newer epoch began since)."""
        if epoch != self.epoch:
            return
        self.replies[seq] = reply
        self.replies.pop(seq - KEPT_REPLIES, None)

    @property
    def last_reply(self) -> bytes | None:
        return self.replies.get(self.last_seq)

    def reply_to_repeat(self, seq: int) -> bytes | None:
        """What to send for a repeated step: its kept reply, if it is still kept."""
        return self.replies.get(seq)

    def lose_sync(self) -> None:
        """A step failed or could not be fetched: wait for the publisher's next epoch."""
        self.in_sync = False
