"""Paged attention as the TPU kernel sees it: a *ragged* batch.

JAX ships the ragged paged attention kernel that sgl-jax and tpu-inference use
(``jax.experimental.pallas.ops.tpu.ragged_paged_attention``). It takes every query token
of a step in one array, sequences delimited by ``cu_q_lens``; each sequence's queries are
its last ``q_len`` positions of ``kv_len`` (a prefill chunk, or one decode token); its
keys and values live in pages ``page_indices[i]`` of one *combined* pool
``[page, page_slot, 2 * kv_heads, head_dim]`` (K and V of a head side by side).

dpbus keeps K and V in two pools ``[page, kv_head, page_slot, head_dim]`` (what the XLA
path on CPU reads fastest). This module converts between the two in one place, builds the
kernel's inputs from dpbus's rows, and calls the kernel (sharded over the KV heads) when
the backend is a TPU. No TPU is at hand where the tests run: the tests prove that the
XLA path and the kernel's reference agree on the same inputs, so the kernel is fed right.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


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


@dataclass
class Ragged:
    """The kernel's description of a step's batch (host arrays)."""

    queries: np.ndarray      # [tokens, q_heads, head_dim]
    kv_lens: np.ndarray      # i32[seqs]: keys each sequence attends to
    page_indices: np.ndarray  # i32[seqs, pages per sequence]
    cu_q_lens: np.ndarray    # i32[seqs + 1]: where each sequence's queries start
    num_seqs: np.ndarray     # i32[1]


def ragged_batch(rows: list[tuple[np.ndarray, int, list[int]]], width: int) -> Ragged:
    """``rows``: (queries [q_len, H, hd] of a sequence, the position of its first query, its
    pages). Decode rows have ``q_len == 1``; a prefill chunk starts at its ``start``."""
    q_lens = [len(q) for q, _, _ in rows]
    pages = np.zeros((len(rows), width), np.int32)
    for i, (_, _, p) in enumerate(rows):
        pages[i, :len(p)] = p
    return Ragged(
        queries=np.concatenate([q for q, _, _ in rows]).astype(np.float32),
        kv_lens=np.array([start + len(q) for q, start, _ in rows], np.int32),
        page_indices=pages,
        cu_q_lens=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
        num_seqs=np.array([len(rows)], np.int32),
    )


def tpu_ragged_attention(mesh: jax.sharding.Mesh, r: Ragged, kv_pages: jax.Array, sm_scale: float) -> jax.Array:
    """The Pallas kernel on a TPU, each device taking its share of the KV heads (the query
    heads that read them come along). Not run where no TPU is."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    from services.worker.model import TENSOR

    def local(q, kv, kv_lens, pages, cu, n):
        return ragged_paged_attention(q, kv, kv_lens, pages, cu, n, sm_scale=sm_scale)

    heads, rep = jax.P(None, TENSOR, None), jax.P()
    return jax.shard_map(local, mesh=mesh, in_specs=(heads, jax.P(None, None, TENSOR, None), rep, rep, rep, rep),
                         out_specs=heads)(r.queries, kv_pages, r.kv_lens, r.page_indices, r.cu_q_lens, r.num_seqs)
