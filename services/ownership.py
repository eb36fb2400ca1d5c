"""Who may answer a request: the rules of the ledger protocol that publisher and ingest
follow, and the order of their ledger calls.

The services do the sending; the functions here decide (without I/O) or make the ledger
calls (``claim``, ``settle``, ``resolve``, ``refuse``), given the ledger and a ``sleep``.
The protocol simulation (``tests/sim``) runs the same functions on its in-memory bucket
with a virtual-time ``sleep``, so what it checks is the production code, not a copy.

A ledger call that times out may still have landed (a JetStream request whose answer was
lost). Such a write is never taken for failed: it is *resolved* by reading the entry back
(``ours``) until the ledger answers, because if it landed nobody else will ever act on
that entry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from dpbus.services.ledger import (ANSWERED, CORRUPT, HELD, KEEP_ANSWER_BYTES, MOVED, REFUSED, REFUSED_BY_INGEST,
                                   Entry, Name, SweepView, entry_key, lease_key, ledger_full, parse_key, request_key)

Sleep = Callable[[float], Awaitable[None]]
SETTLE_ATTEMPTS = 200  # x RETRY at most while the ledger is unreachable, then the lease is given up
RETRY = 0.1  # seconds between two tries of a ledger call that did not answer
RESOLVE_EVERY = 0.2  # seconds between two reads resolving a write whose outcome is unknown
REFUSE_ATTEMPTS = 150  # x RESOLVE_EVERY: how long ingest tries to record a refusal before it asks the group


def certainly_not_applied(e: Exception) -> bool:
    """A ledger call failed in a way that proves it was not applied (no JetStream server
    took it). Anything else, a time-out above all, may have landed."""
    from nats.errors import NoRespondersError
    from nats.js.errors import ServiceUnavailableError

    return isinstance(e, (NoRespondersError, ServiceUnavailableError)) or ledger_full(e)


def ours(got: tuple[int, Entry] | None, mine: Entry) -> bool:
    """Does the entry read back hold exactly what we wrote? Then our write landed (even if
    its acknowledgement was lost) and nobody has changed it since."""
    return got is not None and got[1] == mine


def held_by(instance: int, group: int, sub) -> Entry:
    """The entry a publisher instance claims for a submitted request."""
    return Entry(HELD, instance, group, sub.rid, sub.client, sub.reply, sub.encoding, sub.attempt)


Moved = tuple[str, int]  # a moved submit's source: (the mover's entry key, the mover instance)


def source_of(sub) -> Moved | None:
    """Where a moved submit comes from (None: from ingest)."""
    if not sub.moved_from:
        return None
    return request_key(sub.moved_group, sub.client, sub.rid), sub.moved_from


async def claim(ledger, key: str, mine: Entry, attempt: str, moved: Moved | None = None) -> int | None:
    """Make ``mine`` the holder of ``key`` (its own group's entry) in ``ledger`` (the bucket,
    or the simulation's store): create the entry, else take it over when
    ``may_take_over`` allows. A moved request is claimed only while the mover's entry says
    it was moved here (``offered_here``). Its revision, or None when the name is someone
    else's. The one place this order of calls is written: the publisher and the
    simulation both run it."""
    if moved is not None and not await offered_here(ledger, moved, mine.group):
        return None
    for _ in range(2):  # a second try when the entry vanished between create and get
        rev, existing = await ledger.claim(key, mine)
        if rev is not None:
            return rev
        if existing is None:
            continue
        last, theirs = existing
        if ours(existing, mine):
            return last  # an earlier try of this claim landed; its acknowledgement was lost
        if may_take_over(theirs, attempt):
            return await ledger.swap(key, mine, last)
        return None
    return None


async def offered_here(ledger, moved: Moved, group: int) -> bool:
    """Does the mover's entry say it moved the request to ``group``? Nothing else lets a
    group run a request that another group holds."""
    key, instance = moved
    got = await ledger.get(key)
    return got is not None and got[1].state == MOVED and got[1].owner == instance and got[1].to == group


def may_take_over(theirs: Entry, attempt: str) -> bool:
    """A name already in the group's entries may be taken by a submit only when it is a
    fresh attempt after a refusal (a moved request too: the group refused an earlier
    attempt of it). A ``CORRUPT`` value (not
    written by dpbus) is nobody's: taken over like a refusal. Anything else is a
    duplicate: acknowledged, never run."""
    fresh_attempt = theirs.state == REFUSED and theirs.attempt != attempt
    return fresh_attempt or theirs.state == CORRUPT  # nobody's: whoever claims it takes it


def moved_to(held: Entry, group: int) -> Entry:
    """The mover's entry once it offers the request to ``group``: it answers it no more."""
    return Entry(MOVED, held.owner, held.group, held.rid, held.client, held.reply, held.encoding, held.attempt,
                 to=group)


def taken_back(moved: Entry) -> Entry:
    """The mover's entry held again: the group it was offered to refused it outright."""
    return Entry(HELD, moved.owner, moved.group, moved.rid, moved.client, moved.reply, moved.encoding, moved.attempt)


async def rewrite(ledger, key: str, mine: Entry, rev: int, sleep: Sleep, attempts: int = REFUSE_ATTEMPTS) -> int | None:
    """Compare-and-set our own entry ``key`` from ``rev`` to ``mine`` (a hand-over or a take
    back): the new revision, or None when the entry is no longer ours at ``rev`` or the
    write may not be applied (refused, or still unknown after ``attempts`` reads: then
    the caller goes on as if it had not been, and the ledger arbitrates later)."""
    try:
        return await ledger.swap(key, mine, rev)
    except Exception as e:  # noqa: BLE001 - applied or not: read it back
        if certainly_not_applied(e):
            return None
    for _ in range(attempts):
        await sleep(RESOLVE_EVERY)
        try:
            got = await ledger.get(key)
        except Exception:  # noqa: BLE001 - still unreachable
            continue
        return got[0] if ours(got, mine) else None
    return None


def answered_by(instance: int, group: int, rid: str, client: str, answer: bytes = b"") -> Entry:
    """The entry that settles a request: ``instance`` (0 for ingest) sends its terminal,
    ``answer`` (kept when small: a retry of the request gets it again, ``stored_answer``)."""
    return Entry(ANSWERED, instance, group, rid, client, answer=answer if len(answer) <= KEEP_ANSWER_BYTES else b"")


async def stored_answer(ledger, key: str, reply: str, client: str, rid: str) -> bytes | None:
    """The terminal answer of the request named ``key`` for a retry of it sent to ``reply``
    (a new send, not a copy): kept with its entry once answered, if it was small enough;
    None when it is not answered yet (its answers go to the first reply subject), was sent
    to ``reply`` already, or was not kept."""
    named = await ledger.get_name(key)
    if named is None or named[1] is None or named[1].reply == reply or named[1].group == REFUSED_BY_INGEST:
        return None
    got = await ledger.get(request_key(named[1].group, client, rid))
    if got is None or got[1].state != ANSWERED or not got[1].answer:
        return None
    return got[1].answer


def own_write_landed(got: tuple[int, Entry] | None, instance: int) -> bool:
    """A compare-and-set to answered failed: did our own earlier write land (its
    acknowledgement lost)? Then we won it after all."""
    return got is not None and got[1].state == ANSWERED and got[1].owner == instance


def may_answer(settled: bool, abandoned: bool, owner: int, instance: int, lease_valid: bool) -> bool:
    """A publisher may send to a request's client: it won the terminal answer, or it still
    holds the request under a valid lease and has not given it up."""
    return settled or (not abandoned and owner == instance and lease_valid)


def refused(sub, group: int) -> Entry:
    """The entry ingest creates for a submit nobody acknowledged: if the create works,
    nobody holds the request and ingest answers ``unavailable``; if the name is taken,
    its holder answers."""
    return Entry(REFUSED, group=group, rid=sub.rid, client=sub.client, attempt=sub.attempt)


def name_of(sub, group: int) -> Name:
    return Name(sub.attempt, group, sub.reply)


def refused_name(sub) -> Name:
    """The name of a request every group refused outright (ingest answered the refusal):
    kept, not deleted, so that a copy of it crossing that answer (the retry rule: the same
    request to the same reply subject) is dropped as a copy, while a new attempt (a new
    reply subject) takes the name over."""
    return Name(sub.attempt, REFUSED_BY_INGEST, sub.reply)


NEW, DUPLICATE = "new", "duplicate"  # how an admission ends


async def admit(ledger, key: str, mine: Name, client: str, rid: str, copy: bool = False) -> tuple[str, int]:
    """Ingest records a request's name ``key`` (``n.D``) before handing it to a group:
    (``NEW``, its revision) when the name is this attempt's, (``DUPLICATE``, 0) when a
    request of that name is held, being handed over or was answered (not run again), and
    for a ``copy`` (the client's resend under the retry rule) sent to the reply subject of
    the attempt that has the name, whatever its state: that attempt's answers, a refusal
    included, went or go there, so a copy crossing a refusal is not run. A fresh attempt takes over
    a name whose last attempt was refused and nobody claimed, and a value that is no
    name. Raises what the ledger raises (a write that timed out is read back first: it
    may have landed)."""
    for _ in range(3):
        try:
            rev, existing = await ledger.claim(key, mine)
        except Exception as e:
            if certainly_not_applied(e):
                raise
            existing = await ledger.get_name(key)
            if existing is not None and existing[1] == mine:
                return NEW, existing[0]  # our create landed, its answer lost
            if existing is None:
                raise
            rev = None
        if rev is not None:
            return NEW, rev
        if existing is None:
            continue  # deleted meanwhile: create again
        last, theirs = existing
        if theirs is not None and theirs.attempt == mine.attempt:
            return NEW, last
        if copy and theirs is not None and theirs.reply and theirs.reply == mine.reply:
            return DUPLICATE, 0
        if theirs is not None and theirs.group != REFUSED_BY_INGEST:
            got = await ledger.get(request_key(theirs.group, client, rid))
            if got is None or got[1].state != REFUSED or got[1].attempt != theirs.attempt:
                return DUPLICATE, 0
        took = await ledger.swap(key, mine, last)
        if took is not None:
            return NEW, took
    return DUPLICATE, 0


WON, TAKEN, SILENCED, UNKNOWN = "won", "taken", "silenced", "unknown"  # how a settle ends


async def settle(ledger, key: str, done: Entry, rev: int, may_answer: Callable[[], bool], sleep: Sleep,
                 attempts: int = SETTLE_ATTEMPTS) -> str:
    """Compare-and-set ``key`` from the held revision ``rev`` to ``done`` (answered by us).
    ``WON``: send the terminal answer. ``TAKEN``: someone else has it. ``SILENCED``: we
    may no longer answer (``may_answer`` turned false, or the ledger stayed unreachable),
    and no write of ours can have landed. ``UNKNOWN``: the same, but a write of ours may
    have landed unanswered: ``resolve`` it, and answer if it did."""
    unsure = False
    for _ in range(attempts):
        if not may_answer():
            break
        try:
            if await ledger.swap(key, done, rev) is not None:
                return WON
            got = await ledger.get(key)
        except Exception as e:  # noqa: BLE001 - unreachable for now: try again
            unsure = unsure or not certainly_not_applied(e)
            await sleep(RETRY)
            continue
        return WON if landed(got, done) else TAKEN
    return UNKNOWN if unsure else SILENCED


async def resolve(ledger, key: str, mine: Entry, sleep: Sleep) -> bool:
    """Whether ``mine`` is what ``key`` holds, reading until the ledger answers. A write of
    ours that landed unanswered is ours to act on: nobody else ever will."""
    while True:
        try:
            got = await ledger.get(key)
        except Exception:  # noqa: BLE001 - still unreachable
            await sleep(RESOLVE_EVERY)
            continue
        return landed(got, mine)


def landed(got: tuple[int, Entry] | None, mine: Entry) -> bool:
    """Did our write of ``mine`` land, judging by the entry read back? An answered entry is
    ours whatever the details; any other must be exactly what we wrote."""
    return own_write_landed(got, mine.owner) if mine.state == ANSWERED else ours(got, mine)


async def claim_until_known(ledger, key: str, mine: Entry, attempt: str, moved: Moved | None, sleep: Sleep,
                            still: Callable[[], bool]) -> int | None:
    """``claim`` again until the ledger answers (while ``still``): a claim that timed out
    may have landed, and then the request is ours to run. None: not ours, or ``still``
    turned false (the instance that claimed is gone: ingest answers for it)."""
    while still():
        try:
            return await claim(ledger, key, mine, attempt, moved)
        except Exception:  # noqa: BLE001 - still unreachable
            await sleep(RESOLVE_EVERY)
    return None


async def refuse(ledger, key: str, mine: Entry, sleep: Sleep, attempts: int = REFUSE_ATTEMPTS) -> bool | None:
    """Record ``mine`` (a ``refused`` entry) unless the name is taken (an earlier attempt's
    refusal does not take it): True when the refusal
    is recorded (the refuser answers the client), False when someone holds or answered the
    request (they answer it), None when the ledger did not answer ``attempts`` times (the
    caller asks the group instead: see ``Ingest.refuse_unheard``)."""
    for _ in range(attempts):
        try:
            rev, existing = await ledger.claim(key, mine)
        except Exception as e:  # noqa: BLE001 - it may have landed: read it back next time
            if ledger_full(e):  # a full bucket checks a create's name first: nobody holds it
                return True
            await sleep(RESOLVE_EVERY)
            continue
        if rev is not None:
            return True
        if existing is None:
            continue  # deleted between create and get: create again
        if ours(existing, mine):
            return True  # our earlier try landed unanswered
        last, theirs = existing
        if not may_take_over(theirs, mine.attempt):
            return False  # held or answered: its holder answers
        # an earlier attempt's refusal (or a value that is no entry): nobody holds this
        # attempt, so its refusal takes the entry over (a retry is refused, not silenced)
        try:
            if await ledger.swap(key, mine, last) is not None:
                return True
        except Exception:  # noqa: BLE001 - as a create that did not answer: read it back
            await sleep(RESOLVE_EVERY)
    return None


async def sweep(ledger, view: SweepView, unsure: dict[str, tuple[Entry, Entry]], instance: int, now: float,
                answer_lost: Callable[[Entry], Awaitable[None]]) -> None:
    """One sweep by the ingest ``instance``: answer (``answer_lost``) for held requests whose
    holder's lease expired, when it wins the compare-and-set; then delete settled entries
    and dead leases. ``unsure`` keeps the compare-and-sets that did not answer (key ->
    (our write, the entry)): the next sweep reads them back first. Raises when the ledger
    does not answer (the next sweep carries on)."""
    for key, (mine, entry) in list(unsure.items()):
        if landed(await ledger.get(key), mine):
            await answer_lost(entry)
        del unsure[key]
    for owner, group in {(e.owner, e.group) for _, _, e in view.orphans(now)}:
        # the watch may lag (a NATS cluster electing the bucket's leader) while the holder
        # renews and streams on: read its lease itself before answering for it
        got = await ledger.lease(owner, group)
        if got is not None:
            view.update(lease_key(owner, group), got[0], got[1], now)
    for key, rev, entry in view.orphans(now):
        await answer_for(ledger, view, unsure, instance, key, rev, entry, now, answer_lost)
    for key, rev, entry in view.stale_moves(now):
        await revoke(ledger, view, unsure, instance, key, rev, entry, now, answer_lost)
    for key, rev in [*view.stale_settled(now), *view.stale_names(now), *view.dead_leases(now)]:
        if not await ledger.delete(key, rev):
            await look_again(ledger, view, key, now)


async def revoke(ledger, view: SweepView, unsure: dict[str, tuple[Entry, Entry]], instance: int, key: str, rev: int,
                 entry: Entry, now: float, answer_lost: Callable[[Entry], Awaitable[None]]) -> None:
    """A move its target did not take in time: close the target's entry (created answered
    by this ingest: the target can no longer claim it; if the target got there first, it
    holds the request and this move is over), then win the mover's entry and answer.
    The mover may have taken the request back meanwhile: then that compare-and-set loses."""
    _, _, d = parse_key(key)
    target = entry_key(entry.to, d)
    closed = answered_by(instance, entry.to, entry.rid, entry.client)
    made, existing = await ledger.claim(target, closed)
    if made is None and existing is not None and not ours(existing, closed):
        last, theirs = existing
        if theirs.state not in (REFUSED, CORRUPT) or await ledger.swap(target, closed, last) is None:
            await look_again(ledger, view, target, now)  # the target took it: its holder answers
            return
    await answer_for(ledger, view, unsure, instance, key, rev, entry, now, answer_lost)


async def answer_for(ledger, view: SweepView, unsure: dict[str, tuple[Entry, Entry]], instance: int, key: str,
                     rev: int, entry: Entry, now: float, answer_lost: Callable[[Entry], Awaitable[None]]) -> None:
    """Win ``key`` (at ``rev``) for this ingest and answer its client. A write that did not
    answer goes to ``unsure`` (read back first by the next sweep); one that lost (the entry
    changed since the view saw it, or the view missed a change) has the entry read again."""
    mine = answered_by(instance, entry.group, entry.rid, entry.client)
    try:
        won = await ledger.swap(key, mine, rev)
    except Exception as e:
        if not certainly_not_applied(e):
            unsure[key] = (mine, entry)
        raise
    if won is not None:
        await answer_lost(entry)
    else:
        await look_again(ledger, view, key, now)


async def look_again(ledger, view: SweepView, key: str, now: float) -> None:
    """Put ``key`` as the bucket holds it now into ``view``. The view follows the bucket's
    changes, but one can be missed (a connection lost and found again): a compare-and-set
    on a revision it no longer has would lose at every sweep, and a request still held by
    a dead holder would never be answered. The next sweep uses the revision read here."""
    got = await ledger.read(key)
    view.update(key, got[0] if got else 0, got[1] if got else None, now)
