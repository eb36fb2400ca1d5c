"""Continuous batching over a paged KV cache for one DP group, without I/O.

Requests wait in a bounded FIFO queue. Each step:

1. every running request that is decoding gets one decode row, and a new KV page when
   its next position starts one; when the pool is empty the most recently admitted
   request (possibly the one that needs the page) is *preempted*: it releases its pages and goes back to the front
   of the queue, to be recomputed (prompt + what it generated so far, less what the prefix cache still holds)
   when pages free up;
2. requests still prefilling get prompt chunks, at most ``max_prefill_tokens`` in all,
   as far as free pages allow;
3. waiting requests are admitted while there is room in the batch and pages for their
   first chunk, so new requests join the running batch at the next step. A step carries
   the page list of each request it admits (see ``tables.py``), so admissions stop once
   they hold ``max_start_pages`` pages in all (long prefix-cache hits): the step stays
   small, the rest join at the next one.

Steps may overlap: the publisher plans step N+1 before step N's tokens are known. A
sequence counts what steps in flight will do for it: ``ahead`` positions they write and
``pending`` tokens they sample. Planning goes on from there (a decode row whose previous
token is still pending feeds ``LAST_TOKEN``: the workers hold it); ``apply`` takes each
step's tokens in order. Stop tokens are seen one step late: a sequence that stopped at
step N may be in step N+1 already; that step's token for it is dropped, never streamed.
A length limit is known ahead: no step goes past it.

Pages belong to ``pages.PagePool``, which the scheduler asks. With the prefix cache on, a
request admitted from the queue first takes the longest cached prefix of whole pages of
its prompt (never all of it: at least one token is computed, to sample from) and starts
prefilling after it; each page it fills completely is published to the cache after the
step that wrote it. A request that finishes, is aborted or is preempted releases its
references; the pages it filled stay cached until the pool needs them. When the group
fails (``take_all``) the whole cache is forgotten: a restarted worker has none of it.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dpbus.schemas import FinishReason, SamplingParams
from dpbus.schemas.internal import LAST_TOKEN, DecodeItem, PrefillItem, RowSampling, page_hashes
from dpbus.services.publisher.pages import PagePool


class Status(enum.Enum):
    """Where a sequence is in its life, as the scheduler sees it."""

    LIVE = "live"  # queued or running
    ABORTING = "aborting"  # an abort came: it leaves the batch at the next ``take_aborted``
    ABORTED = "aborted"  # it left after an abort: later tokens are dropped
    FINISHED = "finished"  # it left by a stop token, its length limit or a stop string


@dataclass(eq=False)  # one request's life: compared (and found in lists) by identity, in O(1)
class Sequence:
    """A request as the scheduler sees it. Where its answers go (and everything about
    sending them) is the service's business: ``delivery`` (the publisher's
    ``answers.Delivery``)."""

    rid: str
    prompt: list[int]
    sampling: SamplingParams
    accepted_at: float
    seed: int = 0
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its first whole pages (page_hashes)
    published: int = 0  # its first pages already offered to the prefix cache
    preempted: int = 0
    scheduled_at: float = 0.0
    eos_ids: tuple[int, ...] = ()  # the model's end-of-sequence tokens (stops unless ignore_eos)
    client: str = ""  # who sent it (see schemas.internal.client_of): (client, rid) names a request
    ahead: int = 0  # positions after ``prefilled`` that steps in flight write
    pending: int = 0  # tokens that steps in flight sample for it (not known yet)
    status: Status = Status.LIVE
    delivery: Any = None  # the service's record of its answers

    @property
    def key(self) -> tuple[str, str]:
        return (self.client, self.rid)

    @property
    def aborted(self) -> bool:
        """An abort came for it (it may have left since)."""
        return self.status in (Status.ABORTING, Status.ABORTED)

    @property
    def finished(self) -> bool:
        """It left for good (finished, stopped, aborted): later tokens are dropped."""
        return self.status in (Status.ABORTED, Status.FINISHED)

    def abort(self) -> None:
        if self.status is Status.LIVE:
            self.status = Status.ABORTING

    def leave(self) -> None:
        self.status = Status.ABORTED if self.aborted else Status.FINISHED

    def __post_init__(self) -> None:
        self.seed = self.sampling.seed if self.sampling.seed is not None else random.randrange(1 << 31)
        self.stops = set(self.sampling.stop_token_ids)
        if not self.sampling.ignore_eos:
            self.stops.update(self.eos_ids)

    @property
    def fill_target(self) -> int:
        """Tokens whose K/V must be in the cache before decoding: the prompt, plus (after a
        preemption) every generated token but the last, which the next decode feeds."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    @property
    def planned(self) -> int:
        """Positions whose K/V the steps sent so far write (``prefilled`` once they settle)."""
        return self.prefilled + self.ahead

    @property
    def generated(self) -> int:
        """Tokens generated, counting those that steps in flight sample."""
        return len(self.output) + self.pending

    @property
    def decoding(self) -> bool:
        """Every position before its last token (pending ones counted) is planned: the
        next step feeds that token."""
        return self.generated > 0 and self.planned == len(self.prompt) + self.generated - 1

    def at_limit(self, max_seq_len: int) -> bool:
        """No further token may be planned: the ones pending reach its length limit."""
        return self.generated >= self.sampling.max_new_tokens or len(self.prompt) + self.generated >= max_seq_len

    @property
    def row_sampling(self) -> RowSampling:
        s = self.sampling
        return RowSampling(s.temperature, s.top_p, s.top_k, self.seed)

    @property
    def outstanding_tokens(self) -> int:
        return max(self.fill_target - self.planned, 0) + self.sampling.max_new_tokens - self.generated


@dataclass
class Plan:
    """Which sequence each item of a step belongs to (and in which of its runs: a
    sequence preempted after the step was planned is in a new one)."""

    prefill: list[tuple[Sequence, PrefillItem]]
    decode: list[tuple[Sequence, DecodeItem]]
    lives: dict[int, int] = field(default_factory=dict)  # id(sequence) -> its preemption count then

    def same_run(self, seq: Sequence) -> bool:
        """``seq`` still runs as when this step was planned (its writes are its cache)."""
        return not seq.finished and self.lives.get(id(seq), seq.preempted) == seq.preempted

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


MAX_START_PAGES = 65536  # pages the requests admitted in one step may hold in all (~200 KB of step)


class Scheduler:
    def __init__(self, max_running: int, max_prefill_tokens: int, max_waiting: int, max_seq_len: int,
                 num_pages: int, page_size: int, prefix_cache: bool = True,
                 max_start_pages: int = MAX_START_PAGES) -> None:
        if num_pages - 1 < pages_for(max_seq_len, page_size):
            raise ValueError(f"num_pages={num_pages} (page 0 is reserved) cannot hold one context of "
                             f"max_seq_len={max_seq_len} in pages of {page_size}: need "
                             f"{pages_for(max_seq_len, page_size) + 1}")
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.max_seq_len = max_seq_len
        self.page_size = page_size
        self.max_start_pages = max_start_pages
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.pool = PagePool(num_pages, page_size, prefix_cache)
        self.preemptions = 0
        self.hit_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self.prefill_tokens = 0  # prompt tokens computed (every prefill chunk, recomputes included)

    @property
    def free_pages(self) -> list[int]:
        """Pages no running request holds: free ones and cached ones (both can be taken)."""
        return self.pool.unheld()

    # ---- queue ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue a request; False when the queue is full."""
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(seq)
        return True

    def find(self, rid: str, client: str = "") -> Sequence | None:
        return next((s for s in (*self.waiting, *self.running) if s.rid == rid and s.client == client), None)

    def abort(self, rid: str, client: str = "") -> Sequence | None:
        """Mark the request aborted; it leaves at the next ``take_aborted``."""
        seq = self.find(rid, client)
        if seq is not None:
            seq.abort()
        return seq

    def take_aborted(self) -> list[Sequence]:
        gone = [s for s in self.waiting if s.aborted]
        self.waiting = deque(s for s in self.waiting if not s.aborted)
        for seq in [s for s in self.running if s.aborted]:
            gone.append(self.release(seq))
        for seq in gone:
            seq.leave()
        return gone

    def release(self, seq: Sequence) -> Sequence:
        self.running.remove(seq)
        self.pool.release(seq.pages)
        seq.pages, seq.ahead = [], 0
        return seq

    def stop_early(self, seq: Sequence) -> None:
        """``seq`` reached a stop string: it leaves now (its pages are freed)."""
        self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        seq.leave()
        if seq in self.running:
            self.release(seq)
        elif seq in self.waiting:  # preempted while a step in flight sampled for it
            self.waiting.remove(seq)

    def take_all(self) -> list[Sequence]:
        """Remove every running request (the group failed: its cached pages are forgotten
        too, and what the steps in flight would have done is lost); waiting ones stay
        queued."""
        gone = [self.release(seq) for seq in list(self.running)]
        for seq in (*gone, *self.waiting):
            seq.pending = seq.ahead = 0
        self.pool.forget()
        return gone

    def take_expired(self, now: float, queue_timeout: float) -> list[Sequence]:
        """Waiting requests never scheduled within ``queue_timeout`` of their acceptance
        (a preempted request waits for pages, not for a group: it does not expire)."""
        def expired(s: Sequence) -> bool:
            return not s.scheduled_at and now - s.accepted_at > queue_timeout

        old = [s for s in self.waiting if expired(s)]
        if old:
            self.waiting = deque(s for s in self.waiting if not expired(s))
        return old

    # ---- pages ------------------------------------------------------------------------------
    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give ``seq`` pages for its first ``tokens`` positions, if the pool has them."""
        need = pages_for(tokens, self.page_size) - len(seq.pages)
        if need <= 0:
            return True
        got = self.pool.take(need)
        if got is None:
            return False
        seq.pages += got
        return True

    def _start(self, seq: Sequence, budget: int) -> bool:
        """Give the head of the queue its cached prefix and the pages of its first chunk;
        False (holding nothing) when the pool has not enough."""
        target, hit = seq.fill_target, []
        if self.pool.cache:
            reusable = (target - 1) // self.page_size  # whole pages before the last token to compute
            hit = self.pool.lookup(page_hashes(seq.prompt + seq.output, self.page_size, seq.hashes, reusable)[:reusable])
            self.pool.hold(hit)
        seq.pages, seq.prefilled, seq.published = hit, len(hit) * self.page_size, len(hit)
        if self._grow(seq, seq.prefilled + min(budget, target - seq.prefilled)):
            self.hit_tokens += seq.prefilled
            return True
        self.pool.release(seq.pages)
        seq.pages, seq.prefilled = [], 0
        return False

    def _publish(self, seq: Sequence) -> None:
        """Offer the pages ``seq`` has completely written to the prefix cache."""
        full = seq.prefilled // self.page_size
        if self.pool.cache and full > seq.published:
            page_hashes(seq.prompt + seq.output, self.page_size, seq.hashes, full)
            for i in range(seq.published, full):
                self.pool.publish(seq.pages[i], seq.hashes[i])
            seq.published = full

    def _preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue (a step in flight may still sample a token for
        it: ``apply`` adds it to the output, and it is admitted again only after)."""
        self.release(seq)
        seq.prefilled = 0
        seq.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    # ---- steps ------------------------------------------------------------------------------
    def build_step(self, now: float) -> Plan:
        plan = Plan([], [])
        self._make_room_for_a_newcomer()
        preempted_before = self.preemptions
        for seq in list(self.running):
            if seq not in self.running or not seq.decoding or seq.at_limit(self.max_seq_len):
                continue
            position = len(seq.prompt) + seq.generated - 1
            while not self._grow(seq, position + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                token = LAST_TOKEN if seq.pending else seq.output[-1]
                plan.decode.append((seq, DecodeItem(token, position, seq.generated, list(seq.pages),
                                                    seq.row_sampling)))
                seq.ahead, seq.pending = seq.ahead + 1, seq.pending + 1
        budget = self.max_prefill_tokens
        for seq in self.running:
            if budget > 0 and not seq.decoding:
                budget -= self._plan_chunk(plan, seq, budget)
        # a request preempted in this step waits at least until the next one (no thrashing)
        started = 0  # pages of the requests admitted in this step
        while budget > 0 and self.waiting and len(self.running) < self.max_running \
                and self.preemptions == preempted_before and started < self.max_start_pages:
            seq = self.next_waiting()
            if seq.pending or not self._start(seq, budget):
                break  # not enough free pages: it keeps its place in the queue
            started += len(seq.pages)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.scheduled_at = seq.scheduled_at or now
            budget -= self._plan_chunk(plan, seq, budget)
        plan.lives = {id(seq): seq.preempted for seq, _ in (*plan.prefill, *plan.decode)}
        return plan

    def _running_per_client(self) -> dict[str, int]:
        running: dict[str, int] = {}
        for s in self.running:
            running[s.client] = running.get(s.client, 0) + 1
        return running

    def next_waiting(self) -> Sequence:
        """The waiting request to admit next: the oldest of the client with the fewest
        requests running (a preempted request is at the head of the queue, so it comes
        first among its client's), so that a client that queued a thousand requests does
        not keep a newcomer waiting behind all of them. With one client: queue order."""
        head = self.waiting[0]
        if len(self.waiting) == 1:
            return head
        running = self._running_per_client()
        best, fewest, seen = head, running.get(head.client, 0), {head.client}
        for seq in self.waiting:
            if fewest == 0:
                break
            if seq.client in seen:
                continue
            seen.add(seq.client)
            n = running.get(seq.client, 0)
            if n < fewest:
                best, fewest = seq, n
        return best

    def _make_room_for_a_newcomer(self) -> None:
        """Every place is taken and a client below its share waits (the share:
        ``max_running`` over the clients running and this one): preempt the latest
        admitted request of the client running the most, if that is above the share. One
        per step; each preemption brings the two closer to the share and never past it, so
        it never cascades. The preempted request waits with its pages offered to the prefix
        cache, so taking its place back later costs little. A client alone keeps every
        place."""
        if len(self.running) < self.max_running or not self.waiting:
            return
        newcomer = self.next_waiting()
        if newcomer.pending:
            return
        running = self._running_per_client()
        share = max(1, self.max_running // len(running.keys() | {newcomer.client}))
        most, count = max(running.items(), key=lambda kv: kv[1])
        if running.get(newcomer.client, 0) >= share or count <= share:
            return  # (a client keeps its share at least: no preemption takes it below)
        victim = next(s for s in reversed(self.running) if s.client == most)
        self._preempt(victim)

    def _plan_chunk(self, plan: Plan, seq: Sequence, budget: int) -> int:
        """Add the next prompt chunk of ``seq`` that fits the budget and free pages."""
        target, start = seq.fill_target, seq.planned
        end = min(start + budget, target)
        while end > start and not self._grow(seq, end):
            end = min(end - 1, (len(seq.pages) + self.pool.available()) * self.page_size)
        if end <= start:
            return 0
        tokens = (seq.prompt + seq.output)[start:end]
        sample = end == target and not seq.output
        plan.prefill.append((seq, PrefillItem(start, tokens, sample, list(seq.pages), seq.row_sampling)))
        seq.ahead += len(tokens)
        seq.pending += sample
        self.prefill_tokens += len(tokens)
        return len(tokens)

    def apply(self, plan: Plan, prefill_tokens: list[int], decode_tokens: list[int]
              ) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Record a settled step's sampled tokens (steps are applied in the order they
        were planned); returns (sequence, new token, finish reason or None). A token for
        a sequence that left meanwhile is dropped; one for a sequence preempted meanwhile
        joins its output (it was sampled from the right context)."""
        if len(prefill_tokens) != len(plan.prefill) or len(decode_tokens) != len(plan.decode):
            raise ValueError(f"result has {len(prefill_tokens)}+{len(decode_tokens)} tokens for a step of "
                             f"{len(plan.prefill)}+{len(plan.decode)} items")
        events = []
        for (seq, item), token in zip(plan.prefill, prefill_tokens):
            if plan.same_run(seq):
                self._written(seq, len(item.token_ids))
            if item.sample:
                self._sampled(seq, token, events)
        for (seq, item), token in zip(plan.decode, decode_tokens):
            if plan.same_run(seq):
                self._written(seq, 1)  # the fed token is in the cache now
            self._sampled(seq, token, events)
        return events

    def _written(self, seq: Sequence, n: int) -> None:
        seq.prefilled, seq.ahead = seq.prefilled + n, seq.ahead - n
        self._publish(seq)

    def _sampled(self, seq: Sequence, token: int, events: list) -> None:
        seq.pending -= 1
        if not seq.finished:
            events.append(self._append(seq, token))

    def _append(self, seq: Sequence, token: int) -> tuple[Sequence, int, FinishReason | None]:
        seq.output.append(token)
        reason = None
        if token in seq.stops:
            reason = FinishReason.STOP
        elif len(seq.output) >= seq.sampling.max_new_tokens or len(seq.prompt) + len(seq.output) >= self.max_seq_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._leave(seq)
        return seq, token, reason
