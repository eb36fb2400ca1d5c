"""Step times of the default model (``python -m bench.steps [tensor] [dtype]``): pure decode
batches, prefill chunks early and late in a context, and mixed steps (chunks next to
decode rows, one forward). Prints one JSON line of (min, median) milliseconds per case,
with the compile count after warm-up; run it on two checkouts to compare them.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def main() -> None:
    import jax

    from dpbus.schemas.internal import DecodeItem, PrefillItem, RowSampling
    from dpbus.services.model_config import ModelConfig
    from dpbus.services.worker.model import dummy_weights
    from dpbus.services.worker.runner import ModelRunner, make_group_mesh

    tensor = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    kw = {"dtype": sys.argv[2]} if len(sys.argv) > 2 else {}
    cfg = ModelConfig()
    slots, ps = 16, 16
    per = -(-cfg.max_seq_len // ps)
    greedy = RowSampling(0.0, 1.0, 0, 0)
    pages = [list(range(1 + s * per, 1 + (s + 1) * per)) for s in range(slots)]
    r = ModelRunner(cfg, make_group_mesh(jax.devices()[:tensor]), num_pages=slots * per + 1, page_size=ps,
                    max_running_requests=slots, max_prefill_tokens=256, host_weights=dummy_weights(cfg, 0), **kw)
    t0 = time.perf_counter()
    r.warmup()
    warm, compiled = time.perf_counter() - t0, r.compiled_shapes()

    def dec(n: int, kv: int = 1000) -> list[DecodeItem]:
        return [DecodeItem(65, kv - 1, 1, pages[s], greedy) for s in range(n)]

    def chunk(start: int, n: int, seq: int) -> PrefillItem:
        return PrefillItem(start, [65] * n, True, pages[seq], greedy)

    cases = {
        "decode16@1000": ([], dec(16)),
        "decode16@200": ([], dec(16, 200)),
        "decode4@1000": ([], dec(4)),
        "prefill256@0": ([chunk(0, 256, 15)], []),
        "prefill256@768": ([chunk(768, 256, 15)], []),
        "mixed256@512+15dec@1000": ([chunk(512, 256, 15)], dec(15)),
        "mixed3chunks+13dec@1000": ([chunk(700, 200, 15), chunk(0, 40, 14), chunk(300, 16, 13)], dec(13)),
        "mixed16@0+15dec@1000": ([chunk(0, 16, 15)], dec(15)),
    }
    for prefill, decode in cases.values():
        r.step(prefill, decode)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(15):
        for k, (prefill, decode) in cases.items():
            t0 = time.perf_counter()
            r.step(prefill, decode)
            times[k].append(time.perf_counter() - t0)
    assert r.compiled_shapes() == compiled, "a step compiled after warm-up"
    out = {"tensor": tensor, "dtype": r.dtype, "warmup_s": round(warm, 1), "compiled_at_warmup": compiled}
    out.update({k: (round(min(v) * 1e3, 1), round(statistics.median(v) * 1e3, 1)) for k, v in times.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
