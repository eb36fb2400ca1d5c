"""The table ``make bench`` ends with: the headline numbers of every part side by side
(from the results of one run; a part left out is left out here too)."""

from __future__ import annotations

MiB = 2 ** 20


def render(out: dict) -> str:
    lines = [f"dpbus bench summary ({out.get('when', '?')}, {out.get('cpus', '?')} CPUs"
             + (f", {out['seconds'] / 60:.1f} min" if "seconds" in out else "") + ")"]
    for name, fn in (("model", model), ("delivery", delivery), ("ingest", ingest), ("serving", serving),
                     ("memory", memory), ("multiturn", multiturn), ("fairness", fairness)):
        if name in out or (name == "delivery" and "transports" in out):
            lines += ["", *fn(out)]
    return "\n".join(lines)


def decode_step_ms(out: dict) -> float | None:
    runs = out.get("model", {}).get("model") or []
    return runs[0]["decode_step"]["median_ms"] if runs else None


def model(out: dict) -> list[str]:
    m = out["model"]
    rows = [f"compute: memory bandwidth {m['memory_bandwidth_gb_s']:.1f} GB/s (copy), "
            f"{m['read_bandwidth_gb_s']:.1f} GB/s (read); f32 matmul peak {m['matmul_peak']['gflop_s']:.1f} GFLOP/s",
            "  tensor | dtype    | decode step ms | of read bw   | prefill 256 ms | prefill GFLOP/s | of matmul peak"
            " | mixed step ms"]
    for r in m["model"]:
        mixed = r.get("mixed_step_256_at_512_and_15_decode", {}).get("median_ms")
        rows.append(f"  {r['tensor']:>6} | {r.get('dtype', 'float32'):8} | {r['decode_step']['median_ms']:>14.2f} | "
                    f"{r.get('decode_fraction_of_read_bandwidth') or r['decode_fraction_of_bandwidth']:>12.0%} | "
                    f"{r['prefill_256']['median_ms']:>14.1f} | "
                    f"{r['prefill_gflop_s']:>15.1f} | {r['prefill_fraction_of_matmul_peak']:>14.0%}"
                    + (f" | {mixed:>13.1f}" if mixed is not None else ""))
    return rows


def delivery(out: dict) -> list[str]:
    rows = ["step delivery: a ~400-byte step to W processes and every acknowledgement back, ms (dpbus, while the "
            "system serves: the mean time the leader's device waits between the end of a forward and the "
            "dispatch of the next)",
            "  transport                      | W | p50    | p99    | bus time between two forwards, of a decode step"]
    step = decode_step_ms(out)

    def of_step(ms: float) -> str:
        return f"{ms / step:.1%} of a {step:.2f} ms decode step (batch 16, KV 1000)" if step else "-"

    for d in out.get("delivery") or []:
        if "idle_between_forwards_ms" in d:  # overlapped steps: what the device waits between two forwards
            rows.append(f"  dpbus ordered steps, serving   | {d['nodes_per_group']} | "
                        f"{d['idle_between_forwards_ms']:6.3f} | {'-':>6} | {d['idle_fraction']:.1%} of its own "
                        f"{d['device_ms'] + d['idle_between_forwards_ms']:.2f} ms step (device idle); "
                        f"{of_step(d['idle_between_forwards_ms'])}")
            continue
        rows.append(f"  dpbus ordered steps, serving   | {d['nodes_per_group']} | {d['delivery_overhead_ms']:6.3f} | "
                    f"{'-':>6} | {d['overhead_fraction']:.1%} of its own {d['step_ms']:.2f} ms step; "
                    f"{of_step(d['delivery_overhead_ms'])}")
    t = out.get("transports") or {}
    for name, title in (("zmq", "raw ZeroMQ PUB/SUB + PUSH acks"), ("nats", "raw nats-py publish + acks")):
        for w, r in (t.get(name) or {}).items():
            rows.append(f"  {title:30} | {w} | {r['p50']:6.3f} | {r['p99']:6.3f} | {of_step(r['p50'])}")
    return rows


LEDGER_SPLIT = "4092778"  # the last revision before ingest recorded a name per request (issue 18)


def ingest(out: dict) -> list[str]:
    rows = ["ingest routing: the real ingest process; stand-in publishers (2 groups) claim every request in the "
            "ledger and settle it (claim+settle) or only acknowledge it (ack)",
            "  code            | stand-ins    | offered    | arrived/s | publish->submit p50 / p99 ms | "
            "CPU us/request: ingest / stand-ins / nats / client | refused"]
    raw = None
    closed: dict[tuple[str, str], float] = {}
    rate: dict[tuple[str, str], float] = {}
    for r in out["ingest"]["runs"]:
        raw = r
        for run in r["runs"]:
            offered = f"{run['offered_per_s']:.0f}/s" if run["offered_per_s"] else f"window {run['window']}"
            cpu = run["cpu_us_per_request"]
            rows.append(f"  {r['code'][:15]:15} | {r['mode']:12} | {offered:10} | {run['arrived_per_s']:9.0f} | "
                        f"{run['arrival_ms']['p50']:12.2f} / {run['arrival_ms']['p99']:<13.2f} | "
                        f"{cpu['ingest']:6.0f} / {cpu['standins']:4.0f} / {cpu['nats-server']:4.0f} / "
                        f"{cpu.get('client', 0):4.0f} | {sum(run['refused'].values())}")
            if not run["offered_per_s"]:
                closed[(r["mode"], r["code"])] = cpu["ingest"]
                rate[(r["mode"], r["code"])] = run["arrived_per_s"]
    for mode in ("claim+settle", "ack"):
        mine = closed.get((mode, "this checkout"))
        before = [(code, us) for (m, code), us in closed.items() if m == mode and code not in ("this checkout", LEDGER_SPLIT)]
        if mine and before:
            code, us = before[0]
            rows.append(f"  ingest CPU per request at saturation, {mode}: {code} {us:.0f} us -> this checkout "
                        f"{mine:.0f} us ({us / mine:.1f}x less; one core would route {1e6 / mine:.0f} requests/s)")
    split, mine = rate.get(("claim+settle", LEDGER_SPLIT)), rate.get(("claim+settle", "this checkout"))
    if split and mine:
        rows.append(f"  accepted requests/s with the ledger in the path (claim+settle, closed loop): before the ledger "
                    f"split ({LEDGER_SPLIT}: no name per request) {split:.0f} -> this checkout {mine:.0f} "
                    f"({mine / split:.2f}x)")
    if raw:
        rtt, kv = raw["raw_nats_round_trip_ms"], raw.get("raw_kv_create_ms")
        rows.append(f"  raw NATS request/reply round trip on the same server: p50 {rtt['p50']:.3f} ms, p99 "
                    f"{rtt['p99']:.3f} ms" + (f", server CPU {rtt['server_cpu_us']:.0f} us" if "server_cpu_us" in rtt
                                              else ""))
        if kv:
            rows.append(f"  raw JetStream KV create (a claim) on the same server: p50 {kv['p50']:.3f} ms, p99 "
                        f"{kv['p99']:.3f} ms, server CPU {kv['server_cpu_us']:.0f} us")
    return rows


def per_token(r: dict) -> float:
    """Decode time per output token (TPOT p50): what a stream's pace is, whether its tokens
    arrive one per chunk or in bursts (results written before TPOT was measured: ITL p50)."""
    return r["tpot_ms"]["p50"] if "tpot_ms" in r else r["itl_ms"]["p50"]


def serving(out: dict) -> list[str]:
    """System vs engine alone, each side overlapped (two steps in flight) and one step at a
    time, each ratio against the engine alone doing the same."""
    s = out["serving"]
    rows = ["serving: the system over NATS vs the engine alone (one group, one process), output tokens/s",
            "  concurrency | overlapped: engine | system | ratio | one step at a time: engine | system | ratio | "
            "TPOT p50 engine / system ms | TTFT p50 engine / system ms"]
    one_e, one_s = s.get("engine_one_step", {}), s.get("system_one_step", {})
    for c, ratio in s["ratio"].items():
        e, sy = s["engine"][c], s["system"][c]
        single = (f"{one_e[c]['output_tokens_per_s']:26.0f} | {one_s[c]['output_tokens_per_s']:6.0f} | "
                  f"{s['ratio_one_step'][c]:5.2f}" if c in one_e and c in one_s else f"{'-':>26} | {'-':>6} | {'-':>5}")
        rows.append(f"  {c:>11} | {e['output_tokens_per_s']:18.0f} | {sy['output_tokens_per_s']:6.0f} | "
                    f"{ratio:5.2f} | {single} | {per_token(e):.2f} / {per_token(sy):.2f}"
                    f"{'':13} | {e['ttft_ms']['p50']:.1f} / {sy['ttft_ms']['p50']:.1f}")
    return rows


def memory(out: dict) -> list[str]:
    m = out["memory"]
    rows = [f"memory (MiB): model weights {m['model']['weights_bytes'] / MiB:.1f}, one group's KV cache "
            f"{m['model']['kv_cache_bytes'] / MiB:.1f}",
            "  process        | RSS    | peak RSS"]
    for name, p in m["processes"].items():
        rows.append(f"  {name:14} | {p['rss_bytes'] / MiB:6.1f} | {p['peak_rss_bytes'] / MiB:6.1f}")
    return rows


def multiturn(out: dict) -> list[str]:
    m = out["multiturn"]
    return [f"multi-turn chat: prefix cache on vs off, {m['prefill_tokens_off_over_on']:.1f}x fewer prefill "
            f"tokens, {m['ttft_p50_off_over_on']:.1f}x lower TTFT p50"]


def fairness(out: dict) -> list[str]:
    rows = ["fair share: one client flooding, another's time to first token (p50) and queue wait (p50)"]
    for name, r in out["fairness"].items():
        if name == "workload":
            continue
        refused = r["alice"].get("overloaded", 0)
        rows.append(f"  {name:13} | alone {r['alone']['ttft_p50_ms']:6.1f} ms (queued {r['alone']['queue_p50_ms']:.1f}) "
                    f"| flooded {r['flooded']['ttft_p50_ms']:6.1f} ms (queued {r['flooded']['queue_p50_ms']:.1f}) "
                    f"| {r['ttft_p50_ratio']:.1f}x | flooder: {r['alice'].get('done', 0)} done, {refused} overloaded")
    return rows
