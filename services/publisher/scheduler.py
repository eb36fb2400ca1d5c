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

Pages belong to ``pages.PagePool``, which the scheduler asks. With the prefix cache on, a
request admitted from the queue first takes the longest cached prefix of whole pages of
its prompt (never all of it: at least one token is computed, to sample from) and starts
prefilling after it; each page it fills completely is published to the cache after the
step that wrote it. A request that finishes, is aborted or is preempted releases its
references; the pages it filled stay cached until the pool needs them. When the group
fails (``take_all``) the whole cache is forgotten: a restarted worker has none of it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from schemas import FinishReason, SamplingParams
from schemas.codec import Encoding
from schemas.internal import DecodeItem, PrefillItem, RowSampling, page_hashes
from services.publisher.pages import PagePool
from services.publisher.stops import StopMatcher
from services.tokenizer import EOS_ID, ByteStream, StreamDecoder


@dataclass(eq=False)  # one request's life: compared (and found in lists) by identity, in O(1)
class Sequence:
    rid: str
    prompt: list[int]
    sampling: SamplingParams
    stream: bool
    reply: str
    encoding: Encoding
    accepted_at: float
    seed: int = 0
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its first whole pages (page_hashes)
    published: int = 0  # its first pages already offered to the prefix cache
    aborted: bool = False
    preempted: int = 0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    detok: StreamDecoder = field(default_factory=ByteStream)
    eos_ids: tuple[int, ...] = (EOS_ID,)
    pinned: bool = False
    client: str = ""  # who sent it (see schemas.internal.client_of): (client, rid) names a request
    attempt: str = ""  # the admission it came from (see services/ledger.py)
    ledger_rev: int = 0  # the revision of its ledger entry held by this publisher
    owner: int = 0  # the publisher instance that claimed it (see services/ledger.py)
    abandoned: bool = False  # its publisher lost the lease: someone else answers it
    settled: bool = False  # its publisher won its terminal answer in the ledger

    @property
    def key(self) -> tuple[str, str]:
        return (self.client, self.rid)

    def __post_init__(self) -> None:
        self.seed = self.sampling.seed if self.sampling.seed is not None else random.randrange(1 << 31)
        self.stops = set(self.sampling.stop_token_ids)
        if not self.sampling.ignore_eos:
            self.stops.update(self.eos_ids)
        self.stop_strings = StopMatcher(self.sampling.stop)
        self.text_parts: list[str] = []  # the answer's text so far, when it is not streamed

    @property
    def fill_target(self) -> int:
        """Tokens whose K/V must be in the cache before decoding: the prompt, plus (after a
        preemption) every generated token but the last, which the next decode feeds."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.fill_target and bool(self.output)

    @property
    def row_sampling(self) -> RowSampling:
        s = self.sampling
        return RowSampling(s.temperature, s.top_p, s.top_k, self.seed)

    @property
    def outstanding_tokens(self) -> int:
        return self.fill_target - self.prefilled + self.sampling.max_new_tokens - len(self.output)


@dataclass
class Plan:
    """Which sequence each item of a step belongs to."""

    prefill: list[tuple[Sequence, PrefillItem]]
    decode: list[tuple[Sequence, DecodeItem]]

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
            seq.aborted = True
        return seq

    def take_aborted(self) -> list[Sequence]:
        gone = [s for s in self.waiting if s.aborted]
        self.waiting = deque(s for s in self.waiting if not s.aborted)
        for seq in [s for s in self.running if s.aborted]:
            gone.append(self.release(seq))
        return gone

    def release(self, seq: Sequence) -> Sequence:
        self.running.remove(seq)
        self.pool.release(seq.pages)
        seq.pages = []
        return seq

    def stop_early(self, seq: Sequence) -> None:
        """``seq`` reached a stop string: it leaves the batch now (its pages are freed)."""
        if seq in self.running:
            self.release(seq)

    def take_all(self) -> list[Sequence]:
        """Remove every running request (the group failed: its cached pages are forgotten
        too); waiting ones stay queued."""
        gone = [self.release(seq) for seq in list(self.running)]
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
        self.release(seq)
        seq.prefilled = 0
        seq.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    # ---- steps ------------------------------------------------------------------------------
    def build_step(self, now: float) -> Plan:
        plan = Plan([], [])
        preempted_before = self.preemptions
        for seq in list(self.running):
            if seq not in self.running or not seq.decoding:
                continue
            position = len(seq.prompt) + len(seq.output) - 1
            while not self._grow(seq, position + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                plan.decode.append((seq, DecodeItem(seq.output[-1], position, len(seq.output), list(seq.pages),
                                                    seq.row_sampling)))
        budget = self.max_prefill_tokens
        for seq in self.running:
            if budget > 0 and not seq.decoding:
                budget -= self._plan_chunk(plan, seq, budget)
        # a request preempted in this step waits at least until the next one (no thrashing)
        started = 0  # pages of the requests admitted in this step
        while budget > 0 and self.waiting and len(self.running) < self.max_running \
                and self.preemptions == preempted_before and started < self.max_start_pages:
            seq = self.waiting[0]
            if not self._start(seq, budget):
                break  # not enough free pages: it keeps its place at the head of the queue
            started += len(seq.pages)
            self.waiting.popleft()
            self.running.append(seq)
            seq.scheduled_at = seq.scheduled_at or now
            budget -= self._plan_chunk(plan, seq, budget)
        return plan

    def _plan_chunk(self, plan: Plan, seq: Sequence, budget: int) -> int:
        """Add the next prompt chunk of ``seq`` that fits the budget and free pages."""
        target = seq.fill_target
        end = min(seq.prefilled + budget, target)
        while end > seq.prefilled and not self._grow(seq, end):
            end = min(end - 1, (len(seq.pages) + self.pool.available()) * self.page_size)
        if end <= seq.prefilled:
            return 0
        tokens = (seq.prompt + seq.output)[seq.prefilled:end]
        sample = end == target and not seq.output
        plan.prefill.append((seq, PrefillItem(seq.prefilled, tokens, sample, list(seq.pages), seq.row_sampling)))
        self.prefill_tokens += len(tokens)
        return len(tokens)

    def apply(self, plan: Plan, prefill_tokens: list[int], decode_tokens: list[int]
              ) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Record the sampled tokens; returns (sequence, new token, finish reason or None)."""
        if len(prefill_tokens) != len(plan.prefill) or len(decode_tokens) != len(plan.decode):
            raise ValueError(f"result has {len(prefill_tokens)}+{len(decode_tokens)} tokens for a step of "
                             f"{len(plan.prefill)}+{len(plan.decode)} items")
        events = []
        for (seq, item), token in zip(plan.prefill, prefill_tokens):
            seq.prefilled += len(item.token_ids)
            self._publish(seq)
            if item.sample:
                events.append(self._append(seq, token))
        for (seq, item), token in zip(plan.decode, decode_tokens):
            seq.prefilled = item.position + 1  # the fed token is in the cache now
            self._publish(seq)
            events.append(self._append(seq, token))
        return events

    def _append(self, seq: Sequence, token: int) -> tuple[Sequence, int, FinishReason | None]:
        seq.output.append(token)
        reason = None
        if token in seq.stops:
            reason = FinishReason.STOP
        elif len(seq.output) >= seq.sampling.max_new_tokens or len(seq.prompt) + len(seq.output) >= self.max_seq_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.release(seq)
        return seq, token, reason
