"""The model's shape, without importing JAX (ingest and the publisher need it too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dpbus.services.rope import RopeScaling


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 768
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()  # services/rope.py: default, linear, llama3, yarn
    norm_eps: float = 1e-5
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    bos_token_id: int = 256  # the byte tokenizer's specials (services/tokenizer.py)
    eos_token_ids: tuple[int, ...] = (257,)
    # what the families differ in (services/worker/checkpoint.py reads them from config.json)
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2, attention_bias)
    o_bias: bool = False  # the output projection has one (attention_bias in Llama and Qwen3)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    # mixture of experts (Qwen3-MoE, Qwen2-MoE); n_experts=0: every layer has the dense MLP
    n_experts: int = 0  # routed experts in each sparse layer
    n_experts_per_tok: int = 0  # top-k of the router
    moe_ffn_dim: int = 0  # each expert's SwiGLU hidden size
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to one
    shared_expert_ffn_dim: int = 0  # Qwen2-MoE: an always-on expert, gated by sigmoid(x . w); 0: none
    sparse_layers: tuple[int, ...] = ()  # the layers whose MLP is the experts (others: the dense MLP)

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers

    def check_tensor_size(self, tensor: int) -> None:
        names = ["n_heads", "n_kv_heads"]
        if len(self.sparse_layers) < self.n_layers:
            names.append("ffn_dim")
        if self.sparse_layers:
            names += ["moe_ffn_dim"] + (["shared_expert_ffn_dim"] if self.shared_expert_ffn_dim else [])
        for name in names:
            if getattr(self, name) % tensor:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by the tensor axis size {tensor}")

    def check_world_size(self, data: int, tensor: int) -> None:
        """``--mlp-scope world``: attention is split over ``tensor`` within a group, the MLP's
        hidden dimension over all ``data * tensor`` devices and the experts over ``data``."""
        self.check_tensor_size(tensor)
        names = ["ffn_dim"] if len(self.sparse_layers) < self.n_layers else []
        if self.shared_expert_ffn_dim:
            names.append("shared_expert_ffn_dim")
        for name in names:
            if getattr(self, name) % (data * tensor):
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by the world's {data * tensor} "
                                 "devices (--mlp-scope world splits the MLP over all of them)")
        if self.sparse_layers and self.n_experts % data:
            raise ValueError(f"n_experts={self.n_experts} is not divisible by the {data} groups "
                             "(--mlp-scope world gives each group's devices an equal share of the experts)")

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def model_config_for(model_path: str, max_seq_len: int) -> ModelConfig:
    """The model every role of a deployment agrees on: the built-in one, or the shape in
    ``model_path/config.json`` (a Hugging Face Llama, Mistral, Qwen2, Qwen3,
    Qwen2-MoE or Qwen3-MoE checkpoint),
    its context capped at ``max_seq_len``."""
    if not model_path:
        return ModelConfig(max_seq_len=max_seq_len)
    from dpbus.services.worker.checkpoint import config_from_hf  # reads JSON only, no JAX

    cfg = config_from_hf(model_path)
    return cfg.replace(max_seq_len=min(cfg.max_seq_len, max_seq_len))
