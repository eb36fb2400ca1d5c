"""What ordered step delivery costs: per step, the time from publishing a step to having
every member's acknowledgement, against the leader's own compute time, measured by the
publisher while the real system serves a steady load. Groups of 1 and of 2 processes."""

from __future__ import annotations

import asyncio
import json

import nats

from services.client import generate
from services.launcher import Cluster


async def measure(nnodes: int, requests: int = 48) -> dict:
    # logs in a directory of the cluster's own: removed after a clean stop, kept otherwise
    cluster = Cluster(dp_size=1, nnodes=nnodes, local_devices=1, nats_port=0, say=lambda _: None,
                      extra={"DPBUS_MAX_SEQ_LEN": "256"})
    try:
        await cluster.start(timeout=300)
        nc = await nats.connect(cluster.nats_url, **cluster.auth("client").kwargs(cluster.nats_url))
        req = {"text": "measure the bus", "sampling": {"max_new_tokens": 64, "ignore_eos": True, "temperature": 0}}
        await asyncio.gather(*(generate(nc, req) for _ in range(requests)))
        await nc.close()
        nc = await nats.connect(cluster.nats_url, **cluster.auth("operator").kwargs(cluster.nats_url))
        msg = await nc.request("$SRV.STATS.dpbus-publisher", b"", timeout=5)
        stats = json.loads(msg.data)["endpoints"][0]["data"]
        await nc.close()
    finally:
        cluster.stop()
    steps = stats["steps"]
    step_ms = stats["step_ms_total"] / steps
    compute_ms = stats["compute_ms_total"] / steps
    return {"nodes_per_group": nnodes, "steps": steps, "step_ms": step_ms, "compute_ms": compute_ms,
            "delivery_overhead_ms": step_ms - compute_ms, "overhead_fraction": (step_ms - compute_ms) / step_ms,
            "resent": stats["resent"], "replayed": stats["replayed"]}


def run() -> list[dict]:
    out = []
    for nnodes in (1, 2):
        r = asyncio.run(measure(nnodes))
        out.append(r)
        print(f"group of {nnodes} process(es): step {r['step_ms']:.2f} ms = compute {r['compute_ms']:.2f} ms + "
              f"delivery {r['delivery_overhead_ms']:.2f} ms ({r['overhead_fraction'] * 100:.0f}%) over "
              f"{r['steps']} steps; resent {r['resent']}, replayed {r['replayed']}")
    return out


if __name__ == "__main__":
    run()
