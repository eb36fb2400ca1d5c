"""Runs the model for one group: owns the mesh, the weights, the paged KV pools and the
two jitted functions (prefill one chunk of one sequence; decode one token for a batch).

Shapes are bucketed so the jitted functions compile a bounded number of times, all of
them in ``warmup``: prefill chunks are padded to a power of two (16 .. max_prefill_tokens)
and decode batches to a power of two (1 .. max_running_requests). Page tables always
have room for a whole context; decode visits only the pages in use (a loop bound that is
data, not shape).
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
from services.worker.model import TENSOR, Config
from services.worker.sampling import sample

MIN_PREFILL_BUCKET = 16


def pow2_buckets(low: int, high: int) -> list[int]:
    out, b = [], low
    while b < high:
        out.append(b)
        b *= 2
    return out + [b]


def prefill_buckets(max_prefill_tokens: int) -> list[int]:
    return pow2_buckets(MIN_PREFILL_BUCKET, max_prefill_tokens)


def make_group_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh ``("tensor",)`` over the group's devices (all devices by default)."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), (TENSOR,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _prefill_fn(cfg: Config, weights, cache, tokens, positions, page_table, last_index, temperature, top_p, top_k,
                seed):
    logits, cache = model.forward(cfg, weights, cache, tokens, positions, page_table)
    last = logits[0, last_index][None, :]
    token = sample(last, temperature, top_p, top_k, seed, jnp.zeros((1,), jnp.int32))
    return token, last, cache


def _decode_fn(cfg: Config, weights, cache, tokens, positions, page_tables, n_pages, temperature, top_p, top_k,
               seeds, counters):
    logits, cache = model.forward(cfg, weights, cache, tokens[:, None], positions[:, None], page_tables, n_pages)
    logits = logits[:, 0]
    return sample(logits, temperature, top_p, top_k, seeds, counters), logits, cache


class ModelRunner:
    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, *, num_pages: int, page_size: int,
                 max_running_requests: int, max_prefill_tokens: int, host_weights: dict[str, Any]) -> None:
        cfg.check_tensor_size(mesh.shape[TENSOR])
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: the pool needs the trash page and at least one more")
        self.cfg, self.mesh = cfg, mesh
        self.page_size, self.num_pages = page_size, num_pages
        self.max_pages = -(-cfg.max_seq_len // page_size)  # page table width: a whole context
        self.prefill_sizes = prefill_buckets(max_prefill_tokens)
        self.decode_sizes = pow2_buckets(1, max_running_requests)
        self.weights = model.place_weights(host_weights, cfg, mesh)
        self.cache = model.new_cache(cfg, num_pages, page_size, mesh)
        replicated = NamedSharding(mesh, jax.P())
        cache_sh = [(model.cache_sharding(mesh),) * 2 for _ in range(cfg.n_layers)]
        out = (replicated, replicated, cache_sh)
        self._prefill = jax.jit(functools.partial(_prefill_fn, cfg), donate_argnums=(1,), out_shardings=out)
        self._decode = jax.jit(functools.partial(_decode_fn, cfg), donate_argnums=(1,), out_shardings=out)
        self._replicated = replicated

    def compiled_shapes(self) -> int:
        """How many shapes the two step functions have compiled so far."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def _put(self, *arrays: np.ndarray) -> list[jax.Array]:
        """Host inputs as replicated global arrays (every process of the group passes the same)."""
        return [model.global_array(np.asarray(a), self._replicated) for a in arrays]

    @staticmethod
    def _bucket(sizes: list[int], n: int, what: str) -> int:
        for b in sizes:
            if n <= b:
                return b
        raise ValueError(f"{what} of {n} exceeds the largest bucket {sizes[-1]}")

    def _page_row(self, pages: list[int]) -> np.ndarray:
        if len(pages) > self.max_pages or any(not 0 < p < self.num_pages for p in pages):
            raise ValueError(f"bad page list {pages[:8]}...: {len(pages)} pages, pool of {self.num_pages}")
        row = np.zeros(self.max_pages, np.int32)
        row[: len(pages)] = pages
        return row

    @staticmethod
    def _sampling_rows(rows: Sequence[RowSampling], n: int) -> list[np.ndarray]:
        temp, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        top_k, seed = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, s in enumerate(rows):
            temp[i], top_p[i], top_k[i], seed[i] = s.temperature, s.top_p, s.top_k, s.seed
        return [temp, top_p, top_k, seed]

    def prefill(self, item: PrefillItem, logits: bool = True) -> tuple[int, jax.Array | None]:
        """Process one prompt chunk; return the token sampled after it and (if asked) its
        logits, left on the device."""
        n = len(item.token_ids)
        end = item.start + n
        if end > self.cfg.max_seq_len:
            raise ValueError(f"prefill past the context: {item.start}+{n} > {self.cfg.max_seq_len}")
        if len(item.pages) * self.page_size < end:
            raise ValueError(f"{len(item.pages)} pages of {self.page_size} cannot hold positions up to {end}")
        bucket = self._bucket(self.prefill_sizes, n, "a prefill chunk")
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = item.token_ids
        positions = np.full((1, bucket), self.cfg.max_seq_len, np.int32)  # padding: written to the trash page
        positions[0, :n] = np.arange(item.start, end)
        args = [tokens, positions, self._page_row(item.pages)[None, :], np.int32(n - 1)]
        args += self._sampling_rows([item.sampling], 1)
        token, out, self.cache = self._prefill(self.weights, self.cache, *self._put(*args))
        return int(np.asarray(token)[0]), (out[0] if logits else None)

    def decode(self, items: Sequence[DecodeItem], logits: bool = True) -> tuple[list[int], jax.Array | None]:
        """One token for each item (and, if asked, their logits, left on the device); the
        batch is padded with rows that write to the trash page."""
        bucket = self._bucket(self.decode_sizes, max(len(items), 1), "a decode batch")
        tokens, positions = np.zeros(bucket, np.int32), np.zeros(bucket, np.int32)
        counters = np.zeros(bucket, np.int32)
        tables = np.zeros((bucket, self.max_pages), np.int32)
        for i, it in enumerate(items):
            if not 0 <= it.position < self.cfg.max_seq_len:
                raise ValueError(f"decode position {it.position} outside the context of {self.cfg.max_seq_len}")
            if len(it.pages) * self.page_size <= it.position:
                raise ValueError(f"{len(it.pages)} pages of {self.page_size} cannot hold position {it.position}")
            tokens[i], positions[i], counters[i] = it.token, it.position, it.counter
            tables[i] = self._page_row(it.pages)
        n_pages = np.int32(max((int(p) // self.page_size + 1 for p in positions[: len(items)]), default=1))
        samp = self._sampling_rows([it.sampling for it in items], bucket)
        args = self._put(tokens, positions, tables, n_pages, *samp, counters)
        out, row_logits, self.cache = self._decode(self.weights, self.cache, *args)
        out = np.asarray(out)
        return [int(t) for t in out[: len(items)]], (row_logits[: len(items)] if logits else None)

    def step(self, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]) -> tuple[list[int], list[int]]:
        """Run one scheduling step: every prefill chunk, then the decode batch. Returns the
        token sampled after each chunk (-1 where the chunk does not sample) and per decode row."""
        prefill_tokens = []
        for item in prefill:
            token, _ = self.prefill(item, logits=False)
            prefill_tokens.append(token if item.sample else -1)
        return prefill_tokens, (self.decode(decode, logits=False)[0] if decode else [])

    def warmup(self, progress: Callable[[int, int, str], None] | None = None) -> float:
        """Compile every bucket now. Its writes land in the first pages, which nobody owns
        yet: the publisher schedules nothing before the group reports ready."""
        t0 = time.perf_counter()
        shapes = [("prefill", b) for b in self.prefill_sizes] + [("decode", b) for b in self.decode_sizes]
        greedy = RowSampling(0.0, 1.0, 0, 0)
        pages = list(range(1, min(self.num_pages, self.max_pages + 1)))
        for i, (kind, size) in enumerate(shapes):
            if progress:
                progress(i, len(shapes), f"{kind} {size}")
            if kind == "decode":
                self.decode([DecodeItem(0, 0, 0, [1], greedy)] * size)
            else:
                n = min(size, len(pages) * self.page_size)
                self.prefill(PrefillItem(0, [0] * n, True, pages, greedy))
        if progress:
            progress(len(shapes), len(shapes), "done")
        return time.perf_counter() - t0
