"""``make bench``: measurements side by side in one run, written to ``bench/results/``
(one JSON file per part) and summed up in one table at the end.

* model: memory bandwidth (numpy copy) — the yardstick for decode, which is memory
  bound — and an f32 matmul — the yardstick for prefill; the default model's decode step
  (every slot), prefill chunk and mixed step (a chunk and 15 decode rows in one forward)
  for tensor sizes 1 and 2 in float32 and 1 in bfloat16, the bytes a decode step must
  read (weights + KV cache) and the fraction of the read bandwidth it reaches, prefill's
  fraction of the matmul peak, and what attention takes of each (the same steps with
  little to attend to);
* transports: raw ZeroMQ and raw NATS step-and-acknowledge round trips to 1, 2, 4
  processes (``bench/transports.py``), next to
* delivery: dpbus's ordered step delivery while serving, groups of 1 and 2 processes
  (``bench/delivery.py``): the time the bus adds between two forwards;
* ingest: routing capacity and latency of the real ingest with stand-in publishers
  (``bench/ingest.py``), this checkout next to the code before issue 10 and before the
  ledger split (the name ingest records per request: the accepted requests/s it costs);
* serving: the whole system against the engine alone at concurrency 8 and 32
  (``bench/serving.py``);
* memory: resident memory of every process of a running dpbus (``bench/memory.py``);
* multiturn: the prefix cache on multi-turn chat, on vs off, and ``prefix_affinity`` vs
  ``least_tokens`` on four groups (``bench/multiturn.py``);
* fairness: one client flooding a group, another client's time to first token and queue
  wait, alone and flooded (``bench/fairness.py``).

Run on a quiet machine; compare ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench import summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeat: int, warm: int = 3) -> dict:
    for _ in range(warm):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(samples) * 1000, "p10_ms": np.percentile(samples, 10) * 1000,
            "p90_ms": np.percentile(samples, 90) * 1000, "n": repeat}


def memory_bandwidth(n_bytes: int = 256 << 20) -> float:
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    t = timed(lambda: np.copyto(dst, src), repeat=10)
    return 2 * n_bytes / (t["median_ms"] / 1000) / 1e9  # read + write


def read_bandwidth(n_bytes: int = 256 << 20) -> float:
    """A read-only pass over a large array (what decode does to weights and KV)."""
    src = np.ones(n_bytes // 4, np.float32)
    t = timed(lambda: src.sum(), repeat=10)
    return n_bytes / (t["median_ms"] / 1000) / 1e9


def matmul_peak(n: int = 2048) -> dict:
    """f32 matrix multiply on one JAX device: the compute yardstick for prefill."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(jnp.matmul)
    t = timed(lambda: mm(a, a).block_until_ready(), repeat=10)
    return {**t, "size": n, "gflop_s": 2 * n ** 3 / (t["median_ms"] / 1000) / 1e9}


def prefill_flops(cfg, tokens: int) -> int:
    """Multiply-adds x 2 of a prefill chunk of ``tokens`` from position 0: the projections
    and MLP of every layer, causal attention scores and sums, one row of logits."""
    proj = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.ffn_dim
    attention = 2 * cfg.n_heads * cfg.head_dim * tokens * (tokens + 1) // 2
    return 2 * (cfg.n_layers * (proj * tokens + attention) + cfg.dim * cfg.vocab_size)


def bench_pages_per_visit(read_bw: float) -> dict:
    """Decode attention at the default page size (16) and model shape, batch 16, KV length
    1000, by how many pages each loop iteration reads."""
    import functools

    import jax
    import jax.numpy as jnp

    from dpbus.services.model_config import ModelConfig
    from dpbus.services.worker.attention import paged_decode_attention

    cfg = ModelConfig()
    b, ps, length = 16, 16, 1000
    n = -(-length // ps)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, cfg.n_heads, cfg.head_dim), np.float32))
    pool = (b * n + 1, cfg.n_kv_heads, ps, cfg.head_dim)
    k_pages = jnp.asarray(rng.standard_normal(pool, np.float32))
    v_pages = jnp.asarray(rng.standard_normal(pool, np.float32))
    tables = jnp.asarray((1 + np.arange(b * n)).reshape(b, n).astype(np.int32))
    positions = jnp.full((b,), length - 1, jnp.int32)
    kv_bytes = 2 * b * cfg.n_kv_heads * length * cfg.head_dim * 4
    out = {}
    for per in (1, 2, 4, 8, 16):
        fn = jax.jit(functools.partial(paged_decode_attention, per_visit=per))
        t = timed(lambda: fn(q, k_pages, v_pages, tables, positions, jnp.int32(n)).block_until_ready(), repeat=30)
        out[str(per)] = {**t, "fraction_of_read_bandwidth": kv_bytes / (t["median_ms"] / 1000) / 1e9 / read_bw}
    return out


def bench_model(tensor: int, bandwidth: float, peak_gflop_s: float = 0.0, dtype: str = "float32",
                read_bandwidth: float = 0.0) -> dict:
    """The default model's steps. Next to each headline step, the same compiled step with
    less to attend to (decode rows at KV length 16, a chunk from position 0 against one at
    768): the difference is what attention costs, the rest is weights, matmuls and the
    step's fixed cost."""
    import jax

    from dpbus.schemas.internal import DecodeItem, PrefillItem, RowSampling
    from dpbus.services.model_config import ModelConfig
    from dpbus.services.worker.model import dummy_weights
    from dpbus.services.worker.runner import ModelRunner, make_group_mesh

    cfg = ModelConfig()
    slots, page_size, context = 16, 16, 1000
    per_seq = -(-cfg.max_seq_len // page_size)
    runner = ModelRunner(cfg, make_group_mesh(jax.devices()[:tensor]), num_pages=slots * per_seq + 1,
                         page_size=page_size, max_running_requests=slots, max_prefill_tokens=256,
                         host_weights=dummy_weights(cfg, 0), dtype=dtype)
    compile_s = runner.warmup()
    greedy = RowSampling(0.0, 1.0, 0, 0)
    pages = [list(range(1 + s * per_seq, 1 + (s + 1) * per_seq)) for s in range(slots)]
    items = [DecodeItem(65, context - 1, 1, pages[s], greedy) for s in range(slots)]
    short = [DecodeItem(65, 15, 1, pages[s], greedy) for s in range(slots)]
    decode = timed(lambda: runner.decode(items), repeat=40)
    decode_short = timed(lambda: runner.decode(short), repeat=20)
    prefill = timed(lambda: runner.prefill(PrefillItem(0, [65] * 256, True, pages[0], greedy)), repeat=10)
    prefill_late = timed(lambda: runner.prefill(PrefillItem(768, [65] * 256, True, pages[0], greedy)), repeat=10)
    # one step of both kinds: a 256-token chunk late in a prompt next to 15 decode rows
    mixed = timed(lambda: runner.step([PrefillItem(512, [65] * 256, True, pages[0], greedy)], items[1:]), repeat=10)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.weights))
    kv_row = cfg.n_kv_heads * cfg.head_dim * runner.cache[0][0].dtype.itemsize * 2  # K and V, per position per layer
    cache_bytes = slots * context * kv_row * cfg.n_layers
    step_s = decode["median_ms"] / 1000
    flops = prefill_flops(cfg, 256)
    prefill_gflop_s = flops / (prefill["median_ms"] / 1000) / 1e9
    return {
        "prefill_flops": flops, "prefill_gflop_s": prefill_gflop_s,
        "prefill_fraction_of_matmul_peak": prefill_gflop_s / peak_gflop_s if peak_gflop_s else None,
        "compiled_shapes": runner.compiled_shapes(),
        "tensor": tensor, "dtype": dtype, "batch": slots, "kv_length": context, "page_size": page_size,
        "compile_s": round(compile_s, 2),
        "decode_step": decode, "decode_tokens_per_s": slots / step_s,
        "prefill_256": prefill, "prefill_tokens_per_s": 256 / (prefill["median_ms"] / 1000),
        "mixed_step_256_at_512_and_15_decode": mixed,
        "bytes_read_per_decode_step": weight_bytes + cache_bytes,
        "decode_fraction_of_bandwidth": (weight_bytes + cache_bytes) / step_s / 1e9 / bandwidth,
        "decode_fraction_of_read_bandwidth":
            (weight_bytes + cache_bytes) / step_s / 1e9 / read_bandwidth if read_bandwidth else None,
        "decode_step_kv16": decode_short,
        "decode_attention_share": 1 - decode_short["median_ms"] / decode["median_ms"],
        "prefill_256_at_768": prefill_late,
    }


def bench_attention(bandwidth: float) -> dict:
    """Decode attention alone, B=8, KV length 2048, 32 query / 8 KV heads of 128 (f32):
    the paged kernel against a contiguous cache and against gathering every page first."""
    import jax
    import jax.numpy as jnp

    from dpbus.services.worker.attention import dense_attention, paged_decode_attention

    b, h, kv, hd, length, ps = 8, 32, 8, 128, 2048, 64
    n = length // ps
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, h, hd), np.float32))
    k_pages = jnp.asarray(rng.standard_normal((b * n + 1, kv, ps, hd), np.float32))
    v_pages = jnp.asarray(rng.standard_normal((b * n + 1, kv, ps, hd), np.float32))
    tables = jnp.asarray((1 + np.arange(b * n)).reshape(b, n).astype(np.int32))
    positions = jnp.full((b,), length - 1, jnp.int32)
    k_dense = k_pages[1:].reshape(b, n, kv, ps, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, length, hd)
    v_dense = v_pages[1:].reshape(b, n, kv, ps, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, length, hd)

    paged = jax.jit(paged_decode_attention)
    dense = jax.jit(lambda q, k, v, p: dense_attention(q[:, None], k, v, p[:, None]))

    def gather_all(q, kp, vp, t, p):
        rows = lambda x: x[t].transpose(0, 2, 1, 3, 4).reshape(b, kv, length, hd)  # noqa: E731
        return dense_attention(q[:, None], rows(kp), rows(vp), p[:, None])

    gathered = jax.jit(gather_all)
    ref = np.asarray(dense(q, k_dense, v_dense, positions))[:, 0]
    got = np.asarray(paged(q, k_pages, v_pages, tables, positions, jnp.int32(n)))
    assert np.allclose(got, ref, atol=1e-4), "paged attention disagrees with dense"
    kv_bytes = 2 * b * kv * length * hd * 4
    out = {"config": dict(batch=b, q_heads=h, kv_heads=kv, head_dim=hd, kv_length=length, page_size=ps),
           "kv_bytes": kv_bytes}
    for name, fn in (("paged", lambda: paged(q, k_pages, v_pages, tables, positions, jnp.int32(n)).block_until_ready()),
                     ("contiguous", lambda: dense(q, k_dense, v_dense, positions).block_until_ready()),
                     ("gather_then_dense", lambda: gathered(q, k_pages, v_pages, tables, positions).block_until_ready())):
        t = timed(fn, repeat=20)
        gbs = kv_bytes / (t["median_ms"] / 1000) / 1e9
        out[name] = {**t, "gb_s": gbs, "fraction_of_bandwidth": gbs / bandwidth}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="make bench: every measurement, one run")
    p.add_argument("--ingest-baseline", default=INGEST_BASELINE,
                   help="also measure ingest as it was at these git revisions, comma-separated ('' to skip)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: " + ", ".join(PARTS))
    return p.parse_args(argv)


PARTS = ("model", "transports", "delivery", "ingest", "serving", "memory", "multiturn", "fairness")
# ingest before issue 10's work on its hot path, and before the ledger split (issue 18:
# ingest records each request's name, one more ledger write): measured next to this checkout's
INGEST_BASELINE = "b8a66f6,4092778"


def checkout(rev: str) -> str | None:
    """``services/`` and ``schemas/`` of ``rev`` in a temporary directory (None without git
    or without that revision)."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    where = tempfile.mkdtemp(prefix=f"dpbus-{rev}-")
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "services", "schemas"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        shutil.rmtree(where, ignore_errors=True)
        return None
    return where


def bench_ingest(baselines: str) -> dict:
    from bench import ingest

    out = {"runs": []}
    sources: list[tuple[str, str | None]] = []
    for baseline in filter(None, baselines.split(",")):
        where = checkout(baseline)
        if where is None:
            print(f"ingest baseline {baseline}: no such git revision here; not measured")
        else:
            sources.append((baseline, where))
    sources.append(("this checkout", None))
    try:
        for mode in ("claim+settle", "ack"):
            for label, where in sources:
                try:
                    r = ingest.run(mode=mode, ingest_from=where, label=f"{label}, stand-ins: {mode}")
                except RuntimeError as e:  # a baseline that did not come up: say so, measure the rest
                    if where is None:
                        raise
                    print(f"ingest baseline {label}: {e}; not measured")
                    continue
                r["code"] = label
                out["runs"].append(r)
    finally:
        for _, where in sources:
            if where:
                shutil.rmtree(where, ignore_errors=True)
    return out


def model_part() -> dict:
    bw = memory_bandwidth()
    read_bw = read_bandwidth()
    print(f"memory bandwidth (numpy copy): {bw:.1f} GB/s; read-only pass: {read_bw:.1f} GB/s")
    peak = matmul_peak()
    print(f"f32 matmul {peak['size']}x{peak['size']} on one device: {peak['gflop_s']:.1f} GFLOP/s")
    visits = bench_pages_per_visit(read_bw)
    for per, r in visits.items():
        print(f"decode attention, page size 16, {per:>2} page(s) per visit: {r['median_ms']:.3f} ms "
              f"({r['fraction_of_read_bandwidth'] * 100:.0f}% of read bandwidth)")
    att = bench_attention(bw)
    for name in ("paged", "contiguous", "gather_then_dense"):
        a = att[name]
        print(f"decode attention {name:18s}: {a['median_ms']:.2f} ms, {a['gb_s']:.1f} GB/s "
              f"({a['fraction_of_bandwidth'] * 100:.0f}% of bandwidth)")
    runs = []
    for tensor, dtype in ((1, "float32"), (2, "float32"), (1, "bfloat16")):
        r = bench_model(tensor, bw, peak["gflop_s"], dtype, read_bw)
        runs.append(r)
        print(f"tensor={tensor} {dtype}: decode step {r['decode_step']['median_ms']:.2f} ms "
              f"({r['decode_tokens_per_s']:.0f} tok/s over a batch of {r['batch']} at KV length {r['kv_length']}), "
              f"prefill 256 tokens {r['prefill_256']['median_ms']:.1f} ms "
              f"({r['prefill_fraction_of_matmul_peak'] * 100:.0f}% of the matmul peak), "
              f"mixed step {r['mixed_step_256_at_512_and_15_decode']['median_ms']:.1f} ms, "
              f"decode at {r['decode_fraction_of_read_bandwidth'] * 100:.0f}% of read bandwidth, "
              f"compile {r['compile_s']} s")
        print(f"  breakdown: decode step {r['decode_step']['median_ms']:.2f} ms = "
              f"{r['decode_step_kv16']['median_ms']:.2f} ms at KV length 16 (weights, matmuls, fixed cost) + "
              f"{r['decode_attention_share'] * 100:.0f}% attention over KV 1000; prefill 256 tokens from 0 "
              f"{r['prefill_256']['median_ms']:.1f} ms, from 768 {r['prefill_256_at_768']['median_ms']:.1f} ms")
    return {"read_bandwidth_gb_s": read_bw, "memory_bandwidth_gb_s": bw, "matmul_peak": peak,
            "pages_per_visit": visits, "decode_attention": att, "model": runs}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    skip = {p.strip() for p in a.skip.split(",") if p.strip()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
                 "cpus": os.cpu_count()}

    def part(name: str, fn) -> None:
        if name in skip:
            return
        print(f"\n== {name} ==", flush=True)
        out[name] = fn()
        (RESULTS / f"{name}.json").write_text(json.dumps(out[name], indent=2))

    from bench import delivery, fairness, memory, multiturn, serving, transports, world

    part("model", model_part)
    part("transports", transports.run)
    part("delivery", delivery.run)
    part("ingest", lambda: bench_ingest(a.ingest_baseline))
    part("serving", lambda: report_serving(serving))
    part("memory", memory.run)
    part("multiturn", multiturn.run)
    part("fairness", fairness.run)
    part("world", world.run)
    out["seconds"] = time.monotonic() - started
    print()
    print(summary.render(out))


def report_serving(serving) -> dict:
    served = serving.run()
    serving.report(served)
    return served


if __name__ == "__main__":
    main()
