"""Runs the model for one group: owns the mesh, the weights, the paged KV pools and the
jitted step: one forward over every prefill chunk and decode row of a scheduling step
(a ragged batch, see ``attention.py``), sampling each row that needs a token.

Shapes are bucketed so the step compiles a bounded number of times, all of them in
``warmup``: a decode-only step pads its rows to a power of two (1 .. max_running_requests);
a step with prefill pads its prefill tokens to a power of two (16 .. max_prefill_tokens)
and its decode rows to the largest decode bucket. Page tables always have room for a
whole context; attention visits only the pages in use (loop bounds that are data, not
shape).

The runner keeps, on the device, the token each row sampled last (``last_tokens``, one
per row of the group, ``max_running_requests``): every item with a row records its
sample there, and a decode item whose token is ``LAST_TOKEN`` is fed the one kept for
its row. So a step can be sent before the tokens of the step before it are known, and
the tokens never make a round trip through the host to be fed back.

``launch`` dispatches a step and returns before it is computed (JAX dispatches
asynchronously); ``Launched.tokens`` waits for its tokens. A worker launches the next step
before fetching the tokens of the one before, so the host's work for a step (tables,
batch, transfer, the result's message) overlaps the device's forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dpbus.schemas.internal import LAST_TOKEN, DecodeItem, PrefillItem, RowSampling
from dpbus.services.worker import model
from dpbus.services.worker.attention import Shape, StepBatch, build_batch
from dpbus.services.worker.model import TENSOR, Config
from dpbus.services.worker.sampling import sample

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


def _pack(arrays: Sequence[np.ndarray], dtype) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Many small host arrays as one (one transfer a step instead of one per array)."""
    return np.concatenate([np.asarray(a, dtype).ravel() for a in arrays]), tuple(np.shape(a) for a in arrays)


def _unpack(flat: jax.Array, shapes: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
    out, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[at:at + n].reshape(shape))
        at += n
    return out


def _inputs(int_shapes, float_shapes, ints, floats, last_tokens):
    """A step's batch, its sampling rows and where each row keeps its token, unpacked from
    the two flat inputs; decode slots asking for ``LAST_TOKEN`` fed from ``last_tokens``."""
    *batch, top_k, seeds, counters, held_rows, keep_rows = _unpack(ints, int_shapes)
    temperature, top_p = _unpack(floats, float_shapes)
    batch = StepBatch(*batch)
    batch = batch._replace(tokens=_feed_held(batch.tokens, last_tokens, held_rows))
    return batch, (temperature, top_p, top_k, seeds, counters), keep_rows


def _step_fn(cfg: Config, mesh, int_shapes, float_shapes, weights, cache, last_tokens, ints, floats):
    batch, sampling, keep_rows = _inputs(int_shapes, float_shapes, ints, floats, last_tokens)
    logits, cache = model.forward(cfg, weights, cache, batch, mesh)
    tokens = sample(logits, *sampling)
    return tokens, logits, cache, last_tokens.at[keep_rows].set(tokens, mode="drop")


def _feed_held(tokens: jax.Array, last_tokens: jax.Array, held_rows: jax.Array) -> jax.Array:
    """The step's tokens with each decode slot that asks for ``LAST_TOKEN`` given the token
    kept for its row (``held_rows``: one per decode slot, the first tokens of the step)."""
    d = held_rows.shape[0]
    decode = tokens[:d]
    return tokens.at[:d].set(jnp.where(decode == LAST_TOKEN, last_tokens[held_rows], decode))


@dataclasses.dataclass
class Launched:
    """A step dispatched to the device: its sampled tokens, once computed."""
    device_tokens: jax.Array | None
    decode_slots: int  # where the chunks' rows start
    chunk_samples: list[bool]  # per prefill chunk: does it sample
    decode_rows: int
    at: float = dataclasses.field(default_factory=time.monotonic)  # when it was dispatched

    def tokens(self) -> tuple[list[int], list[int]]:
        """Wait for the step: the token sampled after each chunk (-1 where the chunk does
        not sample) and per decode row."""
        if self.device_tokens is None:
            return [], []
        tokens = np.asarray(self.device_tokens).tolist()
        d = self.decode_slots
        return ([tokens[d + j] if sample else -1 for j, sample in enumerate(self.chunk_samples)],
                tokens[:self.decode_rows])


class ModelRunner:
    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, *, num_pages: int, page_size: int,
                 max_running_requests: int, max_prefill_tokens: int, host_weights: dict[str, Any],
                 dtype: str = "float32") -> None:
        cfg.check_tensor_size(mesh.shape[TENSOR])
        self._layout(cfg, mesh, num_pages, page_size, max_running_requests, max_prefill_tokens, dtype)
        self.weights = model.place_weights(host_weights, cfg, mesh, dtype)
        self.cache = model.new_cache(cfg, num_pages, page_size, mesh, dtype)
        replicated = NamedSharding(mesh, jax.P())
        cache_sh = [(model.cache_sharding(mesh),) * 2 for _ in range(cfg.n_layers)]
        # (int shapes, float shapes, weights, cache, last tokens, ints, floats): the shapes
        # follow from the step's Shape; the cache and the last tokens are updated in place
        self._step = jax.jit(functools.partial(_step_fn, cfg, mesh), static_argnums=(0, 1), donate_argnums=(3, 4),
                             out_shardings=(replicated, replicated, cache_sh, replicated))
        self._replicated = replicated
        # the token each row sampled last (what a LAST_TOKEN decode item is fed); a row that
        # has not sampled in the epoch holds 0 or an old token, never read: the page tables
        # refuse to ask for it
        [self.last_tokens] = self._put(np.zeros(self.max_rows, np.int32))

    def _layout(self, cfg: Config, mesh: jax.sharding.Mesh, num_pages: int, page_size: int,
                max_running_requests: int, max_prefill_tokens: int, dtype: str) -> None:
        """The sizes every step's shape follows from."""
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: the pool needs the trash page and at least one more")
        if dtype not in model.DTYPES:
            raise ValueError(f"dtype={dtype!r}: one of {', '.join(model.DTYPES)}")
        self.cfg, self.mesh, self.dtype = cfg, mesh, dtype
        self.page_size, self.num_pages = page_size, num_pages
        self.max_pages = -(-cfg.max_seq_len // page_size)  # page table width: a whole context
        self.max_rows = max_running_requests
        self.prefill_sizes = prefill_buckets(max_prefill_tokens)
        self.decode_sizes = pow2_buckets(1, max_running_requests)

    def compiled_shapes(self) -> int:
        """How many shapes the step function has compiled so far."""
        return self._step._cache_size()

    def shapes(self) -> list[Shape]:
        """Every shape a step can take (all compiled by ``warmup``): decode-only steps by
        batch bucket, and steps with prefill by prefill-token bucket (decode rows padded to
        the largest decode bucket), so as many compiles as buckets."""
        return [self._shape(d, 0) for d in self.decode_sizes] + \
            [self._shape(self.decode_sizes[-1], p) for p in self.prefill_sizes]

    def _shape(self, decode: int, prefill: int) -> Shape:
        return Shape(decode, prefill, min(self.max_rows, prefill), self.max_pages)

    def _shape_for(self, n_decode: int, n_chunks: int, n_tokens: int) -> Shape:
        if n_decode + n_chunks > self.max_rows:
            raise ValueError(f"{n_decode} decode rows and {n_chunks} chunks: more than {self.max_rows} rows")
        return self._shape_fitting(n_decode, n_chunks, n_tokens)

    def _shape_fitting(self, n_decode: int, n_chunks: int, n_tokens: int) -> Shape:
        """The compiled shape that holds ``n_decode`` decode rows, ``n_chunks`` chunks and
        ``n_tokens`` prefill tokens (a step with chunks has every decode slot)."""
        if not n_chunks:
            return self._shape(self._bucket(self.decode_sizes, max(n_decode, 1), "a decode batch"), 0)
        return self._shape(self.decode_sizes[-1], self._bucket(self.prefill_sizes, n_tokens, "a step's prefill"))

    def _put(self, *arrays: np.ndarray) -> list[jax.Array]:
        """Host inputs as replicated global arrays (every process of the group passes the same)."""
        return [model.global_array(np.asarray(a), self._replicated) for a in arrays]

    @staticmethod
    def _bucket(sizes: list[int], n: int, what: str) -> int:
        for b in sizes:
            if n <= b:
                return b
        raise ValueError(f"{what} of {n} exceeds the largest bucket {sizes[-1]}")

    def _pages(self, pages: list[int]) -> list[int]:
        if len(pages) > self.max_pages or any(not 0 < p < self.num_pages for p in pages):
            raise ValueError(f"bad page list {pages[:8]}...: {len(pages)} pages, pool of {self.num_pages}")
        return pages

    @staticmethod
    def _sampling_rows(rows: Sequence[RowSampling | None], n: int) -> list[np.ndarray]:
        temp, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        top_k, seed = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, s in enumerate(rows):
            if s is not None:
                temp[i], top_p[i], top_k[i], seed[i] = s.temperature, s.top_p, s.top_k, s.seed
        return [temp, top_p, top_k, seed]

    def _check(self, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]) -> None:
        self._check_rows(prefill, decode)
        vocab = self.cfg.vocab_size
        for it in decode:
            if it.token != LAST_TOKEN and not 0 <= it.token < vocab:
                raise ValueError(f"decode token {it.token} outside the vocabulary of {vocab}")
            if not 0 <= it.position < self.cfg.max_seq_len:
                raise ValueError(f"decode position {it.position} outside the context of {self.cfg.max_seq_len}")
            if len(it.pages) * self.page_size <= it.position:
                raise ValueError(f"{len(it.pages)} pages of {self.page_size} cannot hold position {it.position}")
        for it in prefill:
            end = it.start + len(it.token_ids)
            if not it.token_ids or it.start < 0 or end > self.cfg.max_seq_len:
                raise ValueError(f"prefill of {len(it.token_ids)} at {it.start}: outside the context of "
                                 f"{self.cfg.max_seq_len}")
            if min(it.token_ids) < 0 or max(it.token_ids) >= vocab:
                raise ValueError(f"a prefill chunk at {it.start} holds tokens outside the vocabulary of {vocab}")
            if len(it.pages) * self.page_size < end:
                raise ValueError(f"{len(it.pages)} pages of {self.page_size} cannot hold positions up to {end}")

    def _check_rows(self, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]) -> None:
        """Rows are -1 or 0..max_rows-1, each at most once a step; a LAST_TOKEN item has one."""
        rows = [it.row for it in [*decode, *prefill]]
        if any(not -1 <= r < self.max_rows for r in rows):
            raise ValueError(f"rows {rows}: each one -1 (no row) or in 0..{self.max_rows - 1}")
        named = [r for r in rows if r >= 0]
        if len(named) != len(set(named)):
            raise ValueError(f"rows {rows}: a row runs twice in one step")
        for it in decode:
            if it.token == LAST_TOKEN and it.row < 0:
                raise ValueError(f"a decode item at position {it.position} asks for its row's last token "
                                 "(LAST_TOKEN) but has no row")

    def _held_rows(self, shape: Shape, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Where each decode slot reads a LAST_TOKEN from (a row; 0 where unused), and where
        each batch row keeps the token it samples (``max_rows``, out of range: nowhere, for
        padding, items without a row and chunks that do not sample)."""
        held = np.zeros(shape.decode, np.int32)
        keep = np.full(shape.rows, self.max_rows, np.int32)
        for i, it in enumerate(decode):
            held[i] = max(it.row, 0)
            if it.row >= 0:
                keep[i] = it.row
        for j, it in enumerate(prefill):
            if it.sample and it.row >= 0:
                keep[shape.decode + j] = it.row
        return held, keep

    def _host_inputs(self, shape: Shape, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]
                     ) -> tuple[np.ndarray, tuple, np.ndarray, tuple]:
        """A step's inputs packed on the host: every int array in one, every float in another
        (with their shapes, which follow from ``shape``)."""
        batch = build_batch(shape, self.page_size, self.cfg.max_seq_len,
                            [(it.token, it.position, self._pages(it.pages)) for it in decode],
                            [(it.start, it.token_ids, self._pages(it.pages)) for it in prefill])
        n = shape.rows
        samp = self._sampling_rows([it.sampling for it in decode] + [None] * (shape.decode - len(decode))
                                   + [it.sampling for it in prefill], n)
        counters = np.zeros(n, np.int32)
        counters[:len(decode)] = [it.counter for it in decode]
        ints, int_shapes = _pack([*batch, samp[2], samp[3], counters, *self._held_rows(shape, prefill, decode)],
                                 np.int32)
        floats, float_shapes = _pack(samp[:2], np.float32)
        return ints, int_shapes, floats, float_shapes

    def _run(self, shape: Shape, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]
             ) -> tuple[jax.Array, jax.Array]:
        """Dispatch one jitted call and return at once (JAX runs it asynchronously): every
        row's sampled token and its logits, both left on the device, decode rows first
        (``shape.decode`` of them), then one row per chunk."""
        ints, int_shapes, floats, float_shapes = self._host_inputs(shape, prefill, decode)
        tokens, logits, self.cache, self.last_tokens = self._step(int_shapes, float_shapes, self.weights, self.cache,
                                                                  self.last_tokens, *self._put(ints, floats))
        return tokens, logits

    def launch(self, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]) -> Launched:
        """Check and dispatch one scheduling step, every prefill chunk and the decode batch
        in one forward, without waiting for it: the next step can be launched before this
        one's tokens are fetched (``Launched.tokens``), and the device goes from one
        forward straight to the next."""
        self._check(prefill, decode)
        if not prefill and not decode:
            return Launched(None, 0, [], 0)
        shape = self._shape_for(len(decode), len(prefill), sum(len(it.token_ids) for it in prefill))
        tokens, _ = self._run(shape, prefill, decode)
        return Launched(tokens, shape.decode, [it.sample for it in prefill], len(decode))

    def step(self, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]) -> tuple[list[int], list[int]]:
        """Run one scheduling step and wait for it: the token sampled after each chunk (-1
        where the chunk does not sample) and per decode row."""
        return self.launch(prefill, decode).tokens()

    def prefill(self, item: PrefillItem, logits: bool = True) -> tuple[int, jax.Array | None]:
        """A step of one prompt chunk alone: the token sampled after it and (if asked) its
        logits, left on the device."""
        self._check([item], [])
        shape = self._shape_for(0, 1, len(item.token_ids))
        tokens, out = self._run(shape, [item], [])
        return int(np.asarray(tokens)[shape.decode]), (out[shape.decode] if logits else None)

    def decode(self, items: Sequence[DecodeItem], logits: bool = True) -> tuple[list[int], jax.Array | None]:
        """A step of decode rows alone: one token for each (and, if asked, their logits,
        left on the device)."""
        self._check([], items)
        tokens, out = self._run(self._shape_for(len(items), 0, 0), [], items)
        return np.asarray(tokens)[:len(items)].tolist(), (out[:len(items)] if logits else None)

    def _warm(self, shape: Shape) -> None:
        """Compile ``shape``: one step of it, on the first pages."""
        greedy = RowSampling(0.0, 1.0, 0, 0)
        pages = list(range(1, min(self.num_pages, self.max_pages + 1)))
        decode = [DecodeItem(0, 0, 0, [1], greedy)] * shape.decode
        prefill = []
        if shape.prefill:
            n = min(shape.prefill, len(pages) * self.page_size)
            prefill = [PrefillItem(0, [0] * n, True, pages, greedy)]
        jax.block_until_ready(self._run(shape, prefill, decode))

    def warmup(self, progress: Callable[[int, int, str], None] | None = None) -> float:
        """Compile every shape now. Its writes land in the first pages, which nobody owns
        yet: the publisher schedules nothing before the group reports ready."""
        t0 = time.perf_counter()
        shapes = self.shapes()
        for i, shape in enumerate(shapes):
            if progress:
                progress(i, len(shapes), f"decode {shape.decode} prefill {shape.prefill}")
            self._warm(shape)
        if progress:
            progress(len(shapes), len(shapes), "done")
        return time.perf_counter() - t0
