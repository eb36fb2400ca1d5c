"""dpbus's XLA attention over a step's ragged batch equals the TPU kernel's reference on the
same batch (the one ``attention.build_batch`` makes for the runner), so the step is right
on CPU and the kernel (run only on a TPU) is fed right: layouts, query spans, page tables."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpbus.services.worker import attention

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

ragged_mod = pytest.importorskip("jax.experimental.pallas.ops.tpu.ragged_paged_attention")


def pools(rng, num_pages: int, kv: int, ps: int, hd: int):
    k = rng.standard_normal((num_pages, kv, ps, hd)).astype(np.float32)
    v = rng.standard_normal((num_pages, kv, ps, hd)).astype(np.float32)
    return k, v


def test_combined_layout_round_trips():
    rng = np.random.default_rng(0)
    k, v = pools(rng, 5, 4, 8, 16)
    both = attention.combined_kv(jnp.asarray(k), jnp.asarray(v))
    assert both.shape == (5, 8, 8, 16)
    np.testing.assert_array_equal(np.asarray(both[:, :, 0::2]), k.transpose(0, 2, 1, 3))  # K at even heads
    np.testing.assert_array_equal(np.asarray(both[:, :, 1::2]), v.transpose(0, 2, 1, 3))
    k2, v2 = attention.split_kv(both)
    np.testing.assert_array_equal(np.asarray(k2), k)
    np.testing.assert_array_equal(np.asarray(v2), v)


def reference(batch: attention.StepBatch, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The kernel's reference on the batch: one output per token of the real rows."""
    return np.asarray(ragged_mod.ref_ragged_paged_attention(
        jnp.asarray(q), attention.combined_kv(jnp.asarray(k), jnp.asarray(v)), jnp.asarray(batch.kv_lens),
        jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens), jnp.asarray(batch.num_seqs),
        sm_scale=1 / math.sqrt(q.shape[-1])))


_xla = jax.jit(attention.ragged_attention)


# (decode slots, prefill slots, chunk rows) and the rows: decode (q_len 1, start) and chunks (q_len, start)
CASES = [
    (4, 64, 4, [(1, 17), (1, 3)], [(9, 0), (5, 37), (40, 2)]),        # decode rows, a first chunk, later chunks
    (2, 32, 2, [], [(32, 70)]),                                        # one full chunk late in a context
    (8, 0, 0, [(1, 0), (1, 15), (1, 16), (1, 90), (1, 47)], []),       # decode only: one page, page boundaries
    (4, 16, 4, [(1, 5)], [(1, 0), (3, 11), (1, 60), (2, 31)]),         # many small chunks
]


@pytest.mark.parametrize("ps, group", [(4, 1), (16, 1), (4, 4)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_xla_ragged_attention_equals_the_kernel_reference(ps, group, case, monkeypatch):
    monkeypatch.setattr(attention, "PREFILL_GROUP", group)  # blocks walked together
    xla = _xla if group == 1 else jax.jit(attention.ragged_attention)
    d, p, rows, decode_shapes, chunk_shapes = CASES[case]
    rng = np.random.default_rng(100 * ps + 10 * group + case)
    h, kv, hd = 8, 4, 32
    width = 100 // ps + 1
    num_pages = 1 + sum(-(-(start + n) // ps) for n, start in decode_shapes + chunk_shapes) + 6
    k, v = pools(rng, num_pages, kv, ps, hd)
    free = list(rng.permutation(np.arange(1, num_pages)))

    def pages_for(n: int) -> list[int]:
        return [int(free.pop()) for _ in range(-(-n // ps))]

    decode = [(0, start, pages_for(start + 1)) for _, start in decode_shapes]
    prefill = [(start, [0] * n, pages_for(start + n)) for n, start in chunk_shapes]
    # pages no row lists are poison: reading one would show as NaN
    k[free], v[free] = np.nan, np.nan
    shape = attention.Shape(d, p, rows, width)
    batch = attention.build_batch(shape, ps, 10_000, decode, prefill)
    q = rng.standard_normal((d + p, h, hd)).astype(np.float32)

    want = reference(batch, q, k, v)
    got = np.asarray(xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jax.tree.map(jnp.asarray, batch)))
    assert got.shape == q.shape and np.isfinite(got).all()
    real = list(range(len(decode))) + list(range(d, d + sum(n for n, _ in chunk_shapes)))
    cu = batch.cu_q_lens
    assert [t for i in range(int(batch.num_seqs[0])) for t in range(cu[i], cu[i + 1])
            if i < len(decode) or i >= d] == real
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=0)

    # and a wrong page table would show: the first real row reads the trash page instead of its first page
    bad = batch._replace(page_indices=batch.page_indices.copy())
    bad.page_indices[0 if decode else d, 0] = 0
    got_bad = np.asarray(xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jax.tree.map(jnp.asarray, bad)))
    assert not np.allclose(got_bad[real], want[real], atol=2e-5, rtol=0)


def test_blocks_of_a_step_cover_each_prefill_token_once():
    """Query blocks: every prefill token sits in exactly one block of its own row, the
    blocks are sorted by the pages they need (longest first) and each group visits as many
    pages as its first block needs."""
    ps = 4
    prefill = [(0, [1] * 5, [1, 2]), (30, [2] * 40, list(range(3, 21))), (7, [3] * 1, [21, 22])]
    shape = attention.Shape(2, 64, 4, 20)
    b = attention.build_batch(shape, ps, 1000, [(5, 9, [23, 24, 25])], prefill)
    d, bs = shape.decode, shape.block
    assert len(b.block_start) == shape.blocks and shape.blocks % attention.PREFILL_GROUP == 0
    last = {}  # block -> its last position
    for t in range(d, d + 46):
        blk, off = divmod(int(b.token_slot[t - d]), bs)
        assert b.block_start[blk] + off == t and b.rows[t] == b.block_row[blk]
        last[blk] = max(last.get(blk, 0), int(b.positions[t]))
    assert sorted(last) == [0, 1, 2, 3]  # 5 tokens, 32 + 8, 1: four blocks, the rest padding
    need = [-(-(last[i] + 1) // ps) for i in range(4)]
    assert need == sorted(need, reverse=True) and need[0] == -(-70 // ps)
    need += [0] * (shape.blocks - 4)  # padding blocks visit nothing
    assert list(b.group_pages) == need[::attention.PREFILL_GROUP]
    assert list(b.sample) == [0, 1, 6, 46, 47, 0]
    assert list(b.cu_q_lens) == [0, 1, 2, 7, 47, 48, 48] and int(b.num_seqs[0]) == 5
    assert list(b.kv_lens) == [10, 1, 5, 70, 8, 0]
