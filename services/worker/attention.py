"""Paged attention over a step's *ragged* batch: every prefill chunk and decode row of a
step in one flat array of tokens.

The layout is the one of the ragged paged attention kernel that sgl-jax and tpu-inference
use (``jax.experimental.pallas.ops.tpu.ragged_paged_attention``): sequence ``i`` (a *row*)
owns the query tokens ``cu_q_lens[i]:cu_q_lens[i+1]``, which are its last positions of
``kv_lens[i]``, and its keys and values live in pages ``page_indices[i]``. dpbus puts the
decode rows first (one token each, ``D`` slots), then the prefill chunks back to back
(``P`` slots); padding writes to the trash page 0 and is never read by a real token.

On CPU (and wherever no TPU is) attention is plain XLA in two parts, each reading only
the pages in use:

* decode rows: one query per row, an online softmax over the row's pages, one page per
  loop turn, up to the longest row of the step (``paged_decode_attention``);
* prefill chunks: their queries cut in blocks of ``PREFILL_BLOCK`` tokens of one chunk
  each, sorted by how far they reach and taken ``PREFILL_GROUP`` at a time; every loop
  turn gathers the next pages of each block's row, up to the furthest block of the
  group (``prefill_block_attention``), so neither padding nor a short chunk next to a
  long one costs a long walk.

On a TPU the kernel takes the same batch (K and V in its combined pool layout). dpbus
keeps K and V in two pools ``[page, kv_head, page_slot, head_dim]`` (what the XLA path
reads fastest); ``combined_kv`` / ``split_kv`` convert in one place. No TPU is at hand
where the tests run: they prove the XLA path equals the kernel's reference on the same
batch, so the kernel is fed right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# pages each loop turn of decode attention reads per row: more per visit means fewer,
# larger gathers and einsums (see `make bench`, decode attention by pages per visit); at
# page size 16 a loop turn costs about as much as reading a page, so 8 halves decode
# attention at KV length 1000 and costs a few reads of the trash page on short rows
PAGES_PER_VISIT = 8
# prefill queries are attended in blocks of this many tokens of one chunk, each loop turn
# reading PREFILL_PAGES_PER_VISIT pages of the block's row
PREFILL_BLOCK = 32
PREFILL_PAGES_PER_VISIT = 8
PREFILL_GROUP = 1  # blocks visited together (in one loop, as far as the furthest of them)
MASKED = -1e30


# ---- layouts -------------------------------------------------------------------------------

def combined_kv(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
    """dpbus's K and V pools -> the kernel's combined pool (K at even heads, V at odd)."""
    pages, kv, slots, hd = k_pages.shape
    both = jnp.stack([k_pages, v_pages], axis=2)  # [page, kv, 2, slot, hd]
    return both.transpose(0, 3, 1, 2, 4).reshape(pages, slots, 2 * kv, hd)


def split_kv(kv_pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The kernel's combined pool -> dpbus's K and V pools."""
    pages, slots, two_kv, hd = kv_pages.shape
    both = kv_pages.reshape(pages, slots, two_kv // 2, 2, hd).transpose(0, 2, 3, 1, 4)
    return both[:, :, 0], both[:, :, 1]


# ---- reading and writing pages ----------------------------------------------------------------

# bfloat16 pages are kept as their bit patterns (uint16): XLA on CPU turns a scatter into,
# or a gather from, a bfloat16 array into a conversion of the whole pool every step
BF16_BITS = jnp.uint16


def page_values(pages: jax.Array) -> jax.Array:
    """Pages (or a pool) as numbers: bfloat16 for a pool kept as bits, else as they are."""
    return jax.lax.bitcast_convert_type(pages, jnp.bfloat16) if pages.dtype == BF16_BITS else pages


def read_pages(pool: jax.Array, ids: jax.Array) -> jax.Array:
    """``pool[ids]`` in float32. The ids are clipped into the pool: XLA on CPU copies whole
    pages for a clipped gather, while plain indexing (which wraps negative ids) becomes a
    loop over every element, several times slower."""
    return page_values(jnp.take(pool, ids, axis=0, mode="clip")).astype(jnp.float32)


def write_slots(pool: jax.Array, page: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """``x [T, KV, hd]`` into ``pool[page[t], :, slot[t]]``, in the pool's dtype."""
    if pool.dtype == BF16_BITS:
        x = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return pool.at[page, :, slot].set(x.astype(pool.dtype))


# ---- a step's batch, built on the host -------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The static sizes of one compiled step."""

    decode: int         # D: decode row slots (tokens 0..D-1)
    prefill: int        # P: prefill token slots (tokens D..D+P-1); 0 = a decode-only step
    prefill_rows: int   # chunks a step may carry
    width: int          # page table width (a whole context)

    @property
    def block(self) -> int:
        return block_size(self.prefill)

    @property
    def blocks(self) -> int:
        """Query blocks: a chunk of n tokens takes ceil(n / block) of them, so all chunks
        together at most P // block + chunks (and at most P); rounded up to whole groups."""
        if not self.prefill:
            return 0
        n = min(self.prefill, self.prefill // self.block + self.prefill_rows)
        return -(-n // PREFILL_GROUP) * PREFILL_GROUP

    @property
    def rows(self) -> int:
        return self.decode + self.prefill_rows


class StepBatch(NamedTuple):
    """A step's tokens and rows (host numpy arrays, then the jitted step's inputs)."""

    tokens: np.ndarray        # i32[T]   T = D + P
    positions: np.ndarray     # i32[T]   absolute positions; >= max_seq_len marks padding
    rows: np.ndarray          # i32[T]   the row of each token
    page_indices: np.ndarray  # i32[R, width]  R = D + prefill rows; 0 = the trash page
    kv_lens: np.ndarray       # i32[R]   keys a row attends to (its last position + 1)
    cu_q_lens: np.ndarray     # i32[R + 1]  where each row's tokens start
    num_seqs: np.ndarray      # i32[1]   rows up to the last real one
    decode_pages: np.ndarray  # i32[]    pages the decode loop visits (the longest decode row)
    block_start: np.ndarray   # i32[blocks]  the first token of each prefill query block
    block_row: np.ndarray     # i32[blocks]  its row
    group_pages: np.ndarray   # i32[blocks / PREFILL_GROUP]  pages each group of blocks visits
    token_slot: np.ndarray    # i32[P]   prefill token -> block * block size + offset
    sample: np.ndarray        # i32[D + prefill rows]  the token whose logits each row samples from


def block_size(prefill: int) -> int:
    """Query block size of a step with ``prefill`` token slots."""
    return max(1, min(PREFILL_BLOCK, prefill))


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def build_batch(shape: Shape, page_size: int, max_seq_len: int, decode: list[tuple[int, int, list[int]]],
                prefill: list[tuple[int, list[int], list[int]]]) -> StepBatch:
    """``decode``: (token, position, pages) per row; ``prefill``: (start, tokens, pages) per
    chunk. Checking them against the pool and the context is the caller's business.

    Prefill query blocks are sorted by the pages they need, longest first, and visited in
    groups of ``PREFILL_GROUP``: each group reads as far as its own longest block, so a
    short chunk (or the padding) next to a long one costs little."""
    d, p, b = shape.decode, shape.prefill, shape.block
    if len(decode) > d or len(prefill) > shape.prefill_rows or sum(len(t) for _, t, _ in prefill) > p:
        raise ValueError(f"{len(decode)} decode rows and {len(prefill)} chunks do not fit {shape}")
    t_total, r_total = d + p, shape.rows
    tokens = np.zeros(t_total, np.int32)
    positions = np.full(t_total, max_seq_len, np.int32)
    positions[:d] = 0  # padding decode rows read (and write) the trash page's slot 0
    rows = np.zeros(t_total, np.int32)
    rows[:d] = np.arange(d)
    table = np.zeros((r_total, shape.width), np.int32)
    kv_lens = np.ones(r_total, np.int32)
    kv_lens[d:] = 0
    cu = np.zeros(r_total + 1, np.int32)
    cu[1:d + 1] = np.arange(1, d + 1)
    sample = np.zeros(r_total, np.int32)
    sample[:d] = np.arange(d)
    decode_pages = 1
    for i, (token, position, pages) in enumerate(decode):
        tokens[i], positions[i] = token, position
        table[i, :len(pages)] = pages
        kv_lens[i] = position + 1
        decode_pages = max(decode_pages, pages_for(position + 1, page_size))
    blocks = []  # (pages needed, first token, row, tokens)
    at = d
    for j, (start, ids, pages) in enumerate(prefill):
        r, n = d + j, len(ids)
        tokens[at:at + n] = ids
        positions[at:at + n] = np.arange(start, start + n)
        rows[at:at + n] = r
        table[r, :len(pages)] = pages
        kv_lens[r] = start + n
        sample[r] = at + n - 1
        blocks += [(pages_for(start + min(s + b, n), page_size), at + s, r, min(b, n - s)) for s in range(0, n, b)]
        at += n
        cu[r + 1] = at
    cu[d + len(prefill) + 1:] = at
    rows[at:] = r_total - 1  # padding prefill tokens: their positions send them to the trash page
    blocks.sort(key=lambda blk: -blk[0])
    n_blocks = shape.blocks
    block_start = np.zeros(n_blocks, np.int32)
    block_row = np.zeros(n_blocks, np.int32)
    need = np.zeros(n_blocks, np.int32)  # padding blocks visit nothing
    token_slot = np.zeros(p, np.int32)
    for i, (pages_needed, first, r, n) in enumerate(blocks):
        block_start[i], block_row[i], need[i] = first, r, pages_needed
        token_slot[first - d:first - d + n] = i * b + np.arange(n)
    return StepBatch(tokens, positions, rows, table, kv_lens, cu, np.array([d + len(prefill)], np.int32),
                     np.int32(decode_pages), block_start, block_row, need[::PREFILL_GROUP].copy(), token_slot,
                     sample)


# ---- XLA attention ---------------------------------------------------------------------------

def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array,
                           positions: jax.Array, n_pages: jax.Array, per_visit: int = PAGES_PER_VISIT) -> jax.Array:
    """One query per row ``q [B,H,hd]`` against that row's pages, ``per_visit`` pages at a time.

    An online softmax runs over the first ``n_pages`` entries of each row's page table,
    so only the pages in use are read (entries past ``n_pages`` in the last visit read the
    trash page instead, masked) and no gathered copy of the whole cache is built.
    """
    b, h, hd = q.shape
    kv, ps = k_pages.shape[1], k_pages.shape[2]
    g = h // kv
    per = max(1, min(per_visit, page_tables.shape[1]))
    tables = jnp.pad(page_tables, ((0, 0), (0, (-page_tables.shape[1]) % per)))
    q = q.reshape(b, kv, g, hd).astype(jnp.float32) / math.sqrt(hd)

    def visit(j, carry):
        m, denom, acc = carry
        first = j * per
        ids = jax.lax.dynamic_slice_in_dim(tables, first, per, axis=1)  # [B, per]
        ids = jnp.where(first + jnp.arange(per) < n_pages, ids, 0)  # never past n_pages
        # [B, KV, per * ps, hd]: the keys of each (row, KV head) in a row, the layout a
        # plain matmul reads; the keys are the left operand, so only q is repacked
        keys = lambda pool: read_pages(pool, ids).transpose(0, 2, 1, 3, 4).reshape(b, kv, per * ps, hd)  # noqa: E731
        k, v = keys(k_pages), keys(v_pages)
        s = jnp.einsum("bkld,bkgd->bkgl", k, q, preferred_element_type=jnp.float32)
        key_pos = first * ps + jnp.arange(per * ps)
        s = jnp.where((key_pos[None, :] <= positions[:, None])[:, None, None, :], s, MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        pv = jnp.einsum("bkgl,bkld->bkgd", p, v, preferred_element_type=jnp.float32)
        return m_new, denom * scale + p.sum(-1), acc * scale[..., None] + pv

    init = (jnp.full((b, kv, g), MASKED, jnp.float32), jnp.zeros((b, kv, g), jnp.float32),
            jnp.zeros((b, kv, g, hd), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, (n_pages + per - 1) // per, visit, init)
    return (acc / denom[..., None]).reshape(b, h, hd)


def prefill_block_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array,
                            q_pos: jax.Array, n_pages: jax.Array, per_visit: int | None = None) -> jax.Array:
    """Blocks of queries ``q [N, Bq, H, hd]`` at positions ``q_pos [N, Bq]``, block ``i``
    reading the pages ``page_tables[i]`` of its row, causally, ``per_visit`` pages per
    loop turn, over the first ``n_pages`` pages only (the same online softmax as decode)."""
    n, bq, h, hd = q.shape
    kv, ps = k_pages.shape[1], k_pages.shape[2]
    g = h // kv
    per = max(1, min(per_visit or PREFILL_PAGES_PER_VISIT, page_tables.shape[1]))
    tables = jnp.pad(page_tables, ((0, 0), (0, (-page_tables.shape[1]) % per)))
    # [N, KV, g * Bq, hd]: one plain matmul per (block, KV head) against its keys
    q = q.reshape(n, bq, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(n, kv, g * bq, hd).astype(jnp.float32)
    q = q / math.sqrt(hd)
    q_pos = jnp.tile(q_pos, (1, g))  # [N, g * Bq], the order of q's rows

    def visit(j, carry):
        m, denom, acc = carry
        first = j * per
        ids = jax.lax.dynamic_slice_in_dim(tables, first, per, axis=1)  # [N, per]
        ids = jnp.where(first + jnp.arange(per) < n_pages, ids, 0)
        keys = lambda pool: read_pages(pool, ids).transpose(0, 2, 1, 3, 4).reshape(n, kv, per * ps, hd)  # noqa: E731
        k, v = keys(k_pages), keys(v_pages)
        s = jnp.einsum("nkqd,nkld->nkql", q, k, preferred_element_type=jnp.float32)
        key_pos = first * ps + jnp.arange(per * ps)
        s = jnp.where((key_pos[None, None, :] <= q_pos[:, :, None])[:, None], s, MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        pv = jnp.einsum("nkql,nkld->nkqd", p, v, preferred_element_type=jnp.float32)
        return m_new, denom * scale + p.sum(-1), acc * scale[..., None] + pv

    init = (jnp.full((n, kv, g * bq), MASKED, jnp.float32), jnp.zeros((n, kv, g * bq), jnp.float32),
            jnp.zeros((n, kv, g * bq, hd), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, (n_pages + per - 1) // per, visit, init)
    # a block that visited nothing (padding) gives zeros: a real query always sees key 0, so denom >= 1
    out = (acc / jnp.maximum(denom, 1e-30)[..., None]).reshape(n, kv, g, bq, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(n, bq, h, hd)


def ragged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: StepBatch,
                     mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Every query token of a step ``q [T, H, hd]`` against its row's keys: ``[T, H, hd]``.
    The K/V of this step's tokens must be in the pools already."""
    if mesh is not None and jax.default_backend() == "tpu":
        kv_pages = combined_kv(page_values(k_pages), page_values(v_pages))
        out = tpu_ragged_attention(mesh, q.astype(kv_pages.dtype), kv_pages, batch, 1 / math.sqrt(q.shape[-1]))
        return out.astype(jnp.float32)
    t, p = q.shape[0], batch.token_slot.shape[0]
    d = t - p
    parts = []
    if d:
        parts.append(paged_decode_attention(q[:d], k_pages, v_pages, batch.page_indices[:d], batch.positions[:d],
                                            batch.decode_pages))
    if p:
        idx = jnp.minimum(batch.block_start[:, None] + jnp.arange(block_size(p)), t - 1)  # [N, Bq]
        groups = lambda x: x.reshape(-1, PREFILL_GROUP, *x.shape[1:])  # noqa: E731
        per_group = (groups(q[idx]), groups(batch.page_indices[batch.block_row]), groups(batch.positions[idx]),
                     batch.group_pages)
        out = jax.lax.map(lambda a: prefill_block_attention(a[0], k_pages, v_pages, a[1], a[2], a[3]), per_group)
        parts.append(out.reshape(-1, *q.shape[1:])[batch.token_slot])
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def tpu_ragged_attention(mesh: jax.sharding.Mesh, q: jax.Array, kv_pages: jax.Array, batch: StepBatch,
                         sm_scale: float) -> jax.Array:
    """The Pallas kernel on a TPU, each device taking its share of the KV heads (the query
    heads that read them come along). Not run where no TPU is."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    from dpbus.services.worker.model import TENSOR

    def local(q, kv, kv_lens, pages, cu, n):
        return ragged_paged_attention(q, kv, kv_lens, pages, cu, n, sm_scale=sm_scale)

    # manual over "tensor" only: in the world scope this runs inside the per-group map over "data"
    heads, rep = jax.P(None, TENSOR, None), jax.P()
    return jax.shard_map(local, mesh=mesh, in_specs=(heads, jax.P(None, None, TENSOR, None), rep, rep, rep, rep),
                         out_specs=heads, axis_names={TENSOR})(q, kv_pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                                          batch.num_seqs)


def dense_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array, positions: jax.Array) -> jax.Array:
    """q ``[B,T,H,hd]`` against keys ``[B,KV,L,hd]`` at positions 0..L-1; a query at p sees
    0..p. Reads every key: a reference for the tests and the benchmark, not the step's path."""
    b, t, h, hd = q.shape
    kv = k_all.shape[1]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_all) / math.sqrt(hd)
    key_pos = jnp.arange(k_all.shape[2])
    visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, L]
    scores = jnp.where(visible[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_all)
    return out.reshape(b, t, h, hd)
