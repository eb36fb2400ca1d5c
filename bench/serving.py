"""The whole system over NATS against the engine alone, on the same workload, side by side
in one run: one group of one process (1 device), the default model, greedy, 64 new tokens
per request, at concurrency 8 and 32 (`dpbus bench` and `dpbus bench --engine-only`).
Each side runs twice: with overlapped steps (the default, two in flight) and one step at
a time (``--steps-in-flight 1``), to show what the overlap buys; each is compared with the
other side doing the same."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path


def start_clusters(stack, extras: dict[str, dict[str, str]], **layout) -> dict:
    """One deployment per key of ``extras`` (its services' DPBUS_* settings), each with its
    own embedded NATS on a free port and a temporary log directory, stopped with ``stack``."""
    from dpbus.services.launcher import Cluster

    clusters = {}
    for key, extra in extras.items():
        d = stack.enter_context(tempfile.TemporaryDirectory(prefix="dpbus-bench-"))
        cluster = Cluster(**layout, log_dir=Path(d), nats_port=0, say=lambda _: None, extra=extra)
        stack.callback(cluster.stop)
        asyncio.run(cluster.start(timeout=600))
        clusters[key] = cluster
    return clusters


def run(concurrencies=(8, 32), requests: int = 64, rounds: int = 3) -> dict:
    """Both systems (two steps in flight, one) run side by side, idle while the other works;
    each round measures every mode at each concurrency in turn, so that a slow spell of a
    shared machine hits every mode alike; each mode keeps its median round."""
    import contextlib
    import statistics

    import jax

    from dpbus.services import benchmark as b
    from dpbus.services import bus
    from dpbus.services.settings import WorkerSettings

    workloads = {c: b.Workload(requests=requests, input_len=128, output_len=64, range_ratio=0.0, concurrency=c,
                               seed=c) for c in concurrencies}
    modes = {"system": "2", "system_one_step": "1"}
    runs: dict = {k: {c: [] for c in concurrencies} for k in (*modes, "engine", "engine_one_step")}
    with contextlib.ExitStack() as stack:
        clusters = start_clusters(stack, {key: {"DPBUS_STEPS_IN_FLIGHT": n} for key, n in modes.items()},
                                  dp_size=1, nnodes=1, local_devices=1)
        engine = b.load_engine(WorkerSettings(), devices=jax.devices()[:1])

        async def measure() -> None:
            ncs = {k: await bus.connect_client(c.nats_url, auth=c.auth("client")) for k, c in clusters.items()}
            try:
                warm = b.warm_up_workload(workloads[concurrencies[0]], 8)
                for nc in ncs.values():
                    await b.bench_system(nc, warm)
                b.bench_engine(warm, engine)
                for _ in range(rounds):
                    for c, w in workloads.items():
                        for key, nc in ncs.items():
                            runs[key][c].append(await b.bench_system(nc, w))
                        runs["engine"][c].append(b.bench_engine(w, engine, steps_in_flight=2))
                        runs["engine_one_step"][c].append(b.bench_engine(w, engine, steps_in_flight=1))
            finally:
                for nc in ncs.values():
                    await nc.close()

        asyncio.run(measure())
    out: dict = {"rounds": rounds}
    for key, by_c in runs.items():
        out[key] = {}
        for c, results in by_c.items():
            median = statistics.median_low([r["output_tokens_per_s"] for r in results])
            out[key][c] = next(r for r in results if r["output_tokens_per_s"] == median)
            out[key][c]["rounds_tokens_per_s"] = [round(r["output_tokens_per_s"], 1) for r in results]
    tps = {k: {c: out[k][c]["output_tokens_per_s"] for c in concurrencies} for k in runs}
    # each side against the engine alone doing the same: overlapped with overlapped, one step
    # at a time with one step at a time
    out["ratio"] = {c: tps["system"][c] / tps["engine"][c] for c in concurrencies}
    out["ratio_one_step"] = {c: tps["system_one_step"][c] / tps["engine_one_step"][c] for c in concurrencies}
    return out


def report(out: dict) -> None:
    from bench import summary

    print("serving, 64 requests x 64 new tokens, prompt 128, one group of one process:")
    print("\n".join(summary.serving({"serving": out})))
