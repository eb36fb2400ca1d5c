"""Moving requests between DP groups: a request that has sent nothing to its client
(and was not pinned) is offered to the other groups when its own group fails or is not
whole. Before each offer this group writes its own ledger entry ``moved`` to the group
offered (from then on it does not answer the request); that group claims its own entry
only while ours says so, and answers the client. A group that refuses outright is
followed by the next one; when all refuse, the entry is held here again. An offer that
gets no answer leaves the request to the ledger: the target claims it, or ingest revokes
the move and answers (``ownership.revoke``). Never two groups at once.

A part of ``Publisher`` (``service.py``): it uses the service's connection, scheduler,
instance, counters and log, and ``finish``/``ready`` of its other parts."""

from __future__ import annotations

from dpbus.schemas import FinishReason
from dpbus.schemas.internal import GroupAbort, Submit, pack
import asyncio

from dpbus.services import bus, ownership
from dpbus.services.errors import ReceiveDataError
from dpbus.services.ledger import request_key
from dpbus.services.publisher.scheduler import Sequence

UNANSWERED = -1  # what ``requeue`` returns for an offer that got no answer: the request is not ours any more


class Moving:
    def movable(self, seq: Sequence) -> bool:
        """Only a request that has sent nothing to its client, and was not pinned, moves
        (nor one a step in flight still samples for: its token would come here)."""
        return not seq.output and not seq.pending and not seq.delivery.pinned and self.groups > 1

    async def move(self, seq: Sequence) -> int | None:
        """Offer ``seq`` (already out of the scheduler) to the other groups; the group that
        took it, or None. While it is offered it stays listed in ``moving``, so that a
        duplicate or an abort still finds it here; an abort that came meanwhile is
        passed on to the group that took it."""
        if not self.movable(seq):
            return None
        self.moving[seq.key] = seq
        try:
            target = await self.requeue(seq)
        finally:
            self.moving.pop(seq.key, None)
        if target is not None and target >= 0 and seq.aborted and not seq.delivery.abandoned:
            await self.forward_abort(target, seq)
        return target

    async def forward_abort(self, g: int, seq: Sequence) -> None:
        try:
            await bus.request(self.nc, self.subjects.group_abort(g), pack(GroupAbort(seq.rid, seq.delivery.reply)),
                              timeout=2.0)
        except ReceiveDataError as e:
            self.log.warning("abort_not_forwarded", rid=seq.rid, to_group=g, error=e.message)

    async def move_waiting(self) -> None:
        """While the group is not whole, offer its queued requests to other groups. Each one
        leaves the queue before it is offered, so it cannot also start here meanwhile; one
        that no group took goes back to the head of the queue."""
        for seq in list(self.sched.waiting):
            if self.ready():
                return
            if seq not in self.sched.waiting or not self.movable(seq):
                continue
            self.sched.waiting.remove(seq)
            if await self.move(seq) is None and not seq.delivery.abandoned:
                if seq.aborted:
                    await self.finish(seq, FinishReason.ABORT)
                else:
                    self.sched.waiting.appendleft(seq)

    async def requeue(self, seq: Sequence) -> int | None:
        """Hand a request that has sent nothing to its client yet to another group: the one
        that took it, ``UNANSWERED`` when an offer got no answer (not ours any more), or
        None when it stays here. It keeps its rid, reply subject and acceptance time."""
        if not self.movable(seq):
            return None
        d = seq.delivery
        sub = Submit(seq.rid, seq.prompt, seq.sampling, d.stream, d.reply, d.encoding, seq.accepted_at, -1,
                     client=seq.client, attempt=d.attempt, moved_from=d.owner, moved_group=self.g, ack=d.ack)
        key, rev = request_key(self.g, seq.client, seq.rid), d.ledger_rev
        ours = ownership.held_by(d.owner, self.g, sub)
        for g in (x for x in range(self.groups) if x != self.g):
            offered = ownership.moved_to(ours, g)
            written = await ownership.rewrite(self.ledger, key, offered, rev, asyncio.sleep)
            if written is None:
                break  # not written (or not ours any more): offer it nowhere else
            rev, ours, sub.dp_rank = written, offered, g
            try:
                ack = self._ack.decode(await bus.request(self.nc, self.subjects.submit(g), pack(sub), timeout=2.0,
                                                         attempts=1))
            except ReceiveDataError as e:
                self.counts["moves_unanswered"] += 1
                self.log.warning("move_unanswered", rid=seq.rid, to_group=g, error=e.message)
                return UNANSWERED  # group g may claim it yet; if not, ingest revokes the move
            if ack.accepted:
                self.counts["requeued"] += 1
                self.log.info("requeued", rid=seq.rid, to_group=g)
                return g
        if ours.state == ownership.MOVED:  # every group refused it outright: it is ours again
            back = ownership.taken_back(ours)
            written = await ownership.rewrite(self.ledger, key, back, rev, asyncio.sleep)
            if written is None:
                self.log.warning("move_not_taken_back", rid=seq.rid)
                return UNANSWERED  # ingest revokes the move and answers
            d.ledger_rev = written
        return None
