"""Runs the model for one group: owns the mesh, the weights, the KV cache and the two
jitted functions (prefill one chunk of one sequence; decode one token for every slot).

Shapes are bucketed so the jitted functions compile a bounded number of times:
prefill chunks are padded to a power of two (16 .. max_prefill_tokens), decode always
runs every slot (inactive slots compute on padding and are ignored).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from schemas.internal import DecodeItem, PrefillItem, RowSampling
from services.worker import model
from services.worker.model import Config, TENSOR
from services.worker.sampling import sample

MIN_PREFILL_BUCKET = 16


def prefill_buckets(max_prefill_tokens: int) -> list[int]:
    out, b = [], MIN_PREFILL_BUCKET
    while b < max_prefill_tokens:
        out.append(b)
        b *= 2
    out.append(b)
    return out


def make_group_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh ``("tensor",)`` over the group's devices (all local devices by default)."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), (TENSOR,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _prefill_fn(cfg: Config, weights, cache, tokens, positions, slot, last_index, temperature, top_p, top_k, seed):
    logits, cache = model.forward(cfg, weights, cache, tokens, positions, slot)
    last = logits[0, last_index][None, :]
    token = sample(last, temperature, top_p, top_k, seed, jnp.zeros((1,), jnp.int32))
    return token, last, cache


def _decode_fn(cfg: Config, weights, cache, tokens, positions, temperature, top_p, top_k, seeds, counters):
    logits, cache = model.forward(cfg, weights, cache, tokens[:, None], positions[:, None], None)
    logits = logits[:, 0]
    return sample(logits, temperature, top_p, top_k, seeds, counters), logits, cache


class ModelRunner:
    def __init__(
        self,
        cfg: Config,
        mesh: jax.sharding.Mesh,
        slots: int,
        max_prefill_tokens: int,
        host_weights: dict[str, Any],
    ) -> None:
        cfg.check_tensor_size(mesh.shape[TENSOR])
        self.cfg, self.mesh, self.slots = cfg, mesh, slots
        self.buckets = prefill_buckets(max_prefill_tokens)
        self.weights = model.place_weights(host_weights, cfg, mesh)
        self.cache = model.new_cache(cfg, slots, mesh)
        replicated = NamedSharding(mesh, jax.P())
        cache_sh = [(model.cache_sharding(mesh),) * 2 for _ in range(cfg.n_layers)]
        out = (replicated, replicated, cache_sh)
        self._prefill = jax.jit(functools.partial(_prefill_fn, cfg), donate_argnums=(1,), out_shardings=out)
        self._decode = jax.jit(functools.partial(_decode_fn, cfg), donate_argnums=(1,), out_shardings=out)
        self._replicated = replicated

    def _put(self, *arrays: np.ndarray) -> list[jax.Array]:
        return [jax.device_put(a, self._replicated) for a in arrays]

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"a prefill chunk of {n} tokens exceeds max_prefill_tokens={self.buckets[-1]}")

    @staticmethod
    def _sampling_rows(rows: Sequence[RowSampling], n: int) -> list[np.ndarray]:
        temp = np.zeros(n, np.float32)
        top_p = np.ones(n, np.float32)
        top_k = np.zeros(n, np.int32)
        seed = np.zeros(n, np.int32)
        for i, s in enumerate(rows):
            temp[i], top_p[i], top_k[i], seed[i] = s.temperature, s.top_p, s.top_k, s.seed
        return [temp, top_p, top_k, seed]

    def prefill(self, item: PrefillItem) -> tuple[int, np.ndarray]:
        """Process one prompt chunk; return the token sampled after it and its logits."""
        n = len(item.token_ids)
        if item.start + n > self.cfg.max_seq_len:
            raise ValueError(f"prefill past the context: {item.start}+{n} > {self.cfg.max_seq_len}")
        bucket = self.bucket_for(n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = item.token_ids
        # padding goes past the context end, where the scatter drops it
        positions = np.full((1, bucket), self.cfg.max_seq_len + 1, np.int32)
        positions[0, :n] = np.arange(item.start, item.start + n)
        args = [tokens, positions, np.array([item.slot], np.int32), np.int32(n - 1)]
        args += self._sampling_rows([item.sampling], 1)
        token, logits, self.cache = self._prefill(self.weights, self.cache, *self._put(*args))
        return int(np.asarray(token)[0]), np.asarray(logits)[0]

    def decode(self, items: Sequence[DecodeItem]) -> tuple[list[int], np.ndarray]:
        """One token for each item (one row per slot; unused slots run on padding)."""
        s = self.slots
        tokens = np.zeros(s, np.int32)
        positions = np.full(s, self.cfg.max_seq_len + 1, np.int32)  # idle rows write nowhere
        counters = np.zeros(s, np.int32)
        rows: list[RowSampling] = [RowSampling(0.0, 1.0, 0, 0)] * s
        for it in items:
            if not 0 <= it.position < self.cfg.max_seq_len:
                raise ValueError(f"decode position {it.position} outside the context of {self.cfg.max_seq_len}")
            tokens[it.slot], positions[it.slot], counters[it.slot] = it.token, it.position, it.counter
            rows[it.slot] = it.sampling
        temp, top_p, top_k, seed = self._sampling_rows(rows, s)
        args = self._put(tokens, positions, temp, top_p, top_k, seed, counters)
        out, logits, self.cache = self._decode(self.weights, self.cache, *args)
        out = np.asarray(out)
        return [int(out[it.slot]) for it in items], np.asarray(logits)

    def warmup(self, progress: Callable[[int, int, str], None] | None = None) -> float:
        """Compile every bucket now (slot 0, writes past the context are dropped)."""
        t0 = time.perf_counter()
        shapes = [f"prefill {b}" for b in self.buckets] + ["decode"]
        greedy = RowSampling(0.0, 1.0, 0, 0)
        for i, what in enumerate(shapes):
            if progress:
                progress(i, len(shapes), what)
            if what == "decode":
                self.decode([])
            else:
                b = int(what.split()[1])
                self.prefill(PrefillItem(0, 0, [0] * b, True, greedy))
        if progress:
            progress(len(shapes), len(shapes), "done")
        return time.perf_counter() - t0
