"""Multi-turn chat through the real system, to measure the prefix cache.

8 conversations run at once, 6 turns each. Every conversation starts with the same
512-token system prompt; each turn adds a 64-token user message, asks for 48 tokens
(greedy, EOS ignored) and re-sends the whole history as ``input_ids`` (as chat clients
do), at ``--max-seq-len 2048``. Measured in one run, each on a fresh system:

* one group, the prefix cache on vs off (``--no-prefix-cache``): prompt tokens the
  group computed, and time to first token (p50, from ingest's acceptance);
* four groups with the cache on, ``prefix_affinity`` vs ``least_tokens``: the fraction
  of prompt tokens found in the cache (hit rate) and generated tokens per second.

``python -m bench.multiturn`` runs only this (``make bench`` runs it with the rest) and
writes ``bench/results/multiturn.json``.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import nats

from dpbus.schemas import Done
from dpbus.services.client import generate
from dpbus.services.launcher import Cluster

RESULTS = Path(__file__).parent / "results"
SYSTEM, USER, ANSWER, CHATS, TURNS, MAX_SEQ_LEN = 512, 64, 48, 8, 6, 2048


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 256) for _ in range(n)]


async def chat(nc, system: list[int], rng: random.Random, outcomes: list) -> None:
    history = list(system)
    for turn in range(TURNS):
        history += tokens(rng, USER)
        out = await generate(nc, {"input_ids": history, "sampling": {"max_new_tokens": ANSWER, "temperature": 0,
                                                                      "ignore_eos": True}}, timeout=600)
        if not isinstance(out.terminal, Done):
            raise RuntimeError(f"turn {turn}: {out.terminal}")
        outcomes.append((turn, len(history), out.terminal))
        history += out.token_ids


async def publisher_stats(cluster: Cluster, groups: int) -> list[dict]:
    nc = await nats.connect(cluster.nats_url, **cluster.auth("operator").kwargs(cluster.nats_url))
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.STATS.dpbus-publisher", b"", reply=inbox)
    found = [json.loads((await sub.next_msg(timeout=5)).data)["endpoints"][0]["data"] for _ in range(groups)]
    await nc.close()
    return found


async def measure(groups: int, prefix_cache: bool, policy: str) -> dict:
    extra = {"DPBUS_MAX_SEQ_LEN": str(MAX_SEQ_LEN), "DPBUS_PREFIX_CACHE": str(prefix_cache).lower(),
             "DPBUS_POLICY": policy, "DPBUS_MAX_RUNNING_REQUESTS": str(CHATS)}
    cluster = Cluster(dp_size=groups, nnodes=groups, local_devices=1, say=lambda _: None, extra=extra, nats_port=0)
    try:
        await cluster.start(timeout=600)
        nc = await nats.connect(cluster.nats_url, **cluster.auth("client").kwargs(cluster.nats_url))
        rng = random.Random(0)
        system = tokens(rng, SYSTEM)
        outcomes: list = []
        t0 = time.perf_counter()
        await asyncio.gather(*(chat(nc, system, random.Random(c + 1), outcomes) for c in range(CHATS)))
        wall = time.perf_counter() - t0
        await nc.close()
        stats = await publisher_stats(cluster, groups)
    finally:
        cluster.stop()
    prompt_tokens = sum(n for _, n, _ in outcomes)
    ttft = [d.timings.ttft_ms for _, _, d in outcomes]
    return {"groups": groups, "prefix_cache": prefix_cache, "policy": policy, "requests": len(outcomes),
            "prompt_tokens": prompt_tokens, "prefill_tokens": sum(s["prefill_tokens"] for s in stats),
            "hit_tokens": sum(s["hit_tokens"] for s in stats), "evictions": sum(s["evictions"] for s in stats),
            "hit_rate": sum(s["hit_tokens"] for s in stats) / prompt_tokens,
            "ttft_p50_ms": statistics.median(ttft),
            "ttft_p50_ms_later_turns": statistics.median(d.timings.ttft_ms for t, _, d in outcomes if t > 0),
            "wall_s": wall, "tokens_per_s": sum(d.completion_tokens for _, _, d in outcomes) / wall,
            "requests_per_group": [s["done"] for s in stats]}


def table(runs: list[dict]) -> str:
    head = "| groups | policy | prefix cache | prefill tokens computed | hit rate | TTFT p50 ms | tokens/s |"
    rows = [head, "|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r['groups']} | {r['policy']} | {'on' if r['prefix_cache'] else 'off'} | "
                    f"{r['prefill_tokens']} of {r['prompt_tokens']} | {r['hit_rate']:.0%} | {r['ttft_p50_ms']:.0f} | "
                    f"{r['tokens_per_s']:.0f} |")
    return "\n".join(rows)


def run() -> dict:
    runs = [asyncio.run(measure(1, cache, "least_tokens")) for cache in (True, False)]
    runs += [asyncio.run(measure(4, True, policy)) for policy in ("prefix_affinity", "least_tokens")]
    on, off = runs[0], runs[1]
    out = {"workload": dict(system=SYSTEM, user=USER, answer=ANSWER, chats=CHATS, turns=TURNS,
                            max_seq_len=MAX_SEQ_LEN),
           "runs": runs,
           "prefill_tokens_off_over_on": off["prefill_tokens"] / on["prefill_tokens"],
           "ttft_p50_off_over_on": off["ttft_p50_ms"] / on["ttft_p50_ms"],
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(table(runs))
    print(f"cache on vs off (1 group): {out['prefill_tokens_off_over_on']:.1f}x fewer prefill tokens, "
          f"{out['ttft_p50_off_over_on']:.1f}x lower TTFT p50")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "multiturn.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    run()
