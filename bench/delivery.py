"""What ordered step delivery costs while the real system serves a steady load, groups of 1
and of 2 processes: the time the leader's device sits idle between the end of one forward
and the dispatch of the next (the worker's ``idle_ms``: with overlapped steps the next
step is usually there already), and the publisher's view (how often a step settles, and
how much of that the leader spent computing)."""

from __future__ import annotations

import asyncio
import json

import nats

from dpbus.services.client import generate
from dpbus.services.launcher import Cluster


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
        leader = {"node_rank": "0", "dp_rank": "0"}
        workers = [json.loads(m.data) for m in await gather_replies(nc, "$SRV.STATS.dpbus-worker")]
        device = next(w["endpoints"][0]["data"] for w in workers if all(w["metadata"].get(k) == v
                                                                        for k, v in leader.items()))
        await nc.close()
    finally:
        cluster.stop()
    steps = stats["steps"]
    step_ms = stats["step_ms_total"] / steps
    compute_ms = stats["compute_ms_total"] / steps
    busy = device["device_ms"] + device["idle_ms"]
    return {"nodes_per_group": nnodes, "steps": steps, "step_ms": step_ms, "compute_ms": compute_ms,
            "delivery_overhead_ms": step_ms - compute_ms, "overhead_fraction": (step_ms - compute_ms) / step_ms,
            "worker_steps": device["steps"], "device_ms": device["device_ms"] / device["steps"],
            "idle_between_forwards_ms": device["idle_ms"] / device["steps"],
            "idle_fraction": device["idle_ms"] / busy if busy else None,
            "resent": stats["resent"], "replayed": stats["replayed"]}


async def gather_replies(nc, subject: str, wait: float = 0.5) -> list:
    """Every answer to one request on ``subject`` within ``wait`` seconds (micro stats of
    every instance of a service)."""
    inbox, got = nc.new_inbox(), []

    async def on_reply(msg):
        got.append(msg)

    sub = await nc.subscribe(inbox, cb=on_reply)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return got


def run() -> list[dict]:
    out = []
    for nnodes in (1, 2):
        r = asyncio.run(measure(nnodes))
        out.append(r)
        print(f"group of {nnodes} process(es): the leader's device idle between two forwards "
              f"{r['idle_between_forwards_ms']:.3f} ms a step ({r['idle_fraction']:.1%}) next to "
              f"{r['device_ms']:.2f} ms computing; the publisher's view: a step settles every {r['step_ms']:.2f} ms, "
              f"{r['compute_ms']:.2f} ms of it computing, over {r['steps']} steps; resent {r['resent']}, "
              f"replayed {r['replayed']}")
    return out


if __name__ == "__main__":
    run()
