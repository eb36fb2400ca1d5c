"""Who may answer a request: the decisions of the ledger protocol that publisher and
ingest take, without I/O.

The services do the ledger calls and the sending; these functions say what the answers
of those calls mean. The protocol simulation (``tests/sim``) runs the same functions, so
what it checks is the production rule, not a copy of it.
"""

from __future__ import annotations

from services.ledger import ANSWERED, HELD, REFUSED, Entry


def held_by(instance: int, group: int, sub) -> Entry:
    """The entry a publisher instance claims for a submitted request."""
    return Entry(HELD, instance, group, sub.rid, sub.client, sub.reply, sub.encoding, sub.attempt)


async def claim(ledger, key: str, mine: Entry, moved_from: int, attempt: str) -> int | None:
    """Make ``mine`` the holder of ``key`` in ``ledger`` (the bucket, or the simulation's
    store): create the entry, else take it over when ``may_take_over`` allows. Its
    revision, or None when the name is someone else's. The one place this order of
    calls is written: the publisher and the simulation both run it."""
    for _ in range(2):  # a second try when the entry vanished between create and get
        rev, existing = await ledger.claim(key, mine)
        if rev is not None:
            return rev
        if existing is None:
            continue
        last, theirs = existing
        if may_take_over(theirs, moved_from, attempt):
            return await ledger.swap(key, mine, last)
        return None
    return None


def may_take_over(theirs: Entry, moved_from: int, attempt: str) -> bool:
    """A name already in the ledger may be taken by a submit only when the request was
    moved here by the instance holding it, or when it is a fresh attempt after a refusal.
    Anything else is a duplicate: acknowledged, never run."""
    moved_here = theirs.state == HELD and bool(moved_from) and theirs.owner == moved_from
    fresh_attempt = theirs.state == REFUSED and theirs.attempt != attempt
    return moved_here or fresh_attempt


def answered_by(instance: int, group: int, rid: str, client: str) -> Entry:
    """The entry that settles a request: ``instance`` (0 for ingest) sends its terminal."""
    return Entry(ANSWERED, instance, group, rid, client)


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
