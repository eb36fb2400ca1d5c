"""``--mlp-scope world``'s forward: attention per group, the MLP and the experts over the
whole world's devices. Every group's part of one world step must give what the group alone
gives (``model.forward`` on one device), logits and pages, at every layout of the four
virtual devices, for the dense model and both mixture-of-experts families (Qwen3-MoE's
renormalised top-k, Qwen2-MoE's gated shared expert)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpbus.services.model_config import ModelConfig
from dpbus.services.worker import model
from dpbus.services.worker.attention import Shape, StepBatch, build_batch
from dpbus.services.worker.runner import make_group_mesh

pytestmark = pytest.mark.slow  # compiles a model per layout

SMALL = dict(vocab_size=128, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16, ffn_dim=128, max_seq_len=128)
FAMILIES = {
    "dense": ModelConfig(**SMALL),
    # a dense layer, then a sparse one, as decoder_sparse_step / mlp_only_layers give
    "qwen3_moe": ModelConfig(**SMALL, qk_norm=True, n_experts=8, n_experts_per_tok=2, moe_ffn_dim=32,
                             norm_topk_prob=True, sparse_layers=(1,)),
    "qwen2_moe": ModelConfig(**SMALL, qkv_bias=True, n_experts=4, n_experts_per_tok=2, moe_ffn_dim=32,
                             shared_expert_ffn_dim=64, sparse_layers=(0, 1)),
}
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (groups, devices per group)
PAGE, PAGES = 8, 48
SHAPE = Shape(decode=4, prefill=48, prefill_rows=4, width=16)


def world_mesh(groups: int, tensor: int) -> jax.sharding.Mesh:
    return jax.make_mesh((groups, tensor), (model.DATA, model.TENSOR),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:groups * tensor])


def host_weights(cfg: ModelConfig) -> dict:
    """Dummy weights with non-zero biases, so a bias split the wrong way shows."""
    w = model.dummy_weights(cfg, 3)
    rng = np.random.default_rng(4)
    for layer in w["layers"]:
        for name in ("bq", "bk", "bv"):
            if name in layer:
                layer[name] = rng.standard_normal(layer[name].shape).astype(np.float32) * 0.1
    return w


def prefills(cfg: ModelConfig, group: int) -> list:
    """Group ``group``'s first step: prompts of its own lengths and tokens on its own pages."""
    rng = np.random.default_rng(10 + group)
    lengths = [5 + 3 * group, 17 - group]
    firsts = [1 + 2 * group, 20 + 2 * group]
    return [(0, rng.integers(0, cfg.vocab_size, n).tolist(), list(range(p, p + 3))) for n, p in zip(lengths, firsts)]


def two_steps(cfg: ModelConfig, run, groups: int) -> tuple[list[np.ndarray], list[np.ndarray], list]:
    """Each group's prompts in one step, then a decode step for every prompt fed the token
    the first step picked: the logits of both steps per group, and the pages after them."""
    chunks = [prefills(cfg, g) for g in range(groups)]
    first, cache = run([build_batch(SHAPE, PAGE, cfg.max_seq_len, [], c) for c in chunks], None)
    decode = [[(int(np.argmax(first[g][SHAPE.decode + j])), len(ids), pages) for j, (_, ids, pages) in enumerate(c)]
              for g, c in enumerate(chunks)]
    second, cache = run([build_batch(SHAPE, PAGE, cfg.max_seq_len, d, []) for d in decode], cache)
    return first, second, cache


def alone(cfg: ModelConfig, host: dict):
    """Each group by itself on one device (``model.forward``, the group scope)."""
    mesh = make_group_mesh(jax.devices()[:1])
    weights = model.place_weights(host, cfg, mesh)
    step = jax.jit(lambda c, b: model.forward(cfg, weights, c, b))
    caches: dict[int, list] = {}

    def run(batches, _):
        out = []
        for g, b in enumerate(batches):
            logits, caches[g] = step(caches.get(g) or model.new_cache(cfg, PAGES, PAGE, mesh),
                                     jax.tree.map(jnp.asarray, b))
            out.append(np.asarray(logits))
        return out, [caches[g] for g in range(len(batches))]
    return run


@functools.cache
def reference(family: str) -> tuple:
    """Both steps of all four groups' prompts, each group alone (a layout of fewer groups
    reads the first of them)."""
    cfg = FAMILIES[family]
    return two_steps(cfg, alone(cfg, host_weights(cfg)), 4)


def together(cfg: ModelConfig, host: dict, groups: int, tensor: int, sum_len: int = 0):
    """Every group in one world step (``model.world_forward``; ``sum_len``: the SUM_LEN
    layout, that many slots for every group's real tokens end to end)."""
    mesh = world_mesh(groups, tensor)
    weights = model.place_weights(host, cfg, mesh, scope="world")
    step = jax.jit(lambda c, b: model.world_forward(cfg, weights, c, b, mesh, sum_len))
    rows = jax.sharding.NamedSharding(mesh, jax.P(model.DATA))

    def run(batches, cache):
        stacked = StepBatch(*(jax.device_put(np.stack([np.asarray(f) for f in field]), rows)
                              for field in zip(*batches)))
        logits, cache = step(cache or model.new_cache(cfg, PAGES, PAGE, mesh, scope="world"), stacked)
        return list(np.asarray(logits)), cache
    return run, weights


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("groups,tensor", LAYOUTS)
@pytest.mark.parametrize("layout", ["max_len", "sum_len"])
def test_every_group_of_a_world_step_gives_what_it_gives_alone(family, groups, tensor, layout):
    if family == "dense" and groups == 1:
        pytest.skip("one group and the whole world is the group scope (test_model's sharded runner)")
    if layout == "sum_len" and groups == 1:
        pytest.skip("one group's tokens end to end are its own slots")
    cfg = FAMILIES[family]
    cfg.check_world_size(groups, tensor)
    host = host_weights(cfg)
    ref_first, ref_second, ref_cache = reference(family)
    # end to end, every group's real tokens (fewer than all its slots) in one buffer that
    # holds them (not the padded total: the world runner uses one group's slots)
    sum_len = 26 * groups if layout == "sum_len" else 0
    run, _ = together(cfg, host, groups, tensor, sum_len)
    first, second, cache = two_steps(cfg, run, groups)
    # SUM_LEN leaves padding out of the MLP (its rows' logits, and what they write to the
    # trash page, differ): the real rows (the two chunks, then the two decode rows) and pages
    real = (slice(SHAPE.decode, SHAPE.decode + 2), slice(0, 2)) if sum_len else (slice(None), slice(None))
    pages = slice(1, None) if sum_len else slice(None)
    for g in range(groups):
        for got, want, rows in ((first[g], ref_first[g], real[0]), (second[g], ref_second[g], real[1])):
            np.testing.assert_allclose(got[rows], want[rows], atol=2e-4, rtol=1e-4)
            assert (got[rows].argmax(-1) == want[rows].argmax(-1)).all()
        for layer, (k, v) in enumerate(cache):  # each group's pages hold what its own forward wrote
            np.testing.assert_allclose(np.asarray(k[g])[pages], np.asarray(ref_cache[g][layer][0])[pages], atol=1e-5)
            np.testing.assert_allclose(np.asarray(v[g])[pages], np.asarray(ref_cache[g][layer][1])[pages], atol=1e-5)


def shard_elements(a: jax.Array) -> int:
    (n,) = {s.data.size for s in a.addressable_shards}
    return n


def test_the_world_holds_each_expert_once_and_attention_per_group():
    """Two groups of two devices: replicas (the group scope) put every expert on each group
    (split over its two devices); the world splits the experts over the groups too, so each
    device holds half as much of them. Attention weights stay a copy per group."""
    cfg = FAMILIES["qwen2_moe"]
    host = host_weights(cfg)
    replica = model.place_weights(host, cfg, make_group_mesh(jax.devices()[:2]))
    _, world = together(cfg, host, 2, 2)
    for name in ("moe_gate", "moe_up", "moe_down", "shared_gate", "shared_down"):
        assert shard_elements(world["layers"][1][name]) * 2 == shard_elements(replica["layers"][1][name]), name
    assert world["layers"][1]["moe_gate"].sharding.spec == jax.P(model.DATA, None, model.TENSOR)
    for name in ("wq", "wk", "wo", "router"):
        assert shard_elements(world["layers"][1][name]) == shard_elements(replica["layers"][1][name]), name


def test_a_world_the_model_cannot_be_split_over_is_refused_by_name():
    with pytest.raises(ValueError, match="n_experts=4 is not divisible by the 3 groups"):
        FAMILIES["qwen2_moe"].replace(shared_expert_ffn_dim=0, ffn_dim=96).check_world_size(3, 1)
    with pytest.raises(ValueError, match="ffn_dim=128 is not divisible by the world's 12 devices"):
        FAMILIES["dense"].check_world_size(3, 4)
    with pytest.raises(ValueError, match="n_kv_heads=4 is not divisible by the tensor axis size 8"):
        FAMILIES["dense"].check_world_size(1, 8)


# ---- the world's runner: every group's step of a script, against a runner per group ------------

ROWS, PREFILL_TOKENS = 4, 32


def script(group: int) -> list:
    """Steps of one group: prompts in chunks (rows 0 and 1), decodes that feed each row the
    token it sampled last (``LAST_TOKEN``), a seeded sampling row; a step with nothing
    (None) lets the group sit out world steps the others run."""
    from dpbus.schemas.internal import LAST_TOKEN, DecodeItem, PrefillItem, RowSampling

    rng = np.random.default_rng(50 + group)
    greedy, drawn = RowSampling(0.0, 1.0, 0, 0), RowSampling(0.8, 0.9, 20, 7 + group)
    a = rng.integers(0, 128, 20 + 6 * group).tolist()
    b = rng.integers(0, 128, 9).tolist()
    pa, pb = [1 + 8 * group, 2 + 8 * group, 3 + 8 * group, 4 + 8 * group], [5 + 8 * group, 6 + 8 * group]
    steps = [([PrefillItem(0, a[:16], False, pa, greedy, row=0)], []),
             ([PrefillItem(16, a[16:], True, pa, greedy, row=0), PrefillItem(0, b, True, pb, drawn, row=1)], [])]
    at_a, at_b = len(a), len(b)
    for i in range(4 + group):
        if i == 1 and group == 0:
            steps.append(None)
        steps.append(([], [DecodeItem(LAST_TOKEN, at_a + i, i, pa, greedy, row=0),
                           DecodeItem(LAST_TOKEN, at_b + i, i, pb, drawn, row=1)]))
    return steps


@pytest.fixture(scope="module")
def moe_world():
    """A world of 2 groups x 2 devices (Qwen3-MoE) and, for each group's script, the tokens
    of a runner of its own (one device)."""
    from dpbus.services.worker.runner import ModelRunner
    from dpbus.services.worker.world import WorldRunner, make_world_mesh

    cfg = FAMILIES["qwen3_moe"]
    host = host_weights(cfg)
    sizes = dict(num_pages=PAGES, page_size=PAGE, max_running_requests=ROWS, max_prefill_tokens=PREFILL_TOKENS)
    alone_runner = ModelRunner(cfg, make_group_mesh(jax.devices()[:1]), host_weights=host, **sizes)
    want = {g: [alone_runner.step(*s) for s in script(g) if s is not None] for g in range(2)}
    return WorldRunner(cfg, make_world_mesh(2, jax.devices()[:4]), host_weights=host, layout="per_step", **sizes), want


def test_a_world_runner_gives_every_group_the_tokens_of_its_own_runner(moe_world):
    world, want = moe_world
    assert world.groups_here == [0, 1]
    got, sat_out = {0: [], 1: []}, 0
    queues = {g: list(script(g)) for g in range(2)}
    while any(queues.values()):
        parts = {}
        for g, q in queues.items():
            if q:
                s = q.pop(0)
                if s is not None:
                    parts[g] = s
        for g, tokens in world.step_world(parts).items():
            if g in parts:
                got[g].append(tokens)
            else:
                assert tokens == ([], []), "a group that sat out a world step has no tokens of it"
                sat_out += 1
    assert got == want
    assert sat_out == 1  # group 0, mid-script, while group 1 decoded


def test_a_full_decode_batch_in_one_group_and_a_chunk_in_another_share_a_world_step(moe_world):
    """Each group's part fits its rows, the largest of each size together did not: the
    world's shape raised, the world loop broke and every worker left the world (the chaos
    test in a world found it: 16 decode rows in one group, a chunk in the other)."""
    world, _ = moe_world
    shape = world.world_shape([(ROWS, 0, 0), (0, 1, 10)])
    assert shape.decode == ROWS and shape.prefill >= 10 and shape.prefill_rows >= 1


def test_agree_gathers_what_every_device_of_the_world_says():
    from dpbus.services.worker.world import agree, make_world_mesh

    said = agree(make_world_mesh(2, jax.devices()[:4]), [3, 1, 4])
    assert said.shape == (2, 2, 3) and (said == np.array([3, 1, 4])).all()


async def test_the_world_stepper_runs_each_step_of_its_group_once_in_order(moe_world):
    """A group's steps handed to its ``WorldStepper`` one at a time, as the worker does: each
    is applied (its rows changed) exactly once, in order, and gets its own runner's tokens;
    the other group, with no steps, sits every world step out."""
    import asyncio

    from dpbus.schemas.internal import DecodeRow, PrefillChunk, Step
    from dpbus.services.worker.world import WorldStepper

    world, want = moe_world
    parts = [s for s in script(1) if s is not None]
    # the messages say only what the agreement reads (how many rows, chunks and tokens)
    steps = [Step(1, i + 1, prefill=[PrefillChunk(c.row, c.start, c.token_ids, c.sample) for c in p[0]],
                  decode=[DecodeRow(d.row, d.token, d.position, d.counter) for d in p[1]]) for i, p in enumerate(parts)]
    applied = []

    def apply(step: Step):
        applied.append(step.seq)
        return parts[step.seq - 1]

    stepper = WorldStepper(world, 1, apply)
    running = asyncio.create_task(stepper.run())
    try:
        got = [(await stepper.launch(step)).tokens() for step in steps]
        await asyncio.sleep(0.1)  # idle world steps meanwhile: nothing more is applied
    finally:
        running.cancel()
    assert applied == [s.seq for s in steps]
    assert got == want[1]
    assert stepper.counts["ran"] == len(steps) and stepper.counts["sat_out"] == 0 and stepper.counts["idle"] > 0


def test_the_world_lays_tokens_end_to_end_when_they_fit_in_one_group_s_slots():
    """SUM_LEN (the MLP on one group's ``T`` slots) when every group's real tokens fit in
    them, else MAX_LEN (every group's padded slots): what every process picks alike."""
    from dpbus.services.worker.world import end_to_end_len

    decode, prefill = Shape(decode=8, prefill=0, prefill_rows=4, width=16), Shape(8, 64, 4, 16)
    assert end_to_end_len(decode, [(5, 0, 0), (3, 0, 0)]) == 8
    assert end_to_end_len(decode, [(5, 0, 0), (4, 0, 0)]) == 0
    assert end_to_end_len(decode, [(8, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)]) == 8
    assert end_to_end_len(prefill, [(2, 1, 40), (0, 1, 30)]) == 72
    assert end_to_end_len(prefill, [(2, 1, 40), (0, 1, 31)]) == 0


def test_member_watch_names_a_member_gone_silent_or_leaving_never_one_still_starting():
    from dpbus.services.worker.world import MemberWatch

    w = MemberWatch([1, 2], timeout=2.0)
    w.beat(1, False, 0.0)  # starting: not watched yet
    w.beat(7, True, 0.0)  # not a member of this world
    assert w.gone(100.0) is None
    w.beat(1, True, 10.0)
    w.beat(2, True, 10.0)
    assert w.gone(11.9) is None
    w.beat(1, True, 11.0)
    assert w.gone(12.5) == "node(s) [2] silent for over 2s"
    w.beat(2, True, 12.6)
    assert w.gone(12.7) is None
    w.beat(2, False, 12.8)  # leaving a broken world: gone at once, not at the time-out
    assert w.gone(12.8) == "node 2 is leaving the world (it said it is not ready)"
    w.beat(2, True, 12.9)  # what it said stands
    assert w.gone(12.9) is not None
    stopped = MemberWatch([1], timeout=2.0)
    stopped.beat(1, True, 0.0, stopping=True)  # draining after a stop, then gone: stopped, not dead
    assert stopped.gone(1.0) is None and stopped.gone(2.5) == "node(s) [1] stopped"
