"""Resident memory of every process of a running dpbus (as ``dpbus up`` starts it: two
groups of one worker process with two devices each, ingest, the gateway, NATS), after a
few requests went through, next to what the model itself needs: its weights and a
group's KV cache (every page of the pool). Read from ``/proc/<pid>/status``: VmRSS now,
VmHWM the peak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def model_bytes(max_seq_len: int) -> dict:
    """The default model's weights (f32) and one group's KV cache pool (f32, K and V)."""
    from dpbus.services.model_config import ModelConfig
    from dpbus.services.settings import WorkerSettings, total_pages

    import jax

    from dpbus.services.worker.model import dummy_weights

    cfg = ModelConfig(max_seq_len=max_seq_len)
    s = WorkerSettings()
    leaves = jax.tree.leaves(dummy_weights(cfg, 0))
    params = sum(x.size for x in leaves)
    L = cfg.n_layers
    pages = total_pages(s, cfg.max_seq_len)
    kv = pages * s.page_size * cfg.n_kv_heads * cfg.head_dim * 2 * 4 * L
    return {"parameters": params, "weights_bytes": sum(x.nbytes for x in leaves), "kv_pages": pages, "kv_cache_bytes": kv}


def run(requests: int = 16) -> dict:
    from dpbus.services import bus
    from dpbus.services.client import generate
    from dpbus.services.launcher import Cluster, free_port

    out: dict = {"processes": {}}
    with tempfile.TemporaryDirectory(prefix="dpbus-bench-memory-") as d:
        cluster = Cluster(dp_size=2, nnodes=2, local_devices=2, log_dir=Path(d), nats_port=0, http_port=free_port(),
                          say=lambda _: None)
        try:
            asyncio.run(cluster.start(timeout=300))

            async def traffic() -> None:
                nc = await bus.connect_client(cluster.nats_url, auth=cluster.auth("client"))
                req = {"text": "how much memory", "sampling": {"max_new_tokens": 16, "temperature": 0}}
                await asyncio.gather(*(generate(nc, req) for _ in range(requests)))
                await nc.close()

            asyncio.run(traffic())
            for p in cluster.procs:
                pid = p.popen.pid
                out["processes"][p.name] = {"pid": pid, "rss_bytes": status_kib(pid, "VmRSS") * 1024,
                                            "peak_rss_bytes": status_kib(pid, "VmHWM") * 1024}
        finally:
            cluster.stop()
    out["model"] = model_bytes(1024)
    report(out)
    return out


def report(out: dict) -> None:
    m = out["model"]
    print(f"resident memory of a running dpbus (2 groups x 1 worker, 2 devices each), MiB; the model: weights "
          f"{m['weights_bytes'] / 2**20:.1f}, one group's KV cache {m['kv_cache_bytes'] / 2**20:.1f}:")
    for name, p in out["processes"].items():
        print(f"  {name:14} RSS {p['rss_bytes'] / 2**20:7.1f}  peak {p['peak_rss_bytes'] / 2**20:7.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16, help="requests sent before reading memory")
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = run(a.requests)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
