"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in JAX.

Sharding is stated where arrays are made: every weight and cache array has a tuple
of *logical* axes, and ``AXIS_RULES`` maps logical axes to mesh axes. Attention heads,
KV heads and the MLP hidden dimension live on the mesh axis ``"tensor"``; XLA inserts
the all-reduces after the attention output and MLP down projections.

The KV cache is a fixed number of sequence *slots*, each ``max_seq_len`` long, laid out
head-major ``[slot, kv_head, position, head_dim]`` so that decode reads it contiguously.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from services.model_config import ModelConfig

TENSOR = "tensor"

# logical axis -> mesh axis (None: replicated)
AXIS_RULES: dict[str, str | None] = {
    "vocab": None,
    "embed": None,
    "q_heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "ffn": TENSOR,
    "pages": None,
    "page_slot": None,
}


def spec(*logical: str) -> jax.P:
    return jax.P(*(AXIS_RULES[a] for a in logical))


Config = ModelConfig


# name -> logical axes, per layer and for the whole model
LAYER_AXES = {
    "attn_norm": ("embed",),
    "wq": ("embed", "q_heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("q_heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "w_gate": ("embed", "ffn"),
    "w_up": ("embed", "ffn"),
    "w_down": ("ffn", "embed"),
}
TOP_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
CACHE_AXES = ("pages", "kv_heads", "page_slot", "head_dim")


def layer_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return {
        "attn_norm": (d,), "wq": (d, h, hd), "wk": (d, kv, hd), "wv": (d, kv, hd), "wo": (h, hd, d),
        "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d),
    }


def dummy_weights(cfg: Config, seed: int = 0) -> dict[str, Any]:
    """Host (numpy) weights drawn from ``seed``: the same numbers whatever the mesh."""
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(fan_in)).astype(np.float32)

    layers = []
    for _ in range(cfg.n_layers):
        w = {}
        for name, shape in layer_shapes(cfg).items():
            if name.endswith("norm"):
                w[name] = np.ones(shape, np.float32)
            else:
                fan_in = shape[0] if name != "wo" else shape[0] * shape[1]
                w[name] = draw(shape, fan_in)
        layers.append(w)
    weights = {
        "embed": draw((cfg.vocab_size, cfg.dim), 1),
        "final_norm": np.ones((cfg.dim,), np.float32),
        "layers": layers,
    }
    weights["lm_head"] = weights["embed"].T.copy() if cfg.tie_embeddings else draw((cfg.dim, cfg.vocab_size), cfg.dim)
    return weights


def weight_shardings(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    named = lambda axes: NamedSharding(mesh, spec(*axes))  # noqa: E731
    return {
        **{k: named(v) for k, v in TOP_AXES.items()},
        "layers": [{k: named(v) for k, v in LAYER_AXES.items()} for _ in range(cfg.n_layers)],
    }


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole; each process
    places only the pieces its own devices need (works for one process or several)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_weights(host: dict[str, Any], cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Put host weights on the mesh, each array split by its logical axes."""
    return jax.tree.map(global_array, host, weight_shardings(cfg, mesh))


def cache_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(*CACHE_AXES))


def new_cache(cfg: Config, num_pages: int, page_size: int, mesh: jax.sharding.Mesh) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed K and V page pools for every layer, ``[page, kv_head, page_slot, head_dim]``.

    Page 0 is the trash page: padding rows and padding tokens write there, nobody reads it.
    """
    shape = (num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=cache_sharding(mesh))
    return [(make(), make()) for _ in range(cfg.n_layers)]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (first half, second half) of the head dim, as Hugging Face Llama does."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dense_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array, positions: jax.Array) -> jax.Array:
    """q ``[B,T,H,hd]`` against keys ``[B,KV,L,hd]`` at positions 0..L-1; a query at p sees 0..p."""
    b, t, h, hd = q.shape
    kv = k_all.shape[1]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_all) / math.sqrt(hd)
    key_pos = jnp.arange(k_all.shape[2])
    visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, L]
    scores = jnp.where(visible[:, None, None, :, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_all)
    return out.reshape(b, t, h, hd)


# pages each loop iteration of decode attention reads per row: more per visit means fewer,
# larger gathers and einsums (see `make bench`, decode attention by pages per visit)
PAGES_PER_VISIT = 1


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
    q = q.reshape(b, kv, g, hd) / math.sqrt(hd)

    def visit(j, carry):
        m, denom, acc = carry
        first = j * per
        ids = jax.lax.dynamic_slice_in_dim(tables, first, per, axis=1)  # [B, per]
        ids = jnp.where(first + jnp.arange(per) < n_pages, ids, 0)  # never past n_pages
        k, v = k_pages[ids], v_pages[ids]  # [B, per, KV, ps, hd]
        s = jnp.einsum("bkgd,bpkld->bkgpl", q, k).reshape(b, kv, g, per * ps)
        key_pos = first * ps + jnp.arange(per * ps)
        s = jnp.where((key_pos[None, :] <= positions[:, None])[:, None, None, :], s, -1e30)
        m_new = jnp.maximum(m, s.max(-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        pv = jnp.einsum("bkgpl,bpkld->bkgd", p.reshape(b, kv, g, per, ps), v)
        return m_new, denom * scale + p.sum(-1), acc * scale[..., None] + pv

    init = (jnp.full((b, kv, g), -1e30, jnp.float32), jnp.zeros((b, kv, g), jnp.float32),
            jnp.zeros((b, kv, g, hd), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, (n_pages + per - 1) // per, visit, init)
    return (acc / denom[..., None]).reshape(b, h, hd)


def forward(
    cfg: Config,
    weights: dict[str, Any],
    cache: list[tuple[jax.Array, jax.Array]],
    tokens: jax.Array,       # [B, T] int32
    positions: jax.Array,    # [B, T] int32 absolute positions; >= max_seq_len marks padding
    page_tables: jax.Array,  # [B, P] int32 pages of each row's sequence, in order (0 = trash)
    n_pages: jax.Array | int | None = None,  # decode: pages to visit (max in use over rows)
) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """Logits ``[B, T, vocab]`` and the page pools with these tokens' K/V written in.

    ``T == 1`` is a decode step (paged attention, one page at a time); ``T > 1`` is a
    prefill chunk (dense attention over the row's pages).
    """
    b, t = tokens.shape
    ps = cache[0][0].shape[2]
    valid = positions < cfg.max_seq_len
    slot_page = jnp.take_along_axis(page_tables, jnp.clip(positions // ps, 0, page_tables.shape[1] - 1), axis=1)
    write_page = jnp.where(valid, slot_page, 0)  # padding goes to the trash page
    write_off = jnp.where(valid, positions % ps, 0)
    if n_pages is None:
        n_pages = page_tables.shape[1]
    x = weights["embed"][tokens]
    new_cache = []
    for w, (k_pages, v_pages) in zip(weights["layers"], cache):
        h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
        q = rope(jnp.einsum("btd,dhk->bthk", h, w["wq"]), positions, cfg.rope_theta)
        k = rope(jnp.einsum("btd,dhk->bthk", h, w["wk"]), positions, cfg.rope_theta)
        v = jnp.einsum("btd,dhk->bthk", h, w["wv"])
        k_pages = k_pages.at[write_page, :, write_off].set(k)
        v_pages = v_pages.at[write_page, :, write_off].set(v)
        new_cache.append((k_pages, v_pages))
        if t == 1:
            attn = paged_decode_attention(q[:, 0], k_pages, v_pages, page_tables, positions[:, 0], n_pages)[:, None]
        else:
            def rows(pages: jax.Array) -> jax.Array:  # [B, P, KV, ps, hd] -> [B, KV, P*ps, hd]
                g = pages[page_tables]
                return g.transpose(0, 2, 1, 3, 4).reshape(b, g.shape[2], -1, g.shape[4])
            attn = dense_attention(q, rows(k_pages), rows(v_pages), positions)
        x = x + jnp.einsum("bthk,hkd->btd", attn, w["wo"])
        h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
        x = x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
    x = rms_norm(x, weights["final_norm"], cfg.norm_eps)
    return x @ weights["lm_head"], new_cache
