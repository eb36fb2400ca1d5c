"""The prefix cache against the real model: one workload through the real scheduler and
the real JAX model runner (steps run as a worker runs them), with the prefix cache on and
off; every request must produce exactly the same tokens both ways.

The workload has what can go wrong with shared pages: a shared system prompt under
concurrent requests, identical prompts at once, greedy and seeded sampling, a pool too
small for the batch (preemption and recompute), an abort in the middle of a prefill (and
the same prompt again later), prompts and outputs ending exactly on a page boundary, and
follow-up turns that re-send a whole conversation."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import jax
import pytest

from dpbus.schemas import SamplingParams
from dpbus.services.model_config import ModelConfig
from dpbus.services.publisher.scheduler import Scheduler, Sequence
from dpbus.services.worker.model import dummy_weights
from dpbus.services.worker.runner import ModelRunner, make_group_mesh

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

PAGE, MAX_LEN, MAX_RUNNING, MAX_PREFILL = 16, 256, 4, 64
NUM_PAGES = MAX_LEN // PAGE + 1  # one context: four requests of ~100 tokens preempt each other


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cfg = ModelConfig(max_seq_len=MAX_LEN)
    r = ModelRunner(cfg, make_group_mesh(jax.devices()[:1]), num_pages=NUM_PAGES, page_size=PAGE,
                    max_running_requests=MAX_RUNNING, max_prefill_tokens=MAX_PREFILL, host_weights=dummy_weights(cfg, 0))
    r.warmup()
    return r


@dataclass
class Ask:
    rid: str
    prompt: list[int]
    new: int
    temperature: float = 0.0
    seed: int = 1
    at: int = 0  # the step it arrives at (after ``after`` finished, if set)
    after: str = ""  # arrives when that request ended
    continues: bool = True  # and (a follow-up turn) its prompt is that request's prompt + output + this one
    abort_mid_prefill: bool = False
    extra: dict = field(default_factory=dict)


def workload() -> list[Ask]:
    rng = random.Random(12)
    tokens = lambda n: [rng.randrange(1, 256) for _ in range(n)]  # noqa: E731
    system = tokens(40)  # two and a half pages
    long = tokens(200)
    asks = [Ask(f"sys{i}", system + tokens(5 + 17 * i), 30, temperature=0.9 * (i % 2), seed=100 + i) for i in range(5)]
    asks += [Ask("same-a", system + tokens(0) + [7] * 30, 20, at=1), Ask("same-b", system + [7] * 30, 20, at=1)]
    asks += [Ask("boundary", tokens(48), 16, at=2),  # 48 + 16 = 64: ends on a page boundary
             Ask("boundary-next", tokens(0), 12, at=0, after="boundary"),  # its history (64) again, nothing new
             Ask("turn2", tokens(64), 24, after="sys0"), Ask("turn3", tokens(64), 24, after="turn2", temperature=0.7)]
    asks += [Ask("aborted", long, 10, at=3, abort_mid_prefill=True),
             Ask("long-again", long, 10, after="aborted", continues=False, temperature=0.8, seed=5)]
    return asks


def run(runner: ModelRunner, prefix_cache: bool) -> tuple[dict[str, list[int]], Scheduler]:
    s = Scheduler(MAX_RUNNING, MAX_PREFILL, 64, MAX_LEN, NUM_PAGES, PAGE, prefix_cache)
    asks = {a.rid: a for a in workload()}
    done: dict[str, list[int]] = {}
    seqs: dict[str, Sequence] = {}
    ready_at = {rid: a.at for rid, a in asks.items() if not a.after}
    for step in range(2000):
        for rid, at in list(ready_at.items()):
            if at <= step:
                a = asks[rid]
                prompt = seqs[a.after].prompt + seqs[a.after].output + a.prompt if a.after and a.continues else a.prompt
                sp = SamplingParams(max_new_tokens=a.new, temperature=a.temperature, seed=a.seed, ignore_eos=True)
                seqs[rid] = Sequence(rid, prompt, sp, 0.0)
                assert s.add(seqs[rid])
                del ready_at[rid]
        for rid, seq in seqs.items():
            if asks[rid].abort_mid_prefill and 0 < seq.prefilled < len(seq.prompt) and not seq.aborted:
                s.abort(rid)
        for seq in s.take_aborted():
            finished(seq, seq.rid, asks, done, ready_at, step)
        if not s.has_work() and not ready_at:
            return done, s
        plan = s.build_step(float(step))
        prefill = []
        for _, item in plan.prefill:  # as a worker runs a step
            token = runner.prefill(item)[0]
            prefill.append(token if item.sample else -1)
        decode = runner.decode([item for _, item in plan.decode])[0] if plan.decode else []
        for seq, _, reason in s.apply(plan, prefill, decode):
            if reason is not None:
                finished(seq, seq.rid, asks, done, ready_at, step)
    raise AssertionError(f"the workload never finished: {ready_at}, {[q.rid for q in s.waiting]}, "
                         f"{[q.rid for q in s.running]}")


def finished(seq: Sequence, rid: str, asks: dict[str, Ask], done: dict, ready_at: dict, step: int) -> None:
    done[rid] = list(seq.output)
    for a in asks.values():
        if a.after == rid:
            ready_at[a.rid] = step + 1


def test_the_same_tokens_with_the_prefix_cache_on_and_off(runner):
    off, s_off = run(runner, prefix_cache=False)
    on, s_on = run(runner, prefix_cache=True)
    print(f"prefill tokens computed: {s_off.prefill_tokens} off, {s_on.prefill_tokens} on "
          f"({s_on.hit_tokens} from the cache, {s_on.pool.evictions} evictions); "
          f"preemptions {s_off.preemptions} off, {s_on.preemptions} on")
    assert sorted(on) == sorted(off) == sorted(a.rid for a in workload())
    for rid in off:
        assert on[rid] == off[rid], rid
    assert on["aborted"] == off["aborted"] == []  # aborted before its first token, both ways
    assert all(len(off[a.rid]) == a.new for a in workload() if not a.abort_mid_prefill)
    assert s_off.preemptions > 0 and s_on.preemptions > 0
    assert s_on.hit_tokens > 0 and s_on.prefill_tokens < s_off.prefill_tokens
    assert s_off.hit_tokens == 0 and s_off.pool.cached_pages() == 0
    assert len(s_on.free_pages) == len(s_off.free_pages) == NUM_PAGES - 1  # nothing held at the end
