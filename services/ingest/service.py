"""The ingest service (``dpbus-ingest``, a ``nats.micro`` service in a queue group).

``dpbus.generate``: decode and check the request, tokenize, pick a group, forward it on
``dpbus.dp.{g}.submit`` and wait for the publisher's acknowledgement. Anything wrong
becomes an ``error`` answer on the client's reply subject at once; from the
acknowledgement on, the request's entry in the ledger (``services/ledger.py``) says who
answers it: its publisher, or, when that publisher's lease lapses, whichever ingest
instance wins the entry first (``publisher_lost``).

``dpbus.abort``: ask every group to cancel the ``rid``; answer whether one had it.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter, OrderedDict
from typing import Any, Awaitable

import nats.errors
import nats.micro

from dpbus.schemas import AbortAck, DecodeError, Encoding, Error, ErrorCode, Subjects, decode_abort, decode_request
from dpbus.schemas.codec import encode_answer, recode_answer, sniff_encoding
from dpbus.schemas.internal import GroupAbort, LoadReport, Submit, SubmitAck, pack, unpacker
from dpbus.schemas.subjects import INGEST_QUEUE
from dpbus.services import bus, identity, ownership
from dpbus.services import version as package_version
from dpbus.services.lifecycle import unless_stopped
from dpbus.services.errors import Rejected
from dpbus.services.ledger import (CREATE_ONLY, KEEP_ANSWERED, MOVED, NAME_GRACE, Entry, Ledger, SweepView,
                                   created_revision, encode, ledger_full, name_key, request_key)
from dpbus.services.ingest.router import DEFAULT_PREFIX_TOKENS, Router
from dpbus.services.model_config import model_config_for
from dpbus.services.settings import IngestSettings
from dpbus.services.tokenizer import load_tokenizer
from dpbus.services.topology import dp_groups

VERSION = package_version()  # announced in NATS discovery
SUBMIT_ATTEMPTS = 3
LATER_ATTEMPTS = int(NAME_GRACE / ownership.RESOLVE_EVERY)  # background ledger writes, tried for NAME_GRACE at most
REFUSE_ROUNDS = 4  # x ownership.REFUSE_ATTEMPTS tries to record a refusal, each round ending by asking the group
INLINE_TOKENIZE = 16_384  # characters: a longer text is tokenized in a thread
TEXT_BYTES_PER_TOKEN = 8  # no tokenizer needs more characters per token than this
OVER_SHARE_RETRY_MS = 500  # what an over-share refusal suggests (requests take about that to finish)


class TokenBuckets:
    """One token bucket per client: ``take`` spends from it, or says how long until it
    could (in seconds; 0 when spent). Buckets of clients quiet long enough to be full again
    are forgotten, so the map holds only recently active clients."""

    def __init__(self) -> None:
        self.level: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)

    def take(self, client: str, cost: float, rate: float, burst: float, now: float) -> float:
        tokens, then = self.level.get(client, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if cost > tokens and tokens < burst:  # a cost above the whole burst passes when the bucket is full
            return (min(cost, burst) - tokens) / rate
        self.level[client] = (tokens - cost, now)
        if len(self.level) > 4096:
            self.level = {c: (t, w) for c, (t, w) in self.level.items() if t + (now - w) * rate < burst}
        return 0.0


class Handover:
    """A request on its way to a group: offered to ``groups`` in turn until one takes it."""

    __slots__ = ("sub", "groups", "cost", "pinned", "name_rev", "waiter")

    def __init__(self, sub: Submit, groups: list[int], cost: int, pinned: bool, name_rev: int) -> None:
        self.sub, self.groups, self.cost, self.pinned = sub, groups, cost, pinned
        self.name_rev = name_rev  # the revision of its name in the ledger (0: a request without a rid has none)
        self.waiter: asyncio.Future | None = None  # made when someone waits (an abort)

    def wait(self) -> asyncio.Future:
        """A future done when the hand-over is over (accepted, refused or answered)."""
        if self.waiter is None:
            self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter


class RecentRefusals:
    """(reply subject, rid) of the requests this ingest answered with an error, for
    ``KEEP_ANSWERED`` seconds and ``limit`` entries at most (the oldest go first)."""

    def __init__(self, keep: float = KEEP_ANSWERED, limit: int = 65536) -> None:
        self.keep, self.limit = keep, limit
        self.at: OrderedDict[tuple[str, str], float] = OrderedDict()

    def add(self, reply: str, rid: str, now: float) -> None:
        self.at[(reply, rid)] = now
        self.at.move_to_end((reply, rid))
        while len(self.at) > self.limit or (self.at and now - next(iter(self.at.values())) > self.keep):
            self.at.popitem(last=False)

    def has(self, reply: str, rid: str, now: float) -> bool:
        when = self.at.get((reply, rid))
        return when is not None and now - when <= self.keep


class Ingest:
    def __init__(self, settings: IngestSettings, log: Any, auth: bus.NatsAuth | None = None) -> None:
        self.s = settings
        self.auth = auth or bus.auth_from(settings, "ingest")
        self.subjects = Subjects(settings.prefix)
        self.log = log
        self.model = model_config_for(settings.model_path, settings.max_seq_len)
        self.tokenizer = load_tokenizer(settings.model_path)
        # raises ValueError (start-up fails with the list of valid policies) on an unknown --policy
        self.groups = dp_groups(settings.dp_size, settings.enable_dp_attention)
        # discovery metadata; groups_ready is kept current (see tell_readiness)
        self.metadata = {"dp_size": str(settings.dp_size), "prefix": settings.prefix, "groups_ready": "0"}
        self.router = Router(self.groups, settings.policy, stale_after=settings.load_stale_after,
                             affinity_skew=settings.affinity_skew, start_grace=getattr(settings, "start_grace", 60.0),
                             prefix_tokens=getattr(settings, "affinity_prefix_tokens", DEFAULT_PREFIX_TOKENS))
        self.errors: Counter[str] = Counter()
        self._said: dict[str, float] = {}  # error code -> when a refusal was last logged
        self._unsaid: Counter[str] = Counter()  # refusals not logged since
        self.forwarded = 0
        self.handing: dict[tuple[str, str], Handover] = {}  # (client, rid) being handed to a group now
        self.client_handing: dict[str, int] = {}  # client -> how many of handing are its
        self.token_rate = TokenBuckets()  # client -> its tokens per second (client_tokens_per_s)
        self.orphaned = 0
        self.refused = RecentRefusals()  # refusals ingest answered itself: a copy crossing one is not run
        self.view = SweepView(fallback_ttl=settings.publisher_timeout)
        self.instance = secrets.randbits(62) | 1  # names this ingest in the entries it settles
        self.unsure: dict[str, tuple[Entry, Entry]] = {}  # key -> (our unanswered settling write, the entry)
        self.ledger: Ledger | None = None
        self.listening = asyncio.Event()  # its endpoints are subscribed at the server
        self.dispatched: Counter[int] = Counter()  # accepted requests per group
        self.tasks: set[asyncio.Task] = set()  # hand-overs past their first answer (see offer)
        self._ack = unpacker(SubmitAck)
        self._ack_abort = unpacker(AbortAck)
        self._load = unpacker(LoadReport)
        # names this instance gives (a rid when the client sent none, each admission's attempt):
        # a random prefix per process and a counter, unique without the random source per request
        self._origin = secrets.token_hex(8)
        self._names = itertools.count()
        self.max_text = self.model.max_seq_len * TEXT_BYTES_PER_TOKEN

    # ---- checks ------------------------------------------------------------------------
    def sender(self, subject: str, base: str, reply: str) -> str | None:
        """The client a message on ``subject`` comes from (``services/identity.py``), or None
        when its reply subject is not that client's to read: then nothing is answered
        anywhere (counted, and logged at most once a second)."""
        try:
            return identity.client_key(subject, base, reply, secured=bool(self.auth.user),
                                       default_client=self.s.default_client)
        except identity.ForeignReply as e:
            self.errors["foreign_reply"] += 1
            self.log_refusal("foreign_reply", f"{e} (on {subject[:80]})", None)
            return None

    async def admit(self, body: bytes, reply: str, client: str) -> tuple[Submit, list[int] | None]:
        """Turn a body into a Submit; raises DecodeError/Rejected. Also returns the groups to try."""
        req, enc = decode_request(body)
        try:
            return await self.check(req, enc, reply, client)
        except Rejected as e:
            e.rid = req.rid  # the client can tell which of its requests was refused
            raise

    async def check(self, req: Any, enc: Encoding, reply: str, client: str) -> tuple[Submit, list[int] | None]:
        if req.dp_rank is not None and req.dp_rank >= self.groups:
            raise Rejected(ErrorCode.UNKNOWN_DP_RANK, f"dp_rank {req.dp_rank} does not exist: this deployment has "
                           f"{self.groups} DP group(s) (0..{self.groups - 1})")
        if req.text is not None and len(req.text) > self.max_text:  # before any tokenizing
            raise Rejected(ErrorCode.PROMPT_TOO_LONG, f"the text has {len(req.text)} characters; the context holds "
                           f"{self.model.max_seq_len} tokens, so no text above {self.max_text} characters can fit")
        try:
            if req.text is None:
                ids = req.input_ids
            elif len(req.text) > INLINE_TOKENIZE:  # a long text is tokenized off the event loop
                ids = await asyncio.to_thread(self.tokenizer.encode, req.text)
            else:
                ids = self.tokenizer.encode(req.text)
        except ValueError as e:
            raise Rejected(ErrorCode.BAD_REQUEST, str(e)) from None
        if ids and max(ids) >= self.model.vocab_size:
            bad = next(t for t in ids if t >= self.model.vocab_size)
            raise Rejected(ErrorCode.BAD_REQUEST,
                           f"token id {bad} is outside the vocabulary (0..{self.model.vocab_size - 1})")
        if len(ids) >= self.model.max_seq_len:
            raise Rejected(ErrorCode.PROMPT_TOO_LONG, f"the prompt has {len(ids)} tokens; the context holds "
                           f"{self.model.max_seq_len}, and at least one must be left to generate")
        name = f"{self._origin}{next(self._names):x}"
        rid = req.rid or name  # without a rid, every copy is a new request
        sub = Submit(rid, ids, req.sampling, req.stream, reply, enc, time.time(), -1, pinned=req.dp_rank is not None,
                     client=client, attempt=name, ack=req.ack, resend=req.resend)
        return sub, [req.dp_rank] if req.dp_rank is not None else None

    # ---- handlers ----------------------------------------------------------------------
    async def answer_error(self, reply: str, enc: Encoding, code: ErrorCode, message: str, rid: str | None = None,
                           retry_after_ms: int | None = None) -> None:
        self.errors[code.value] += 1
        self.log_refusal(code.value, message, rid)
        if rid:
            self.refused.add(reply, rid, time.monotonic())
        if reply:
            await self.outbox.send(reply, encode_answer(Error(code, message, rid=rid, retry_after_ms=retry_after_ms),
                                                        enc), terminal=True)

    def log_refusal(self, code: str, message: str, rid: str | None) -> None:
        """One line per error code per second at most: an overload refuses every request,
        and a line for each would slow the refusing down (``errors`` counts them all)."""
        now = time.monotonic()
        if now - self._said.get(code, float("-inf")) < 1.0:
            self._unsaid[code] += 1
            return
        self._said[code] = now
        self.log.info("request_rejected", code=code, reason=message[:200], rid=rid,
                      also_since_last_line=self._unsaid.pop(code, 0))

    async def on_generate(self, req: Any) -> None:
        reply = bus.reply_subject(req)
        if not reply:
            self.errors["no_reply_subject"] += 1
            self.log_refusal("no_reply_subject", "a request without a reply subject", None)
            return
        client = self.sender(req.subject, self.subjects.generate, reply)
        if client is None:
            return
        body = req.data
        try:
            sub, pinned = await self.admit(body, reply, client)
        except DecodeError as e:
            await self.answer_error(reply, sniff_encoding(body), e.code, e.message)
            return
        except Rejected as e:
            await self.answer_error(reply, sniff_encoding(body), e.code, e.message, e.rid)
            return
        if sub.key in self.handing:  # a copy of a request being handed over right now
            self.errors["duplicate_delivery"] += 1
            return
        if sub.resend and self.refused.has(reply, sub.rid, time.monotonic()):
            # a copy (the retry rule) of a request refused here before it was named (no group
            # available, over its share, ...): that refusal went to this reply subject, and
            # the copy may have crossed it on its way back (held answers after a reconnect)
            self.errors["copy_of_refused"] += 1
            return
        if len(self.handing) >= self.s.max_inflight:
            await self.answer_error(reply, sub.encoding, ErrorCode.OVERLOADED,
                                    f"ingest has {len(self.handing)} requests being forwarded", sub.rid)
            return
        why, wait_ms = self.over_share(sub)
        if why:
            await self.answer_error(reply, sub.encoding, ErrorCode.OVERLOADED, why, sub.rid, wait_ms)
            return
        groups, why = self.route(sub, pinned)
        if why:
            await self.answer_error(reply, sub.encoding, ErrorCode.UNAVAILABLE, why, sub.rid)
            return
        # the common case without a task: record its name in the ledger (a create, answered
        # in a callback), offer it to the first group, whose acknowledgement settles it in
        # the reply's callback; anything else goes on in a task (``name_slowly``, ``offer``)
        h = Handover(sub, groups, len(sub.input_ids) + sub.sampling.max_new_tokens, pinned is not None, 0)
        self.handing[sub.key] = h
        self.client_handing[sub.client] = self.client_handing.get(sub.client, 0) + 1
        if sub.rid == sub.attempt:  # without a rid: never deduplicated, so never named (one write fewer)
            await self.hand(h)
            return
        name = ownership.name_of(sub, groups[0])
        try:
            await self.replies.send(self.ledger.subject(name_key(sub.client, sub.rid)), encode(name),
                                    self.s.submit_timeout, lambda got: self.named(h, got), headers=CREATE_ONLY)
        except Exception as e:  # noqa: BLE001 - NATS away: the slow path answers it
            self.named(h, e)

    def named(self, h: "Handover", got: Any) -> Awaitable[None] | None:
        """The ledger's answer to the create of ``h``'s name (a body, or why none came):
        created, it goes to its first group; anything else (a copy, a retry after a
        refusal, a time-out, a full bucket) is decided by ``ownership.admit`` in a task."""
        rev = created_revision(got)
        if rev:
            h.name_rev = rev
            return self.hand(h)
        self.in_background(self.name_slowly(h))
        return None

    async def name_slowly(self, h: "Handover") -> None:
        sub = h.sub
        try:
            how, rev = await ownership.admit(self.ledger, name_key(sub.client, sub.rid),
                                             ownership.name_of(sub, h.groups[0]), sub.client, sub.rid,
                                             copy=sub.resend > 0)
        except Exception as e:  # noqa: BLE001 - no ledger, no acceptance
            self.handed(h)
            full = ledger_full(e)
            await self.answer_error(sub.reply, sub.encoding, ErrorCode.OVERLOADED if full else ErrorCode.UNAVAILABLE,
                                    "the request ledger is full" if full else f"the request ledger is unreachable: {e!r}",
                                    sub.rid)
            return
        if how == ownership.DUPLICATE:  # a copy: the first one's reply subject gets the answer
            self.errors["duplicate_request"] += 1
            self.handed(h)
            if not sub.resend:  # a retry, not a copy: its client may have lost the answer
                await self.answer_again(sub)
            return
        h.name_rev = rev
        await self.hand(h)

    async def answer_again(self, sub: Submit) -> None:
        """A retry (sent anew, to another reply subject) of a request answered already gets
        that terminal answer again, when it was kept with its ledger entry (in the retry's
        encoding); a request still running, or whose answer was not kept, answers its first
        reply subject only."""
        try:
            answer = await ownership.stored_answer(self.ledger, name_key(sub.client, sub.rid), sub.reply, sub.client,
                                                   sub.rid)
        except Exception as e:  # noqa: BLE001 - the retry hears nothing more than before
            self.log.warning("answer_not_read_again", rid=sub.rid, error=repr(e))
            return
        if answer is not None:
            self.errors["answered_again"] += 1
            await self.outbox.send(sub.reply, recode_answer(answer, sub.encoding), terminal=True)

    async def hand(self, h: "Handover") -> None:
        """Offer a named request to its first group."""
        g = h.sub.dp_rank = h.groups[0]
        self.router.sent(g, h.cost, h.sub.input_ids)  # counted before any await, so a concurrent burst sees it
        try:
            await self.replies.send(self.subjects.submit(g), pack(h.sub), self.s.submit_timeout,
                                    lambda got: self.first_answer(h, got))
        except Exception as e:  # noqa: BLE001 - NATS away: the slow path answers it
            self.first_answer(h, e)

    async def forget_name(self, h: "Handover") -> None:
        """Every group refused the request outright: nothing holds it, and its name says so
        (``ownership.refused_name``: a copy crossing the refusal is dropped, a retry with a
        new reply subject is a new attempt). While the ledger does not answer, tried again
        in the background (for ``NAME_GRACE`` at most: then the sweep deletes it)."""
        if not h.name_rev:
            return
        key, rev, name = name_key(h.sub.client, h.sub.rid), h.name_rev, ownership.refused_name(h.sub)
        try:
            await self.ledger.swap(key, name, rev)
        except Exception as e:  # noqa: BLE001
            self.log.warning("name_not_marked_refused", rid=h.sub.rid, error=repr(e))
            self.in_background(self.retry(lambda: self.ledger.swap(key, name, rev)))

    async def retry(self, call) -> None:
        """Call ``call`` until the ledger answers, every ``RESOLVE_EVERY`` s, for ``NAME_GRACE`` at most."""
        for _ in range(LATER_ATTEMPTS):
            await asyncio.sleep(ownership.RESOLVE_EVERY)
            try:
                await call()
                return
            except Exception:  # noqa: BLE001 - still unreachable
                continue

    def in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def rename(self, h: "Handover", g: int) -> None:
        """The request is refused in group ``g``'s entries: the name says so, so that a
        retry finds the refusal and is run as a fresh attempt."""
        if not h.name_rev or g == h.groups[0]:
            return
        try:
            rev = await self.ledger.swap(name_key(h.sub.client, h.sub.rid), ownership.name_of(h.sub, g), h.name_rev)
        except Exception as e:  # noqa: BLE001
            self.log.warning("name_not_moved", rid=h.sub.rid, error=repr(e))
            return
        h.name_rev = rev or h.name_rev

    def first_answer(self, h: "Handover", got: Any) -> None:
        """The first group's answer to a submit (its body, or why none came)."""
        if not isinstance(got, BaseException):
            try:
                ack = self._ack.decode(got)
            except Exception as e:  # noqa: BLE001 - not an acknowledgement: as a publisher's failure
                got = e
            else:
                if ack.accepted:
                    self.accepted(h.sub.dp_rank, ack)
                    self.handed(h)
                    return
        task = asyncio.create_task(self.offer(h, got))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _: self.handed(h))

    def handed(self, h: "Handover") -> None:
        if self.handing.get(h.sub.key) is h:
            del self.handing[h.sub.key]
            left = self.client_handing.get(h.sub.client, 0) - 1
            if left > 0:
                self.client_handing[h.sub.client] = left
            else:
                self.client_handing.pop(h.sub.client, None)
        if h.waiter is not None and not h.waiter.done():
            h.waiter.set_result(None)

    def accepted(self, g: int, ack: SubmitAck) -> None:
        """Group ``g`` took the request: its holder (or, for a duplicate, whoever has the
        name) answers it."""
        self.forwarded += 1
        self.dispatched[g] += 1
        self.errors["duplicate_request"] += ack.duplicate

    def over_share(self, sub: Submit) -> tuple[str, int]:
        """Why ``sub``'s client may not have one more request now, and after how many
        milliseconds to try again (("", 0) when it may). A client holds at most
        ``max_inflight_per_client`` requests (held or being handed over) and spends at
        most ``client_tokens_per_s`` tokens (prompt + max_new_tokens) a second, so no
        client alone fills every group's queue; only that client is refused."""
        cap = self.s.max_inflight_per_client
        if cap:
            n = self.client_handing.get(sub.client, 0) + self.view.per_client.get(sub.client, 0)
            if n >= cap:
                self.errors["client_over_share"] += 1
                return (f"this client has {n} requests in flight, its share is {cap}: retry when some have "
                        "finished"), OVER_SHARE_RETRY_MS
        rate = self.s.client_tokens_per_s
        if rate:
            cost = len(sub.input_ids) + sub.sampling.max_new_tokens
            wait = self.token_rate.take(sub.client, cost, rate, rate * self.s.client_burst_s, time.monotonic())
            if wait:
                self.errors["client_over_rate"] += 1
                return (f"this client may send {rate} tokens (prompt + max_new_tokens) a second and has spent them: "
                        f"this request costs {cost}"), max(1, round(wait * 1000))
        return "", 0

    def route(self, sub: Submit, pinned: list[int] | None) -> tuple[list[int], str]:
        """The groups to offer ``sub`` to, in turn, or why there are none.

        A pinned group is the only one tried. Unavailable groups (see ``Router``) are not
        tried at all: with none available the client gets ``unavailable`` at once."""
        if pinned:
            why = self.router.unavailable_reason(pinned[0])
            if why:
                return [], f"group {pinned[0]} (the request's dp_rank) is unavailable: {why}"
            return pinned, ""
        groups = self.router.order(sub.input_ids, sub.sampling.max_new_tokens)
        if not groups:
            whys = "; ".join(f"group {g}: {self.router.unavailable_reason(g)}" for g in range(self.groups))
            return [], f"no DP group is available ({whys})"
        return groups, ""

    async def submit_to(self, g: int, sub: Submit, first: Any = None) -> SubmitAck | None:
        """Hand ``sub`` to group ``g``; None when no acknowledgement came (the publisher may
        hold it: a resubmission of the same (client, rid) is acknowledged as a duplicate).
        ``first``: the answer to a first attempt made already (a body or an exception)."""
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                if attempt == 0 and first is not None:
                    if isinstance(first, BaseException):
                        raise first
                    got = first
                else:
                    got = await self.replies.request(self.subjects.submit(g), pack(sub), self.s.submit_timeout)
                return self._ack.decode(got)
            except nats.errors.NoRespondersError:
                return SubmitAck(False, ErrorCode.UNAVAILABLE, "no publisher")
            except nats.errors.TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001
                return SubmitAck(False, ErrorCode.UNAVAILABLE, repr(e))
        return None

    async def offer(self, h: "Handover", first: Any) -> None:
        """Offer the request to its groups in turn until one acknowledges it (the first
        group is counted as sent to already; ``first``: the answer to an offer made to it
        already, or None)."""
        sub, cost = h.sub, h.cost
        tried: list[str] = []
        codes: set[ErrorCode | None] = set()
        for i, g in enumerate(h.groups):
            sub.dp_rank = g
            if i:
                self.router.sent(g, cost, sub.input_ids)
            ack = await self.submit_to(g, sub, first if i == 0 else None)
            if ack is None:  # it may hold the request without our knowing: never offer it elsewhere
                self.router.unsent(g, cost)
                if await self.refuse_unheard(h, g):
                    await self.rename(h, g)
                return
            if ack.accepted:
                self.accepted(g, ack)
                return
            self.router.unsent(g, cost)
            tried.append(f"group {g}: {ack.message}")
            codes.add(ack.code)
            if ack.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE) and not h.pinned:
                continue
            await self.forget_name(h)
            await self.answer_error(sub.reply, sub.encoding, ack.code or ErrorCode.INTERNAL, f"group {g}: {ack.message}",
                                    sub.rid)
            return
        await self.forget_name(h)
        overloaded = codes == {ErrorCode.OVERLOADED}
        await self.answer_error(sub.reply, sub.encoding, ErrorCode.OVERLOADED if overloaded else ErrorCode.UNAVAILABLE,
                                "no group could take the request: " + "; ".join(tried), sub.rid)

    # ---- what ingest guarantees after the acknowledgement ---------------------------------
    async def refuse_later(self, h: "Handover", g: int) -> None:
        sub = h.sub
        if await ownership.refuse(self.ledger, request_key(g, sub.client, sub.rid), ownership.refused(sub, g),
                                  asyncio.sleep, attempts=LATER_ATTEMPTS):
            await self.rename(h, g)

    async def refuse_unheard(self, h: "Handover", g: int) -> bool:
        """No acknowledgement came: the publisher may hold the request or never have seen
        it. Marking it ``refused`` in the ledger settles which: if that works, nobody holds
        it (and a late copy of the submit will not run), so ingest answers ``unavailable``;
        if the name is taken, its holder answers. While the ledger does not answer, the
        group is asked to abort the request every ``REFUSE_ATTEMPTS`` tries: a group that
        holds it (or is still claiming it) ends it with its own terminal answer; one that
        does not, or after ``REFUSE_ROUNDS`` rounds, ingest answers ``unavailable``.
        True when the refusal is recorded in the ledger."""
        sub = h.sub
        key = request_key(g, sub.client, sub.rid)
        written = False
        why = f"group {g} did not acknowledge the request within {SUBMIT_ATTEMPTS} x {self.s.submit_timeout}s"
        for _ in range(REFUSE_ROUNDS):
            recorded = await ownership.refuse(self.ledger, key, ownership.refused(sub, g), asyncio.sleep)
            if recorded is not None:
                written = recorded
                break
            self.errors["refusal_unrecorded"] += 1
            ack = await self.ask_abort(g, sub.rid, sub.reply)
            if ack is not None and ack.found:
                self.log.warning("unacknowledged_request_aborted_by_its_holder", rid=sub.rid, dp_rank=g)
                return False
            if ack is not None:
                why += "; the request ledger did not answer and the group does not hold the request"
                recorded = True
                break
        else:
            why += "; neither the request ledger nor the group answered"
            recorded = True
        if recorded:
            await self.answer_error(sub.reply, sub.encoding, ErrorCode.UNAVAILABLE, why, sub.rid)
            if not written:  # answered without the ledger: record the refusal once it answers again,
                # so that a retry of this name runs as a fresh attempt (and a late copy of the submit never)
                self.in_background(self.refuse_later(h, g))
        else:
            self.log.warning("submit_unacknowledged_but_held", rid=sub.rid, dp_rank=g)
        return written

    async def ask_abort(self, g: int, rid: str, reply: str) -> AbortAck | None:
        """Ask group ``g`` to abort the request ``rid`` answered on ``reply``: its answer,
        or None when none came (a group that cannot answer is not running it)."""
        try:
            msg = await self.nc.request(self.subjects.group_abort(g), pack(GroupAbort(rid, reply)),
                                        timeout=self.s.submit_timeout)
            return self._ack_abort.decode(msg.data)
        except Exception:  # noqa: BLE001
            return None

    async def watch_ledger(self, stop: asyncio.Event) -> None:
        """Keep ``view`` up to date with every change of the ledger (following it again
        when it cannot be followed: JetStream away)."""
        def changed(key: str, revision: int, value: bytes | None) -> None:
            try:
                self.view.update(key, revision, value, time.monotonic())
            except Exception as e:  # noqa: BLE001 - not an entry of this dpbus: leave it out
                self.errors["unreadable_ledger_entry"] += 1
                self.log.warning("unreadable_ledger_entry", key=key, error=repr(e))

        while not stop.is_set():
            try:
                following = await self.ledger.follow(changed)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - NATS away: try again
                self.log.warning("ledger_watch_failed", error=repr(e))
                await asyncio.sleep(self.s.reconcile_interval)
                continue
            try:
                await stop.wait()
            finally:
                try:
                    await following.unsubscribe()
                except Exception:  # noqa: BLE001 - closing anyway
                    pass

    async def sweep_loop(self, stop: asyncio.Event) -> None:
        """Every ``reconcile_interval``: answer for publishers whose lease lapsed, and forget
        settled requests ``KEEP_ANSWERED`` seconds after their answer."""
        while not stop.is_set():
            await asyncio.sleep(self.s.reconcile_interval)
            self.tell_readiness()  # a group that went silent is no longer counted
            try:
                await self.sweep(time.monotonic())
            except Exception as e:  # noqa: BLE001 - NATS away: the next sweep retries
                self.log.warning("sweep_failed", error=repr(e), detail=str(getattr(e, "description", "")))

    async def sweep(self, now: float) -> None:
        await ownership.sweep(self.ledger, self.view, self.unsure, self.instance, now, self.answer_lost)

    async def answer_lost(self, entry: Entry) -> None:
        self.orphaned += 1
        if entry.state == MOVED:  # a move its target did not take (ownership.revoke)
            self.log.info("answered_for_revoked_move", rid=entry.rid, dp_rank=entry.group, to_group=entry.to)
            await self.answer_error(entry.reply, entry.encoding, ErrorCode.UNAVAILABLE,
                                    f"group {entry.group} moved this request to group {entry.to}, which did not "
                                    f"take it within {self.view.move_grace}s: send it again", entry.rid)
            return
        self.log.info("answered_for_lost_holder", rid=entry.rid, dp_rank=entry.group, holder=entry.owner)
        await self.answer_error(entry.reply, entry.encoding, ErrorCode.PUBLISHER_LOST,
                                f"the publisher of group {entry.group} holding this request went silent for "
                                f"{self.s.publisher_timeout}s", entry.rid)

    async def on_abort(self, req: Any) -> None:
        """Each abort is handled in a task of its own: one waiting for its request's
        hand-over never holds up the others."""
        reply = bus.reply_subject(req)
        client = self.sender(req.subject, self.subjects.abort, reply) if reply else ""
        if client is None:
            return
        task = asyncio.create_task(self.abort(req.data, reply, client))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def abort(self, body: bytes, reply: str, client: str) -> None:
        try:
            abort, enc = decode_abort(body)
        except DecodeError as e:
            await self.answer_error(reply, sniff_encoding(body), e.code, e.message)
            return
        if not identity.answerable(abort.reply, client):  # not the sender's own request: not found
            self.errors["abort_of_another"] += 1
            if reply:
                await self.outbox.send(reply, encode_answer(AbortAck(rid=abort.rid, found=False), enc))
            return

        handing = self.handing.get((client, abort.rid))
        if handing is not None:  # the request is on its way to a group: abort it once it is there
            await asyncio.wait({handing.wait()}, timeout=self.s.submit_timeout * 2)

        acks = await asyncio.gather(*(self.ask_abort(g, abort.rid, abort.reply) for g in range(self.groups)))
        hit = next((a for a in acks if a is not None and a.found), None)
        answer = hit or AbortAck(rid=abort.rid, found=False)
        if reply:
            await self.outbox.send(reply, encode_answer(answer, enc))

    async def on_load(self, msg: Any) -> None:
        try:
            self.router.on_load(self._load.decode(msg.data))
        except Exception:  # noqa: BLE001
            self.errors["bad_load_report"] += 1
        self.tell_readiness()

    def tell_readiness(self) -> None:
        """Groups with a fresh ready report, in the service's discovery metadata: what any
        client (the gateway's /ready) learns from a $SRV.PING, with no more permissions."""
        ready = sum(st.report is not None and self.router.available(g) for g, st in enumerate(self.router.groups))
        self.metadata["groups_ready"] = str(ready)

    def stats(self, *_: Any) -> dict:
        return {"forwarded": self.forwarded, "inflight": len(self.handing), "errors": dict(self.errors),
                "held": len(self.view.held), "orphaned": self.orphaned,
                "policy": self.router.policy,
                "dispatched": {str(g): self.dispatched[g] for g in range(self.groups)},
                "groups": self.router.snapshot()}

    async def run(self, stop: asyncio.Event) -> None:
        hooks: list = []
        bus.refuse_placeholder(self.s.nats_url, self.auth)  # the main user's own trouble is told first
        answering = bus.answer_auth(self.s, self.auth)  # before connecting: a missing one stops start-up
        self.nc = await unless_stopped(stop, bus.connect(self.s.nats_url, "dpbus-ingest", self.log,
                                                         on_reconnect_hooks=hooks, auth=self.auth))
        # answers go over a connection that may publish nothing but client inboxes: whatever
        # a request names, ingest's answers cannot reach the ledger, a group or a service
        answer_hooks: list = []
        self.answer_nc = self.nc if answering is None else await unless_stopped(stop, bus.connect(
            self.s.nats_url, "dpbus-ingest-answers", self.log, on_reconnect_hooks=answer_hooks, auth=answering))
        self.outbox = bus.ClientOutbox(self.answer_nc, self.log)
        (hooks if answering is None else answer_hooks).append(self.outbox.on_reconnect)
        self.replies = bus.Replies(self.nc)
        await self.replies.start()
        self.ledger = await Ledger.open(self.nc, self.s.prefix, self.s.ledger_replicas, log=self.log)
        await bus.subscribe(self.nc, self.subjects.all_loads, self.on_load)
        svc = await nats.micro.add_service(
            self.nc, name="dpbus-ingest", version=VERSION, description="dpbus front door: validate and route",
            queue_group=INGEST_QUEUE, metadata=self.metadata,
            stats_handler=self.stats,
        )
        # the plain subjects (the default client's) and every client's own (see services/identity.py)
        await svc.add_endpoint(name="generate", subject=self.subjects.generate, handler=self.on_generate)
        await svc.add_endpoint(name="generate-own", subject=self.subjects.all_generate, handler=self.on_generate)
        await svc.add_endpoint(name="abort", subject=self.subjects.abort, handler=self.on_abort)
        await svc.add_endpoint(name="abort-own", subject=self.subjects.all_abort, handler=self.on_abort)
        await bus.at_server(self.nc)  # the endpoints' subscriptions, not only our buffer
        self.listening.set()
        self.log.info("ingest_ready", subjects=[self.subjects.generate, self.subjects.all_generate,
                                                self.subjects.abort, self.subjects.all_abort])
        background = [asyncio.create_task(self.watch_ledger(stop)), asyncio.create_task(self.sweep_loop(stop))]
        await stop.wait()
        for task in background:
            task.cancel()
        await svc.stop()
        deadline = time.monotonic() + self.s.drain_timeout
        while self.handing and time.monotonic() < deadline:  # requests being handed to a group
            await asyncio.sleep(0.05)
        await self.outbox.drain(timeout=2)
        self.replies.stop()
        if self.answer_nc is not self.nc:
            await bus.close(self.answer_nc)
        await bus.close(self.nc)
