"""The request ledger: who owns each accepted request's terminal answer, kept where any
survivor can find it (a JetStream key-value bucket, ``<prefix>_requests``).

Two kinds of entry per accepted request, both keyed by a digest ``D`` of (client, rid):

* the **name** ``n.D``, written by ingest only: created when ingest admits the request
  (the name must be new: a copy of a request, whichever ingest and group it reaches, is
  a duplicate), it says which group it was handed to and in which attempt;
* the **request entry** ``r.<g>.D`` of group g, which group g's publisher and ingest write
  (a publisher's NATS user may write its own group's entries only: no publisher can
  settle, renew or take over another group's requests):

  - a publisher **claims** ``r.<g>.D`` (create: it must be new) before it acknowledges a
    submit; the entry says ``held`` by that publisher instance and carries the reply
    subject;
  - the terminal answer belongs to whoever wins the compare-and-set from ``held`` to
    ``answered``: the holder when it finishes, or an ingest instance when the holder's
    lease expired. Ingest writes, then sends. The holder, under a valid lease, sends its
    answer with the write right behind it on the same connection (one write to the
    server, handled in order), so that its death leaves both or neither;
  - a group **moves** a request by writing its own entry ``moved`` to group h first (from
    then on it does not answer it), then offering it to h; h claims ``r.<h>.D`` only
    while ``r.<g>.D`` says ``moved`` to h by that instance. The mover takes the request
    back (``moved`` to ``held``) only when h refused it outright; a move nobody took for
    ``MOVE_GRACE`` is revoked by ingest: it creates ``r.<h>.D`` answered (h can no longer
    claim it), then wins ``r.<g>.D`` and answers the client;
  - ingest records ``refused`` in ``r.<g>.D`` for a request whose submit it could not get
    acknowledged and nobody claimed (so a late copy of that submit never runs); a fresh
    attempt with the same name may take a ``refused`` entry over;
* settled entries (``answered``, ``refused``, a ``moved`` one its target took) are deleted
  ``KEEP_ANSWERED`` seconds later, and the name with the last of them (copies and retries
  of the same name are duplicates until then).

Each publisher instance keeps a **lease** (``lease.<group>.<instance>``: a publisher's NATS
user may write only its own group's leases), renewed every quarter of
its ``ttl``. It sends nothing to a client once ``ttl - MARGIN`` has passed since it *sent*
the last renewal that was acknowledged; an ingest declares the lease expired ``ttl +
MARGIN`` after it first *saw* the latest renewal. A renewal is seen after it was sent, so
the holder is silent before anyone answers for it. Only durations on each side's own
monotonic clock are compared: no wall clocks.

The decisions (``LeaseClock``, ``SweepView``) do no I/O; ``Ledger`` is the bucket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
from msgspec import Struct

from dpbus.schemas.codec import Encoding

HELD, ANSWERED, REFUSED, MOVED = "held", "answered", "refused", "moved"
CORRUPT = "corrupt"  # a value that is no entry at all (not written by dpbus): taken over by the next claim
KEEP_ANSWERED = 120.0  # seconds a settled name stays (duplicates are dropped until then)
KEEP_ANSWER_BYTES = 1024  # a terminal answer up to this size is kept with its entry (a retry gets it again)
# The bucket's limits: a safety net, never the protocol. An entry lives from its claim to
# KEEP_ANSWERED after its answer, so at ~3k accepted requests/s (one stream leader's rate)
# the bucket holds ~350k entries of ~250 bytes, ~400 with a kept terminal answer (140 MB).
# Past MAX_BYTES a claim is refused (the client gets ``overloaded``); MAX_AGE only drops what no sweep deleted (no ingest for
# hours), far beyond the longest request (65k tokens) and renewed leases. JetStream sets
# MAX_BYTES aside in its store when the bucket is made (a deployment's server has 4 GB).
MAX_BYTES = 192 << 20
MAX_AGE = 6 * 3600.0
LEDGER_FULL = (10077, 10047, 10027)  # JetStream: maximum messages / bytes / storage exceeded
CONFIG_DIFFERS = 10058  # JetStream: the stream exists with another configuration
MOVE_GRACE = 10.0  # seconds a move may wait for its target's claim before ingest revokes it
NAME_GRACE = 600.0  # seconds a name may stand without a request entry (an ingest died handing it over)
MARGIN = 0.5  # seconds between the holder going silent and anyone answering for it
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's error codes for a compare-and-set that lost


class Entry(Struct, omit_defaults=True):
    state: str
    owner: int = 0  # the publisher instance holding it, or the publisher or ingest instance that answered it
    group: int = -1
    rid: str = ""
    client: str = ""
    reply: str = ""
    encoding: Encoding = Encoding.JSON
    attempt: str = ""  # the admission it came from (a refused attempt's copies never run)
    to: int = -1  # the group a ``moved`` entry was offered to
    answer: bytes = b""  # an ``answered`` entry: the terminal answer sent (when ``KEEP_ANSWER_BYTES`` at most)


class Name(Struct, omit_defaults=True):
    """What ingest records when it admits a request: the attempt, the group it went to
    (``REFUSED_BY_INGEST`` once every group refused it outright: nobody holds it), and
    the reply subject its answers go to (a copy sent there again is that attempt)."""

    attempt: str
    group: int
    reply: str = ""


REFUSED_BY_INGEST = -1  # a name's group when ingest answered the refusal itself


class Lease(Struct):
    instance: int
    group: int
    ttl: float


_entry = msgspec.msgpack.Decoder(Entry)
_name = msgspec.msgpack.Decoder(Name)
_lease = msgspec.msgpack.Decoder(Lease)
_enc = msgspec.msgpack.Encoder()


def bucket_name(prefix: str) -> str:
    return f"{prefix}_requests"


def digest(client: str, rid: str) -> str:
    """The part of a ledger key that names (client, rid): any strings, as a valid token."""
    return hashlib.blake2b(f"{client}\0{rid}".encode(), digest_size=16).hexdigest()


def name_key(client: str, rid: str) -> str:
    """The key of a request's name (ingest's)."""
    return "n." + digest(client, rid)


def request_key(group: int, client: str, rid: str) -> str:
    """The key of (client, rid)'s request entry in ``group``."""
    return entry_key(group, digest(client, rid))


def entry_key(group: int, d: str) -> str:
    return f"r.{group}.{d}"


def parse_key(key: str) -> tuple[str, int, str]:
    """(kind, group, digest) of a key: kind ``n`` (a name, group -1), ``r`` (a request
    entry) or ``lease`` (group, and the instance in place of the digest)."""
    parts = key.split(".")
    if parts[0] == "n" and len(parts) == 2:
        return "n", -1, parts[1]
    if parts[0] in ("r", "lease") and len(parts) == 3:
        return parts[0], int(parts[1]), parts[2]
    raise ValueError(f"not a ledger key: {key[:80]!r}")


def lease_key(instance: int, group: int) -> str:
    return f"lease.{group}.{instance}"


CREATE_ONLY = {"Nats-Expected-Last-Subject-Sequence": "0"}  # the headers of a key-value create


class PubAck(Struct):
    """JetStream's answer to a publish into the bucket's stream."""

    seq: int = 0
    error: dict | None = None


_pub_ack = msgspec.json.Decoder(PubAck)


def created_revision(got: Any) -> int:
    """The revision a create made, from JetStream's answer to it (bytes), or 0 when it made
    none (the key exists, the bucket is full, no answer: ``got`` an exception)."""
    if not isinstance(got, bytes):
        return 0
    try:
        ack = _pub_ack.decode(got)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0
    return 0 if ack.error else ack.seq


def encode(value: Struct) -> bytes:
    return _enc.encode(value)


def decode_entry(data: bytes) -> Entry:
    return _entry.decode(data)


def read_entry(data: bytes) -> Entry:
    """The entry a value holds; one that does not decode is ``CORRUPT`` (a state of its own
    that a claim takes over, never an error that stops whoever reads it)."""
    try:
        entry = _entry.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Entry(CORRUPT)
    return entry if entry.state in (HELD, ANSWERED, REFUSED, MOVED) else Entry(CORRUPT)


def read_name(data: bytes) -> Name | None:
    """The name a value holds, or None when it does not decode (taken over by the next
    admission of that name)."""
    try:
        return _name.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def ledger_full(e: BaseException) -> bool:
    """A write refused because the bucket is full (nothing was written)."""
    return getattr(e, "err_code", None) in LEDGER_FULL


def decode_lease(data: bytes) -> Lease:
    return _lease.decode(data)


class LeaseClock:
    """The holder's side of a lease: valid until ``ttl - MARGIN`` after the sending of the
    last renewal that was acknowledged."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.valid_until = float("-inf")

    def renewed(self, sent_at: float) -> None:
        self.valid_until = max(self.valid_until, sent_at + self.ttl - MARGIN)

    def valid(self, now: float) -> bool:
        return now < self.valid_until


@dataclass
class Seen:
    revision: int
    since: float  # when this revision was first seen, on the viewer's monotonic clock


@dataclass
class SweepView:
    """What one ingest instance knows of the ledger (from watching it), and what it must do:
    answer for held requests whose holder's lease expired and for moves nobody took,
    delete settled entries after ``KEEP_ANSWERED`` (and names whose entries are all gone),
    delete leases of holders that are gone."""

    fallback_ttl: float  # for a holder whose lease this view never saw
    move_grace: float = MOVE_GRACE
    name_grace: float = NAME_GRACE
    leases: dict[int, tuple[Seen, float]] = field(default_factory=dict)  # instance -> (seen, ttl)
    lease_groups: dict[int, int] = field(default_factory=dict)  # instance -> its group (names its key)
    held: dict[str, tuple[int, Entry]] = field(default_factory=dict)  # key -> (revision, entry)
    holding: dict[int, set[str]] = field(default_factory=dict)  # holder -> the keys of held it holds
    owner_seen: dict[int, float] = field(default_factory=dict)  # holder -> first seen holding
    settled: dict[str, Seen] = field(default_factory=dict)  # in the order seen (oldest first)
    moving: dict[str, tuple[int, Entry, float]] = field(default_factory=dict)  # moves not taken yet
    present: dict[str, dict[str, str]] = field(default_factory=dict)  # digest -> its request entries' key -> state
    names: dict[str, int] = field(default_factory=dict)  # digest -> its name's revision
    emptied: dict[str, None] = field(default_factory=dict)  # names whose entries were all deleted
    unclaimed: dict[str, float] = field(default_factory=dict)  # names with no entry yet -> since (oldest first)
    per_client: dict[str, int] = field(default_factory=dict)  # client -> held requests (fair share)

    def update(self, key: str, revision: int, value: bytes | None, now: float) -> None:
        """Record a change of ``key`` (``value`` None: deleted). Raises ValueError for a key
        that is not dpbus's."""
        kind, group, d = parse_key(key)
        if kind == "lease":
            self._lease(int(d), group, revision, value, now)
        elif kind == "n":
            self._name(d, revision, value, now)
        else:
            self._entry(key, group, d, revision, value, now)

    def _lease(self, instance: int, group: int, revision: int, value: bytes | None, now: float) -> None:
        if value is None:
            self.leases.pop(instance, None)
            self.lease_groups.pop(instance, None)
            return
        old = self.leases.get(instance)
        if old is None or old[0].revision != revision:
            self.leases[instance] = (Seen(revision, now), decode_lease(value).ttl)
            self.lease_groups[instance] = group

    def _name(self, d: str, revision: int, value: bytes | None, now: float) -> None:
        self.emptied.pop(d, None)
        self.unclaimed.pop(d, None)
        if value is None:
            self.names.pop(d, None)
            return
        self.names[d] = revision
        if d not in self.present:
            self.unclaimed[d] = now

    def _entry(self, key: str, group: int, d: str, revision: int, value: bytes | None, now: float) -> None:
        was = self.held.pop(key, None)
        if was is not None:
            keys = self.holding[was[1].owner]
            keys.discard(key)
            if not keys:
                del self.holding[was[1].owner]
            self._count(was[1].client, -1)
        self.settled.pop(key, None)
        self.moving.pop(key, None)
        keys = self.present.setdefault(d, {})
        if value is None:
            keys.pop(key, None)
            if not keys:
                del self.present[d]
                if d in self.names:
                    self.emptied[d] = None
            return
        entry = read_entry(value)
        keys[key] = entry.state
        self.unclaimed.pop(d, None)
        self.emptied.pop(d, None)
        if entry.state != REFUSED:  # a claim (or ingest closing it): a move to this group is over
            for other in keys:
                move = self.moving.get(other)
                if move is not None and move[1].to == group:
                    del self.moving[other]
                    self.settled[other] = Seen(move[0], now)
        if entry.state == HELD:
            self.held[key] = (revision, entry)
            self.holding.setdefault(entry.owner, set()).add(key)
            self._count(entry.client, 1)
            self.owner_seen.setdefault(entry.owner, now)
        elif entry.state == MOVED and keys.get(entry_key(entry.to, d), REFUSED) == REFUSED:
            self.moving[key] = (revision, entry, now)
        else:
            self.settled[key] = Seen(revision, now)

    def _count(self, client: str, n: int) -> None:
        left = self.per_client.get(client, 0) + n
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)

    def expired(self, owner: int, now: float) -> bool:
        if owner in self.leases:
            seen, ttl = self.leases[owner]
            return now - seen.since > ttl + MARGIN
        return now - self.owner_seen.get(owner, now) > self.fallback_ttl + MARGIN

    def orphans(self, now: float) -> list[tuple[str, int, Entry]]:
        """Held requests whose holder's lease expired: someone must answer them. (By
        holder: a sweep costs the number of holders, not of held requests.)"""
        return [(k, *self.held[k]) for owner, keys in self.holding.items() if self.expired(owner, now)
                for k in sorted(keys)]

    def stale_settled(self, now: float) -> list[tuple[str, int]]:
        """Settled entries seen more than ``KEEP_ANSWERED`` ago. ``settled`` is in the order
        seen, so this stops at the first younger one (with a clock that went back, an
        entry waits for the ones seen before it: kept longer, never deleted early)."""
        out = []
        for k, s in self.settled.items():
            if now - s.since <= KEEP_ANSWERED:
                break
            out.append((k, s.revision))
        return out

    def dead_leases(self, now: float) -> list[tuple[str, int]]:
        return [(lease_key(i, self.lease_groups[i]), seen.revision) for i, (seen, ttl) in self.leases.items()
                if i not in self.holding and now - seen.since > ttl + MARGIN]

    def stale_moves(self, now: float) -> list[tuple[str, int, Entry]]:
        """Moves whose target has not claimed the request for ``move_grace``: ingest revokes them."""
        return [(k, rev, e) for k, (rev, e, since) in self.moving.items() if now - since > self.move_grace]

    def stale_names(self, now: float) -> list[tuple[str, int]]:
        """Names to delete: their entries are all gone, or none came for ``name_grace``
        (the ingest handing the request over died)."""
        out = [("n." + d, self.names[d]) for d in self.emptied]
        for d, since in self.unclaimed.items():
            if now - since <= self.name_grace:
                break
            out.append(("n." + d, self.names[d]))
        return out


class Ledger:
    """The bucket. Every call may raise (no JetStream, a time-out); callers decide."""

    def __init__(self, kv, js=None, bucket: str = "") -> None:
        self.kv, self.js, self.bucket = kv, js, bucket

    @classmethod
    async def open(cls, nc, prefix: str, replicas: int = 1, timeout: float = 2.0, attempts: int = 10,
                   log: Any = None) -> "Ledger":
        """Open (or create) the bucket. A JetStream that does not answer in time (a busy
        server, a cluster still electing its leader) is asked again, ``attempts`` times in
        all, before the error goes to the caller."""
        import asyncio

        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import KeyValueConfig, StorageType

        js = nc.jetstream(timeout=timeout)
        from nats.js.errors import BadRequestError

        config = KeyValueConfig(bucket=bucket_name(prefix), history=1, storage=StorageType.FILE, replicas=replicas,
                                max_bytes=MAX_BYTES, ttl=MAX_AGE,
                                description="dpbus request ledger: who owns each request's terminal answer")
        for attempt in range(1, attempts + 1):
            try:
                return cls(await js.create_key_value(config), js, config.bucket)
            except BadRequestError as e:
                if e.err_code != CONFIG_DIFFERS:
                    raise
                # made by an older dpbus (or by hand): use it as it is, and say so
                if log is not None:
                    log.warning("ledger_config_differs", bucket=config.bucket, want_max_bytes=MAX_BYTES,
                                want_max_age_s=MAX_AGE)
                return cls(await js.key_value(config.bucket), js, config.bucket)
            except NatsTimeout:
                if attempt == attempts:
                    raise
                if log is not None:
                    log.warning("ledger_not_ready", attempt=attempt, of=attempts, bucket=config.bucket)
                await asyncio.sleep(min(0.5 * attempt, 2.0))
        raise AssertionError("unreachable")

    async def claim(self, key: str, value: Entry | Name) -> tuple[int | None, tuple[int, Any] | None]:
        """Create ``key`` (a request entry, or a name): (its revision, None), or (None, the
        existing (revision, entry or name)); (None, None) when it was deleted meanwhile."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return await self.kv.create(key, encode(value)), None
        except KeyWrongLastSequenceError:
            return None, await (self.get_name(key) if isinstance(value, Name) else self.get(key))

    def subject(self, key: str) -> str:
        """The subject a write of ``key`` is published on."""
        return f"$KV.{self.bucket}.{key}"

    async def get(self, key: str) -> tuple[int, Entry] | None:
        """The current (revision, entry) of ``key``: ``CORRUPT`` for a value that is no entry."""
        got = await self.read(key)
        return None if got is None else (got[0], read_entry(got[1]))

    async def get_name(self, key: str) -> tuple[int, Name | None] | None:
        """The current (revision, name) of ``key``: None for a value that is no name."""
        got = await self.read(key)
        return None if got is None else (got[0], read_name(got[1]))

    async def swap(self, key: str, value: Entry | Name, last: int) -> int | None:
        """Compare-and-set: the new revision, or None when ``key`` changed since ``last``."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return await self.kv.update(key, encode(value), last=last)
        except KeyWrongLastSequenceError:
            return None

    async def delete(self, key: str, last: int) -> bool:
        """Delete ``key`` if it is still at revision ``last``: False when it changed
        meanwhile (or another ingest deleted it)."""
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        try:
            await self.kv.delete(key, last=last)
        except KeyWrongLastSequenceError:
            return False
        except APIError as e:  # nats-py's delete does not name this error itself
            if e.err_code not in WRONG_LAST_SEQUENCE:
                raise
            return False
        return True

    async def lease(self, instance: int, group: int) -> tuple[int, bytes] | None:
        """The current (revision, value) of ``instance``'s lease, read from the bucket itself."""
        return await self.read(lease_key(instance, group))

    async def read(self, key: str) -> tuple[int, bytes] | None:
        """The current (revision, raw value) of ``key``, read from the bucket itself; None
        when it is absent or deleted."""
        from nats.js.errors import KeyNotFoundError

        try:
            got = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return got.revision, got.value

    async def renew(self, lease: Lease) -> None:
        await self.kv.put(lease_key(lease.instance, lease.group), encode(lease))

    async def follow(self, on_change: Callable[[str, int, bytes | None], None]) -> Any:
        """Call ``on_change(key, revision, value)`` with the latest value of every key, then
        with every change (``value`` None: deleted), as the changes are delivered. One
        subscription for a reader of every change of every request: no entry object,
        queue or iterator per change. Returns the subscription (``unsubscribe`` ends it)."""
        from nats.js.api import DeliverPolicy

        pre = f"$KV.{self.bucket}."

        async def deliver(msg) -> None:
            headers = msg.header
            deleted = False
            if headers:
                op = headers.get("KV-Operation")
                reason = headers.get("Nats-Marker-Reason")  # the server's own delete markers (2.11+)
                if op is None and reason is not None and reason not in ("MaxAge", "Purge", "Remove"):
                    return  # a marker of a kind this code does not know
                deleted = op in ("DEL", "PURGE") or reason is not None
            on_change(msg.subject[len(pre):], stream_sequence(msg.reply), None if deleted else msg.data)

        return await self.js.subscribe(pre + ">", stream=f"KV_{self.bucket}", cb=deliver, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, inactive_threshold=300.0)


def stream_sequence(reply: str) -> int:
    """The stream sequence (a key's revision) of a JetStream delivery, from its reply
    subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`` (9 tokens), or
    with a domain and an account hash after ``ACK`` (12 or more)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])
