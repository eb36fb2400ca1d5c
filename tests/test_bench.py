"""The benchmark modules run, in tiny configurations (no numbers are checked: only that
every request made it and the results have the shape the summary table reads).
ZeroMQ is left out: it is in the `bench` extra, which `make test` does not install."""

from __future__ import annotations

import os

import pytest

from bench import ingest, memory, summary, transports
from bench import run as bench_run


def test_the_command_lines_parse():
    a = ingest.parse_args([])
    assert a.mode == "claim+settle" and a.rates == "1000,2000,4000" and a.window == 256
    assert ingest.parse_args(["--mode", "ack", "--rates", ""]).mode == "ack"
    t = transports.parse_args(["--workers", "1,2", "--no-zmq"])
    assert t.workers == "1,2" and t.no_zmq and t.payload == 400
    assert memory.parse_args([]).requests == 16
    r = bench_run.parse_args(["--skip", "memory,multiturn", "--ingest-baseline", ""])
    assert r.skip == "memory,multiturn" and r.ingest_baseline == ""


@pytest.mark.slow
def test_ingest_bench_routes_every_request_through_the_ledger():
    out = ingest.run(groups=1, rates=(200,), seconds=0.3, window=8, rtt_samples=20)
    assert [r["offered_per_s"] for r in out["runs"]] == [None, 200]
    for r in out["runs"]:
        assert r["sent"] > 0 and r["arrived"] == r["sent"] == r["claimed"] == r["settled"], r
        assert r["refused"] == {}
        assert set(r["cpu_us_per_request"]) == {"ingest", "standins", "nats-server", "client"}
    assert out["raw_nats_round_trip_ms"]["p50"] > 0


def test_raw_nats_transport_round_trips():
    out = transports.run(workers=(1, 2), rounds=20, zmq=False)
    assert set(out["nats"]) == {1, 2} and out["zmq"] == {}
    assert all(r["n"] == 20 for r in out["nats"].values())


def test_memory_reads_proc_and_sizes_the_model():
    assert memory.status_kib(os.getpid(), "VmRSS") > 0
    assert memory.status_kib(os.getpid(), "NoSuchField") == 0
    m = memory.model_bytes(1024)
    assert m["weights_bytes"] == 4 * m["parameters"] and m["kv_cache_bytes"] > 0


def test_the_summary_renders_what_the_parts_return():
    p = {"p50": 0.1, "p90": 0.2, "p99": 0.3, "mean": 0.1, "n": 10}
    run = {"offered_per_s": None, "window": 8, "arrived_per_s": 100.0, "arrival_ms": {"p50": 1.0, "p99": 2.0},
           "cpu_us_per_request": {"ingest": 30.0, "standins": 10.0, "nats-server": 10.0, "client": 5.0},
           "refused": {}}
    measured = {"mode": "ack", "raw_nats_round_trip_ms": p, "raw_kv_create_ms": {**p, "server_cpu_us": 9.0},
                "runs": [run], "capacity_per_s": 100.0, "best_rate_p99_under_1ms": 0.0}
    out = {"when": "now", "cpus": 2,
           "transports": {"payload_bytes": 400, "rounds": 10, "nats": {1: p}, "zmq": {1: p}},
           "delivery": [{"nodes_per_group": 1, "delivery_overhead_ms": 0.5, "overhead_fraction": 0.1, "step_ms": 5.0,
                         "idle_between_forwards_ms": 0.25, "idle_fraction": 0.05, "device_ms": 4.75}],
           "ingest": {"runs": [{**measured, "code": "abc1234"}, {**measured, "code": "this checkout"}]},
           "memory": {"model": {"weights_bytes": 1 << 20, "kv_cache_bytes": 2 << 20},
                      "processes": {"ingest": {"rss_bytes": 50 << 20, "peak_rss_bytes": 60 << 20}}}}
    served = {"output_tokens_per_s": 100.0, "itl_ms": p, "ttft_ms": p}
    out["serving"] = {"engine": {8: served}, "system": {8: served}, "system_one_step": {8: served},
                      "engine_one_step": {8: served}, "ratio": {8: 1.0}, "ratio_one_step": {8: 1.0}}
    text = summary.render(out)
    for part in ("raw ZeroMQ", "raw nats-py", "dpbus ordered steps", "ingest routing", "abc1234 30 us -> this checkout",
                 "raw JetStream KV create", "memory (MiB)", "one step at a time", "5.0% of its own 5.00 ms step"):
        assert part in text


def test_tokens_of_a_several_token_chunk_are_spread_since_the_chunk_before():
    """With ``--stream-interval N`` a chunk carries N tokens sampled a step apart: the bench
    spreads them since the chunk before, so ITL is per token, not 0 inside a chunk."""
    from dpbus.services.benchmark import token_times

    assert token_times([], 5.0, 3) == [5.0, 5.0, 5.0]  # the first chunk: its first token is the TTFT
    assert token_times([1.0], 5.0, 4) == [2.0, 3.0, 4.0, 5.0]
    assert token_times([1.0, 2.0], 2.5, 1) == [2.5]


def test_tokens_answered_in_pairs_show_in_itl_and_tpot_gives_the_decode_speed():
    """One-token chunks that reach the client two at a time (as a CPU group answers its
    overlapped steps): the ITL of arrivals is bimodal, its p50 near 0, while TPOT is each
    request's decode time per token. A first chunk of three tokens adds no 0 ms interval."""
    from dpbus.services.benchmark import Record, Workload, summarize

    paired = Record(sent=0.0, end=0.0131, output_tokens=8)
    paired.tokens = [t + d for t in (0.010, 0.011, 0.012, 0.013) for d in (0.0, 0.0000001)]  # 2 a millisecond
    r = summarize([paired], 1.0, "system", Workload())
    assert r["itl_ms"]["p50"] < 0.01 and r["itl_ms"]["p90"] > 0.9
    assert r["tpot_ms"]["p50"] == pytest.approx(3.0001 / 7)

    chunked = Record(sent=0.0, end=0.0201, output_tokens=6, first_chunk=3)
    chunked.tokens = [0.010, 0.010, 0.010, 0.012, 0.014, 0.016]  # the first chunk, then one token each 2 ms
    r = summarize([chunked], 1.0, "system", Workload())
    assert r["itl_ms"]["p50"] == pytest.approx(2.0) and min(r["itl_ms"].values()) == pytest.approx(2.0)
    assert r["ttft_ms"]["p50"] == pytest.approx(10.0)
