"""Continuous batching for one DP group, without I/O.

Requests wait in a bounded FIFO queue; each step admits waiting requests into free
cache slots, gives prompt chunks (at most ``max_prefill_tokens`` per step in all) to
those still prefilling and one decode row to every request that has a pending token.
New requests thus join the running batch at the next step.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from schemas import FinishReason, SamplingParams
from schemas.codec import Encoding
from schemas.internal import DecodeItem, PrefillItem, RowSampling
from services.tokenizer import EOS_ID, ByteStream, StreamDecoder


@dataclass
class Sequence:
    rid: str
    prompt: list[int]
    sampling: SamplingParams
    stream: bool
    reply: str
    encoding: Encoding
    accepted_at: float
    seed: int = 0
    slot: int = -1
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    aborted: bool = False
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    detok: StreamDecoder = field(default_factory=ByteStream)
    eos_ids: tuple[int, ...] = (EOS_ID,)

    def __post_init__(self) -> None:
        self.seed = self.sampling.seed if self.sampling.seed is not None else random.randrange(1 << 31)
        self.stops = set(self.sampling.stop_token_ids)
        if not self.sampling.ignore_eos:
            self.stops.update(self.eos_ids)

    @property
    def row_sampling(self) -> RowSampling:
        s = self.sampling
        return RowSampling(s.temperature, s.top_p, s.top_k, self.seed)

    @property
    def outstanding_tokens(self) -> int:
        return len(self.prompt) - self.prefilled + self.sampling.max_new_tokens - len(self.output)


@dataclass
class Plan:
    """Which sequence each item of a step belongs to."""

    prefill: list[tuple[Sequence, PrefillItem]]
    decode: list[tuple[Sequence, DecodeItem]]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, slots: int, max_prefill_tokens: int, max_waiting: int, max_seq_len: int) -> None:
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.free: list[int] = list(range(slots - 1, -1, -1))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue a request; False when the queue is full."""
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(seq)
        return True

    def find(self, rid: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.rid == rid:
                return seq
        return next((s for s in self.running.values() if s.rid == rid), None)

    def abort(self, rid: str) -> Sequence | None:
        """Mark ``rid`` aborted; it leaves at the next ``take_aborted``."""
        seq = self.find(rid)
        if seq is not None:
            seq.aborted = True
        return seq

    def take_aborted(self) -> list[Sequence]:
        gone = [s for s in self.waiting if s.aborted]
        self.waiting = deque(s for s in self.waiting if not s.aborted)
        for slot, seq in list(self.running.items()):
            if seq.aborted:
                gone.append(self.release(slot))
        return gone

    def release(self, slot: int) -> Sequence:
        seq = self.running.pop(slot)
        self.free.append(slot)
        return seq

    def take_all(self) -> list[Sequence]:
        """Remove every running request (the group failed); waiting ones stay queued."""
        return [self.release(slot) for slot in list(self.running)]

    def take_expired(self, now: float, queue_timeout: float) -> list[Sequence]:
        old = [s for s in self.waiting if now - s.accepted_at > queue_timeout]
        if old:
            self.waiting = deque(s for s in self.waiting if now - s.accepted_at <= queue_timeout)
        return old

    def build_step(self, now: float) -> Plan:
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            seq.slot = self.free.pop()
            seq.scheduled_at = now
            self.running[seq.slot] = seq
        plan = Plan([], [])
        budget = self.max_prefill_tokens
        for seq in self.running.values():
            if seq.prefilled < len(seq.prompt):
                if budget <= 0:
                    continue
                chunk = seq.prompt[seq.prefilled : seq.prefilled + budget]
                budget -= len(chunk)
                last = seq.prefilled + len(chunk) == len(seq.prompt)
                plan.prefill.append((seq, PrefillItem(seq.slot, seq.prefilled, chunk, last, seq.row_sampling)))
            elif seq.output:
                position = len(seq.prompt) + len(seq.output) - 1
                plan.decode.append((seq, DecodeItem(seq.slot, seq.output[-1], position, len(seq.output),
                                                    seq.row_sampling)))
        return plan

    def apply(self, plan: Plan, prefill_tokens: list[int], decode_tokens: list[int]
              ) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Record the sampled tokens; returns (sequence, new token, finish reason or None)."""
        if len(prefill_tokens) != len(plan.prefill) or len(decode_tokens) != len(plan.decode):
            raise ValueError(f"result has {len(prefill_tokens)}+{len(decode_tokens)} tokens for a step of "
                             f"{len(plan.prefill)}+{len(plan.decode)} items")
        events = []
        for (seq, item), token in zip(plan.prefill, prefill_tokens):
            seq.prefilled += len(item.token_ids)
            if item.last:
                events.append(self._append(seq, token))
        for (seq, _), token in zip(plan.decode, decode_tokens):
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
            self.release(seq.slot)
        return seq, token, reason
