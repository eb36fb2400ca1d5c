"""Hugging Face Llama checkpoints (``--model-path``) against ``transformers`` itself.

Small random ``LlamaForCausalLM`` models (GQA; tied and untied embeddings; one file,
sharded with an index, and bfloat16) are saved with ``save_pretrained`` and loaded by
``dpbus.services.worker.checkpoint``. Our model must give transformers' logits for a whole
prompt (tensor axis 1 and 2), the same 32 greedy tokens as ``generate`` with chunked
prefill, and the same tokens through the whole system (ingest, publisher, worker over
NATS), for ``input_ids`` and, with a ``tokenizer.json``, for ``text``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dpbus.schemas.internal import DecodeItem, PrefillItem, RowSampling  # noqa: E402
from dpbus.services.model_config import ModelConfig  # noqa: E402
from dpbus.services.worker import attention, model  # noqa: E402
from dpbus.services.worker.checkpoint import config_from_hf, load_hf_weights  # noqa: E402
from dpbus.services.worker.runner import ModelRunner, make_group_mesh  # noqa: E402

pytestmark = pytest.mark.slow  # compiles models or waits out leases: not in `make test-fast`

HF_SHAPE = dict(vocab_size=300, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
N_NEW = 32
MAX_PREFILL = 16
PAGE_SIZE = 16
PROMPT_LENS = (5, 23, 41)  # within one chunk, two chunks, three chunks
GREEDY = RowSampling(0.0, 1.0, 0, 0)
RTOL_LOGITS = 1e-4  # max |ours - HF| over max |HF|


# ---- the runner-facing code (kept here so a runner API change touches only this) ---------------

def full_logits(cfg: ModelConfig, host: dict, tensor: int, tokens: list[int]) -> np.ndarray:
    """Our logits ``[T, vocab]`` for one whole prompt, one forward pass on ``tensor`` devices."""
    mesh = make_group_mesh(jax.devices()[:tensor])
    n_pages = -(-len(tokens) // PAGE_SIZE)
    cache = model.new_cache(cfg, n_pages + 1, PAGE_SIZE, mesh)
    weights = model.place_weights(host, cfg, mesh)
    batch = attention.build_batch(attention.Shape(0, len(tokens), 1, n_pages), PAGE_SIZE, cfg.max_seq_len, [],
                                  [(0, tokens, list(range(1, n_pages + 1)))])
    batch = batch._replace(sample=np.arange(len(tokens), dtype=np.int32))  # logits of every position
    fwd = jax.jit(lambda w, c, b: model.forward(cfg, w, c, b)[0])
    return np.asarray(fwd(weights, cache, batch))


def runner_greedy(cfg: ModelConfig, host: dict, tensor: int, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy tokens for every prompt at once: chunked prefill, then batched decode."""
    mesh = make_group_mesh(jax.devices()[:tensor])
    per_seq = -(-cfg.max_seq_len // PAGE_SIZE)
    runner = ModelRunner(cfg, mesh, num_pages=len(prompts) * per_seq + 1, page_size=PAGE_SIZE,
                         max_running_requests=len(prompts), max_prefill_tokens=MAX_PREFILL, host_weights=host)
    pages = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(prompts))]
    out: list[list[int]] = []
    for prompt, pg in zip(prompts, pages):
        for start in range(0, len(prompt), MAX_PREFILL):
            chunk = prompt[start:start + MAX_PREFILL]
            last = start + len(chunk) == len(prompt)
            token, _ = runner.prefill(PrefillItem(start, chunk, last, pg, GREEDY))
        out.append([token])
    for step in range(1, n_new):
        items = [DecodeItem(seq[-1], len(p) + step - 1, step, pg, GREEDY) for seq, p, pg in zip(out, prompts, pages)]
        tokens, _ = runner.decode(items)
        for seq, t in zip(out, tokens):
            seq.append(t)
    return out


# ---- checkpoints ----------------------------------------------------------------------------------

def random_llama(tie: bool, seed: int):
    """A LlamaForCausalLM whose weights give logits of order 1 (so greedy has no near-ties)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**HF_SHAPE, tie_word_embeddings=tie, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # gains that are not all ones
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return m


def word_tokenizer(vocab_size: int):
    """A word-level ``tokenizers`` tokenizer: id i is the word ``w{i}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


class Ckpt:
    def __init__(self, path: Path, hf) -> None:
        self.path, self.hf = path, hf
        self._greedy: dict[tuple[int, ...], list[int]] = {}

    def hf_greedy(self, prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in self._greedy:
            with torch.no_grad():
                out = self.hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=N_NEW,
                                       pad_token_id=0)
            self._greedy[key] = out[0, len(prompt):].tolist()
            assert len(self._greedy[key]) == N_NEW
        return self._greedy[key]


def _no_eos(m) -> None:
    # generate must not stop (nor bend logits) at EOS: our runner knows nothing of it
    m.generation_config.eos_token_id = None


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Ckpt]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    untied = random_llama(tie=False, seed=0)
    untied.save_pretrained(root / "untied", safe_serialization=True)
    tied = random_llama(tie=True, seed=1)
    tied.save_pretrained(root / "tied_sharded", safe_serialization=True, max_shard_size="200KB")
    word_tokenizer(HF_SHAPE["vocab_size"]).save(str(root / "tied_sharded" / "tokenizer.json"))
    copy.deepcopy(untied).to(torch.bfloat16).save_pretrained(root / "bf16", safe_serialization=True)
    # the reference for bf16: the same rounded weights, computed in float32 (a bf16 model cast
    # back to float32 would also carry RoPE's inv_freq rounded to bf16)
    ref16 = copy.deepcopy(untied)
    with torch.no_grad():
        for p in ref16.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    for name, m in (("untied", untied), ("tied_sharded", tied), ("bf16", ref16)):
        _no_eos(m)
        out[name] = Ckpt(root / name, m)
    assert (root / "tied_sharded" / "model.safetensors.index.json").exists()
    assert len(list((root / "tied_sharded").glob("*.safetensors"))) > 1
    return out


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, HF_SHAPE["vocab_size"], n).tolist() for n in PROMPT_LENS]


# ---- (a) config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,tie", [("untied", False), ("tied_sharded", True), ("bf16", False)])
def test_config_from_hf(ckpts, name, tie):
    cfg = config_from_hf(ckpts[name].path)
    assert cfg == ModelConfig(vocab_size=300, dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16,
                              ffn_dim=256, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=256,
                              tie_embeddings=tie, bos_token_id=1, eos_token_ids=(2,))


def test_config_older_style_and_defaults(tmp_path):
    """rope_theta at top level, rope_scaling null, eos as a list, no head_dim / KV heads."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 512, "rope_theta": 500000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "bos_token_id": 5, "eos_token_id": [7, 9],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11]}))
    cfg = config_from_hf(tmp_path)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.max_seq_len) == (4, 64, 500000.0, 8192)
    assert cfg.eos_token_ids == (7, 9, 11) and cfg.bos_token_id == 5 and not cfg.tie_embeddings


# ---- (b) logits ------------------------------------------------------------------------------------

def assert_logits_match(ck: Ckpt, prompt: list[int], tensors: tuple[int, ...], name: str) -> None:
    """Our logits for the whole ``prompt`` are transformers' on each number of devices."""
    cfg = config_from_hf(ck.path)
    host = load_hf_weights(ck.path, cfg)
    with torch.no_grad():
        ref = ck.hf(torch.tensor([prompt])).logits[0].numpy()
    scale = np.abs(ref).max()
    assert scale > 1.0  # logits of order one: the comparison means something
    for tensor in tensors:
        ours = full_logits(cfg, host, tensor, prompt)
        err = np.abs(ours - ref).max() / scale
        assert err < RTOL_LOGITS, f"{name}, tensor={tensor}: max error {err:.2e} of the logit scale {scale:.2f}"


@pytest.mark.parametrize("name", ["untied", "tied_sharded", "bf16"])
def test_full_prompt_logits_match_transformers(ckpts, name):
    assert_logits_match(ckpts[name], prompts()[2], (1, 2), name)


def test_bf16_decodes_exactly(ckpts):
    cfg = config_from_hf(ckpts["bf16"].path)
    host = load_hf_weights(ckpts["bf16"].path, cfg)
    want = ckpts["bf16"].hf.model.layers[1].self_attn.k_proj.weight.detach().numpy()  # bf16 -> f32 by torch
    assert np.array_equal(host["layers"][1]["wk"], want.T.reshape(cfg.dim, cfg.n_kv_heads, cfg.head_dim))
    assert host["embed"].dtype == np.float32 and host["lm_head"].shape == (cfg.dim, cfg.vocab_size)


# ---- (c) greedy tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,tensor", [("untied", 2), ("tied_sharded", 1), ("bf16", 2)])
def test_greedy_tokens_match_generate(ckpts, name, tensor):
    ck = ckpts[name]
    cfg = config_from_hf(ck.path)
    ps = prompts()
    ours = runner_greedy(cfg, load_hf_weights(ck.path, cfg), tensor, ps, N_NEW)
    for p, got in zip(ps, ours):
        assert got == ck.hf_greedy(p), f"{name}, prompt of {len(p)} tokens"


# ---- (d) the whole system --------------------------------------------------------------------------


def greedy_through_services(nats_server, tmp_path: Path, cases: list[dict], env: dict[str, str]) -> list:
    """Each case (``input_ids`` or ``text``) generated greedily for N_NEW tokens by one
    group (ingest, publisher, a worker on two devices) started with ``env``; the outcomes."""
    from dpbus.services.client import generate
    from dpbus.services.launcher import Cluster

    c = Cluster(dp_size=1, nnodes=1, local_devices=2, nats_url=nats_server.url, credentials=nats_server.credentials,
                log_dir=tmp_path, say=lambda _: None, extra={"DPBUS_MAX_RUNNING_REQUESTS": "4", **env})

    async def run() -> list:
        nc = await nats_server.connect("client")
        try:
            sampling = {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(generate(nc, {**case, "sampling": sampling}) for case in cases))
        finally:
            await nc.close()

    try:
        asyncio.run(c.start(timeout=300))
        return asyncio.run(run())
    finally:
        c.stop()


@pytest.mark.e2e
def test_model_path_end_to_end(ckpts, nats_server, tmp_path):
    from dpbus.schemas import Done

    ck = ckpts["tied_sharded"]
    tok = word_tokenizer(HF_SHAPE["vocab_size"])
    text = "w17 w250 w3 w99 w42 " * 4
    text_ids = tok.encode(text).ids
    cases = [{"input_ids": p} for p in prompts()] + [{"text": text}]
    want = [ck.hf_greedy(p) for p in prompts()] + [ck.hf_greedy(text_ids)]

    outcomes = greedy_through_services(nats_server, tmp_path, cases, {
        "DPBUS_MODEL_PATH": str(ck.path), "DPBUS_MAX_PREFILL_TOKENS": str(MAX_PREFILL), "DPBUS_MAX_SEQ_LEN": "256"})
    for case, want_ids, out in zip(cases, want, outcomes):
        assert isinstance(out.terminal, Done), out.terminal
        assert out.token_ids == want_ids, f"prompt {case}"
    # the streamed text continues the prompt: prompt text + answer text = the text of all tokens
    # (a word after the prompt starts with its space, as in-context detokenizing gives it)
    assert tok.decode(text_ids) + outcomes[-1].text == tok.decode(text_ids + want[-1])


# ---- (e) refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("model_type", "gpt2"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),  # without low/high_freq_factor
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("sliding_window", 64),  # with model_type mistral
])
def test_unsupported_configs_are_refused(ckpts, tmp_path, field, value):
    c = json.loads((ckpts["untied"].path / "config.json").read_text())
    c[field] = value
    if field == "sliding_window":
        c["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=field):
        config_from_hf(tmp_path)


def test_mistral_without_window_is_llama(ckpts, tmp_path):
    c = json.loads((ckpts["untied"].path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, "model_type": "mistral", "sliding_window": None}))
    assert config_from_hf(tmp_path) == config_from_hf(ckpts["untied"].path)


def test_missing_and_misshapen_tensors_are_named(ckpts, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = ckpts["untied"].path
    cfg = config_from_hf(src)
    tensors = load_file(str(src / "model.safetensors"))
    shutil.copy(src / "config.json", tmp_path / "config.json")

    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_weights(tmp_path, cfg)

    with pytest.raises(ValueError, match=r"lm_head\.weight"):  # untied, but saved without the head
        t = load_file(str(src / "model.safetensors"))
        del t["lm_head.weight"]
        save_file(t, str(tmp_path / "model.safetensors"))
        load_hf_weights(tmp_path, cfg)

    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
        load_hf_weights(src, cfg.replace(ffn_dim=128))
