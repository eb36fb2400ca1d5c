"""Steps that carry row changes only, checked end to end without NATS: the real
scheduler plans, the publisher's ``RowTables`` encodes, the step goes through msgpack,
and real ``Worker`` objects (their step classification and page tables; a fake runner
in place of the model) rebuild the runner's items. Those must be exactly the items of
the scheduler's plan, which is what the old protocol sent whole, through prefill chunks,
decode, preemption, finishes, stops, aborts, prefix-cache sharing, workers that miss
steps and replay them, workers that join midway, and new epochs.

And the point of it all: a step's size follows what changed, not the context length."""

from __future__ import annotations

import random
import time
import types

import msgspec
import pytest

from dpbus.schemas import FinishReason
from dpbus.schemas.internal import (
    DecodeItem, DecodeRow, PrefillChunk, PrefillItem, RowPages, RowSampling, RowStart, Step, pack, unpacker,
)
from dpbus.services import logs
from dpbus.services.publisher.scheduler import Plan, Scheduler
from dpbus.services.publisher.tables import RowTables
from dpbus.services.publisher.service import Publisher
from dpbus.services.settings import PublisherSettings, WorkerSettings
from dpbus.services.worker.ordering import GAP, REPEAT, STALE
from dpbus.services.worker.service import Worker
from dpbus.services.worker.tables import PageTables
from tests.test_scheduler import PagedFake, check_pages, expected_output, mkseq, mksched, varied_prompt

LOG = logs.configure("warning", json=True)
G = RowSampling(0.0, 1.0, 0, 0)
decode_step = unpacker(Step)


class LegacyStep(msgspec.Struct):
    """The step as it was: every item with its sequence's whole page list."""

    epoch: int
    seq: int
    prefill: list[PrefillItem] = []
    decode: list[DecodeItem] = []


def legacy_bytes(epoch: int, seq: int, plan: Plan) -> int:
    return len(pack(LegacyStep(epoch, seq, [i for _, i in plan.prefill], [i for _, i in plan.decode])))


class Runner:
    """Stands in for the model runner: checks the items it is given against the plan's,
    and (for the worker that drives the scheduler) answers through ``PagedFake``."""

    def __init__(self, expected: dict, model: PagedFake | None = None) -> None:
        self.expected, self.model = expected, model
        self.key: tuple[int, int] = (0, 0)
        self.plan: Plan | None = None

    def step(self, prefill: list[PrefillItem], decode: list[DecodeItem]) -> tuple[list[int], list[int]]:
        want_prefill, want_decode = self.expected[self.key]
        assert all(it.row >= 0 for it in [*prefill, *decode]), "the worker's items carry their rows"
        assert (rowless(prefill), rowless(decode)) == (rowless(want_prefill), rowless(want_decode)), \
            f"step {self.key}: items differ from the plan's"
        if self.model is None:
            return [-1] * len(prefill), [0] * len(decode)
        rebuilt = Plan([(seq, item) for (seq, _), item in zip(self.plan.prefill, prefill)],
                       [(seq, item) for (seq, _), item in zip(self.plan.decode, decode)])
        return self.model.run(rebuilt)

    def launch(self, prefill: list[PrefillItem], decode: list[DecodeItem]):
        tokens = self.step(prefill, decode)
        return types.SimpleNamespace(tokens=lambda: tokens, at=time.monotonic())


def rowless(items: list) -> list:
    """The items without their rows (the plan's name sequences, the worker's name rows)."""
    return [msgspec.structs.replace(it, row=-1) for it in items]


class Follower:
    """A real ``Worker`` (not connected) taking packed steps: a gap is filled from the
    publisher's steps of the epoch, as ``Worker.take_step`` does through the replay window."""

    def __init__(self, max_rows: int, expected: dict, window: dict, model: PagedFake | None = None) -> None:
        self.worker = Worker(WorkerSettings(max_running_requests=max_rows), LOG)
        self.worker.runner = Runner(expected, model)
        self.window = window
        self.replayed = 0

    def take(self, data: bytes, plan: Plan | None = None):
        w = self.worker
        step = decode_step.decode(data)
        kind = w.order.classify(step.epoch, step.seq)
        if kind in (REPEAT, STALE):
            return None
        todo = [step]
        if kind == GAP:
            todo = [decode_step.decode(self.window[(step.epoch, n)]) for n in w.order.missing(step.seq)] + todo
            self.replayed += len(todo) - 1
        for s in todo:
            w.runner.key, w.runner.plan = (s.epoch, s.seq), plan
            result = w.run_step(s)
            w.order.ran(s.seq, b"")
        return result

    def table(self) -> dict[int, list[int]]:
        return {row: r.pages for row, r in self.worker.tables.rows.items()}


def run_group(seed: int, steps: int = 500, *, max_running: int = 4, budget: int = 10, max_len: int = 40,
              num_pages: int = 13, page_size: int = 4, prefix_cache: bool = True, resets: bool = True) -> dict:
    rng = random.Random(seed)
    sched = mksched(max_running=max_running, max_prefill=budget, max_waiting=6, max_seq_len=max_len,
                    num_pages=num_pages, page_size=page_size, prefix_cache=prefix_cache)
    tables = RowTables(max_running)
    expected: dict[tuple[int, int], tuple[list, list]] = {}
    window: dict[tuple[int, int], bytes] = {}
    model = PagedFake(page_size, shared=prefix_cache)
    leader = Follower(max_running, expected, window, model)
    steady = Follower(max_running, expected, window)
    lossy = Follower(max_running, expected, window)
    late = Follower(max_running, expected, window)
    epoch, number, n = 1, 0, 0
    done: dict[str, FinishReason] = {}
    added, ended, stats = [], [], {"epochs": 1, "joins": 0, "stops": 0, "started": 0, "grown": 0, "freed": 0}
    while n < steps or sched.has_work():
        n += 1
        assert n < steps + 2000, "never finished"
        if n < steps and rng.random() < 0.35:
            q = mkseq(f"r{n}", n_prompt=1, max_new_tokens=rng.randint(1, 20), stop_token_ids=[3])
            q.prompt = varied_prompt(rng, max_len, added) if prefix_cache else \
                [(i % 200) + 10 for i in range(rng.randint(1, max_len - 1))]
            if sched.add(q):
                added.append(q)
        live = [*sched.waiting, *sched.running]
        if n < steps and rng.random() < 0.04 and live:
            sched.abort(rng.choice(live).rid)
        for q in sched.take_aborted():
            done[q.rid] = FinishReason.ABORT
        if resets and n < steps and rng.random() < 0.02 and sched.running:  # the group fails: a new epoch
            for q in sched.take_all():
                done[q.rid] = FinishReason.ABORT  # (a real publisher moves or fails them)
            epoch, number = epoch + 1, 0
            tables.reset()
            stats["epochs"] += 1
        plan = sched.build_step(float(n))
        if not plan:
            continue
        check_pages(sched, plan)
        number += 1
        step = tables.step(epoch, number, plan, sched.running)
        for what in ("started", "grown", "freed"):
            stats[what] += len(getattr(step, what))
        data = window[(epoch, number)] = pack(step)
        assert len(data) <= bound(step), "a step bigger than its changes"
        expected[(epoch, number)] = ([i for _, i in plan.prefill], [i for _, i in plan.decode])
        result = leader.take(data, plan)
        steady.take(data)
        steady.take(data)  # a repeat changes nothing
        if rng.random() < 0.7 or n >= steps:
            lossy.take(data)
        if rng.random() < 0.03:  # a worker (re)starts midway through the epoch: it replays from step 1
            late = Follower(max_running, expected, window)
            stats["joins"] += 1
        if rng.random() < 0.8 or n >= steps:
            late.take(data)
        events = sched.apply(plan, result.prefill_tokens, result.decode_tokens)
        for q, _, reason in events:
            if reason is None and rng.random() < 0.02:  # a stop string: it leaves before the next step
                sched.stop_early(q)
                reason = FinishReason.STOP
                stats["stops"] += 1
                ended.append(q.rid)
            if reason is not None:
                done[q.rid] = reason
        check_pages(sched)
        for seq in sched.running:  # the workers' table of each row is its sequence's page list
            row = tables.row(seq)
            if row is not None:
                assert leader.table()[row] == seq.pages
        for other in (steady, lossy, late):
            if (other.worker.order.epoch, other.worker.order.last_seq) == (epoch, number):
                assert other.table() == leader.table()
    for q in added:
        want, reason = expected_output(q, max_len)
        if done[q.rid] == FinishReason.ABORT or q.rid in ended:
            assert q.output == want[:len(q.output)]
        else:
            assert (q.output, done[q.rid]) == (want, reason), q.rid
    return {**stats, "added": len(added), "preemptions": sched.preemptions, "hit_tokens": sched.hit_tokens,
            "replayed": lossy.replayed + late.replayed}


def bound(step: Step) -> int:
    """Bytes a step may take: a few per change (a msgpack number is 1 to 5 bytes, a row's
    sampling about 30), nothing per page or token it does not carry."""
    return (16 + 5 * len(step.freed) + sum(40 + 5 * len(r.pages) for r in step.started)
            + sum(8 + 5 * len(g.pages) for g in step.grown) + sum(16 + 5 * len(c.token_ids) for c in step.prefill)
            + 24 * len(step.decode))


@pytest.mark.parametrize("seed, page_size, num_pages, prefix_cache",
                         [(1, 4, 13, True), (2, 1, 45, True), (3, 16, 4, True), (4, 4, 11, False), (5, 2, 30, True)])
def test_workers_rebuild_exactly_the_page_lists_of_the_plan(seed, page_size, num_pages, prefix_cache):
    stats = run_group(seed, page_size=page_size, num_pages=num_pages, prefix_cache=prefix_cache)
    print(stats)
    assert stats["added"] > 60 and stats["preemptions"] > 0 and stats["epochs"] > 1 and stats["stops"] > 0
    assert stats["joins"] > 0 and stats["replayed"] > 0 and stats["grown"] > 0 and stats["freed"] > 0
    assert stats["hit_tokens"] > 0 or not prefix_cache


def test_rows_are_numbered_from_zero_and_reused_once_freed():
    s = mksched(max_running=3, prefix_cache=False)
    tables = RowTables(3)
    for rid in "abc":
        s.add(mkseq(rid, n_prompt=4, max_new_tokens=2 if rid == "b" else 9))
    plan = s.build_step(0.0)
    step = tables.step(1, 1, plan, s.running)
    assert [r.row for r in step.started] == [0, 1, 2] and [c.row for c in step.prefill] == [0, 1, 2]
    assert [r.pages for r in step.started] == [q.pages for q in s.running]
    s.apply(plan, [7, 7, 7], [])
    plan = s.build_step(0.0)  # position 4 starts a second page for everyone
    step = tables.step(1, 2, plan, s.running)
    assert step.started == [] and step.freed == []
    assert step.grown == [RowPages(i, [q.pages[1]]) for i, q in enumerate(s.running)]
    assert step.decode == [DecodeRow(i, 7, 4, 1) for i in range(3)]
    s.apply(plan, [], [7, 7, 7])  # "b" has its two tokens: it leaves
    s.add(mkseq("d", n_prompt=4))
    plan = s.build_step(0.0)
    step = tables.step(1, 3, plan, s.running)
    assert step.freed == [1] and [r.row for r in step.started] == [1]  # d takes b's row in the same step
    assert [d.row for d in step.decode] == [0, 2] and step.prefill == [PrefillChunk(1, 0, s.running[-1].prompt, True)]
    tables.reset()
    step = tables.step(2, 1, s.build_step(0.0), s.running)
    assert sorted(r.row for r in step.started) == [0, 1, 2]  # a new epoch starts every row again


def test_the_publisher_starts_every_epoch_with_no_rows():
    pub = Publisher(PublisherSettings(max_running_requests=4, max_seq_len=64), LOG)
    s = pub.sched
    s.add(mkseq("a"))
    plan = s.build_step(0.0)
    first = decode_step.decode(pub.stepper.next_step(pub.engine.pack_step(plan), []))
    [a] = s.running
    assert first.epoch > 0 and first.seq == 1
    assert [r.row for r in first.started] == [0] and pub.tables.row(a) == 0
    s.take_all()  # the group fails (or the lease is lost): the next step starts a new epoch
    pub.stepper.reset()
    again = decode_step.decode(pub.stepper.next_step(pub.engine.pack_step(s.build_step(0.0)), []))
    assert (again.epoch, again.seq) == (first.epoch + 1, 1) and not pub.tables.rows and pub.tables.row(a) is None


def test_a_page_list_that_shrank_is_refused():
    s = mksched(prefix_cache=False)
    tables = RowTables(4)
    s.add(mkseq("a", n_prompt=6, max_new_tokens=9))
    plan = s.build_step(0.0)
    tables.step(1, 1, plan, s.running)
    s.apply(plan, [7], [])
    plan = s.build_step(0.0)
    plan.decode[0][1].pages = plan.decode[0][1].pages[:1]
    with pytest.raises(ValueError, match="changed other than by growing"):
        tables.step(1, 2, plan, s.running)


def test_worker_tables_refuse_a_step_that_does_not_fit_and_stay_as_they_were():
    t = PageTables(4)
    t.apply(Step(1, 1, started=[RowStart(0, [1, 2], G)], prefill=[PrefillChunk(0, 0, [5] * 8, True)]))
    bad = [
        Step(1, 2, freed=[1]),                                        # a row not in use
        Step(1, 2, started=[RowStart(0, [3], G)]),                    # a row in use
        Step(1, 2, started=[RowStart(4, [3], G)]),                    # outside the rows
        Step(1, 2, grown=[RowPages(2, [3])]),                         # grows a row not in use
        Step(1, 2, decode=[DecodeRow(3, 1, 8, 1)]),                   # runs a row not in use
        Step(1, 2, freed=[0], decode=[DecodeRow(0, 1, 8, 1)]),        # runs a row it freed
        Step(1, 2, decode=[DecodeRow(0, 1, 8, 1), DecodeRow(0, 1, 8, 1)]),  # the same row twice
        Step(1, 2, grown=[RowPages(0, [3])], freed=[0, 0]),           # frees a row twice
    ]
    for step in bad:
        with pytest.raises(ValueError):
            t.apply(step)
        assert {row: r.pages for row, r in t.rows.items()} == {0: [1, 2]}
    prefill, decode = t.apply(Step(1, 2, grown=[RowPages(0, [3])], decode=[DecodeRow(0, 9, 8, 1)]))
    assert prefill == [] and decode == [DecodeItem(9, 8, 1, [1, 2, 3], G, row=0)]
    t.apply(Step(1, 3, freed=[0], started=[RowStart(0, [4], G)]))
    assert t.pages(0) == [4]


# ---------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------

def long_context_group(rows: int, context: int, page_size: int = 16) -> tuple[Scheduler, RowTables, list]:
    """``rows`` requests of ``context - 64`` prompt tokens each, all admitted and prefilled
    in one step; returns the scheduler (every row decoding), its tables and the log of
    (step, plan) so far."""
    prompt = context - 64  # a multiple of the page size: the first decode starts a page
    sched = Scheduler(rows, rows * prompt, rows, context, rows * (context // page_size) + 1, page_size,
                      prefix_cache=False, max_start_pages=rows * context)
    for i in range(rows):
        q = mkseq(f"r{i}", n_prompt=1, max_new_tokens=60, ignore_eos=True)
        q.prompt = [10 + (i + j) % 200 for j in range(prompt)]
        sched.add(q)
    tables = RowTables(rows)
    plan = sched.build_step(0.0)
    step = tables.step(1, 1, plan, sched.running)
    sched.apply(plan, [7] * len(plan.prefill), [])
    return sched, tables, [(step, plan)]


def decode_steps(sched: Scheduler, tables: RowTables, n: int) -> list[tuple[Step, Plan]]:
    out = []
    for number in range(2, n + 2):
        plan = sched.build_step(0.0)
        out.append((tables.step(1, number, plan, sched.running), plan))
        sched.apply(plan, [], [7] * len(plan.decode))
    return out


@pytest.mark.parametrize("rows, context", [(64, 32768)])
def test_a_decode_step_stays_small_at_a_long_context(rows, context):
    sched, tables, log = long_context_group(rows, context)
    steps = decode_steps(sched, tables, 20)
    before = [legacy_bytes(1, step.seq, plan) for step, plan in steps]
    growing = [len(pack(step)) for step, _ in steps if len(step.grown) == rows]
    quiet = [len(pack(step)) for step, _ in steps if not step.grown]
    print(f"{rows} rows x {context} context: decode step {min(quiet)}..{max(quiet)} bytes, "
          f"one page more for every row {max(growing)} bytes; whole page lists: {max(before)} bytes")
    assert all(len(step.decode) == rows and not step.started and not step.freed for step, _ in steps)
    assert growing and quiet  # the first decode starts a page for every row, the next 15 do not
    assert max(quiet) <= rows * 16  # a row costs a few bytes: row, token, position, counter
    assert max(growing) <= rows * 24  # plus its new page
    assert min(before) > rows * (context // 16) * 2  # each row's ~2,000 pages, as it was
    # the size does not follow the context: the same batch at a short context is as big
    short, short_tables, _ = long_context_group(rows, 1024)
    short_quiet = [len(pack(step)) for step, _ in decode_steps(short, short_tables, 20) if not step.grown]
    assert max(quiet) <= max(short_quiet) + rows  # (a wider position number at most)


def test_a_step_that_starts_a_row_carries_its_pages_once():
    """A new row's pages (a long prefix-cache hit, say) go out in the step it starts in,
    never again."""
    sched, tables, log = long_context_group(4, 8192)
    first, _ = log[0]
    assert [len(r.pages) for r in first.started] == [(8192 - 64) // 16] * 4
    later = decode_steps(sched, tables, 3)
    assert all(not step.started for step, _ in later)
    assert sum(len(g.pages) for step, _ in later for g in step.grown) == 4  # one page each, once
