"""Decode rows fed "the token this row sampled last" (``LAST_TOKEN``), kept by the workers
on the device, instead of a token the step carries.

A small publisher by hand sends wire steps (rows started, grown, freed and reused,
prompts prefilled in one chunk or several, one abandoned mid-prefill) through msgpack to
the worker's real ``PageTables`` and the real JAX ``ModelRunner``. Run once with every
decode token given and once with each asked for as ``LAST_TOKEN``, greedy and seeded
sampling alike, every step must sample exactly the same tokens. The tables refuse to
feed a row that has sampled nothing in the epoch; the runner refuses a ``LAST_TOKEN``
item without a row; no new shape is compiled after warmup.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
import pytest

from dpbus.schemas.internal import (
    LAST_TOKEN, DecodeItem, DecodeRow, PrefillChunk, PrefillItem, RowPages, RowSampling, RowStart, Step, pack, unpacker,
)
from dpbus.services.model_config import ModelConfig
from dpbus.services.worker.model import dummy_weights
from dpbus.services.worker.runner import ModelRunner, make_group_mesh
from dpbus.services.worker.tables import PageTables

CFG = ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                  max_seq_len=96)
PAGE, NUM_PAGES, MAX_RUNNING, MAX_PREFILL = 8, 48, 4, 32
GREEDY = RowSampling(0.0, 1.0, 0, 0)
decode_step = unpacker(Step)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    r = ModelRunner(CFG, make_group_mesh(jax.devices()[:2]), num_pages=NUM_PAGES, page_size=PAGE,
                    max_running_requests=MAX_RUNNING, max_prefill_tokens=MAX_PREFILL,
                    host_weights=dummy_weights(CFG, 4))
    r.warmup()
    r.compiled_at_warmup = r.compiled_shapes()
    return r


# ---------------------------------------------------------------------------------------
# a publisher by hand
# ---------------------------------------------------------------------------------------

@dataclass
class Ask:
    rid: str
    prompt_len: int
    chunks: list[int]            # prefill chunk sizes, in order
    new: int                     # tokens to generate
    sampling: RowSampling = GREEDY
    at: int = 0                  # the first step it may join at (when a row is free)
    leave_after_chunks: int = 0  # abandoned (aborted) after this many chunks, before sampling
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    prefilled: int = 0
    row: int = -1
    pages: list[int] = field(default_factory=list)


def workload() -> list[Ask]:
    """Four rows for seven requests: rows are freed and reused (one by a request that
    replaced one abandoned mid-prefill), some prompts take two chunks, greedy and sampled."""
    asks = [
        Ask("a", 5, [5], 10),
        Ask("b", 20, [7, 13], 8, RowSampling(0.9, 0.95, 0, 11)),
        Ask("d", 12, [12], 3),
        Ask("c", 45, [32, 13], 6, RowSampling(1.0, 1.0, 40, 7), at=1),
        Ask("e", 30, [16, 14], 7, RowSampling(0.7, 1.0, 0, 3), at=2),
        Ask("f", 40, [20, 20], 5, at=2, leave_after_chunks=1),
        Ask("g", 8, [8], 9, RowSampling(1.2, 0.8, 0, 99), at=3),
    ]
    rng = np.random.default_rng(5)
    for a in asks:
        a.prompt = rng.integers(0, CFG.vocab_size, a.prompt_len).tolist()
        assert sum(a.chunks) == a.prompt_len and a.prompt_len + a.new <= CFG.max_seq_len
    return asks


class Publisher:
    """Plans steps as the real one does, in its protocol: a request joins as the lowest
    free row, its pages grow as its positions need them, a row freed in a step may be
    started again in the same step. ``held(ask, step)`` says whether a decode row asks for
    its last token instead of carrying it."""

    def __init__(self, held: Callable[[Ask, int], bool]) -> None:
        self.held = held
        self.waiting = workload()
        self.running: list[Ask] = []
        self.leaving: list[Ask] = []
        self.done: dict[str, list[int]] = {}
        self.free_pages = random.Random(1).sample(range(1, NUM_PAGES), NUM_PAGES - 1)  # scattered, never ascending
        self.stats = {"held": 0, "given": 0, "reused": 0, "chunks": 0}
        self.used_rows: set[int] = set()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.leaving)

    def step(self, seq: int) -> Step:
        step = Step(1, seq)
        for a in self.leaving:
            step.freed.append(a.row)
            self.free_pages += a.pages
        self.leaving = []
        free = sorted(set(range(MAX_RUNNING)) - {a.row for a in self.running})
        for a in [a for a in self.waiting if a.at <= seq][:len(free)]:
            self.waiting.remove(a)
            a.row = free.pop(0)
            self.stats["reused"] += a.row in self.used_rows
            self.used_rows.add(a.row)
            step.started.append(RowStart(a.row, [], a.sampling))
            self.running.append(a)
        budget = MAX_PREFILL
        for a in self.running:
            if a.prefilled < a.prompt_len:
                n = a.chunks[self._chunk(a)]
                if n > budget:
                    continue
                budget -= n
                self._grow(step, a, a.prefilled + n)
                step.prefill.append(PrefillChunk(a.row, a.prefilled, a.prompt[a.prefilled:a.prefilled + n],
                                                 a.prefilled + n == a.prompt_len))
                a.prefilled += n
            elif a.output and len(a.output) < a.new:
                position = a.prompt_len + len(a.output) - 1
                self._grow(step, a, position + 1)
                held = self.held(a, seq)
                self.stats["held" if held else "given"] += 1
                step.decode.append(DecodeRow(a.row, LAST_TOKEN if held else a.output[-1], position, len(a.output)))
        return step

    def _chunk(self, a: Ask) -> int:
        """The index of ``a``'s next chunk."""
        return [sum(a.chunks[:i]) for i in range(len(a.chunks))].index(a.prefilled)

    def _grow(self, step: Step, a: Ask, end: int) -> None:
        """Give ``a`` the pages its first ``end`` positions need: in its RowStart if it
        starts in this step, else as a RowPages."""
        more = [self.free_pages.pop() for _ in range(-(-end // PAGE) - len(a.pages))]
        if not more:
            return
        a.pages += more
        started = [s for s in step.started if s.row == a.row]
        if started:
            started[0].pages.extend(more)
        else:
            step.grown.append(RowPages(a.row, more))

    def took(self, step: Step, prefill: list[int], decode: list[int]) -> None:
        """The step's sampled tokens: outputs grow; a request done (or abandoned) leaves."""
        by_row = {a.row: a for a in self.running}
        for chunk, token in zip(step.prefill, prefill):
            a = by_row[chunk.row]
            self.stats["chunks"] += 1
            assert (token >= 0) == chunk.sample
            if token >= 0:
                a.output.append(token)
        for row, token in zip(step.decode, decode):
            by_row[row.row].output.append(token)
        for a in list(self.running):
            abandoned = a.leave_after_chunks and self._chunks_done(a) == a.leave_after_chunks
            if abandoned or len(a.output) == a.new:
                self.running.remove(a)
                self.leaving.append(a)
                self.done[a.rid] = list(a.output)

    @staticmethod
    def _chunks_done(a: Ask) -> int:
        return sum(1 for i in range(len(a.chunks)) if sum(a.chunks[:i + 1]) <= a.prefilled)


def run(runner: ModelRunner, held: Callable[[Ask, int], bool]) -> tuple[list[tuple[list[int], list[int]]], Publisher]:
    """Every step's sampled tokens (prefill, decode), as a worker takes the steps: off the
    wire, through its page tables, into the runner."""
    pub, tables, out = Publisher(held), PageTables(MAX_RUNNING), []
    seq = 0
    while pub.has_work():
        seq += 1
        assert seq < 200, "never finished"
        step = decode_step.decode(pack(pub.step(seq)))
        prefill, decode = tables.apply(step)
        assert [it.row for it in prefill] == [c.row for c in step.prefill]
        assert [(it.row, it.token) for it in decode] == [(d.row, d.token) for d in step.decode]
        got = runner.step(prefill, decode)
        pub.took(step, *got)
        out.append(got)
    return out, pub


def given(a: Ask, seq: int) -> bool:
    return False


def held(a: Ask, seq: int) -> bool:
    return True


# ---------------------------------------------------------------------------------------
# the same tokens either way
# ---------------------------------------------------------------------------------------

def test_held_tokens_sample_what_given_tokens_do(runner):
    want, explicit = run(runner, given)
    got, kept = run(runner, held)
    print(explicit.stats, kept.stats)
    assert explicit.stats["held"] == 0 and kept.stats["given"] == 0 and kept.stats["held"] == explicit.stats["given"]
    assert kept.stats["reused"] >= 2 and kept.stats["chunks"] > len(workload())
    assert sorted(kept.done) == sorted(a.rid for a in workload())
    assert kept.done["f"] == [] and all(len(kept.done[a.rid]) == a.new for a in workload() if a.rid != "f")
    for i, (a, b) in enumerate(zip(want, got)):
        assert a == b, f"step {i + 1}"
    assert len(want) == len(got)
    # the seeded rows did draw (not all of their tokens are the greedy ones)
    greedy_b = run_alone(runner, "b", GREEDY)
    assert kept.done["b"] != greedy_b


def run_alone(runner: ModelRunner, rid: str, sampling: RowSampling) -> list[int]:
    """``rid``'s tokens when it runs by itself with ``sampling``."""
    [a] = [a for a in workload() if a.rid == rid]
    pages = list(range(1, 1 + -(-(a.prompt_len + a.new) // PAGE)))
    tokens = [runner.prefill(PrefillItem(0, a.prompt, True, pages, sampling), logits=False)[0]]
    while len(tokens) < a.new:
        item = DecodeItem(tokens[-1], a.prompt_len + len(tokens) - 1, len(tokens), pages, sampling)
        tokens += runner.decode([item], logits=False)[0]
    return tokens


def test_a_row_reused_reads_its_own_first_token_not_the_last_owners(runner, monkeypatch):
    """Mutant (in memory): prefill chunks keep no token. A row's first held token is then
    the one its previous owner (or an earlier run) left: the comparison fails."""
    want, _ = run(runner, given)
    real = ModelRunner._held_rows

    def no_prefill_keeps(self, shape, prefill, decode):
        read, keep = real(self, shape, prefill, decode)
        keep[shape.decode:] = self.max_rows
        return read, keep

    monkeypatch.setattr(ModelRunner, "_held_rows", no_prefill_keeps)
    got, _ = run(runner, held)
    assert got != want


def test_the_runner_keeps_each_sampled_token_for_its_row_and_nothing_else(runner):
    before = np.asarray(runner.last_tokens).copy()
    pages = [[5 + 3 * i, 6 + 3 * i, 7 + 3 * i] for i in range(4)]
    prefill = [PrefillItem(0, [3, 4, 5], True, pages[1], GREEDY, row=1),
               PrefillItem(0, [6, 7, 8, 9], False, pages[3], GREEDY, row=3)]
    decode = [DecodeItem(11, 4, 1, pages[2], RowSampling(1.0, 1.0, 0, 8), row=2),
              DecodeItem(12, 4, 1, pages[0], GREEDY)]  # no row: kept nowhere
    got_prefill, got_decode = runner.step(prefill, decode)
    after = np.asarray(runner.last_tokens)
    assert got_prefill[1] == -1
    assert after[1] == got_prefill[0] and after[2] == got_decode[0]
    assert after[0] == before[0] and after[3] == before[3]
    # and fed back: the kept token goes in where the item asks for it
    again = runner.decode([DecodeItem(LAST_TOKEN, 5, 2, pages[2], GREEDY, row=2)], logits=False)[0]
    assert runner.decode([DecodeItem(got_decode[0], 5, 2, pages[2], GREEDY)], logits=False)[0] == again


# ---------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------

def rows_of(t: PageTables) -> dict[int, tuple[list[int], bool]]:
    return {row: (list(r.pages), r.sampled) for row, r in t.rows.items()}


def test_tables_feed_only_rows_that_sampled_in_the_epoch():
    t = PageTables(4)
    t.apply(Step(1, 1, started=[RowStart(0, [1, 2], GREEDY), RowStart(1, [3], GREEDY)],
                 prefill=[PrefillChunk(0, 0, [5] * 8, True), PrefillChunk(1, 0, [5] * 4, False)]))
    bad = [
        Step(1, 2, decode=[DecodeRow(1, LAST_TOKEN, 4, 0)]),                           # a chunk that did not sample
        Step(1, 2, started=[RowStart(2, [4], GREEDY)], decode=[DecodeRow(2, LAST_TOKEN, 0, 0)]),  # just started
        Step(1, 2, freed=[0], started=[RowStart(0, [4], GREEDY)],
             decode=[DecodeRow(0, LAST_TOKEN, 0, 0)]),                                   # freed, started again
        Step(1, 2, freed=[0], decode=[DecodeRow(0, LAST_TOKEN, 8, 1)]),                 # freed
    ]
    for step in bad:
        before = rows_of(t)
        with pytest.raises(ValueError):
            t.apply(step)
        assert rows_of(t) == before == {0: ([1, 2], True), 1: ([3], False)}
    with pytest.raises(ValueError, match="sampled none"):
        t.apply(bad[0])
    # row 0 sampled: it can be fed its token, as its own row
    prefill, decode = t.apply(Step(1, 2, grown=[RowPages(0, [4])], prefill=[PrefillChunk(1, 4, [6] * 4, True)],
                                   decode=[DecodeRow(0, LAST_TOKEN, 8, 1)]))
    assert decode == [DecodeItem(LAST_TOKEN, 8, 1, [1, 2, 4], GREEDY, row=0)]
    assert prefill == [PrefillItem(4, [6] * 4, True, [3], GREEDY, row=1)]
    assert rows_of(t) == {0: ([1, 2, 4], True), 1: ([3], True)}
    t.apply(Step(1, 3, decode=[DecodeRow(1, LAST_TOKEN, 8, 1), DecodeRow(0, LAST_TOKEN, 9, 2)]))
    # freed in one step, started again in the next: nothing to feed until it samples again
    t.apply(Step(1, 4, freed=[0]))
    t.apply(Step(1, 5, started=[RowStart(0, [5], GREEDY)]))
    with pytest.raises(ValueError, match="row 0"):
        t.apply(Step(1, 6, decode=[DecodeRow(0, LAST_TOKEN, 0, 0)]))
    assert rows_of(t) == {0: ([5], False), 1: ([3], True)}
    t.apply(Step(1, 6, decode=[DecodeRow(0, 7, 0, 0)]))  # a decode row samples too
    t.apply(Step(1, 7, decode=[DecodeRow(0, LAST_TOKEN, 1, 1)]))
    # a new epoch starts with no rows, so with no tokens
    t.clear()
    t.apply(Step(2, 1, started=[RowStart(1, [3], GREEDY)]))
    with pytest.raises(ValueError):
        t.apply(Step(2, 2, decode=[DecodeRow(1, LAST_TOKEN, 4, 1)]))


def test_the_runner_refuses_a_last_token_without_a_row(runner):
    pages = [1, 2]
    refused = [
        ([], [DecodeItem(LAST_TOKEN, 3, 1, pages, GREEDY)]),                             # no row
        ([], [DecodeItem(LAST_TOKEN, 3, 1, pages, GREEDY, row=MAX_RUNNING)]),            # not a row
        ([], [DecodeItem(1, 3, 1, pages, GREEDY, row=-2)]),
        ([PrefillItem(0, [1], True, pages, GREEDY, row=1)], [DecodeItem(1, 3, 1, [3], GREEDY, row=1)]),  # twice
    ]
    for prefill, decode in refused:
        with pytest.raises(ValueError):
            runner.step(prefill, decode)
    with pytest.raises(ValueError, match="LAST_TOKEN"):
        runner.decode([DecodeItem(LAST_TOKEN, 3, 1, pages, GREEDY)])


def test_the_runner_refuses_tokens_outside_the_vocabulary(runner):
    """Only LAST_TOKEN may be negative; nothing may reach past the vocabulary (the
    embedding lookup would wrap or clamp without a word)."""
    pages = [1, 2]
    for decode_token in (-2, CFG.vocab_size):
        with pytest.raises(ValueError, match="vocabulary"):
            runner.decode([DecodeItem(decode_token, 3, 1, pages, GREEDY, row=0)])
    for chunk in ([5, -3], [CFG.vocab_size]):
        with pytest.raises(ValueError, match="vocabulary"):
            runner.prefill(PrefillItem(0, chunk, True, pages, GREEDY))


# ---------------------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------------------

def test_no_compilation_after_warmup_with_held_and_given_tokens(runner):
    assert runner.compiled_at_warmup == len(runner.shapes())
    mixed = lambda a, seq: (seq + ord(a.rid)) % 3 != 0  # noqa: E731
    _, pub = run(runner, mixed)
    assert pub.stats["held"] and pub.stats["given"]
    assert runner.compiled_shapes() == runner.compiled_at_warmup
