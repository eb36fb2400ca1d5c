"""RoPE frequencies, computed once on the host with numpy (no JAX: the config that holds
them is read by ingest and the publisher too).

A checkpoint's RoPE is its ``rope_theta`` and, for long-context models, a scaling
(``rope_scaling`` in older configs, ``rope_parameters`` in transformers 5):

- ``default``: ``inv_freq[i] = theta ** (-2i / head_dim)``.
- ``linear``: every frequency divided by ``factor``.
- ``llama3`` (Llama 3.1+): low frequencies (wavelength past ``original / low_freq_factor``)
  divided by ``factor``, high ones (wavelength under ``original / high_freq_factor``) kept,
  the band between blended smoothly.
- ``yarn`` (Qwen's long context): a per-frequency blend of the plain and the divided
  frequency, ramped between the dimensions ``beta_fast`` and ``beta_slow`` rotations
  select, and cos/sin multiplied by an attention factor (``0.1 ln(factor) + 1`` unless given).
- ``dynamic`` rescales only for sequences longer than ``max_position_embeddings``, which
  also bounds the context dpbus serves: within it, it is ``default``.

The formulas follow transformers' ``modeling_rope_utils`` (the tests compare them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

KINDS = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # cos and sin are multiplied by it


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's default attention factor (the paper's ``0.1 ln(s) + 1``; DeepSeek-style configs
    give ``mscale`` and ``mscale_all_dim`` and take the ratio of the two)."""

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


def _plain(head_dim: int, theta: float) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _llama3(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * out / s.factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, out)


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    def dim_of(rotations: float) -> float:
        # the dimension whose wavelength fits ``rotations`` times in the original context
        wavelengths = s.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelengths) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the plain frequency (fast dimensions), 0: divided by factor (slow ones)
    plain = _plain(head_dim, theta)
    return plain / s.factor * (1 - keep) + plain * keep


@functools.lru_cache(maxsize=16)
def inv_freq(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
    """The ``head_dim // 2`` inverse frequencies, float32 (what the rotation multiplies
    positions by). Cached: computed once per model."""
    if scaling.kind == "default":
        out = _plain(head_dim, theta)
    elif scaling.kind == "linear":
        out = _plain(head_dim, theta) / scaling.factor
    elif scaling.kind == "llama3":
        out = _llama3(_plain(head_dim, theta), scaling)
    elif scaling.kind == "yarn":
        out = _yarn(head_dim, theta, scaling)
    else:
        raise ValueError(f"RoPE scaling {scaling.kind!r} is not one of {', '.join(KINDS)}")
    out = out.astype(np.float32)
    out.flags.writeable = False
    return out
