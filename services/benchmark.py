"""``dpbus bench``: a serving benchmark any user can point at a running deployment.

A seeded workload (random prompt and output lengths around ``--input-len`` and
``--output-len``, prompts of random token ids, greedy, ``ignore_eos`` so every answer has
its planned length) sent at a fixed concurrency or at a Poisson request rate. It reports
request throughput, output tokens/s, time to first token (TTFT), inter-token latency
(ITL), time per output token (TPOT) and end-to-end latency percentiles, and errors by
code, as a table and as JSON.

ITL is the time between two tokens reaching the client, so it shows how tokens arrive:
a group whose overlapped steps are answered two at a time (seen on a CPU: the results of
steps k and k+1 reach the publisher together) delivers them in pairs, a fraction of a
millisecond apart, and its ITL p50 is then near 0. TPOT is each request's decode time
over its tokens, ``(last token - first token) / (tokens - 1)``: the decode speed a client
gets, whatever the bursts.

``--engine-only`` runs the same workload through the same scheduler and model runner in
this one process, with no bus at all: the yardstick for what the bus costs.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ACK_TIMEOUT = 5.0  # each request asks for `accepted` and is sent again while unheard: the retry rule clients follow


@dataclass
class Workload:
    requests: int = 64
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5  # lengths drawn uniformly from [len * (1 - ratio), len]
    concurrency: int = 8
    rate: float = 0.0  # requests/s with Poisson arrivals; 0: keep `concurrency` in flight
    seed: int = 0
    vocab: int = 256  # prompt ids drawn below this (the built-in model's bytes)

    def items(self) -> list[tuple[list[int], int]]:
        rng = random.Random(self.seed)

        def length(n: int) -> int:
            return max(1, rng.randint(int(n * (1 - self.range_ratio)), n))

        return [([rng.randrange(self.vocab) for _ in range(length(self.input_len))], length(self.output_len))
                for _ in range(self.requests)]

    def arrivals(self) -> list[float]:
        """Seconds after the start at which each request is sent (rate mode)."""
        rng, t, out = random.Random(self.seed + 1), 0.0, []
        for _ in range(self.requests):
            out.append(t)
            t += rng.expovariate(self.rate) if self.rate > 0 else 0.0
        return out


def warm_up_workload(w: Workload, requests: int) -> Workload | None:
    """What a benchmark sends first and does not measure (None for 0 requests): a few
    requests shaped like ``w``. A first run in a fresh process otherwise times what it
    compiles, or loads from the compile cache, beyond the warm-up (measured: ``dpbus
    bench --engine-only`` gave 2,011 then 2,497 tokens/s on one workload, each run a fresh
    process, while the deployment it was compared with had warmed up long before)."""
    if requests <= 0:
        return None
    return Workload(requests, w.input_len, w.output_len, w.range_ratio, min(requests, w.concurrency or requests),
                    seed=w.seed + 99, vocab=w.vocab)


@dataclass
class Record:
    sent: float = 0.0
    tokens: list[float] = field(default_factory=list)  # when each token arrived
    first_chunk: int = 1  # tokens in the first chunk: all stamped when it came (the first one's TTFT)
    end: float = 0.0
    error: str = ""
    output_tokens: int = 0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}


def summarize(records: list[Record], elapsed: float, mode: str, w: Workload) -> dict[str, Any]:
    ok = [r for r in records if not r.error]
    ttft = [(r.tokens[0] - r.sent) * 1000 for r in ok if r.tokens]
    # within the first chunk nothing tells when its tokens were sampled: no interval there
    itl = [(b - a) * 1000 for r in ok for a, b in zip(r.tokens[r.first_chunk - 1:], r.tokens[r.first_chunk:])]
    tpot = [(r.tokens[-1] - r.tokens[0]) * 1000 / (len(r.tokens) - 1) for r in ok if len(r.tokens) > 1]
    e2e = [(r.end - r.sent) * 1000 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {"mode": mode, "requests": len(records), "completed": len(ok), "seconds": elapsed,
            "concurrency": w.concurrency if not w.rate else None, "rate": w.rate or None,
            "request_throughput": len(ok) / elapsed if elapsed else 0.0,
            "output_tokens_per_s": out_tokens / elapsed if elapsed else 0.0, "output_tokens": out_tokens,
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "tpot_ms": percentiles(tpot),
            "e2e_ms": percentiles(e2e),
            "errors": dict(Counter(r.error for r in records if r.error))}


async def _paced(w: Workload, run_one, progress) -> tuple[list[Record], float]:
    """Send the workload at its concurrency or rate; run_one(i, ids, n, record) does one."""
    items = w.items()
    records = [Record() for _ in items]
    gate = asyncio.Semaphore(w.concurrency if not w.rate else len(items))
    start = time.perf_counter()

    async def one(i: int, at: float) -> None:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            await run_one(i, *items[i], records[i])
        progress()

    await asyncio.gather(*(one(i, at) for i, at in enumerate(w.arrivals())))
    return records, time.perf_counter() - start


def token_times(before: list[float], now: float, n: int) -> list[float]:
    """Arrival times for the ``n`` tokens of a chunk that came at ``now``: spread evenly since
    the chunk before (a publisher streaming several tokens per chunk sampled them one step
    apart), all at ``now`` for the first chunk (its first token is the TTFT)."""
    if not before or n == 1:
        return [now] * n
    last = before[-1]
    return [last + (now - last) * (k + 1) / n for k in range(n)]


async def bench_system(nc: Any, w: Workload, prefix: str = "dpbus", progress=lambda: None,
                       timeout: float = 600.0, dp_rank: int | None = None) -> dict[str, Any]:
    """The workload through a running dpbus (``nc``: a connected client); ``dp_rank``: every
    request pinned to that group."""
    from dpbus.schemas import Chunk, Done, Subjects
    from dpbus.services.client import NoResponders, Streams

    streams = await Streams(nc, Subjects(prefix), timeout).start()
    run = uuid.uuid4().hex[:8]  # rids unique to this run: a repeated rid is a duplicate, never answered twice

    async def run_one(i: int, ids: list[int], n: int, rec: Record) -> None:
        rec.sent = time.perf_counter()
        try:
            pin = {} if dp_rank is None else {"dp_rank": dp_rank}
            answers = await streams.send({"rid": f"bench-{run}-{i}", "input_ids": ids, "stream": True, **pin,
                                          "sampling": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}},
                                         ack_timeout=ACK_TIMEOUT)
            async with asyncio.timeout(timeout):
                async for ans in answers:  # stamped with when it reached this process, not when read
                    record(rec, ans, answers.arrived)
        except NoResponders:
            rec.error = "no_responders"
        except Exception as e:  # noqa: BLE001 - a time-out, a lost connection
            rec.error = type(e).__name__

    def record(rec: Record, ans: Any, now: float) -> None:
        if isinstance(ans, Chunk):
            if not rec.tokens:
                rec.first_chunk = len(ans.token_ids)
            rec.tokens.extend(token_times(rec.tokens, now, len(ans.token_ids)))
            return
        rec.end = now
        if isinstance(ans, Done):
            rec.output_tokens = ans.completion_tokens
        else:
            rec.error = ans.code.value

    try:
        records, elapsed = await _paced(w, run_one, progress)
    finally:
        await streams.stop()
    return summarize(records, elapsed, "system", w)


def bench_engine(w: Workload, engine: Any, progress=lambda: None, steps_in_flight: int = 2) -> dict[str, Any]:
    """The same workload through a group's step core (``GroupEngine``: the publisher's
    scheduler, row tables and stepper) and the model runner in this process, no bus:
    requests join as they arrive (or as others finish, at a fixed concurrency). Up to
    ``steps_in_flight`` steps are launched before the oldest one's tokens are taken (1:
    one step after another), as a publisher keeps them; the worker's page tables turn
    each step into the runner's items, as off the wire."""
    from collections import deque

    from dpbus.schemas.internal import StepResult, token_digest
    from dpbus.schemas.public import SamplingParams
    from dpbus.services.publisher.engine import GroupEngine
    from dpbus.services.publisher.scheduler import Scheduler, Sequence
    from dpbus.services.publisher.stepper import Stepper
    from dpbus.services.publisher.tables import RowTables
    from dpbus.services.settings import total_pages
    from dpbus.services.worker.tables import PageTables

    s, runner = engine.settings, engine.runner
    group = GroupEngine(Scheduler(s.max_running_requests, s.max_prefill_tokens, 1 << 30, runner.cfg.max_seq_len,
                                  total_pages(s, runner.cfg.max_seq_len), s.page_size),
                        RowTables(s.max_running_requests), Stepper(0, [0], steps_in_flight), steps_in_flight)
    tables = PageTables(s.max_running_requests)
    items, arrivals = w.items(), w.arrivals()
    records = [Record() for _ in items]
    by_rid: dict[str, int] = {}
    launched: deque = deque()  # (step, its launch on the device), oldest first
    start = time.perf_counter()
    next_i, in_flight = 0, 0
    while next_i < len(items) or group.has_work() or launched:
        now = time.perf_counter() - start
        while next_i < len(items) and (in_flight < w.concurrency if not w.rate else arrivals[next_i] <= now):
            ids, n = items[next_i]
            rid = f"e{next_i}"
            group.add(Sequence(rid, ids, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True),
                               time.time()))
            by_rid[rid] = next_i
            records[next_i].sent = time.perf_counter()
            next_i += 1
            in_flight += 1
        while out := group.plan(time.time()):
            launched.append((out, runner.launch(*tables.apply(out.step))))
        if not launched:
            time.sleep(min(0.001, max(arrivals[next_i] - now, 0)) if next_i < len(items) else 0)
            continue
        out, running = launched.popleft()
        pre, dec = running.tokens()
        group.on_reply(StepResult(out.step.epoch, out.number, 0, pre, dec, 0.0, token_digest(pre, dec)))
        now = time.perf_counter()
        for seq, _token, reason in group.take_settled()[1]:
            rec = records[by_rid[seq.rid]]
            rec.tokens.append(now)
            if reason is not None:
                rec.end, rec.output_tokens = now, len(seq.output)
                in_flight -= 1
                progress()
    return summarize(records, time.perf_counter() - start, "engine-only", w)


@dataclass
class Engine:
    settings: Any
    runner: Any


def load_engine(settings: Any, devices: list | None = None) -> Engine:
    """A model runner as a one-process group's worker builds it (dummy weights unless a
    model path is set), warmed up, over ``devices`` (default: all of this process's)."""
    from dpbus.services import logs
    from dpbus.services.worker.service import load_runner

    log = logs.configure("warning", True)
    return Engine(settings, load_runner(settings, log, devices))


def table(results: list[dict[str, Any]]):
    from rich.table import Table

    t = Table(title="dpbus bench")
    for col in ("mode", "concurrency / rate", "done", "req/s", "out tok/s", "TTFT p50/p90/p99 ms",
                "ITL p50/p90/p99 ms", "TPOT p50/p99 ms", "E2E p50/p99 ms", "errors"):
        t.add_column(col)
    for r in results:
        q = lambda k: "/".join(f"{r[k][p]:.1f}" for p in ("p50", "p90", "p99"))  # noqa: E731
        t.add_row(r["mode"], str(r["concurrency"] or f"{r['rate']}/s"), f"{r['completed']}/{r['requests']}",
                  f"{r['request_throughput']:.2f}", f"{r['output_tokens_per_s']:.0f}", q("ttft_ms"), q("itl_ms"),
                  f"{r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f}",
                  f"{r['e2e_ms']['p50']:.0f}/{r['e2e_ms']['p99']:.0f}",
                  ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-")
    return t
