"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p.

Each row draws from its own key ``fold_in(PRNGKey(seed), n)`` where ``n`` is how many
tokens that request has generated, so a request's tokens depend on its seed alone,
never on what else shares the batch; every worker of a group draws the same token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits: jax.Array,       # [B, V] float32
    temperature: jax.Array,  # [B] float32, 0 = greedy
    top_p: jax.Array,        # [B] float32 in (0, 1]
    top_k: jax.Array,        # [B] int32, 0 = no cut
    seeds: jax.Array,        # [B] int32
    counters: jax.Array,     # [B] int32
) -> jax.Array:
    """The next token of every row. A batch of greedy rows only (the common case of
    benchmarks and tests) takes a fast path: an argmax, no sort of the vocabulary."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.all(temperature <= 0.0), lambda: greedy,
                        lambda: _draw(logits, temperature, top_p, top_k, seeds, counters, greedy))


def _draw(logits, temperature, top_p, top_k, seeds, counters, greedy) -> jax.Array:
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    # top-k: keep values >= the k-th largest
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)
    # top-p: keep the smallest prefix whose probability reaches top_p
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p[:, None]
    floor = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, floor)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature <= 0.0, greedy, drawn)
