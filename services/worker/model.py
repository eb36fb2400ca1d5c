"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in JAX.

One model for the families dpbus serves; the config's flags say where they differ:
``qkv_bias`` / ``o_bias`` (Qwen2's q/k/v biases, ``attention_bias``), ``qk_norm`` (Qwen3's
RMSNorm over each query and key head before RoPE) and ``rope_scaling`` (Llama 3's
``llama3``, ``linear``, Qwen's ``yarn``: inverse frequencies computed once on the host,
``services/rope.py``).

Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE) replace the MLP of their *sparse* layers
(``cfg.sparse_layers``) by routed experts: a router picks the top-k of ``n_experts`` SwiGLU
experts per token (softmax, then top-k, renormalised if ``norm_topk_prob``), and Qwen2-MoE
adds a shared expert scaled by a sigmoid gate. Each sparse layer holds its experts as one
stacked weight per projection, ``[expert, ...]``; tokens are grouped by expert and each
group multiplied by its expert's weights (``moe_mlp``).

Sharding is stated where arrays are made: every weight and cache array has a tuple
of *logical* axes, and ``AXIS_RULES`` maps logical axes to mesh axes. Attention heads,
KV heads and the MLP hidden dimension live on the mesh axis ``"tensor"``; XLA inserts
the all-reduces after the attention output and MLP down projections. In a sparse layer
every expert's hidden dimension (and the shared expert's) is split over ``"tensor"`` the
same way; the expert axis and the router are replicated, so each device holds a slice of
every expert and the routing needs no communication.

The KV cache is a pool of pages per layer, ``[page, kv_head, page_slot, head_dim]`` for K and
for V; a sequence's positions live in the pages its page table lists, in order.

A forward is one scheduling step: the tokens of every prefill chunk and decode row of
the step in one flat batch (``attention.StepBatch``), attention ragged over those rows.
Weights and pages are stored in the runner's dtype (float32, or bfloat16 to halve the
bytes read); norms, softmax and the residual stream stay float32, matmuls accumulate
in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dpbus.services import rope as rope_freqs
from dpbus.services.model_config import ModelConfig
from dpbus.services.worker.attention import BF16_BITS, StepBatch, ragged_attention, write_slots

TENSOR = "tensor"
DATA = "data"  # --mlp-scope world: the groups, one slice of the world's devices each

# logical axis -> mesh axis (None: replicated), for a group's own mesh ("tensor" only)
AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": None,
    "embed": None,
    "q_heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "ffn": TENSOR,
    "experts": None,
    "expert_scores": None,  # the router's output: every device routes every token
    "moe_ffn": TENSOR,
    "pages": None,
    "page_slot": None,
}
# ... and for the world's mesh ("data" over the groups, "tensor" inside each): attention and
# its pages per group (a leading "groups" axis), the dense MLP's hidden dimension over every
# device of the world and the experts over the groups (expert parallel)
WORLD_RULES: dict[str, str | tuple[str, ...] | None] = {
    **AXIS_RULES, "ffn": (DATA, TENSOR), "experts": DATA, "groups": DATA,
}
RULES = {"group": AXIS_RULES, "world": WORLD_RULES}


def spec(*logical: str, scope: str = "group") -> jax.P:
    return jax.P(*(RULES[scope][a] for a in logical))


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
    # only in some families (see ``layer_names``): biases split like their heads, the
    # output bias and the per-head norms replicated
    "bq": ("q_heads", "head_dim"),
    "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"),
    "bo": ("embed",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    # sparse (MoE) layers, instead of w_gate/w_up/w_down: the router, every expert's
    # projections stacked on a leading expert axis, and Qwen2-MoE's shared expert
    "router": ("embed", "expert_scores"),
    "moe_gate": ("experts", "embed", "moe_ffn"),
    "moe_up": ("experts", "embed", "moe_ffn"),
    "moe_down": ("experts", "moe_ffn", "embed"),
    "shared_gate": ("embed", "ffn"),
    "shared_up": ("embed", "ffn"),
    "shared_down": ("ffn", "embed"),
    "shared_router": ("embed",),  # the shared expert's scale is sigmoid(h . shared_router)
}
TOP_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
CACHE_AXES = ("pages", "kv_heads", "page_slot", "head_dim")


def layer_names(cfg: Config, layer: int = 0) -> list[str]:
    """The weights of layer ``layer`` of this model."""
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm"]
    if not cfg.is_sparse(layer):
        names += ["w_gate", "w_up", "w_down"]
    else:
        names += ["router", "moe_gate", "moe_up", "moe_down"]
        if cfg.shared_expert_ffn_dim:
            names += ["shared_gate", "shared_up", "shared_down", "shared_router"]
    if cfg.qkv_bias:
        names += ["bq", "bk", "bv"]
    if cfg.o_bias:
        names.append("bo")
    if cfg.qk_norm:
        names += ["q_norm", "k_norm"]
    return names


def layer_shapes(cfg: Config, layer: int = 0) -> dict[str, tuple[int, ...]]:
    d, h, kv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    e, fe, fs = cfg.n_experts, cfg.moe_ffn_dim, cfg.shared_expert_ffn_dim
    every = {
        "attn_norm": (d,), "wq": (d, h, hd), "wk": (d, kv, hd), "wv": (d, kv, hd), "wo": (h, hd, d),
        "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d),
        "bq": (h, hd), "bk": (kv, hd), "bv": (kv, hd), "bo": (d,), "q_norm": (hd,), "k_norm": (hd,),
        "router": (d, e), "moe_gate": (e, d, fe), "moe_up": (e, d, fe), "moe_down": (e, fe, d),
        "shared_gate": (d, fs), "shared_up": (d, fs), "shared_down": (fs, d), "shared_router": (d,),
    }
    return {name: every[name] for name in layer_names(cfg, layer)}


def dummy_weights(cfg: Config, seed: int = 0) -> dict[str, Any]:
    """Host (numpy) weights drawn from ``seed``: the same numbers whatever the mesh."""
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(fan_in)).astype(np.float32)

    layers = []
    for i in range(cfg.n_layers):
        w = {}
        for name, shape in layer_shapes(cfg, i).items():
            if name.endswith("norm"):
                w[name] = np.ones(shape, np.float32)
            elif name.startswith("b"):
                w[name] = np.zeros(shape, np.float32)
            else:
                if name == "wo":
                    fan_in = shape[0] * shape[1]
                else:  # an expert's input is after its expert axis
                    fan_in = shape[1] if name.startswith("moe_") else shape[0]
                w[name] = draw(shape, fan_in)
        layers.append(w)
    weights = {
        "embed": draw((cfg.vocab_size, cfg.dim), 1),
        "final_norm": np.ones((cfg.dim,), np.float32),
        "layers": layers,
    }
    weights["lm_head"] = weights["embed"].T.copy() if cfg.tie_embeddings else draw((cfg.dim, cfg.vocab_size), cfg.dim)
    return weights


def weight_shardings(cfg: Config, mesh: jax.sharding.Mesh, scope: str = "group") -> dict[str, Any]:
    named = lambda axes: NamedSharding(mesh, spec(*axes, scope=scope))  # noqa: E731
    return {
        **{k: named(v) for k, v in TOP_AXES.items()},
        "layers": [{k: named(LAYER_AXES[k]) for k in layer_names(cfg, i)} for i in range(cfg.n_layers)],
    }


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole; each process
    places only the pieces its own devices need (works for one process or several)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def place_weights(host: dict[str, Any], cfg: Config, mesh: jax.sharding.Mesh, dtype: str = "float32",
                  scope: str = "group") -> dict[str, Any]:
    """Put host weights on the mesh in ``dtype``, each array split by its logical axes."""
    want = DTYPES[dtype]
    place = lambda a, sh: global_array(np.asarray(a).astype(want, copy=False), sh)  # noqa: E731
    return jax.tree.map(place, host, weight_shardings(cfg, mesh, scope))


def cache_sharding(mesh: jax.sharding.Mesh, scope: str = "group") -> NamedSharding:
    axes = ("groups", *CACHE_AXES) if scope == "world" else CACHE_AXES
    return NamedSharding(mesh, spec(*axes, scope=scope))


def new_cache(cfg: Config, num_pages: int, page_size: int, mesh: jax.sharding.Mesh, dtype: str = "float32",
              scope: str = "group") -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed K and V page pools for every layer, ``[page, kv_head, page_slot, head_dim]``,
    split over the KV heads; in the world scope one pool per group, ``[group, page, ...]``,
    each on its group's devices.

    Page 0 is the trash page: padding rows and padding tokens write there; a real token
    reads it only where masked. bfloat16 pages are kept as their bits (uint16).
    """
    shape = (num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)
    if scope == "world":
        shape = (mesh.shape[DATA], *shape)
    stored = BF16_BITS if dtype == "bfloat16" else DTYPES[dtype]  # see attention.BF16_BITS
    make = jax.jit(lambda: jnp.zeros(shape, stored), out_shardings=cache_sharding(mesh, scope))
    return [(make(), make()) for _ in range(cfg.n_layers)]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(jnp.float32)


def mm(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``einsum(spec, x, w)`` in the weights' dtype, accumulated and returned in float32."""
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotate pairs (first half, second half) of the head dim, as Hugging Face Llama does.
    ``x [T, H, hd]`` at ``positions [T]``; ``inv_freq [hd/2]`` from ``services/rope.py``,
    ``scale`` multiplies cos and sin (YaRN's attention factor; 1 otherwise)."""
    hd = x.shape[-1]
    angles = positions[:, None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [T, hd/2]
    cos = (jnp.cos(angles) * scale)[:, None, :]
    sin = (jnp.sin(angles) * scale)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_inputs(cfg: Config, w: dict[str, Any], h: jax.Array, positions: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v ``[T, heads, head_dim]`` of the normed residual ``h``: projections, the
    biases and per-head norms of the families that have them, then RoPE on q and k."""
    q, k, v = (mm("td,dhk->thk", h, w[name]) for name in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = (a + w[b].astype(jnp.float32) for a, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if cfg.qk_norm:
        q, k = rms_norm(q, w["q_norm"], cfg.norm_eps), rms_norm(k, w["k_norm"], cfg.norm_eps)
    inv_freq = rope_freqs.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    scale = cfg.rope_scaling.attention_factor
    return rope(q, positions, inv_freq, scale), rope(k, positions, inv_freq, scale), v


def swiglu(h: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """The dense MLP: ``down(silu(h gate) * (h up))``, ``h [T, dim]``."""
    return mm("tf,fd->td", jax.nn.silu(mm("td,df->tf", h, gate)) * mm("td,df->tf", h, up), down)


def moe_mlp(cfg: Config, w: dict[str, Any], h: jax.Array, first_expert: jax.Array | int = 0) -> jax.Array:
    """A sparse layer's MLP on ``h [T, dim]``: the routed experts, plus the shared expert
    where the family has one.

    The router gives each token a softmax over the experts; its top ``n_experts_per_tok``
    keep their probability (renormalised to sum to one if ``norm_topk_prob``). Each token is
    then copied once per chosen expert, the ``T * k`` copies sorted by expert, and every
    expert's SwiGLU runs on its own contiguous run of rows with ``jax.lax.ragged_dot``
    against the stacked weights (group sizes counted per step): the FLOPs of the chosen
    experts only, static shapes, no Python loop over experts. The rows are scaled by their
    routing weight and summed back onto their tokens. With the experts' hidden dimension on
    ``"tensor"``, each device computes its slice for every row and the down projection's
    partial sums are all-reduced, as in the dense MLP.

    ``w`` may hold a run of the experts only, ``first_expert`` onwards (``world_mlp``: each
    group's devices hold their share): a copy routed elsewhere adds nothing here.
    """
    probs = jax.nn.softmax(mm("td,de->te", h, w["router"]), axis=-1)  # [T, E], float32
    k, held = cfg.n_experts_per_tok, w["moe_gate"].shape[0]
    top_p, top_e = jax.lax.top_k(probs, k)  # [T, k]
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    local = top_e.reshape(-1) - first_expert
    here = (local >= 0) & (local < held)
    key = jnp.where(here, local, held)  # copies for experts held elsewhere sort last
    order = jnp.argsort(key)  # the T*k (token, expert) pairs, grouped by expert
    token = order // k
    sizes = jnp.bincount(key, length=held + 1)[:held].astype(jnp.int32)
    x = h[token]  # [T*k, dim]

    def grouped(a: jax.Array, w_stacked: jax.Array) -> jax.Array:  # row r times its expert's matrix
        return jax.lax.ragged_dot(a.astype(w_stacked.dtype), w_stacked, sizes, preferred_element_type=jnp.float32)

    act = jax.nn.silu(grouped(x, w["moe_gate"])) * grouped(x, w["moe_up"])  # [T*k, moe_ffn]
    rows = grouped(act, w["moe_down"]) * top_p.reshape(-1)[order][:, None]  # [T*k, dim]
    rows = jnp.where(here[order][:, None], rows, 0.0)
    out = jnp.zeros_like(h).at[token].add(rows)
    if cfg.shared_expert_ffn_dim:
        scale = jax.nn.sigmoid(mm("td,d->t", h, w["shared_router"]))[:, None]
        out = out + scale * swiglu(h, w["shared_gate"], w["shared_up"], w["shared_down"])
    return out


def mlp(cfg: Config, w: dict[str, Any], h: jax.Array, layer: int, first_expert: jax.Array | int = 0) -> jax.Array:
    """Layer ``layer``'s MLP (dense or experts) on the normed residual ``h [T, dim]``."""
    if cfg.is_sparse(layer):
        return moe_mlp(cfg, w, h, first_expert)
    return swiglu(h, w["w_gate"], w["w_up"], w["w_down"])


def write_slots_of(batch: StepBatch, page_size: int, max_seq_len: int) -> tuple[jax.Array, jax.Array]:
    """Where each token's K/V goes: ``page_indices[row, position // page_size]`` at slot
    ``position % page_size``; padding (position >= max_seq_len) goes to the trash page."""
    positions = batch.positions
    valid = positions < max_seq_len
    page_col = jnp.clip(positions // page_size, 0, batch.page_indices.shape[1] - 1)
    return (jnp.where(valid, batch.page_indices[batch.rows, page_col], 0),
            jnp.where(valid, positions % page_size, 0))


def attention_block(cfg: Config, w: dict[str, Any], x: jax.Array, pools: tuple[jax.Array, jax.Array],
                    batch: StepBatch, mesh: jax.sharding.Mesh | None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The residual ``x [T, dim]`` after one layer's attention, and its page pools with the
    step's K/V written in."""
    k_pages, v_pages = pools
    write_page, write_off = write_slots_of(batch, k_pages.shape[2], cfg.max_seq_len)
    h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
    q, k, v = attention_inputs(cfg, w, h, batch.positions)
    k_pages = write_slots(k_pages, write_page, write_off, k)
    v_pages = write_slots(v_pages, write_page, write_off, v)
    x = x + mm("thk,hkd->td", ragged_attention(q, k_pages, v_pages, batch, mesh), w["wo"])
    if cfg.o_bias:
        x = x + w["bo"].astype(jnp.float32)
    return x, (k_pages, v_pages)


def sampled_logits(cfg: Config, weights: dict[str, Any], x: jax.Array) -> jax.Array:
    return mm("...d,dv->...v", rms_norm(x, weights["final_norm"], cfg.norm_eps), weights["lm_head"])


def forward(
    cfg: Config,
    weights: dict[str, Any],
    cache: list[tuple[jax.Array, jax.Array]],
    batch: StepBatch,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """One step over the flat tokens of ``batch``: logits ``[S, vocab]`` (float32) of the
    tokens ``batch.sample`` names, and the page pools with every token's K/V written in.
    ``mesh`` is needed only for the TPU kernel (on CPU the attention is plain XLA).
    """
    x = weights["embed"][batch.tokens].astype(jnp.float32)  # [T, dim]
    new_cache = []
    for i, (w, pools) in enumerate(zip(weights["layers"], cache)):
        x, pools = attention_block(cfg, w, x, pools, batch, mesh)
        new_cache.append(pools)
        x = x + mlp(cfg, w, rms_norm(x, w["mlp_norm"], cfg.norm_eps), i)
    return sampled_logits(cfg, weights, x[batch.sample]), new_cache


# ---- the world scope: attention per group, the MLP over every group's tokens --------------------

ATTENTION_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm")


def world_mlp(cfg: Config, w: dict[str, Any], h: jax.Array, layer: int, mesh: jax.sharding.Mesh,
              dest: jax.Array | None = None, sum_len: int = 0) -> jax.Array:
    """Layer ``layer``'s MLP over every group's tokens ``h [group, T, dim]`` (each group's
    rows on its devices), in the world scope.

    Every device gathers the tokens of all groups, applies the part of the MLP it holds (its
    slice of the dense hidden dimension, or of its groups' experts and of their hidden
    dimension), and the partial sums are added up, so each group gets back its own rows:
    DP attention's gather before the MLP and scatter after. Two layouts (sgl-jax's):

    * MAX_LEN (``sum_len`` 0): every group's ``T`` slots, padding included, side by side
      (an all-gather over ``data``; after it, the sums over ``tensor`` and a reduce-scatter
      over ``data``);
    * SUM_LEN: only the real tokens, end to end in ``sum_len`` slots, token ``t`` of group
      ``g`` at ``dest[g, t]`` (``sum_len`` for padding: dropped, and zero after), so the MLP
      runs on ``sum_len`` rows instead of ``groups * T`` (each group adds its rows into the
      buffer, one sum over ``data``; after it, the sums over the world, and each group takes
      its rows back). Worth it when few groups have many tokens (``world_layout``).
    """
    names = [n for n in layer_names(cfg, layer) if n not in ATTENTION_NAMES and n != "mlp_norm"]
    held = cfg.n_experts // mesh.shape[DATA] if cfg.is_sparse(layer) else 0

    def max_len(h_group: jax.Array, w_part: dict[str, Any]) -> jax.Array:
        t = h_group.shape[1]
        every = jax.lax.all_gather(h_group.reshape(t, -1), DATA, tiled=True)  # [group * T, dim]
        out = mlp(cfg, w_part, every, layer, jax.lax.axis_index(DATA) * held)
        out = jax.lax.psum_scatter(jax.lax.psum(out, TENSOR), DATA, scatter_dimension=0, tiled=True)
        return out.reshape(h_group.shape)

    def end_to_end(h_group: jax.Array, dest_group: jax.Array, w_part: dict[str, Any]) -> jax.Array:
        t, d = h_group.shape[1], dest_group.reshape(-1)
        mine = jnp.zeros((sum_len + 1, h_group.shape[-1]), h_group.dtype).at[d].set(h_group.reshape(t, -1))
        every = jax.lax.psum(mine[:sum_len], DATA)  # [sum_len, dim]: every group's real tokens
        out = jax.lax.psum(mlp(cfg, w_part, every, layer, jax.lax.axis_index(DATA) * held), (DATA, TENSOR))
        out = jnp.concatenate([out, jnp.zeros_like(out[:1])])[d]  # this group's rows (padding: zeros)
        return out.reshape(h_group.shape)

    w_specs = {n: spec(*LAYER_AXES[n], scope="world") for n in names}
    rows = spec("groups", scope="world")
    weights = {n: w[n] for n in names}
    if sum_len:
        return jax.shard_map(end_to_end, mesh=mesh, in_specs=(rows, rows, w_specs), out_specs=rows,
                             check_vma=False)(h, dest, weights)
    return jax.shard_map(max_len, mesh=mesh, in_specs=(rows, w_specs), out_specs=rows, check_vma=False)(h, weights)


def end_to_end_slots(batch: StepBatch, max_seq_len: int, sum_len: int) -> jax.Array:
    """Where each group's real tokens go in the SUM_LEN layout: ``[group, T]`` slots,
    group after group in order, ``sum_len`` for padding: a padding prefill token (its
    position is ``max_seq_len`` or more) or a padding decode row (its row's pages are the
    trash page, 0, which no real row has). The caller makes ``sum_len`` hold every real
    token."""
    first_page = jnp.take_along_axis(batch.page_indices[..., 0], batch.rows, axis=1)  # [group, T]
    real = (batch.positions < max_seq_len) & (first_page != 0)
    n = real.sum(axis=1)
    first = jnp.cumsum(n) - n
    return jnp.where(real, first[:, None] + jnp.cumsum(real, axis=1) - 1, sum_len).astype(jnp.int32)


def world_forward(
    cfg: Config,
    weights: dict[str, Any],
    cache: list[tuple[jax.Array, jax.Array]],
    batch: StepBatch,
    mesh: jax.sharding.Mesh,
    sum_len: int = 0,
) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """One world step: every group's batch in one forward (``batch``'s arrays and the pools
    have a leading group axis on ``data``). Attention runs per group on the group's devices,
    exactly as ``forward`` runs it (each group its own loop bounds); the MLP runs over every
    group's tokens (``world_mlp``, in the SUM_LEN layout when ``sum_len`` is given: at least
    the real tokens of all groups together). Logits ``[group, S, vocab]``.
    """
    rows = spec("groups", scope="world")
    weights_here = jax.P()  # attention weights: every group holds them (split over tensor)

    def attend(cfg_w, x, pools, group_batch):
        one = lambda a: a[0]  # noqa: E731  this device's group
        x, pools = attention_block(cfg, cfg_w, one(x), jax.tree.map(one, pools), jax.tree.map(one, group_batch),
                                   mesh)
        return x[None], jax.tree.map(lambda a: a[None], pools)

    per_group = jax.shard_map(attend, mesh=mesh, in_specs=(weights_here, rows, rows, rows), out_specs=(rows, rows),
                              axis_names={DATA}, check_vma=False)
    x = weights["embed"][batch.tokens].astype(jnp.float32)  # [group, T, dim]
    dest = end_to_end_slots(batch, cfg.max_seq_len, sum_len) if sum_len else None
    new_cache = []
    for i, (w, pools) in enumerate(zip(weights["layers"], cache)):
        x, pools = per_group({n: w[n] for n in ATTENTION_NAMES if n in w}, x, pools, batch)
        new_cache.append(pools)
        x = x + world_mlp(cfg, w, rms_norm(x, w["mlp_norm"], cfg.norm_eps), i, mesh, dest, sum_len)
    x = jnp.take_along_axis(x, batch.sample[..., None], axis=1)  # [group, S, dim]
    return sampled_logits(cfg, weights, x), new_cache
