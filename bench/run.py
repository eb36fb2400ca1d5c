"""``make bench``: measurements side by side in one run, written to ``bench/results/``.

* memory bandwidth (numpy copy) — the yardstick for decode, which is memory bound;
* the default model's decode step (every slot), prefill chunk and mixed step (a chunk and
  15 decode rows in one forward), for tensor sizes 1 and 2 in float32 and 1 in bfloat16;
* the bytes a decode step must read (weights + KV cache) and the fraction of the
  measured bandwidth the step reaches;
* ordered step delivery's overhead (``bench/delivery.py``);
* the prefix cache on multi-turn chat, on vs off, and ``prefix_affinity`` vs
  ``least_tokens`` on four groups (``bench/multiturn.py``).

Run on a quiet machine; compare ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

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


def bench_pages_per_visit(read_bw: float) -> dict:
    """Decode attention at the default page size (16) and model shape, batch 16, KV length
    1000, by how many pages each loop iteration reads."""
    import functools

    import jax
    import jax.numpy as jnp

    from services.model_config import ModelConfig
    from services.worker.attention import paged_decode_attention

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


def bench_model(tensor: int, bandwidth: float, dtype: str = "float32") -> dict:
    import jax

    from schemas.internal import DecodeItem, PrefillItem, RowSampling
    from services.model_config import ModelConfig
    from services.worker.model import dummy_weights
    from services.worker.runner import ModelRunner, make_group_mesh

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
    decode = timed(lambda: runner.decode(items), repeat=40)
    prefill = timed(lambda: runner.prefill(PrefillItem(0, [65] * 256, True, pages[0], greedy)), repeat=10)
    # one step of both kinds: a 256-token chunk late in a prompt next to 15 decode rows
    mixed = timed(lambda: runner.step([PrefillItem(512, [65] * 256, True, pages[0], greedy)], items[1:]), repeat=10)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.weights))
    kv_row = cfg.n_kv_heads * cfg.head_dim * runner.cache[0][0].dtype.itemsize * 2  # K and V, per position per layer
    cache_bytes = slots * context * kv_row * cfg.n_layers
    step_s = decode["median_ms"] / 1000
    return {
        "compiled_shapes": runner.compiled_shapes(),
        "tensor": tensor, "dtype": dtype, "batch": slots, "kv_length": context, "page_size": page_size,
        "compile_s": round(compile_s, 2),
        "decode_step": decode, "decode_tokens_per_s": slots / step_s,
        "prefill_256": prefill, "prefill_tokens_per_s": 256 / (prefill["median_ms"] / 1000),
        "mixed_step_256_at_512_and_15_decode": mixed,
        "bytes_read_per_decode_step": weight_bytes + cache_bytes,
        "decode_fraction_of_bandwidth": (weight_bytes + cache_bytes) / step_s / 1e9 / bandwidth,
    }


def bench_attention(bandwidth: float) -> dict:
    """Decode attention alone, B=8, KV length 2048, 32 query / 8 KV heads of 128 (f32):
    the paged kernel against a contiguous cache and against gathering every page first."""
    import jax
    import jax.numpy as jnp

    from services.worker.attention import dense_attention, paged_decode_attention

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


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    bw = memory_bandwidth()
    read_bw = read_bandwidth()
    print(f"memory bandwidth (numpy copy): {bw:.1f} GB/s; read-only pass: {read_bw:.1f} GB/s")
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
        r = bench_model(tensor, bw, dtype)
        runs.append(r)
        print(f"tensor={tensor} {dtype}: decode step {r['decode_step']['median_ms']:.2f} ms "
              f"({r['decode_tokens_per_s']:.0f} tok/s over a batch of {r['batch']} at KV length {r['kv_length']}), "
              f"prefill 256 tokens {r['prefill_256']['median_ms']:.1f} ms, "
              f"mixed step {r['mixed_step_256_at_512_and_15_decode']['median_ms']:.1f} ms, "
              f"decode at {r['decode_fraction_of_bandwidth'] * 100:.0f}% of bandwidth, compile {r['compile_s']} s")
    from bench import serving
    from bench.delivery import run as delivery

    steps = delivery()
    served = serving.run()
    serving.report(served)
    out = {"step_delivery": steps, "serving": served, "read_bandwidth_gb_s": read_bw, "pages_per_visit": visits, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
           "cpus": os.cpu_count(), "memory_bandwidth_gb_s": bw, "decode_attention": att, "model": runs}
    path = RESULTS / "model.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    from bench.multiturn import run as multiturn

    multiturn()  # the prefix cache on multi-turn chat: writes bench/results/multiturn.json


if __name__ == "__main__":
    main()
