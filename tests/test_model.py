"""The worker's model, runner and sampler against an independent numpy reference.

The reference (``ref_logits``) is plain float64 numpy written from the Llama recipe
(RMSNorm, RoPE half rotation, grouped-query attention, SwiGLU), recomputing the whole
sequence for every new token. The runner must give the same greedy tokens and logits
for meshes of 1, 2 and 4 devices, with chunked prefill and several sequences in flight.

Every sequence here lives in deliberately scattered, shuffled KV pages (never
1, 2, 3, ...), so that a page-table mistake (order, offset, a missing page) shows.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

# Fake 4 CPU devices; must happen before jax is imported (tests/conftest.py does it too).
_FLAG = "--xla_force_host_platform_device_count=4"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpbus.schemas.internal import DecodeItem, PrefillItem, RowSampling  # noqa: E402
from dpbus.services.worker import attention, model  # noqa: E402
from dpbus.services.worker.model import Config  # noqa: E402
from dpbus.services.worker.runner import ModelRunner, make_group_mesh, prefill_buckets  # noqa: E402
from dpbus.services.worker.sampling import sample  # noqa: E402

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

CFG = Config(vocab_size=384, dim=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16, ffn_dim=256,
             max_seq_len=96)
PAGE = 8
MAX_PAGES = -(-CFG.max_seq_len // PAGE)  # 12: one whole context
NUM_PAGES = 48                            # page 0 (trash) + 47
MAX_RUNNING = 4                           # decode buckets 1, 2, 4
MAX_PREFILL = 32                          # prefill buckets 16, 32
N_NEW = 12
GREEDY = RowSampling(0.0, 1.0, 0, 0)
ATOL = 1e-4

# (prompt length, prefill chunk sizes, decode step at which it joins the batch)
PROMPTS = [
    (5, [5], 0),
    (20, [7, 13], 0),
    (45, [32, 13], 4),  # longer than one chunk; joins while the others decode
]


def host_weights() -> dict:
    """Dummy weights with random (not all-ones) norm gains, so a misapplied gain shows."""
    w = model.dummy_weights(CFG, seed=3)
    rng = np.random.default_rng(11)
    gain = lambda n: rng.uniform(0.5, 1.5, n).astype(np.float32)  # noqa: E731
    for layer in w["layers"]:
        layer["attn_norm"] = gain(CFG.dim)
        layer["mlp_norm"] = gain(CFG.dim)
    w["final_norm"] = gain(CFG.dim)
    return w


HOST = host_weights()


def pages_for(tokens: int, page_size: int = PAGE) -> int:
    return -(-tokens // page_size)


def scattered_pages(seed: int, n: int = 3) -> list[list[int]]:
    """``n`` disjoint page lists of a whole context each, drawn in shuffled order from the
    pool (never page 0), none of them ascending."""
    perm = np.random.default_rng(seed).permutation(np.arange(1, NUM_PAGES)).tolist()
    lists = [perm[i * MAX_PAGES:(i + 1) * MAX_PAGES] for i in range(n)]
    assert all(len(p) == MAX_PAGES and p != sorted(p) for p in lists)
    return lists


# ---------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------

def f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def ref_norm(x: np.ndarray, gain) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.norm_eps) * f64(gain)


def ref_rope(a: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``a [T, H, hd]``: rotate pairs (i, i + hd/2) by angle position * theta^(-2i/hd)."""
    hd = a.shape[-1]
    inv_freq = 1.0 / CFG.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.asarray(positions, np.float64)[:, None] * inv_freq
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    a1, a2 = a[..., : hd // 2], a[..., hd // 2:]
    return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], axis=-1)


def ref_logits(cfg: Config, w: dict, tokens: list[int]) -> np.ndarray:
    """Logits ``[T, V]`` for every position of ``tokens``, float64, no cache, no mesh."""
    t, hd = len(tokens), cfg.head_dim
    group = cfg.n_heads // cfg.n_kv_heads
    pos = np.arange(t)
    causal = np.tril(np.ones((t, t), bool))
    x = f64(w["embed"])[np.asarray(tokens)]
    for lw in w["layers"]:
        h = ref_norm(x, lw["attn_norm"])
        q = ref_rope(np.einsum("td,dhk->thk", h, f64(lw["wq"])), pos)
        k = ref_rope(np.einsum("td,dhk->thk", h, f64(lw["wk"])), pos)
        v = np.einsum("td,dhk->thk", h, f64(lw["wv"]))
        # query head i reads KV head i // group (Hugging Face repeat_kv)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("thk,shk->hts", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("thk,hkd->td", np.einsum("hts,shk->thk", p, v), f64(lw["wo"]))
        h = ref_norm(x, lw["mlp_norm"])
        gate = h @ f64(lw["w_gate"])
        x = x + (gate / (1.0 + np.exp(-gate)) * (h @ f64(lw["w_up"]))) @ f64(lw["w_down"])
    return ref_norm(x, w["final_norm"]) @ f64(w["lm_head"])


def ref_layer0_keys(tokens: list[int]) -> np.ndarray:
    """What layer 0 must write into the K pages: ``[T, KV, hd]``."""
    lw = HOST["layers"][0]
    h = ref_norm(f64(HOST["embed"])[np.asarray(tokens)], lw["attn_norm"])
    return ref_rope(np.einsum("td,dhk->thk", h, f64(lw["wk"])), np.arange(len(tokens)))


def ref_generate(prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    seq, out, logits = list(prompt), [], []
    for _ in range(n):
        last = ref_logits(CFG, HOST, seq)[-1]
        top2 = np.sort(last)[-2:]
        # a near tie would make the greedy comparison ill-posed: pick other seeds then
        assert top2[1] - top2[0] > 20 * ATOL, "reference has a near tie; change the test seeds"
        tok = int(np.argmax(last))
        out.append(tok)
        logits.append(last)
        seq.append(tok)
    return out, logits


def make_prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n, *_ in PROMPTS]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts()


@pytest.fixture(scope="module")
def reference(prompts):
    return [ref_generate(p, N_NEW) for p in prompts]


# ---------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------

_RUNNERS: dict[int, ModelRunner] = {}


@pytest.fixture(scope="module")
def runners():
    if len(jax.devices()) < 4:
        pytest.fail("needs 4 CPU devices: XLA_FLAGS was set after jax was imported")
    yield _RUNNERS
    _RUNNERS.clear()


def get_runner(runners: dict, tensor: int) -> ModelRunner:
    if tensor not in runners:
        runners[tensor] = ModelRunner(CFG, make_group_mesh(jax.devices()[:tensor]), num_pages=NUM_PAGES,
                                      page_size=PAGE, max_running_requests=MAX_RUNNING,
                                      max_prefill_tokens=MAX_PREFILL, host_weights=HOST)
    return runners[tensor]


def prefill_all(runner: ModelRunner, prompt: list[int], sizes: list[int], pages: list[int],
                sampling: RowSampling = GREEDY) -> tuple[int, np.ndarray]:
    """Prefill in chunks; each chunk gets just the pages it needs (as the scheduler grows them)."""
    start, token, logits = 0, None, None
    for size in sizes:
        chunk = prompt[start:start + size]
        end = start + size
        token, logits = runner.prefill(PrefillItem(start, chunk, end == len(prompt), pages[:pages_for(end)],
                                                   sampling))
        start = end
    assert start == len(prompt)
    return token, logits


def decode_item(token: int, position: int, counter: int, pages: list[int], sampling: RowSampling) -> DecodeItem:
    return DecodeItem(token, position, counter, pages[:pages_for(position + 1)], sampling)


def run_batch(runner: ModelRunner, prompts: list[list[int]], plan: list[tuple], n_new: int,
              sampling: list[RowSampling] | None = None, pages: list[list[int]] | None = None,
              ) -> dict[int, tuple[list[int], list[np.ndarray]]]:
    """Continuous batching by hand: each prompt is prefilled (in chunks) at its join step,
    then decoded together with every other live sequence until it has ``n_new`` tokens."""
    sampling = sampling or [GREEDY] * len(prompts)
    pages = pages or scattered_pages(0, len(prompts))
    out: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    step = 0
    while len(out) < len(prompts) or any(len(toks) < n_new for toks, _ in out.values()):
        for i, (prompt, (_, sizes, join)) in enumerate(zip(prompts, plan)):
            if join == step:
                tok, lg = prefill_all(runner, prompt, sizes, pages[i], sampling[i])
                out[i] = ([tok], [lg])
        items = []
        for i, (toks, _) in out.items():
            if len(toks) < n_new:
                position = len(prompts[i]) + len(toks) - 1
                items.append((i, decode_item(toks[-1], position, len(toks), pages[i], sampling[i])))
        if items:
            toks, logits = runner.decode([it for _, it in items])
            assert logits.shape == (len(items), CFG.vocab_size)
            for row, ((i, _), tok) in enumerate(zip(items, toks)):
                out[i][0].append(tok)
                out[i][1].append(logits[row])
        step += 1
        assert step < 100
    return out


def assert_matches_reference(got, reference, prompts, what: str) -> None:
    for i, (want_tokens, want_logits) in enumerate(reference):
        tokens, logits = got[i]
        assert tokens == want_tokens, f"prompt {i} (len {len(prompts[i])}), {what}"
        np.testing.assert_allclose(np.stack(logits), np.stack(want_logits), atol=ATOL, rtol=0,
                                   err_msg=f"prompt {i}, {what}")


# ---------------------------------------------------------------------------------------
# (b) sharded runner == reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tensor", [1, 2, 4])
def test_runner_matches_reference(runners, prompts, reference, tensor):
    runner = get_runner(runners, tensor)
    assert runner.mesh.shape["tensor"] == tensor
    got = run_batch(runner, prompts, PROMPTS, N_NEW, pages=scattered_pages(100 + tensor))
    assert_matches_reference(got, reference, prompts, f"tensor={tensor}")


def test_whole_steps_match_reference(runners, prompts, reference):
    """``step``: chunks of some prompts and decode rows of others in one forward, as a
    worker runs the publisher's steps, give the reference's greedy tokens."""
    runner = get_runner(runners, 2)
    pages = scattered_pages(111)
    joins = [0, 0, 2]  # 5 + 7 tokens, then 13, then 32 and 13: never more than MAX_PREFILL a step
    done = [0] * len(prompts)  # prompt tokens in the cache
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(40):
        prefill, decode, who = [], [], []
        for i, (prompt, (_, sizes, _)) in enumerate(zip(prompts, PROMPTS)):
            if step < joins[i] or len(out[i]) == N_NEW:
                continue
            if done[i] < len(prompt):
                n = sizes[[sum(sizes[:j]) for j in range(len(sizes))].index(done[i])]
                end = done[i] + n
                prefill.append(PrefillItem(done[i], prompt[done[i]:end], end == len(prompt),
                                           pages[i][:pages_for(end)], GREEDY))
                who.append(("p", i))
                done[i] = end
            else:
                decode.append(decode_item(out[i][-1], len(prompt) + len(out[i]) - 1, len(out[i]), pages[i], GREEDY))
                who.append(("d", i))
        if not who:
            break
        assert sum(len(it.token_ids) for it in prefill) <= MAX_PREFILL
        got_prefill, got_decode = runner.step(prefill, decode)
        for (kind, i), tok in zip([w for w in who if w[0] == "p"] + [w for w in who if w[0] == "d"],
                                  got_prefill + got_decode):
            if tok >= 0:
                out[i].append(tok)
            else:
                assert kind == "p" and done[i] < len(prompts[i])  # a chunk that is not a prompt's last
    assert out == [tokens for tokens, _ in reference]


def test_a_page_table_bug_would_show(runners, prompts, reference, monkeypatch):
    """Mutant (in memory): the runner sorts each page list. With shuffled pages the
    sequence's positions land elsewhere as its list grows, and the comparison fails; with
    ascending contiguous lists this mutant would have passed unnoticed."""
    runner = get_runner(runners, 1)
    real = ModelRunner._pages
    monkeypatch.setattr(ModelRunner, "_pages", lambda self, pages: real(self, sorted(pages)))
    got = run_batch(runner, prompts, PROMPTS, N_NEW, pages=scattered_pages(7))
    with pytest.raises(AssertionError):
        assert_matches_reference(got, reference, prompts, "sorted-pages mutant")
    monkeypatch.undo()
    got = run_batch(runner, prompts, PROMPTS, N_NEW, pages=scattered_pages(7))
    assert_matches_reference(got, reference, prompts, "after revert")


def test_reference_agrees_with_unsharded_forward(prompts):
    """model.forward on plain arrays (no mesh, fresh pools, whole sequence at once)."""
    prompt = prompts[1]
    t = len(prompt)
    pages = scattered_pages(9)[0]
    cache = [(jnp.zeros((NUM_PAGES, CFG.n_kv_heads, PAGE, CFG.head_dim)),) * 2 for _ in range(CFG.n_layers)]
    weights = jax.tree.map(jnp.asarray, HOST)
    batch = attention.build_batch(attention.Shape(0, t, 1, len(pages)), PAGE, CFG.max_seq_len, [],
                                  [(0, prompt, pages)])
    batch = batch._replace(sample=np.arange(t, dtype=np.int32))  # logits of every position
    logits, cache = jax.jit(model.forward, static_argnums=0)(CFG, weights, cache, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_allclose(np.asarray(logits), ref_logits(CFG, HOST, prompt), atol=ATOL, rtol=0)
    # the K of position p sits at (pages[p // PAGE], :, p % PAGE); nothing else was written
    k0 = np.asarray(cache[0][0])
    want = ref_layer0_keys(prompt)
    for p in range(t):
        np.testing.assert_allclose(k0[pages[p // PAGE], :, p % PAGE], want[p], atol=1e-5, rtol=0)
    used = set(pages[:pages_for(t)])
    assert not np.any(k0[[i for i in range(NUM_PAGES) if i not in used]])


def test_bfloat16_runs_close_to_the_reference(prompts, reference):
    """Weights and KV pages in bfloat16 (``--dtype bfloat16``): the pools and weights really
    are bf16, and with the reference's tokens fed back (teacher forcing, so one flipped
    near-tie does not derail the rest) the logits stay close and the greedy choices
    mostly agree."""
    runner = ModelRunner(CFG, make_group_mesh(jax.devices()[:2]), num_pages=NUM_PAGES, page_size=PAGE,
                         max_running_requests=MAX_RUNNING, max_prefill_tokens=MAX_PREFILL, host_weights=HOST,
                         dtype="bfloat16")
    assert runner.weights["layers"][0]["wq"].dtype == jnp.bfloat16
    assert all(attention.page_values(a).dtype == jnp.bfloat16 for kv in runner.cache for a in kv)
    pages = scattered_pages(71)
    got, want = [], []
    for i, (prompt, (_, sizes, _)) in enumerate(zip(prompts, PROMPTS)):
        ref_tokens, ref_logits_ = reference[i]
        _, lg = prefill_all(runner, prompt, sizes, pages[i])
        got.append(np.asarray(lg))
        for j, tok in enumerate(ref_tokens[:-1]):
            _, lg = runner.decode([decode_item(tok, len(prompt) + j, j + 1, pages[i], GREEDY)])
            got.append(np.asarray(lg[0]))
        want += ref_logits_
    got, want = np.stack(got), np.stack(want)
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()  # about 0.007 measured
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


# ---------------------------------------------------------------------------------------
# paged decode attention == dense attention
# ---------------------------------------------------------------------------------------

def ref_attention(q: np.ndarray, k_pages: np.ndarray, v_pages: np.ndarray, table: np.ndarray,
                  positions: np.ndarray) -> np.ndarray:
    """float64: row r's query against its keys 0..positions[r], read through its page table."""
    b, h, hd = q.shape
    kv, ps = k_pages.shape[1], k_pages.shape[2]
    out = np.zeros((b, h, hd))
    for r in range(b):
        n = int(positions[r]) + 1
        ids = table[r, :pages_for(n, ps)]
        k = f64(k_pages[ids]).transpose(1, 0, 2, 3).reshape(kv, -1, hd)[:, :n]
        v = f64(v_pages[ids]).transpose(1, 0, 2, 3).reshape(kv, -1, hd)[:, :n]
        for head in range(h):
            s = k[head // (h // kv)] @ f64(q[r, head]) / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[r, head] = (p / p.sum()) @ v[head // (h // kv)]
    return out


def attention_case(page_size: int, seed: int = 0):
    """Rows of different lengths (one page, a page boundary, many pages), scattered pages,
    garbage in the trash page, and NaN-poisoned pages listed past ``n_pages``."""
    rng = np.random.default_rng(seed)
    b, h, kv, hd = 4, 8, 2, 16
    max_len = 40
    positions = np.array([0, page_size - 1, page_size, max_len - 5], np.int32)
    n_pages = int(max(pages_for(int(p) + 1, page_size) for p in positions))
    width = n_pages + 3
    need = [pages_for(int(p) + 1, page_size) for p in positions]
    num_pages = 1 + sum(need) + 3 + 2
    perm = rng.permutation(np.arange(1, num_pages))
    poison = perm[-3:]  # listed after n_pages: must never be read
    table = np.zeros((b, width), np.int32)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[at:at + n]
        at += n
        table[r, n_pages:] = poison
    k_pages = rng.standard_normal((num_pages, kv, page_size, hd)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, kv, page_size, hd)).astype(np.float32)
    k_pages[0] *= 50.0  # loud garbage in the trash page: rows shorter than n_pages see it, masked
    v_pages[0] *= 50.0
    k_pages[poison] = np.nan
    v_pages[poison] = np.nan
    q = rng.standard_normal((b, h, hd)).astype(np.float32)
    return q, k_pages, v_pages, table, positions, n_pages


_paged = jax.jit(attention.paged_decode_attention)


@pytest.mark.parametrize("page_size, per_visit", [(1, 1), (4, 1), (16, 1), (1, 8), (4, 3), (16, 8), (4, 64)])
def test_paged_decode_attention_equals_dense(page_size, per_visit):
    q, kp, vp, table, positions, n_pages = attention_case(page_size, seed=page_size)
    assert n_pages < table.shape[1]
    paged = jax.jit(functools.partial(attention.paged_decode_attention, per_visit=per_visit))
    got = np.asarray(paged(q, kp, vp, table, positions, np.int32(n_pages)))
    assert np.isfinite(got).all(), "a page past n_pages was read"
    want = ref_attention(q, kp, vp, table, positions)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # and the model's own dense attention (the prefill path) agrees, over the row's pages
    b, kv = q.shape[0], kp.shape[1]
    clean = table.copy()
    clean[:, n_pages:] = 0
    rows = lambda pool: pool[clean].transpose(0, 2, 1, 3, 4).reshape(b, kv, -1, pool.shape[3])  # noqa: E731
    dense = attention.dense_attention(jnp.asarray(q)[:, None], rows(kp), rows(vp), jnp.asarray(positions)[:, None])
    np.testing.assert_allclose(np.asarray(dense[:, 0]), want, atol=1e-5, rtol=0)


def test_paged_decode_attention_rows_do_not_depend_on_each_other():
    """A row alone (its own n_pages) gives what it gives inside the mixed batch."""
    q, kp, vp, table, positions, n_pages = attention_case(4, seed=1)
    batch = np.asarray(_paged(q, kp, vp, table, positions, np.int32(n_pages)))
    for r in range(q.shape[0]):
        own = pages_for(int(positions[r]) + 1, 4)
        alone = np.asarray(_paged(q[r:r + 1], kp, vp, table[r:r + 1], positions[r:r + 1], np.int32(own)))
        np.testing.assert_allclose(alone[0], batch[r], atol=1e-6, rtol=0)


def test_a_broken_paged_attention_fails_the_comparison():
    """Mutant built in memory from the real source: key positions forget the page offset."""
    src = inspect.getsource(attention.paged_decode_attention)
    assert "first * ps + jnp.arange(per * ps)" in src
    ns = dict(vars(attention))
    exec(src.replace("first * ps + jnp.arange(per * ps)", "jnp.arange(per * ps)"), ns)  # noqa: S102
    q, kp, vp, table, positions, n_pages = attention_case(4, seed=2)
    want = ref_attention(q, kp, vp, table, positions)
    bad = np.asarray(jax.jit(ns["paged_decode_attention"])(q, kp, vp, table, positions, np.int32(n_pages)))
    assert not np.allclose(bad, want, atol=1e-5, rtol=0)
    # visiting one page too few fails as well
    short = np.asarray(_paged(q, kp, vp, table, positions, np.int32(n_pages - 1)))
    assert not np.allclose(short, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# padding writes only the trash page
# ---------------------------------------------------------------------------------------

def snapshot(runner: ModelRunner) -> list[np.ndarray]:
    return [np.asarray(a).copy() for kv in runner.cache for a in kv]


def changed_slots(before: list[np.ndarray], after: list[np.ndarray]) -> set[tuple[int, int]]:
    """(page, slot) pairs that differ in any layer, K or V, any KV head."""
    out = set()
    for a, b in zip(before, after):
        diff = np.any(a != b, axis=(1, 3))  # [page, slot]
        out |= {(int(p), int(s)) for p, s in zip(*np.nonzero(diff))}
    return out


def test_padding_writes_only_the_trash_page(runners, prompts):
    """A 5-token chunk in a 16-token bucket and a decode batch of 3 in a bucket of 4 write
    their K/V exactly where the real tokens go, padding goes to page 0 only, and each real
    row's result is what it is when the row runs alone (no padding at all)."""
    runner = get_runner(runners, 2)
    runner.cache = model.new_cache(CFG, NUM_PAGES, PAGE, runner.mesh)  # start from zeroed pools
    pages = scattered_pages(21)
    lens = [5, 20, 30]
    before = snapshot(runner)
    firsts = []
    for i, n in enumerate(lens):
        tok, _ = runner.prefill(PrefillItem(0, prompts[i][:n], True, pages[i][:pages_for(n)], GREEDY))
        firsts.append(tok)
    after = snapshot(runner)
    real = {(pages[i][p // PAGE], p % PAGE) for i, n in enumerate(lens) for p in range(n)}
    assert real <= changed_slots(before, after)
    assert changed_slots(before, after) - real <= {(0, s) for s in range(PAGE)}
    assert (0, 0) in changed_slots(before, after)  # the 16-bucket padding did land in the trash page

    hot = RowSampling(1.0, 0.9, 0, 77)
    items = [decode_item(firsts[i], n, 1, pages[i], hot if i == 1 else GREEDY) for i, n in enumerate(lens)]
    before = snapshot(runner)
    toks, logits = runner.decode(items)  # bucket 4: one padding row
    after = snapshot(runner)
    real = {(pages[i][n // PAGE], n % PAGE) for i, n in enumerate(lens)}
    assert real <= changed_slots(before, after)
    assert changed_slots(before, after) - real <= {(0, s) for s in range(PAGE)}
    # each row alone (bucket 1, no padding) rewrites the same K/V and gets the same answer
    for i, it in enumerate(items):
        tok, lg = runner.decode([it])
        assert tok == [toks[i]]
        np.testing.assert_allclose(lg[0], logits[i], atol=1e-5, rtol=0)
    # and the cache holds exactly what the reference model puts there
    k0 = np.asarray(runner.cache[0][0])
    for i, n in enumerate(lens):
        want = ref_layer0_keys(prompts[i][:n] + [firsts[i]])
        got = np.stack([k0[pages[i][p // PAGE], :, p % PAGE] for p in range(n + 1)])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# (c) batch independence
# ---------------------------------------------------------------------------------------

def test_decode_rows_are_independent(runners, prompts):
    """A sequence gets the same tokens and logits alone, next to another one, and in
    other pages; it samples (temperature > 0), so per-row seeds and counters count too."""
    runner = get_runner(runners, 2)
    a, b = prompts[1], prompts[2]
    hot = RowSampling(1.0, 0.95, 0, 1234)
    p1, p2 = scattered_pages(31), scattered_pages(32)
    alone = run_batch(runner, [a], [(0, [20], 0)], 8, [hot], pages=[p1[0]])[0]
    together = run_batch(runner, [a, b], [(0, [20], 0), (0, [16, 29], 0)], 8, [hot, GREEDY],
                         pages=[p1[0], p1[1]])[0]
    moved = run_batch(runner, [b, a], [(0, [32, 13], 0), (0, [5, 15], 2)], 8,
                      [RowSampling(1.0, 1.0, 0, 99), hot], pages=[p2[0], p2[1]])[1]
    assert all(x != y for x, y in zip(p2[1][:4], p1[0][:4]))  # really other pages
    assert together[0] == alone[0]
    assert moved[0] == alone[0]
    np.testing.assert_allclose(np.stack(together[1]), np.stack(alone[1]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack(moved[1]), np.stack(alone[1]), atol=1e-5, rtol=0)
    # token j was drawn with the row's seed and counter j from the logits returned with it
    for j, (tok, lg) in enumerate(zip(*alone)):
        assert draw(lg[None], hot.temperature, hot.top_p, hot.top_k, hot.seed, j)[0] == tok
    # the same prompt with another seed goes elsewhere (the seed is really used)
    other = run_batch(runner, [a], [(0, [20], 0)], 8, [RowSampling(1.0, 0.95, 0, 4321)], pages=[p1[2]])[0]
    assert other[0] != alone[0]


def test_runner_rejects_bad_positions_and_page_lists(runners):
    runner = get_runner(runners, 1)
    pages = scattered_pages(41)[0]
    bad_decode = [
        decode_item(1, CFG.max_seq_len, 1, pages, GREEDY),          # outside the context
        DecodeItem(1, 8, 1, pages[:1], GREEDY),                      # position 8 needs 2 pages of 8
        DecodeItem(1, 3, 1, [0], GREEDY),                            # the trash page
        DecodeItem(1, 3, 1, [NUM_PAGES], GREEDY),                    # not in the pool
        DecodeItem(1, 3, 1, pages + [pages[0]], GREEDY),             # wider than a context
    ]
    for item in bad_decode:
        with pytest.raises(ValueError):
            runner.decode([item])
    bad_prefill = [
        PrefillItem(CFG.max_seq_len - 3, [1, 2, 3, 4], True, pages, GREEDY),  # past the context
        PrefillItem(4, [1, 2, 3, 4, 5], True, pages[:1], GREEDY),              # 9 tokens, 1 page
        PrefillItem(0, [1, 2], True, [pages[0], 0], GREEDY),                    # the trash page
        PrefillItem(0, list(range(1, MAX_PREFILL + 2)), True, pages, GREEDY),  # bigger than any bucket
    ]
    for item in bad_prefill:
        with pytest.raises(ValueError):
            runner.prefill(item)


# ---------------------------------------------------------------------------------------
# (d) the weights and the page pools are really split over "tensor"
# ---------------------------------------------------------------------------------------

def test_weights_and_cache_are_sharded(runners, prompts):
    runner = get_runner(runners, 4)
    pages = scattered_pages(51)[0]
    prompt = prompts[1]
    runner.prefill(PrefillItem(0, prompt, True, pages[:pages_for(len(prompt))], GREEDY))
    runner.decode([])  # the pools coming out of a step keep their sharding
    devices = set(jax.devices()[:4])
    h, kv, hd, d, f = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.dim, CFG.ffn_dim

    layer = runner.weights["layers"][0]
    expect = {
        "wq": (jax.P(None, "tensor", None), (d, h // 4, hd)),
        "wk": (jax.P(None, "tensor", None), (d, kv // 4, hd)),
        "wo": (jax.P("tensor", None, None), (h // 4, hd, d)),
        "w_gate": (jax.P(None, "tensor"), (d, f // 4)),
        "w_down": (jax.P("tensor", None), (f // 4, d)),
    }
    for name, (spec, shard_shape) in expect.items():
        arr = layer[name]
        assert arr.sharding.spec == spec, name
        assert {s.device for s in arr.addressable_shards} == devices, name
        assert {s.data.shape for s in arr.addressable_shards} == {shard_shape}, name
    # each device holds its own heads: shard i of wq is heads [2i, 2i+2)
    host_wq = HOST["layers"][0]["wq"]
    for s in layer["wq"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), host_wq[s.index])
    assert sorted(s.index[1].start for s in layer["wq"].addressable_shards) == [0, 2, 4, 6]
    # the embedding is replicated
    assert {s.data.shape for s in runner.weights["embed"].addressable_shards} == {(CFG.vocab_size, d)}

    assert len(runner.cache) == CFG.n_layers
    for k, v in runner.cache:
        for arr in (k, v):
            assert arr.shape == (NUM_PAGES, kv, PAGE, hd)
            assert arr.sharding.spec == jax.P(None, "tensor", None, None)
            shards = arr.addressable_shards
            assert {s.device for s in shards} == devices
            assert {s.data.shape for s in shards} == {(NUM_PAGES, kv // 4, PAGE, hd)}
            assert sorted(s.index[1].start for s in shards) == [0, 1, 2, 3]
    # device i's pages hold KV head i (and only it) of every written position
    want = ref_layer0_keys(prompt)
    for s in runner.cache[0][0].addressable_shards:
        head = s.index[1].start
        data = np.asarray(s.data)
        got = np.stack([data[pages[p // PAGE], 0, p % PAGE] for p in range(len(prompt))])
        np.testing.assert_allclose(got, want[:, head], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# (f) bounded compilation
# ---------------------------------------------------------------------------------------

def test_compilations_are_bounded(runners, prompts):
    runner = get_runner(runners, 2)
    assert runner.prefill_sizes == prefill_buckets(MAX_PREFILL) == [16, 32]
    assert runner.decode_sizes == [1, 2, 4]
    assert runner.max_pages == MAX_PAGES
    runner.warmup()
    n = runner.compiled_shapes()
    assert n == len(runner.prefill_sizes) + len(runner.decode_sizes)

    hot = RowSampling(0.7, 0.9, 40, 5)
    pool = scattered_pages(61)
    # prefill: every length 1..32, starts from 0 to late in the context, page lists of 1..12 pages
    for length in (1, 9, 16, 17, 31, 32):
        for start in (0, 3, CFG.max_seq_len - length):
            end = start + length
            runner.prefill(PrefillItem(start, list(range(1, length + 1)), length % 2 == 0,
                                       pool[length % 3][:pages_for(end)], hot))
    # decode: batches of 1..MAX_RUNNING rows, short and long contexts (1..12 pages visited)
    runner.decode([])
    for size in range(1, MAX_RUNNING + 1):
        for position in (0, 7, 8, 50, CFG.max_seq_len - 1):
            items = [decode_item(7, max(position - r, 0), 20 + r, pool[r % 3], hot if r % 2 else GREEDY)
                     for r in range(size)]
            runner.decode(items)
    run_batch(runner, prompts, PROMPTS, 3, pages=scattered_pages(62))
    # whole steps: chunks next to decode rows, up to MAX_RUNNING rows and MAX_PREFILL tokens in all
    for chunks, decodes in (([20], 1), ([1, 1, 1], 1), ([5, 27], 2), ([32], 3), ([3], 0), ([16, 16], 0)):
        prefill = [PrefillItem(3 * i, list(range(1, n + 1)), i % 2 == 0, pool[i][:pages_for(3 * i + n)], hot)
                   for i, n in enumerate(chunks)]
        decode = [decode_item(7, 40 + r, 1, pool[(len(chunks) + r) % 3], GREEDY) for r in range(decodes)]
        got_prefill, got_decode = runner.step(prefill, decode)
        assert len(got_decode) == decodes and [t >= 0 for t in got_prefill] == [i % 2 == 0 for i in range(len(chunks))]
    assert runner.compiled_shapes() == n

    # the counter does see a new shape (so the check above can fail): 17 prefill token slots
    runner._run(runner._shape(runner.decode_sizes[-1], 17), [PrefillItem(0, [1] * 17, True, pool[0][:3], GREEDY)], [])
    assert runner.compiled_shapes() == n + 1


# ---------------------------------------------------------------------------------------
# (e) sampling
# ---------------------------------------------------------------------------------------

_sample = jax.jit(sample)


def draw(logits, temperature, top_p=1.0, top_k=0, seeds=0, counters=0) -> np.ndarray:
    b = logits.shape[0]
    row = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (b,))  # noqa: E731
    return np.asarray(_sample(jnp.asarray(logits, jnp.float32), row(temperature, jnp.float32),
                              row(top_p, jnp.float32), row(top_k, jnp.int32), row(seeds, jnp.int32),
                              row(counters, jnp.int32)))


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32) * 2


def test_temperature_zero_is_argmax(logits):
    np.testing.assert_array_equal(draw(logits, 0.0, seeds=np.arange(32)), logits.argmax(-1))
    np.testing.assert_array_equal(draw(logits, 0.0, top_p=0.5, top_k=3, seeds=7), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy(logits):
    seeds = np.arange(32)
    np.testing.assert_array_equal(draw(logits, 1.5, top_k=1, seeds=seeds), logits.argmax(-1))
    np.testing.assert_array_equal(draw(logits, 1.5, top_p=1e-6, seeds=seeds), logits.argmax(-1))


def test_same_seed_and_counter_same_token_whatever_the_batch(logits):
    seeds, counters = np.arange(100, 132), np.arange(32) % 5
    base = draw(logits, 1.0, seeds=seeds, counters=counters)
    perm = np.random.default_rng(1).permutation(32)
    permuted = draw(logits[perm], 1.0, seeds=seeds[perm], counters=counters[perm])
    np.testing.assert_array_equal(permuted, base[perm])
    # other rows with other settings around rows 0..7
    mixed_t = np.r_[np.ones(8), np.zeros(8), np.full(8, 3.0), np.full(8, 0.5)]
    mixed_seeds = np.r_[seeds[:8], np.arange(24)]
    mixed = draw(np.r_[logits[:8], logits[8:][::-1]], mixed_t, seeds=mixed_seeds, counters=np.r_[counters[:8],
                 np.zeros(24, int)])
    np.testing.assert_array_equal(mixed[:8], base[:8])
    # a single row alone
    for i in (0, 5):
        assert draw(logits[i:i + 1], 1.0, seeds=seeds[i], counters=counters[i])[0] == base[i]


def test_seeds_and_counters_vary_the_draw():
    flat = np.zeros((64, 16), np.float32)  # uniform over 16 tokens
    by_seed = draw(flat, 1.0, seeds=np.arange(64))
    by_counter = draw(flat, 1.0, seeds=7, counters=np.arange(64))
    assert len(set(by_seed.tolist())) >= 8
    assert len(set(by_counter.tolist())) >= 8
    assert not np.array_equal(by_seed, by_counter)


def test_top_k_and_top_p_restrict_the_draw():
    row = np.log(np.array([0.4, 0.3, 0.2, 0.05, 0.05], np.float32))
    logits = np.tile(row, (256, 1))
    seeds = np.arange(256)
    assert set(draw(logits, 1.0, top_k=2, seeds=seeds).tolist()) == {0, 1}
    assert set(draw(logits, 1.0, top_p=0.65, seeds=seeds).tolist()) == {0, 1}  # 0.4 + 0.3 reaches 0.65
    assert set(draw(logits, 1.0, top_p=0.75, seeds=seeds).tolist()) == {0, 1, 2}
    assert set(draw(logits, 1.0, seeds=seeds).tolist()) == {0, 1, 2, 3, 4}
