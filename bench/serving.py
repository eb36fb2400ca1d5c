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


def run(concurrencies=(8, 32), requests: int = 64) -> dict:
    import jax

    from services import benchmark as b
    from services import bus
    from services.launcher import Cluster
    from services.settings import WorkerSettings

    workloads = {c: b.Workload(requests=requests, input_len=128, output_len=64, range_ratio=0.0, concurrency=c,
                               seed=c) for c in concurrencies}
    out: dict = {"system": {}, "system_one_step": {}, "engine": {}, "engine_one_step": {}}
    for key, in_flight in (("system", "2"), ("system_one_step", "1")):
        with tempfile.TemporaryDirectory(prefix="dpbus-bench-") as d:
            cluster = Cluster(dp_size=1, nnodes=1, local_devices=1, log_dir=Path(d), nats_port=0,
                              say=lambda _: None, extra={"DPBUS_STEPS_IN_FLIGHT": in_flight})
            try:
                asyncio.run(cluster.start(timeout=300))

                async def system() -> None:
                    nc = await bus.connect_client(cluster.nats_url, auth=cluster.auth("client"))
                    try:
                        await b.bench_system(nc, b.Workload(requests=8, concurrency=8, seed=99))  # warm the path
                        for c, w in workloads.items():
                            out[key][c] = await b.bench_system(nc, w)
                    finally:
                        await nc.close()

                asyncio.run(system())
            finally:
                cluster.stop()
    engine = b.load_engine(WorkerSettings(), devices=jax.devices()[:1])
    b.bench_engine(b.Workload(requests=8, concurrency=8, seed=99), engine)  # warm
    for c, w in workloads.items():
        out["engine"][c] = b.bench_engine(w, engine, steps_in_flight=2)
        out["engine_one_step"][c] = b.bench_engine(w, engine, steps_in_flight=1)
    tps = {k: {c: out[k][c]["output_tokens_per_s"] for c in concurrencies} for k in out}
    # each side against the engine alone doing the same: overlapped with overlapped, one step
    # at a time with one step at a time
    out["ratio"] = {c: tps["system"][c] / tps["engine"][c] for c in concurrencies}
    out["ratio_one_step"] = {c: tps["system_one_step"][c] / tps["engine_one_step"][c] for c in concurrencies}
    return out


def report(out: dict) -> None:
    from bench import summary

    print("serving, 64 requests x 64 new tokens, prompt 128, one group of one process:")
    print("\n".join(summary.serving({"serving": out})))
