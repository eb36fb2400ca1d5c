"""dpbus's XLA attention and the TPU kernel's reference agree on the same ragged batch, so
the kernel (run only on a TPU) is fed right: layouts, query spans, page tables."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from services.worker import attention, model

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


@pytest.mark.parametrize("ps", [4, 16])
def test_xla_paths_equal_the_kernel_reference_on_a_mixed_batch(ps):
    rng = np.random.default_rng(ps)
    h, kv, hd = 8, 4, 32
    width = 12
    num_pages = 60
    k, v = pools(rng, num_pages, kv, ps, hd)
    free = list(rng.permutation(np.arange(1, num_pages)))

    def pages_for(n: int) -> list[int]:
        return [int(free.pop()) for _ in range(-(-n // ps))]

    # (q_len, start): two decode rows, a first chunk and a later chunk of a prompt
    shapes = [(1, 17), (1, 3), (9, 0), (5, 2 * ps + 1)]
    rows = []
    for q_len, start in shapes:
        rows.append((rng.standard_normal((q_len, h, hd)).astype(np.float32), start, pages_for(start + q_len)))

    want = []
    decode = [r for r in rows if len(r[0]) == 1]
    table = np.zeros((len(decode), width), np.int32)
    for i, (_, _, p) in enumerate(decode):
        table[i, :len(p)] = p
    positions = np.array([start for _, start, _ in decode], np.int32)
    n_pages = int(max(len(p) for _, _, p in decode))
    dec = np.asarray(model.paged_decode_attention(jnp.asarray(np.stack([q[0] for q, _, _ in decode])),
                                                  jnp.asarray(k), jnp.asarray(v), jnp.asarray(table),
                                                  jnp.asarray(positions), jnp.int32(n_pages)))
    for q, start, p in rows:
        if len(q) == 1:
            want.append(dec[[i for i, r in enumerate(decode) if r[2] is p][0]][None])
            continue
        row = np.zeros(width, np.int32)
        row[:len(p)] = p
        gather = lambda pool: pool[row].transpose(1, 0, 2, 3).reshape(kv, -1, hd)[None]  # noqa: E731
        pos = np.arange(start, start + len(q), dtype=np.int32)[None]
        want.append(np.asarray(model.dense_attention(jnp.asarray(q[None]), jnp.asarray(gather(k)),
                                                     jnp.asarray(gather(v)), jnp.asarray(pos)))[0])
    want = np.concatenate(want)

    r = attention.ragged_batch(rows, width)
    got = ragged_mod.ref_ragged_paged_attention(
        jnp.asarray(r.queries), attention.combined_kv(jnp.asarray(k), jnp.asarray(v)), jnp.asarray(r.kv_lens),
        jnp.asarray(r.page_indices), jnp.asarray(r.cu_q_lens), jnp.asarray(r.num_seqs), sm_scale=1 / math.sqrt(hd))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
    # and a wrong page table would show
    r.page_indices[0, 0] = r.page_indices[1, 0]
    bad = ragged_mod.ref_ragged_paged_attention(
        jnp.asarray(r.queries), attention.combined_kv(jnp.asarray(k), jnp.asarray(v)), jnp.asarray(r.kv_lens),
        jnp.asarray(r.page_indices), jnp.asarray(r.cu_q_lens), jnp.asarray(r.num_seqs), sm_scale=1 / math.sqrt(hd))
    assert not np.allclose(np.asarray(bad), want, atol=2e-5, rtol=0)
