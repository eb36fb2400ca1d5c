"""The families people serve, against ``transformers`` itself: Llama 3 RoPE scaling
(``llama3``; ``linear`` with attention biases), Qwen2 (q/k/v biases; with YaRN RoPE), Qwen3 (per-head q/k norms,
a head_dim that is not hidden/heads, tied embeddings), Mistral without a window.

Each family is a tiny random model that transformers makes and saves; dpbus reads it with
``config_from_hf`` / ``load_hf_weights`` and must give the same greedy tokens as
``generate`` for several prompts (chunked prefill, then batched decode, on two devices
so the new weights are sharded). The RoPE frequencies are also compared with
transformers' own for every scaling kind, in both config forms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dpbus.services import rope  # noqa: E402
from dpbus.services.worker.checkpoint import config_from_hf, load_hf_weights  # noqa: E402
from tests.test_checkpoint import Ckpt, _no_eos, greedy_through_services, runner_greedy  # noqa: E402

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

SHAPE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
N_NEW = 32
PROMPT_LENS = (5, 23, 41)
# a short pretraining context, so that the scaled RoPE differs from plain RoPE at the
# positions the tests reach (up to 41 + 32)
ORIGINAL = 32
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL}


def randomize(m, seed: int):
    """Weights that give logits of order one (no near-ties for greedy), norm gains not all one."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return m.float().eval()


def old_style_rope(path, rope_scaling: dict) -> None:
    """Rewrite a saved config.json the way older checkpoints say it: rope_theta at the top and
    ``rope_scaling`` with ``type`` (transformers 5 writes ``rope_parameters``)."""
    c = json.loads((path / "config.json").read_text())
    params = c.pop("rope_parameters")
    c["rope_theta"] = params["rope_theta"]
    c["rope_scaling"] = rope_scaling
    (path / "config.json").write_text(json.dumps(c))


# name -> (config class, model class, extra config, how config.json is rewritten)
FAMILIES = {
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_parameters": LLAMA3}, None),
    # with attention_bias: biases on q, k, v and o
    "llama_linear": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                      "attention_bias": True},
                     lambda p: old_style_rope(p, {"type": "linear", "factor": 4.0})),
    "qwen2_yarn": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"rope_parameters": YARN}, None),
    "qwen3_tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   {"head_dim": 24, "tie_word_embeddings": True}, None),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}, None),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Ckpt]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, (name, (config_cls, model_cls, extra, rewrite)) in enumerate(FAMILIES.items()):
        cfg = config_cls(**SHAPE, **extra, attn_implementation="eager")
        m = randomize(model_cls(cfg), seed=i)
        m.save_pretrained(root / name, safe_serialization=True)
        if rewrite:
            rewrite(root / name)
        _no_eos(m)
        out[name] = Ckpt(root / name, m)
    return out


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(3, SHAPE["vocab_size"], n).tolist() for n in PROMPT_LENS]


def test_configs_say_what_each_family_adds(families):
    c = {name: config_from_hf(ck.path) for name, ck in families.items()}
    assert c["llama3"].rope_scaling == rope.RopeScaling("llama3", 8.0, 1.0, 4.0, ORIGINAL)
    assert c["llama_linear"].rope_scaling == rope.RopeScaling("linear", 4.0)
    assert (c["llama_linear"].qkv_bias, c["llama_linear"].o_bias) == (True, True)
    assert not (c["llama3"].qkv_bias or c["llama3"].o_bias or c["llama3"].qk_norm)
    assert c["qwen2_yarn"].rope_scaling.kind == "yarn"
    assert c["qwen2_yarn"].rope_scaling.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)
    assert (c["qwen2_yarn"].qkv_bias, c["qwen2_yarn"].o_bias, c["qwen2_yarn"].qk_norm) == (True, False, False)
    q3 = c["qwen3_tied"]
    assert (q3.qk_norm, q3.qkv_bias, q3.tie_embeddings) == (True, False, True)
    assert (q3.head_dim, q3.dim // q3.n_heads) == (24, 16)
    assert c["mistral"] == config_from_hf(families["llama_linear"].path).replace(
        rope_scaling=rope.RopeScaling(), qkv_bias=False, o_bias=False)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_tokens_match_generate(families, name):
    ck = families[name]
    cfg = config_from_hf(ck.path)
    host = load_hf_weights(ck.path, cfg)
    ps = prompts()
    ours = runner_greedy(cfg, host, 2, ps, N_NEW)
    for p, got in zip(ps, ours):
        assert got == ck.hf_greedy(p), f"{name}, prompt of {len(p)} tokens"


def test_tied_checkpoint_has_no_head_tensor(families):
    from safetensors import safe_open

    path = families["qwen3_tied"].path
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in set(f.keys())
    host = load_hf_weights(path, config_from_hf(path))
    assert np.array_equal(host["lm_head"], host["embed"].T)


# ---- RoPE frequencies against transformers' -----------------------------------------------------

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    "llama3": {**LLAMA3, "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "factor": 32.0},
    "yarn": {**YARN, "original_max_position_embeddings": 4096, "rope_theta": 1000000.0},
    "yarn_mscale": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
def test_rope_frequencies_match_transformers(tmp_path, case, form):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = ROPE_CASES[case]
    hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=16384,
                                      rope_parameters=dict(params))
    kind = params["rope_type"]
    want, want_scale = (ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu") if kind != "default"
                        else (1.0 / params["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64), 1.0))
    c = hf_cfg.to_dict()
    if form == "rope_scaling":  # the older form: theta at the top, "type"
        scaling = {("type" if k == "rope_type" else k): v for k, v in c.pop("rope_parameters").items()
                   if k != "rope_theta"}
        c.update(rope_theta=params["rope_theta"], rope_scaling=scaling)
    (tmp_path / "config.json").write_text(json.dumps(c))
    cfg = config_from_hf(tmp_path)
    got = rope.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    assert cfg.rope_scaling.attention_factor == pytest.approx(want_scale, rel=1e-6)
    if case != "default":  # the scaled frequencies are not the plain ones (the test can fail)
        plain = rope.inv_freq(cfg.head_dim, cfg.rope_theta)
        assert (case == "dynamic") == np.array_equal(got, plain)


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,change,field", [
    ("qwen2_yarn", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
                    "layer_types": ["sliding_attention"] * 2}, "use_sliding_window"),
    ("qwen3_tied", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
                    "layer_types": None}, "use_sliding_window"),
    ("mistral", {"sliding_window": 64}, "sliding_window"),
    ("llama3", {"rope_parameters": {**LLAMA3, "rope_type": "longrope"}}, "rope_type"),
    ("llama3", {"rope_parameters": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
     "rope_parameters.low_freq_factor"),
    ("llama3", {"rope_parameters": {**LLAMA3, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("llama3", {"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_family_configs_are_refused(families, tmp_path, family, change, field):
    c = json.loads((families[family].path / "config.json").read_text())
    c.update(change)
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=field):
        config_from_hf(tmp_path)


def test_windows_not_in_force_are_accepted(families, tmp_path):
    """Qwen configs name a window they do not use (use_sliding_window false, or every layer
    below max_window_layers); Mistral's window as long as the context is no window."""
    for family, change in (("qwen2_yarn", {"use_sliding_window": False, "sliding_window": 16}),
                           ("qwen3_tied", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2,
                                           "layer_types": None}),
                           ("mistral", {"sliding_window": SHAPE["max_position_embeddings"]})):
        c = json.loads((families[family].path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**c, **change}))
        assert config_from_hf(tmp_path) == config_from_hf(families[family].path)


# ---- the whole system, the model named by a hub id ----------------------------------------------

@pytest.mark.e2e
def test_qwen3_by_hub_id_end_to_end(families, nats_server, tmp_path):
    """Qwen3 (q/k norms, tied, head_dim 24) through ingest, publisher and worker over NATS,
    every role given ``--model-path org/qwen3-tiny`` and resolving it offline from a hub cache."""
    import shutil

    from dpbus.schemas import Done
    from tests.test_checkpoint import word_tokenizer
    from tests.test_model_path import fake_hub_cache

    ck = families["qwen3_tied"]
    snapshot = fake_hub_cache(tmp_path / "hub", "org/qwen3-tiny", {})
    for f in ck.path.iterdir():
        shutil.copy(f, snapshot / f.name)
    tok = word_tokenizer(SHAPE["vocab_size"])
    tok.save(str(snapshot / "tokenizer.json"))
    text = "w17 w250 w3 w99 w42 " * 3
    cases = [{"input_ids": p} for p in prompts()] + [{"text": text}]
    want = [ck.hf_greedy(p) for p in prompts()] + [ck.hf_greedy(tok.encode(text).ids)]

    outcomes = greedy_through_services(nats_server, tmp_path, cases, {
        "DPBUS_MODEL_PATH": "org/qwen3-tiny", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
        "DPBUS_MAX_PREFILL_TOKENS": "16", "DPBUS_MAX_SEQ_LEN": "128"})
    for case, want_ids, out in zip(cases, want, outcomes):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.token_ids == want_ids, f"prompt {case}"
