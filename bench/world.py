"""``--mlp-scope world`` against replicas (``group``), side by side in one run.

* weights per device: a mixture-of-experts model on 4 virtual devices, 2 groups of 2,
  each group a whole model (replicas) or the experts split over the groups (world);
* the agreement before each world step: two processes of one JAX job (gloo on CPU)
  gathering what each holds, alone, per call;
* serving: three deployments of 2 groups x 1 process x 1 device, the built-in model:
  replicas, a world (``--mlp-scope world``, its MLP layout picked per step:
  ``--world-layout per_step``) and a world always in the MAX_LEN layout (``max_len``, what
  ``auto`` picks on a CPU), the same workload through
  each, taking turns: balanced (ingest routes) and skewed (every request pinned to group
  0, the other group idle: in a world it still takes part in every step with an empty
  batch, and SUM_LEN leaves its padding out of the MLP).

Run alone: ``python -m bench.world`` (``make bench`` runs it as its "world" part).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _python(code: str, devices: int, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=HERE, env=env, stdout=subprocess.PIPE, text=True)


WEIGHTS = """
import json, jax
from dpbus.services.model_config import ModelConfig
from dpbus.services.worker import model
from dpbus.services.worker.runner import make_group_mesh
from dpbus.services.worker.world import make_world_mesh
cfg = ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_dim=512,
                  n_experts=16, n_experts_per_tok=2, moe_ffn_dim=256, norm_topk_prob=True, qk_norm=True,
                  sparse_layers=(1, 2, 3))
host = model.dummy_weights(cfg, 0)
def per_device(weights):
    total, experts = 0, 0
    for path, a in jax.tree_util.tree_leaves_with_path(weights):
        n = max(s.data.nbytes for s in a.addressable_shards)
        total += n
        experts += n if "moe_" in jax.tree_util.keystr(path) else 0
    return {"bytes": total, "expert_bytes": experts}
print(json.dumps({"replicas": per_device(model.place_weights(host, cfg, make_group_mesh(jax.devices()[:2]))),
                  "world": per_device(model.place_weights(host, cfg, make_world_mesh(2), scope="world"))}))
"""

AGREE = """
import json, sys, time, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from dpbus.services.worker.world import agree, make_world_mesh
mesh = make_world_mesh(2)
for _ in range(20):
    agree(mesh, [1, 1, 1, 4, 0, 0])
times = []
for i in range(300):
    t0 = time.perf_counter()
    agree(mesh, [1, 1, i, 4, 0, 0])
    times.append((time.perf_counter() - t0) * 1000)
times.sort()
print(json.dumps({"median_ms": times[len(times) // 2], "p90_ms": times[int(len(times) * 0.9)]}))
jax.distributed.shutdown()
"""


def weights() -> dict:
    p = _python(WEIGHTS, 4)
    out, _ = p.communicate(timeout=300)
    got = json.loads(out.strip().splitlines()[-1])
    got["expert_ratio"] = got["replicas"]["expert_bytes"] / got["world"]["expert_bytes"]
    return got


def agreement() -> dict:
    from dpbus.services.launcher import free_port

    where = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, where, str(r)], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu",
                                   "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return json.loads(outs[0].strip().splitlines()[-1])


def serving(concurrencies=(8, 32), requests: int = 32, output_len: int = 32, rounds: int = 2) -> dict:
    import contextlib

    from dpbus.services import benchmark as b
    from dpbus.services import bus
    from bench.serving import start_clusters

    deployments = {"group": {"DPBUS_MLP_SCOPE": "group"},
                   "world": {"DPBUS_MLP_SCOPE": "world", "DPBUS_WORLD_LAYOUT": "per_step"},
                   "world_max_len": {"DPBUS_MLP_SCOPE": "world", "DPBUS_WORLD_LAYOUT": "max_len"}}
    scopes = tuple(deployments)
    loads = {"balanced": None, "skewed": 0}
    runs: dict = {s: {ld: {c: [] for c in concurrencies} for ld in loads} for s in scopes}
    stats: dict = {}
    with contextlib.ExitStack() as stack:
        clusters = start_clusters(stack, deployments, dp_size=2, nnodes=2, local_devices=1)

        async def measure() -> None:
            ncs = {s: await bus.connect_client(c.nats_url, auth=c.auth("client")) for s, c in clusters.items()}
            try:
                for nc in ncs.values():
                    await b.bench_system(nc, b.Workload(requests=8, input_len=64, output_len=8, concurrency=8))
                for _ in range(rounds):
                    for c in concurrencies:
                        w = b.Workload(requests=requests, input_len=128, output_len=output_len, range_ratio=0.0,
                                       concurrency=c, seed=c)
                        for load, pin in loads.items():
                            for scope, nc in ncs.items():
                                runs[scope][load][c].append(await b.bench_system(nc, w, dp_rank=pin))
                stats.update(await world_stats(clusters["world"]))
            finally:
                for nc in ncs.values():
                    await nc.close()

        asyncio.run(measure())
    out: dict = {"rounds": rounds, "requests": requests, "output_len": output_len, "worker_stats": stats}
    for scope in scopes:
        out[scope] = {}
        for load in loads:
            out[scope][load] = {}
            for c in concurrencies:
                rs = runs[scope][load][c]
                median = statistics.median_low([r["output_tokens_per_s"] for r in rs])
                r = next(r for r in rs if r["output_tokens_per_s"] == median)
                out[scope][load][c] = {"output_tokens_per_s": r["output_tokens_per_s"], "ttft_ms_p50": r["ttft_ms"]["p50"],
                                       "rounds_tokens_per_s": [round(x["output_tokens_per_s"], 1) for x in rs]}
    return out


async def world_stats(cluster) -> dict:
    """The world workers' step counts and timings (nats.micro STATS, as the operator)."""
    from dpbus.services import bus

    op = await bus.connect_client(cluster.nats_url, auth=cluster.auth("operator"))
    try:
        docs = await bus.service_stats(op, "dpbus-worker", cluster.prefix)
    finally:
        await op.close()
    out = {}
    for doc in docs:
        data = doc["endpoints"][0]["data"]
        out[doc["metadata"]["dp_rank"]] = {"steps": data["steps"], "device_ms": data["device_ms"],
                                           **{k: data["world"][k] for k in ("world_steps", "ran", "sat_out", "idle",
                                                                            "sum_len", "max_len", "agree_ms")}}
    return out


def run() -> dict:
    out = {"weights": weights()}
    w = out["weights"]
    print(f"weights per device, MoE model on 2 groups x 2 devices: replicas {w['replicas']['bytes'] / 1e6:.2f} MB "
          f"(experts {w['replicas']['expert_bytes'] / 1e6:.2f} MB), world {w['world']['bytes'] / 1e6:.2f} MB "
          f"(experts {w['world']['expert_bytes'] / 1e6:.2f} MB): experts {w['expert_ratio']:.2f}x less")
    out["agreement"] = agreement()
    print(f"the agreement alone, 2 processes: {out['agreement']['median_ms']:.3f} ms median, "
          f"{out['agreement']['p90_ms']:.3f} ms p90 per world step")
    out["serving"] = serving()
    s = out["serving"]
    for load in ("balanced", "skewed"):
        for c in s["group"][load]:
            g, wd, wm = s["group"][load][c], s["world"][load][c], s["world_max_len"][load][c]
            print(f"serving {load:8s} concurrency {c:>2}: replicas {g['output_tokens_per_s']:.0f} tok/s "
                  f"(TTFT p50 {g['ttft_ms_p50']:.0f} ms), world {wd['output_tokens_per_s']:.0f} tok/s "
                  f"(TTFT p50 {wd['ttft_ms_p50']:.0f} ms): {wd['output_tokens_per_s'] / g['output_tokens_per_s']:.2f}x; "
                  f"world always MAX_LEN {wm['output_tokens_per_s']:.0f} tok/s: "
                  f"{wm['output_tokens_per_s'] / g['output_tokens_per_s']:.2f}x")
    for g, st in s["worker_stats"].items():
        print(f"world worker of group {g}: {st}")
    return out


if __name__ == "__main__":
    result = run()
    (HERE / "bench" / "results").mkdir(exist_ok=True)
    (HERE / "bench" / "results" / "world.json").write_text(json.dumps(result, indent=2))
