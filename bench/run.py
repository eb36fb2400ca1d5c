"""``make bench``: measurements side by side in one run, written to ``bench/results/``.

* memory bandwidth (numpy copy) — the yardstick for decode, which is memory bound;
* the default model's decode step (every slot) and prefill chunk, for tensor sizes 1 and 2;
* the bytes a decode step must read (weights + KV cache) and the fraction of the
  measured bandwidth the step reaches.

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


def bench_model(tensor: int, bandwidth: float) -> dict:
    import jax

    from schemas.internal import DecodeItem, PrefillItem, RowSampling
    from services.model_config import ModelConfig
    from services.worker.model import dummy_weights
    from services.worker.runner import ModelRunner, make_group_mesh

    cfg = ModelConfig()
    slots = 16
    runner = ModelRunner(cfg, make_group_mesh(jax.devices()[:tensor]), slots, 256, dummy_weights(cfg, 0))
    compile_s = runner.warmup()
    greedy = RowSampling(0.0, 1.0, 0, 0)
    items = [DecodeItem(s, 65, 500, 1, greedy) for s in range(slots)]
    decode = timed(lambda: runner.decode(items), repeat=40)
    prefill = timed(lambda: runner.prefill(PrefillItem(0, 0, [65] * 256, True, greedy)), repeat=10)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.weights))
    cache_bytes = sum(k.nbytes + v.nbytes for k, v in runner.cache)
    step_s = decode["median_ms"] / 1000
    return {
        "tensor": tensor, "slots": slots, "max_seq_len": cfg.max_seq_len, "compile_s": round(compile_s, 2),
        "decode_step": decode, "decode_tokens_per_s": slots / step_s,
        "prefill_256": prefill, "prefill_tokens_per_s": 256 / (prefill["median_ms"] / 1000),
        "bytes_read_per_decode_step": weight_bytes + cache_bytes,
        "decode_fraction_of_bandwidth": (weight_bytes + cache_bytes) / step_s / 1e9 / bandwidth,
    }


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    bw = memory_bandwidth()
    print(f"memory bandwidth (numpy copy): {bw:.1f} GB/s")
    runs = []
    for tensor in (1, 2):
        r = bench_model(tensor, bw)
        runs.append(r)
        print(f"tensor={tensor}: decode step {r['decode_step']['median_ms']:.2f} ms "
              f"({r['decode_tokens_per_s']:.0f} tok/s over {r['slots']} slots), "
              f"prefill 256 tokens {r['prefill_256']['median_ms']:.1f} ms, "
              f"decode at {r['decode_fraction_of_bandwidth'] * 100:.0f}% of bandwidth, compile {r['compile_s']} s")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
           "cpus": os.cpu_count(), "memory_bandwidth_gb_s": bw, "model": runs}
    path = RESULTS / "model.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
