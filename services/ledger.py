"""The request ledger: who owns each accepted request's terminal answer, kept where any
survivor can find it (a JetStream key-value bucket, ``<prefix>_requests``).

One entry per accepted request, keyed by a digest of (client, rid):

* a publisher **claims** the entry (create: the name must be new) before it acknowledges
  a submit; the entry says ``held`` by that publisher instance and carries the reply
  subject;
* a group taking a moved request **takes it over** with compare-and-set from the instance
  that moved it;
* the terminal answer belongs to whoever wins the compare-and-set from ``held`` to
  ``answered``: the holder when it finishes, or an ingest instance when the holder's
  lease expired. Ingest writes, then sends. The holder, under a valid lease, sends its
  answer with the write right behind it on the same connection (one write to the
  server, handled in order), so that its death leaves both or neither; a holder that
  offered the request to another group writes first;
* ingest records ``refused`` for a request whose submit it could not get acknowledged and
  nobody claimed (so a late copy of that submit never runs); a fresh attempt with the
  same name may take a ``refused`` entry over;
* ``answered`` and ``refused`` entries are deleted ``KEEP_ANSWERED`` seconds later (copies
  and retries of the same name are duplicates until then).

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

HELD, ANSWERED, REFUSED = "held", "answered", "refused"
CORRUPT = "corrupt"  # a value that is no entry at all (not written by dpbus): taken over by the next claim
KEEP_ANSWERED = 120.0  # seconds a settled name stays (duplicates are dropped until then)
# The bucket's limits: a safety net, never the protocol. An entry lives from its claim to
# KEEP_ANSWERED after its answer, so at ~3k accepted requests/s (one stream leader's rate)
# the bucket holds ~350k entries of ~250 bytes: 90 MB. Past MAX_BYTES a claim is refused
# (the client gets ``overloaded``); MAX_AGE only drops what no sweep deleted (no ingest for
# hours), far beyond the longest request (65k tokens) and renewed leases. JetStream sets
# MAX_BYTES aside in its store when the bucket is made (a deployment's server has 4 GB).
MAX_BYTES = 128 << 20
MAX_AGE = 6 * 3600.0
LEDGER_FULL = (10077, 10047, 10027)  # JetStream: maximum messages / bytes / storage exceeded
CONFIG_DIFFERS = 10058  # JetStream: the stream exists with another configuration
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


class Lease(Struct):
    instance: int
    group: int
    ttl: float


_entry = msgspec.msgpack.Decoder(Entry)
_lease = msgspec.msgpack.Decoder(Lease)
_enc = msgspec.msgpack.Encoder()


def bucket_name(prefix: str) -> str:
    return f"{prefix}_requests"


def request_key(client: str, rid: str) -> str:
    """The ledger key of (client, rid): any strings, as a valid key."""
    return "r." + hashlib.blake2b(f"{client}\0{rid}".encode(), digest_size=16).hexdigest()


def lease_key(instance: int, group: int) -> str:
    return f"lease.{group}.{instance}"


def lease_of(key: str) -> tuple[int, int]:
    """(instance, group) of a lease key."""
    _, group, instance = key.split(".")
    return int(instance), int(group)


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
    return entry if entry.state in (HELD, ANSWERED, REFUSED) else Entry(CORRUPT)


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
    answer for held requests whose holder's lease expired, delete settled entries after
    ``KEEP_ANSWERED``, delete leases of holders that are gone."""

    fallback_ttl: float  # for a holder whose lease this view never saw
    leases: dict[int, tuple[Seen, float]] = field(default_factory=dict)  # instance -> (seen, ttl)
    lease_groups: dict[int, int] = field(default_factory=dict)  # instance -> its group (names its key)
    held: dict[str, tuple[int, Entry]] = field(default_factory=dict)  # key -> (revision, entry)
    holding: dict[int, set[str]] = field(default_factory=dict)  # holder -> the keys of held it holds
    owner_seen: dict[int, float] = field(default_factory=dict)  # holder -> first seen holding
    settled: dict[str, Seen] = field(default_factory=dict)  # in the order seen (oldest first)
    per_client: dict[str, int] = field(default_factory=dict)  # client -> held requests (fair share)

    def update(self, key: str, revision: int, value: bytes | None, now: float) -> None:
        """Record a change of ``key`` (``value`` None: deleted)."""
        if key.startswith("lease."):
            instance, group = lease_of(key)
            if value is None:
                self.leases.pop(instance, None)
                self.lease_groups.pop(instance, None)
                return
            old = self.leases.get(instance)
            if old is None or old[0].revision != revision:
                self.leases[instance] = (Seen(revision, now), decode_lease(value).ttl)
                self.lease_groups[instance] = group
            return
        was = self.held.pop(key, None)
        if was is not None:
            keys = self.holding[was[1].owner]
            keys.discard(key)
            if not keys:
                del self.holding[was[1].owner]
            self._count(was[1].client, -1)
        self.settled.pop(key, None)
        if value is None:
            return
        entry = read_entry(value)
        if entry.state == HELD:
            self.held[key] = (revision, entry)
            self.holding.setdefault(entry.owner, set()).add(key)
            self._count(entry.client, 1)
            self.owner_seen.setdefault(entry.owner, now)
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

    async def claim(self, key: str, entry: Entry) -> tuple[int | None, tuple[int, Entry] | None]:
        """Create ``key``: (its revision, None), or (None, the existing (revision, entry))."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return await self.kv.create(key, encode(entry)), None
        except KeyWrongLastSequenceError:
            return None, await self.get(key)

    async def get(self, key: str) -> tuple[int, Entry] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            got = await self.kv.get(key)
        except KeyNotFoundError:  # KeyDeletedError is one
            return None
        return got.revision, read_entry(got.value)

    async def swap(self, key: str, entry: Entry, last: int) -> int | None:
        """Compare-and-set: the new revision, or None when ``key`` changed since ``last``."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return await self.kv.update(key, encode(entry), last=last)
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
