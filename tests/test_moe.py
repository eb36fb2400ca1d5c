"""The mixture-of-experts families against ``transformers`` itself: Qwen3-MoE (Qwen3's
attention with per-head q/k norms and an explicit head_dim; routed experts, top-k
renormalised) and Qwen2-MoE (Qwen2's q/k/v biases; routed experts, top-k not renormalised,
plus a shared expert under a sigmoid gate).

Each is a tiny random model that transformers makes and saves, with dense and sparse
layers mixed (``mlp_only_layers`` in one, ``decoder_sparse_step`` in the other). dpbus
reads it with ``config_from_hf`` / ``load_hf_weights`` (every expert's tensors stacked into
one weight per layer) and must give transformers' logits for a whole prompt and the same
greedy tokens as ``generate`` for several prompts (chunked prefill, then batched decode),
on one device and on two (the experts' hidden dimension split over the tensor axis).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dpbus.services.worker import model  # noqa: E402
from dpbus.services.worker.checkpoint import config_from_hf, load_hf_weights  # noqa: E402
from dpbus.services.worker.runner import make_group_mesh  # noqa: E402
from tests.test_checkpoint import (Ckpt, _no_eos, assert_logits_match, greedy_through_services,  # noqa: E402
                                   runner_greedy)
from tests.test_families import randomize  # noqa: E402

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

SHAPE = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             moe_intermediate_size=32, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
             eos_token_id=2)
PROMPT_LENS = (5, 23, 41)

# name -> (config class, model class, what the family sets, the sparse layers that must follow)
FAMILIES = {
    # 3 layers, the middle one dense by mlp_only_layers; 8 experts, top-2 renormalised
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_hidden_layers=3, head_dim=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[1]), (0, 2)),
    # 4 layers, every second one sparse; 4 experts, top-2 as the softmax gave them, a shared expert
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                       decoder_sparse_step=2, shared_expert_intermediate_size=48), (1, 3)),
}


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[str, Ckpt]:
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for i, (name, (config_cls, model_cls, extra, _)) in enumerate(FAMILIES.items()):
        m = randomize(model_cls(config_cls(**SHAPE, **extra, attn_implementation="eager")), seed=20 + i)
        m.save_pretrained(root / name, safe_serialization=True)
        _no_eos(m)
        out[name] = Ckpt(root / name, m)
    return out


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(13)
    return [rng.integers(3, SHAPE["vocab_size"], n).tolist() for n in PROMPT_LENS]


def test_configs_name_the_experts(moes):
    q3, q2 = config_from_hf(moes["qwen3_moe"].path), config_from_hf(moes["qwen2_moe"].path)
    assert (q3.sparse_layers, q3.n_experts, q3.n_experts_per_tok, q3.moe_ffn_dim) == (FAMILIES["qwen3_moe"][3], 8, 2, 32)
    assert (q3.norm_topk_prob, q3.shared_expert_ffn_dim, q3.qk_norm, q3.qkv_bias, q3.head_dim) == (True, 0, True,
                                                                                                   False, 24)
    assert (q2.sparse_layers, q2.n_experts, q2.n_experts_per_tok, q2.moe_ffn_dim) == (FAMILIES["qwen2_moe"][3], 4, 2, 32)
    assert (q2.norm_topk_prob, q2.shared_expert_ffn_dim, q2.qk_norm, q2.qkv_bias, q2.o_bias) == (False, 48, False,
                                                                                                 True, False)
    # transformers built the same layers: sparse where we say, dense elsewhere
    for name, ck in moes.items():
        sparse = tuple(i for i, layer in enumerate(ck.hf.model.layers) if hasattr(layer.mlp, "experts"))
        assert sparse == config_from_hf(ck.path).sparse_layers, name


def test_tokens_spread_over_every_expert(moes):
    """The parity tests exercise the routing: in transformers' own forward of the longest
    prompt, the tokens of every sparse layer do not all pick the same experts (more than
    top-k of them are chosen, at least half of all)."""
    for name, ck in moes.items():
        cfg = config_from_hf(ck.path)
        with torch.no_grad():
            router = ck.hf(torch.tensor([prompts()[2]]), output_router_logits=True).router_logits
        assert len(router) == len(cfg.sparse_layers)
        for logits in router:
            chosen = torch.topk(logits, cfg.n_experts_per_tok, dim=-1).indices
            used = set(chosen.flatten().tolist())
            assert len(used) > cfg.n_experts_per_tok and 2 * len(used) >= cfg.n_experts, (name, used)


def test_experts_are_stacked_per_layer(moes):
    """One ``[expert, dim, moe_ffn]`` weight per projection per sparse layer, equal to
    transformers' own experts (which it holds fused: gate and up in one ``gate_up_proj``)."""
    ck = moes["qwen3_moe"]
    cfg = config_from_hf(ck.path)
    host = load_hf_weights(ck.path, cfg)
    experts = ck.hf.model.layers[2].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().numpy(), experts.down_proj.detach().numpy()
    f = cfg.moe_ffn_dim
    layer = host["layers"][2]
    assert layer["moe_gate"].shape == (8, cfg.dim, f) and layer["moe_down"].shape == (8, f, cfg.dim)
    np.testing.assert_array_equal(layer["moe_gate"], gate_up[:, :f, :].transpose(0, 2, 1))
    np.testing.assert_array_equal(layer["moe_up"], gate_up[:, f:, :].transpose(0, 2, 1))
    np.testing.assert_array_equal(layer["moe_down"], down.transpose(0, 2, 1))
    np.testing.assert_array_equal(layer["router"], ck.hf.model.layers[2].mlp.gate.weight.detach().numpy().T)
    assert "w_gate" in host["layers"][1] and "moe_gate" not in host["layers"][1]  # the dense layer


def test_expert_weights_are_split_over_the_tensor_axis(moes):
    ck = moes["qwen2_moe"]
    cfg = config_from_hf(ck.path)
    mesh = make_group_mesh(jax.devices()[:2])
    w = model.place_weights(load_hf_weights(ck.path, cfg), cfg, mesh)["layers"][1]
    assert w["moe_gate"].sharding.spec == jax.P(None, None, "tensor")
    assert w["moe_down"].sharding.spec == jax.P(None, "tensor", None)
    assert w["shared_up"].sharding.spec == jax.P(None, "tensor")
    assert w["router"].sharding.spec == jax.P(None, None) and w["shared_router"].sharding.spec == jax.P(None)
    # each device holds half of every expert's hidden dimension
    assert {s.data.shape for s in w["moe_up"].addressable_shards} == {(4, cfg.dim, cfg.moe_ffn_dim // 2)}


def test_dummy_weights_and_tensor_checks_know_the_experts(moes):
    """``--load-format dummy`` draws a MoE model's stacked experts in the shapes the shardings
    expect; an expert hidden size the tensor axis does not divide is refused by name."""
    cfg = config_from_hf(moes["qwen2_moe"].path)
    mesh = make_group_mesh(jax.devices()[:2])
    host = model.dummy_weights(cfg, seed=0)
    assert jax.tree.structure(host) == jax.tree.structure(model.weight_shardings(cfg, mesh))
    assert host["layers"][3]["moe_down"].shape == (4, 32, cfg.dim) and "w_up" in host["layers"][2]
    cfg.check_tensor_size(2)
    for field, value in (("moe_ffn_dim", 33), ("shared_expert_ffn_dim", 47)):
        with pytest.raises(ValueError, match=field):
            cfg.replace(**{field: value}).check_tensor_size(2)


def test_fused_expert_tensors_are_refused_by_name(moes, tmp_path):
    """transformers holds experts fused in memory (``gate_up_proj``); a checkpoint saved that
    way is named in the error rather than half read."""
    import shutil

    from safetensors.torch import save_file

    ck = moes["qwen3_moe"]
    shutil.copy(ck.path / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in ck.hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj.*fused, mlp\.experts\.gate_up_proj"):
        load_hf_weights(tmp_path, config_from_hf(tmp_path))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_prompt_logits_match_transformers(moes, name):
    assert_logits_match(moes[name], prompts()[2], (2,), name)


@pytest.mark.parametrize("tensor", [1, 2])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_tokens_match_generate(moes, name, tensor):
    ck = moes[name]
    cfg = config_from_hf(ck.path)
    ps = prompts()
    ours = runner_greedy(cfg, load_hf_weights(ck.path, cfg), tensor, ps, 32)
    for p, got in zip(ps, ours):
        assert got == ck.hf_greedy(p), f"{name}, tensor={tensor}, prompt of {len(p)} tokens"


def world_greedy(cfg, host: dict, groups: int, tensor: int, ps: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy tokens of every prompt, prompt i served by group i % groups of one world
    (``--mlp-scope world``: the experts split over the groups): each prompt's chunks in
    world steps of its own group, then every group's decode rows in the same world steps."""
    from dpbus.schemas.internal import DecodeItem, PrefillItem
    from dpbus.services.worker.world import WorldRunner, make_world_mesh
    from tests.test_checkpoint import GREEDY, MAX_PREFILL, PAGE_SIZE

    per_seq = -(-cfg.max_seq_len // PAGE_SIZE)
    runner = WorldRunner(cfg, make_world_mesh(groups, jax.devices()[:groups * tensor]),
                         num_pages=len(ps) * per_seq + 1, page_size=PAGE_SIZE, max_running_requests=len(ps),
                         max_prefill_tokens=MAX_PREFILL, host_weights=host)
    pages = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(ps))]  # in its group's pool
    out: list[list[int]] = []
    for i, prompt in enumerate(ps):
        for start in range(0, len(prompt), MAX_PREFILL):
            chunk = prompt[start:start + MAX_PREFILL]
            part = ([PrefillItem(start, chunk, start + len(chunk) == len(prompt), pages[i], GREEDY)], [])
            (token,), _ = runner.step_world({i % groups: part})[i % groups]
        out.append([token])
    for step in range(1, n_new):
        parts = {g: ([], [DecodeItem(out[i][-1], len(ps[i]) + step - 1, step, pages[i], GREEDY)
                          for i in range(g, len(ps), groups)]) for g in range(groups)}
        for g, (_, tokens) in runner.step_world(parts).items():
            for i, t in zip(range(g, len(ps), groups), tokens):
                out[i].append(t)
    return out


# every layout against the group scope's forward: tests/test_world.py; here against transformers,
# the shared expert (Qwen2-MoE) at both layouts that split the experts
@pytest.mark.parametrize("name,groups,tensor", [("qwen3_moe", 2, 2), ("qwen2_moe", 2, 2), ("qwen2_moe", 4, 1)])
def test_greedy_tokens_match_generate_in_one_world(moes, name, groups, tensor):
    """The world scope against transformers itself: the same greedy tokens, whichever group
    serves a prompt, with each device holding only its groups' share of the experts."""
    ck = moes[name]
    cfg = config_from_hf(ck.path)
    ps = prompts()
    ours = world_greedy(cfg, load_hf_weights(ck.path, cfg), groups, tensor, ps, 32)
    for i, (p, got) in enumerate(zip(ps, ours)):
        assert got == ck.hf_greedy(p), f"{name}, {groups} groups x {tensor}, prompt {i} of {len(p)} tokens"


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,change,field", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen3_moe", {"moe_intermediate_size": None}, "moe_intermediate_size"),
    ("qwen2_moe", {"shared_expert_intermediate_size": None}, "shared_expert_intermediate_size"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
                   "layer_types": ["sliding_attention"] * 4}, "use_sliding_window"),
    ("qwen3_moe", {"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_moe_configs_are_refused(moes, tmp_path, family, change, field):
    c = json.loads((moes[family].path / "config.json").read_text())
    c.update(change)
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=field):
        config_from_hf(tmp_path)


def test_no_sparse_layer_is_a_dense_model(moes, tmp_path):
    """``num_experts`` 0, or every layer in ``mlp_only_layers``: transformers builds only
    dense MLPs, and so do we (no expert field set)."""
    c = json.loads((moes["qwen3_moe"].path / "config.json").read_text())
    for change in ({"num_experts": 0}, {"mlp_only_layers": [0, 1, 2]}):
        (tmp_path / "config.json").write_text(json.dumps({**c, **change}))
        cfg = config_from_hf(tmp_path)
        assert (cfg.sparse_layers, cfg.n_experts) == ((), 0)
        assert "w_gate" in model.layer_names(cfg, 0)


# ---- the whole system ----------------------------------------------------------------------------

@pytest.mark.e2e
def test_qwen3_moe_end_to_end(moes, nats_server, tmp_path):
    """Qwen3-MoE through ingest, publisher and a worker on two devices over NATS."""
    from dpbus.schemas import Done

    ck = moes["qwen3_moe"]
    cases = [{"input_ids": p} for p in prompts()]
    outcomes = greedy_through_services(nats_server, tmp_path, cases, {
        "DPBUS_MODEL_PATH": str(ck.path), "DPBUS_MAX_PREFILL_TOKENS": "16", "DPBUS_MAX_SEQ_LEN": "128"})
    for case, out in zip(cases, outcomes):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.token_ids == ck.hf_greedy(case["input_ids"]), f"prompt of {len(case['input_ids'])} tokens"
