"""Hugging Face checkpoints of the Llama family (Llama, Mistral, Qwen2, Qwen3 dense) and of
the Qwen mixture-of-experts families (Qwen2-MoE, Qwen3-MoE): the shape from ``config.json`` and the weights from ``*.safetensors`` (one file, or shards listed
in ``model.safetensors.index.json``).

``config_from_hf`` reads JSON only, so ingest and the publisher can call it without JAX or
the weights. ``load_hf_weights`` reads one tensor at a time into host numpy float32 in our
layout (see ``services/worker/model.py``); the runner then puts each on the mesh with its
sharding, so host memory peaks near one float32 copy of the model. A MoE checkpoint stores
each expert's projections as separate tensors (``mlp.experts.{e}.gate_proj.weight``, as
transformers saves them); they are read one at a time into one stacked array per layer.

What we do not implement is refused by name (a ValueError naming the config field)
rather than served wrong.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpbus.services.model_config import ModelConfig
from dpbus.services.rope import RopeScaling, yarn_attention_factor

INDEX_FILE = "model.safetensors.index.json"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: --model-path must be a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _refuse(path: Path, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{path}: {field}={value!r} is not supported ({why})")


def _check_window(cfg_path: Path, c: dict[str, Any]) -> None:
    """Refuse a sliding window that is actually in force (we attend to the whole context).
    Mistral sets ``sliding_window``; Qwen2/Qwen3 also need ``use_sliding_window`` and
    apply it from layer ``max_window_layers`` on (``layer_types`` says so in transformers 5)."""
    window, max_pos = c.get("sliding_window"), c.get("max_position_embeddings")
    if window is None or (max_pos is not None and window >= max_pos):
        return
    if c.get("model_type") == "mistral":
        raise _refuse(cfg_path, "sliding_window", window, "sliding-window attention is not implemented")
    if not c.get("use_sliding_window"):
        return
    layer_types = c.get("layer_types")
    if layer_types is not None:
        active = "sliding_attention" in layer_types
    else:
        active = c.get("max_window_layers", 0) < c.get("num_hidden_layers", 0)
    if active:
        raise _refuse(cfg_path, "use_sliding_window", True, f"sliding_window={window} would apply to some layers; "
                      "sliding-window attention is not implemented")


def _attention_flags(cfg_path: Path, c: dict[str, Any]) -> dict[str, bool]:
    """What the family adds to Llama's attention: biases and per-head q/k norms."""
    model_type = c.get("model_type")
    if model_type not in FAMILIES:
        raise _refuse(cfg_path, "model_type", model_type, f"one of {', '.join(FAMILIES)}")
    _check_window(cfg_path, c)
    bias = bool(c.get("attention_bias", False))
    if model_type == "qwen2":  # q/k/v always have a bias, the output projection none
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False}
    if model_type == "qwen2_moe":  # Qwen2's attention; transformers 5 names the bias switch qkv_bias
        return {"qkv_bias": bool(c.get("qkv_bias", True)), "o_bias": False, "qk_norm": False}
    if model_type == "mistral" and bias:
        raise _refuse(cfg_path, "attention_bias", bias, "Mistral has no attention biases")
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": model_type in ("qwen3", "qwen3_moe")}


def _moe(cfg_path: Path, c: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """The experts of a Qwen2-MoE / Qwen3-MoE config: which layers are sparse (every
    ``decoder_sparse_step``-th, counting from one, except ``mlp_only_layers``; none if
    ``num_experts`` is 0), the router's top-k and the experts' sizes."""
    if c.get("model_type") not in MOE_FAMILIES:
        return {}

    def need(field: str) -> int:
        if c.get(field) is None:
            raise ValueError(f"{cfg_path}: {field} is missing (a {c['model_type']} config needs it)")
        return int(c[field])

    if c.get("num_experts") is None and c.get("num_local_experts") is not None:
        c = {**c, "num_experts": c["num_local_experts"]}  # transformers 5 saves it by this name
    n_experts = need("num_experts")
    if n_experts <= 0:
        return {}
    step = c.get("decoder_sparse_step")
    step = 1 if step is None else int(step)
    if step < 1:
        raise _refuse(cfg_path, "decoder_sparse_step", c["decoder_sparse_step"], "must be at least 1")
    dense_only = {int(i) for i in c.get("mlp_only_layers") or ()}
    sparse = tuple(i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0)
    if not sparse:
        return {}
    top_k = need("num_experts_per_tok")
    if not 1 <= top_k <= n_experts:
        raise _refuse(cfg_path, "num_experts_per_tok", top_k, f"between 1 and num_experts={n_experts}")
    shared = need("shared_expert_intermediate_size") if c["model_type"] == "qwen2_moe" else 0
    return {"n_experts": n_experts, "n_experts_per_tok": top_k, "moe_ffn_dim": need("moe_intermediate_size"),
            "norm_topk_prob": bool(c.get("norm_topk_prob", False)), "shared_expert_ffn_dim": shared,
            "sparse_layers": sparse}


def _rope(cfg_path: Path, c: dict[str, Any]) -> tuple[float, RopeScaling]:
    """``rope_theta`` and the scaling, from ``rope_theta`` + ``rope_scaling`` (older configs)
    or ``rope_parameters`` (transformers 5)."""
    theta = c.get("rope_theta")
    scaling = RopeScaling()
    for field in ("rope_scaling", "rope_parameters"):
        rope = c.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise _refuse(cfg_path, field, rope, "expected an object")
        if "rope_type" not in rope and "type" not in rope and any(isinstance(v, dict) for v in rope.values()):
            raise _refuse(cfg_path, field, rope, "one RoPE for every layer only")
        if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
            raise _refuse(cfg_path, f"{field}.partial_rotary_factor", rope.get("partial_rotary_factor"),
                          "RoPE over the whole head only")
        theta = rope.get("rope_theta", theta)
        scaling = _rope_scaling(cfg_path, field, rope, c)
    return float(theta if theta is not None else 10000.0), scaling


def _rope_scaling(cfg_path: Path, field: str, rope: dict[str, Any], c: dict[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return RopeScaling()
    if kind == "dynamic":
        # dynamic NTK changes the frequencies only past max_position_embeddings, which also caps
        # the context we serve: within it, it is plain RoPE
        return RopeScaling()

    def need(key: str) -> float:
        if rope.get(key) is None:
            raise ValueError(f"{cfg_path}: {field}.{key} is missing (rope_type {kind!r} needs it)")
        return float(rope[key])

    # the pretraining context: a top-level original_max_position_embeddings wins (as in
    # transformers), else the one in the RoPE object, else max_position_embeddings
    original = c.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
        or c.get("max_position_embeddings")
    if kind == "linear":
        return RopeScaling("linear", factor=need("factor"))
    if kind == "llama3":
        if rope.get("original_max_position_embeddings") is None and c.get("original_max_position_embeddings") is None:
            need("original_max_position_embeddings")
        low, high = need("low_freq_factor"), need("high_freq_factor")
        if high <= low:
            raise _refuse(cfg_path, f"{field}.high_freq_factor", high, f"must exceed low_freq_factor={low}")
        return RopeScaling("llama3", factor=need("factor"), low_freq_factor=low, high_freq_factor=high,
                           original_max_position_embeddings=int(original))
    if kind == "yarn":
        if original is None:
            raise ValueError(f"{cfg_path}: {field}.original_max_position_embeddings is missing (rope_type 'yarn')")
        factor = rope.get("factor")
        factor = float(factor) if factor is not None else c["max_position_embeddings"] / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = yarn_attention_factor(factor, rope.get("mscale"), rope.get("mscale_all_dim"))
        return RopeScaling("yarn", factor=factor, original_max_position_embeddings=int(original),
                           beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                           truncate=bool(rope.get("truncate", True)), attention_factor=float(attention))
    raise _refuse(cfg_path, f"{field}.rope_type", kind, "RoPE scaling: default, linear, llama3, yarn or dynamic")


def config_from_hf(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE or
    Qwen3-MoE directory (its
    ``config.json``; the EOS ids of ``generation_config.json`` are added when that file exists)."""
    path = Path(path)
    cfg_path = path / "config.json"
    c = _read_json(cfg_path)

    flags = _attention_flags(cfg_path, c)
    if c.get("hidden_act", "silu") != "silu":
        raise _refuse(cfg_path, "hidden_act", c["hidden_act"], "only 'silu' (SwiGLU)")
    if c.get("mlp_bias"):
        raise _refuse(cfg_path, "mlp_bias", c["mlp_bias"], "MLP projections without bias only")
    if c.get("quantization_config"):
        raise _refuse(cfg_path, "quantization_config", c["quantization_config"], "unquantized weights only")
    rope_theta, rope_scaling = _rope(cfg_path, c)

    def need(field: str) -> Any:
        if c.get(field) is None:
            raise ValueError(f"{cfg_path}: {field} is missing")
        return c[field]

    n_layers = int(need("num_hidden_layers"))
    moe = _moe(cfg_path, c, n_layers)
    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    n_kv = int(c.get("num_key_value_heads") or n_heads)
    if n_heads % n_kv:
        raise ValueError(f"{cfg_path}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    head_dim = c.get("head_dim")
    if head_dim is None:
        if dim % n_heads:
            raise ValueError(f"{cfg_path}: hidden_size={dim} is not a multiple of num_attention_heads={n_heads}")
        head_dim = dim // n_heads
    if int(head_dim) % 2:
        raise ValueError(f"{cfg_path}: head_dim={head_dim} must be even for RoPE")

    eos = list(_token_ids(c.get("eos_token_id")))
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        for t in _token_ids(_read_json(gen_path).get("eos_token_id")):
            if t not in eos:
                eos.append(t)
    bos = c.get("bos_token_id")
    return ModelConfig(
        vocab_size=int(need("vocab_size")),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(head_dim),
        ffn_dim=int(need("intermediate_size")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(c.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=-1 if bos is None else int(bos),  # -1: the checkpoint names none
        eos_token_ids=tuple(eos),
        **flags,
        **moe,
    )


# ---- weights ---------------------------------------------------------------------------------

class _SafetensorsFile:
    """One ``.safetensors`` file: its tensor table, and one tensor at a time as float32."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.table: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.table[name]["shape"])

    def read(self, name: str):
        import numpy as np

        entry = self.table[name]
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        if dtype == "BF16":
            # numpy has no bfloat16: a bf16 is the top half of an f32
            begin, end = entry["data_offsets"]
            raw = np.memmap(self.path, dtype="<u2", mode="r", offset=self.data_start + begin,
                            shape=((end - begin) // 2,))
            out = (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            del raw
            return out
        if dtype not in ("F32", "F16", "F64"):
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}; only F32, F16 and BF16 are supported")
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32, copy=False)


def _checkpoint_files(path: Path) -> dict[str, _SafetensorsFile]:
    """Tensor name -> the file that holds it."""
    index = path / INDEX_FILE
    files: dict[str, _SafetensorsFile] = {}
    where: dict[str, _SafetensorsFile] = {}
    if index.exists():
        weight_map = _read_json(index).get("weight_map") or {}
        for name, fname in weight_map.items():
            if fname not in files:
                if not (path / fname).exists():
                    raise FileNotFoundError(f"{index} lists {fname} (for {name!r}), which is missing")
                files[fname] = _SafetensorsFile(path / fname)
            where[name] = files[fname]
        return where
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {path} (only safetensors checkpoints are supported)")
    for p in shards:
        f = _SafetensorsFile(p)
        for name in f.table:
            where.setdefault(name, f)
    return where


def _hf_tensors(cfg: ModelConfig, prefix: str) -> Iterator[tuple[tuple[str | int, ...], str, tuple[int, ...]]]:
    """(where in our dict, HF name, HF shape) for every tensor we need; an expert's tensor
    has its expert index last in the destination (it is one slice of the stacked weight)."""
    d, h, kv, hd, f, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    fe, fs = cfg.moe_ffn_dim, cfg.shared_expert_ffn_dim
    yield ("embed",), f"{prefix}embed_tokens.weight", (v, d)
    for i in range(cfg.n_layers):
        p = f"{prefix}layers.{i}."
        yield ("layers", i, "attn_norm"), p + "input_layernorm.weight", (d,)
        yield ("layers", i, "wq"), p + "self_attn.q_proj.weight", (h * hd, d)
        yield ("layers", i, "wk"), p + "self_attn.k_proj.weight", (kv * hd, d)
        yield ("layers", i, "wv"), p + "self_attn.v_proj.weight", (kv * hd, d)
        yield ("layers", i, "wo"), p + "self_attn.o_proj.weight", (d, h * hd)
        if cfg.qkv_bias:
            yield ("layers", i, "bq"), p + "self_attn.q_proj.bias", (h * hd,)
            yield ("layers", i, "bk"), p + "self_attn.k_proj.bias", (kv * hd,)
            yield ("layers", i, "bv"), p + "self_attn.v_proj.bias", (kv * hd,)
        if cfg.o_bias:
            yield ("layers", i, "bo"), p + "self_attn.o_proj.bias", (d,)
        if cfg.qk_norm:
            yield ("layers", i, "q_norm"), p + "self_attn.q_norm.weight", (hd,)
            yield ("layers", i, "k_norm"), p + "self_attn.k_norm.weight", (hd,)
        yield ("layers", i, "mlp_norm"), p + "post_attention_layernorm.weight", (d,)
        if not cfg.is_sparse(i):
            yield ("layers", i, "w_gate"), p + "mlp.gate_proj.weight", (f, d)
            yield ("layers", i, "w_up"), p + "mlp.up_proj.weight", (f, d)
            yield ("layers", i, "w_down"), p + "mlp.down_proj.weight", (d, f)
            continue
        yield ("layers", i, "router"), p + "mlp.gate.weight", (cfg.n_experts, d)
        for e in range(cfg.n_experts):
            yield ("layers", i, "moe_gate", e), p + f"mlp.experts.{e}.gate_proj.weight", (fe, d)
            yield ("layers", i, "moe_up", e), p + f"mlp.experts.{e}.up_proj.weight", (fe, d)
            yield ("layers", i, "moe_down", e), p + f"mlp.experts.{e}.down_proj.weight", (d, fe)
        if fs:
            yield ("layers", i, "shared_gate"), p + "mlp.shared_expert.gate_proj.weight", (fs, d)
            yield ("layers", i, "shared_up"), p + "mlp.shared_expert.up_proj.weight", (fs, d)
            yield ("layers", i, "shared_down"), p + "mlp.shared_expert.down_proj.weight", (d, fs)
            yield ("layers", i, "shared_router"), p + "mlp.shared_expert_gate.weight", (1, d)
    yield ("final_norm",), f"{prefix}norm.weight", (d,)
    if not cfg.tie_embeddings:
        yield ("lm_head",), "lm_head.weight", (v, d)


def _to_our_layout(key: str, w, cfg: ModelConfig):
    """HF stores Linear weights as [out, in]; we keep [in, (heads, head_dim) | out]."""
    import numpy as np

    h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    if key == "wq":
        w = w.T.reshape(d, h, hd)
    elif key in ("wk", "wv"):
        w = w.T.reshape(d, kv, hd)
    elif key == "wo":
        w = w.T.reshape(h, hd, d)
    elif key == "bq":
        w = w.reshape(h, hd)
    elif key in ("bk", "bv"):
        w = w.reshape(kv, hd)
    elif key == "shared_router":
        w = w.reshape(d)
    elif key in ("w_gate", "w_up", "w_down", "lm_head", "router", "moe_gate", "moe_up", "moe_down",
                 "shared_gate", "shared_up", "shared_down"):
        w = w.T
    return np.ascontiguousarray(w, dtype=np.float32)


def load_hf_weights(path: str | Path, cfg: ModelConfig, progress=None) -> dict[str, Any]:
    """Host float32 weights in our layout, read tensor by tensor from ``path``'s safetensors;
    ``progress(done, total, name)`` is told after each tensor."""
    import numpy as np

    path = Path(path)
    where = _checkpoint_files(path)
    prefix = "model." if "model.embed_tokens.weight" in where or "embed_tokens.weight" not in where else ""
    wanted = list(_hf_tensors(cfg, prefix))
    missing = [name for _, name, _ in wanted if name not in where]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        hint = " (config.json says tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        if any(name.endswith("mlp.experts.gate_up_proj") for name in where):
            hint = (" (this checkpoint holds each layer's experts fused, mlp.experts.gate_up_proj: not supported; "
                    "dpbus reads one tensor per expert, as save_pretrained writes them)")
        raise ValueError(f"{path}: missing tensor(s) {shown}{hint}")

    out: dict[str, Any] = {"layers": [{} for _ in range(cfg.n_layers)]}
    for i, (dest, name, shape) in enumerate(wanted):
        if progress:
            progress(i, len(wanted), name)
        f = where[name]
        got = f.shape(name)
        if got != shape:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}")
        if dest[0] == "layers" and len(dest) == 4:  # one expert: a slice of the stacked weight
            _, layer, key, e = dest
            w = _to_our_layout(str(key), f.read(name), cfg)
            stacked = out["layers"][layer].setdefault(key, np.empty((cfg.n_experts, *w.shape), np.float32))
            stacked[e] = w
            continue
        w = _to_our_layout(str(dest[-1]), f.read(name), cfg)
        if dest[0] == "layers":
            out["layers"][dest[1]][dest[2]] = w
        else:
            out[dest[0]] = w
    if cfg.tie_embeddings:
        out["lm_head"] = out["embed"].T.copy()
    return out
