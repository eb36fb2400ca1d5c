"""Admission into one DP group: a submit becomes a queued request once this publisher
instance holds its name in the request ledger (``ownership.claim``), a copy of one held or
answered here is acknowledged as a duplicate, and an abort finds what it names.

A part of ``Publisher`` (``service.py``): it uses the service's scheduler, ledger,
instance, counters and log, and ``ready``/``recently_answered`` of its other parts."""

from __future__ import annotations

import asyncio
from typing import Any

from dpbus.schemas import Accepted, ErrorCode, encode_answer
from dpbus.schemas.internal import SubmitAck, Submit, client_of, pack
from dpbus.schemas.public import AbortAck
from dpbus.services import identity, ownership
from dpbus.services.ledger import ledger_full, request_key
from dpbus.services.publisher.answers import Delivery
from dpbus.services.publisher.scheduler import Sequence


class Admission:
    async def on_submit(self, req: Any) -> None:
        try:
            sub = self._unpack["submit"].decode(req.data)
        except Exception as e:  # noqa: BLE001
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.BAD_REQUEST, f"bad submit: {e}")))
            return
        if not identity.answerable(sub.reply, sub.client):  # ingest checks this; a publisher never trusts it
            self.counts["foreign_reply"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.BAD_REQUEST, "the reply subject is not the client's inbox")))
            return
        if sub.key in self.doubtful:
            return  # its claim is being resolved: no answer until known (ingest asks again)
        if self.held(sub.client, sub.rid) is not None or self.recently_answered(sub.key):
            # a retried submit, or a copy of a request we hold or answered: one answer only
            self.counts["duplicates"] += 1
            await req.respond(pack(SubmitAck(True, waiting=len(self.sched.waiting), instance=self.instance,
                                             duplicate=True)))
            return
        if not self.ready():
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.UNAVAILABLE, self.not_ready_reason())))
            return
        if len(self.sched.waiting) >= self.sched.max_waiting:
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.OVERLOADED,
                                             f"group {self.g} has {len(self.sched.waiting)} requests waiting")))
            return
        seq = self.new_sequence(sub)
        instance = self.instance
        try:
            rev = await self.claim(sub)
        except Exception as e:  # noqa: BLE001 - no ledger, no acceptance
            if ledger_full(e):  # every group shares the bucket: the system is full
                self.counts["rejected"] += 1
                await req.respond(pack(SubmitAck(False, ErrorCode.OVERLOADED, "the request ledger is full")))
                return
            if ownership.certainly_not_applied(e):
                self.counts["rejected"] += 1
                await req.respond(pack(SubmitAck(False, ErrorCode.UNAVAILABLE,
                                                 f"the request ledger is unreachable: {e!r}")))
                return
            # the claim may have landed: refusing would leave a request nobody runs. No
            # answer now; ingest asks again, or records a refusal that the ledger arbitrates
            self.log.warning("claim_unknown", rid=sub.rid, error=repr(e))
            self.doubtful[sub.key] = seq
            task = asyncio.create_task(self.resolve_claim(sub, seq, instance))
            self.resolving_claims.add(task)
            task.add_done_callback(self.resolving_claims.discard)
            return
        if rev is None and sub.moved_from:  # not moved here (any more): the mover keeps it
            self.counts["rejected"] += 1
            await req.respond(pack(SubmitAck(False, ErrorCode.UNAVAILABLE, "the request is not moved to this group")))
            return
        if rev is None:  # the name is someone else's (held elsewhere, or answered): never run it twice
            self.counts["duplicates"] += 1
            await req.respond(pack(SubmitAck(True, instance=self.instance, duplicate=True)))
            return
        await self.adopt(seq, rev, instance)
        await req.respond(pack(SubmitAck(True, waiting=len(self.sched.waiting), instance=self.instance)))

    def new_sequence(self, sub: Submit) -> Sequence:
        """The scheduler's sequence for a submitted request, with its delivery record."""
        delivery = Delivery(sub.reply, sub.encoding, sub.stream, sub.sampling.stop,
                            self.tokenizer.stream(sub.input_ids), pinned=sub.pinned, attempt=sub.attempt,
                            ack=sub.ack)
        return Sequence(sub.rid, sub.input_ids, sub.sampling, sub.accepted_at, eos_ids=self.model.eos_token_ids,
                        client=sub.client, delivery=delivery)

    async def adopt(self, seq: Sequence, rev: int, instance: int) -> None:
        """``seq`` is claimed in the ledger by ``instance`` (this one): queue it (and tell
        its client first, when it asked: nothing of the request can be sent before)."""
        d = seq.delivery
        d.ledger_rev, d.owner = rev, instance
        if d.ack:
            said = Accepted(seq.rid, self.g, len(self.sched.waiting))
            await self.outbox.send(d.reply, encode_answer(said, d.encoding), still=lambda: self.may_answer(seq))
        self.sched.waiting.append(seq)  # room was checked when it came; the claim is made
        self.counts["accepted"] += 1
        self.wake.set()

    async def resolve_claim(self, sub: Submit, seq: Sequence, instance: int) -> None:
        """A claim whose outcome is unknown: claim again until the ledger answers. If ours,
        run it (ingest could not refuse it: the name was taken). Given up with this
        instance (then ingest answers for the instance's held requests)."""
        try:
            mine = ownership.held_by(instance, self.g, sub)
            rev = await ownership.claim_until_known(self.ledger, request_key(self.g, sub.client, sub.rid), mine,
                                                    sub.attempt, ownership.source_of(sub), asyncio.sleep,
                                                    lambda: self.instance == instance)
            if rev is not None and self.instance == instance:
                self.log.info("claim_resolved", rid=sub.rid)
                await self.adopt(seq, rev, instance)
        finally:
            self.doubtful.pop(sub.key, None)

    async def on_abort(self, req: Any) -> None:
        try:
            ask = self._unpack["abort"].decode(req.data)
        except Exception as e:  # noqa: BLE001
            await req.respond(pack(AbortAck(rid="", found=False)))
            self.log.warning("bad_abort", error=str(e))
            return
        rid = ask.rid
        # a request whose claim is still in doubt is aborted too: if the claim proves ours,
        # it ends at once with its terminal answer
        seq = self.held(client_of(ask.reply), rid) or self.doubtful.get((client_of(ask.reply), rid))
        found = seq is not None and seq.delivery.reply == ask.reply  # only the owner knows its reply subject
        if found:
            self.engine.abort(seq)
        await req.respond(pack(AbortAck(rid=rid, found=found, dp_rank=self.g if found else None)))
        if found:
            self.wake.set()

    async def claim(self, sub: Submit) -> int | None:
        """Make this instance the holder of ``sub`` in the ledger: its revision, or None
        when the name belongs to someone else. A moved request only while its mover's
        entry says it moved it here; a refused one by a fresh attempt."""
        mine = ownership.held_by(self.instance, self.g, sub)
        return await ownership.claim(self.ledger, request_key(self.g, sub.client, sub.rid), mine, sub.attempt,
                                     ownership.source_of(sub))

    def held(self, client: str, rid: str) -> Sequence | None:
        """The request (client, rid) if this publisher holds it: queued, running or moving."""
        return self.sched.find(rid, client) or self.moving.get((client, rid))
