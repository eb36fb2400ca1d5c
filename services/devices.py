"""Which devices a worker computes on, and in which dtype.

By default (``--local-devices 0``) a worker takes the devices JAX finds: on a TPU VM the
host's chips, on a machine without an accelerator one CPU device. Asked for ``N``, it
makes ``N`` virtual CPU devices instead (XLA's host platform split in ``N``), which is how
the tests and ``make demo`` shard a group on a CPU; that also picks the CPU platform
unless ``JAX_PLATFORMS`` already names one.

``--dtype auto`` becomes bfloat16 on TPU (what its matrix units take, half the bytes a
step reads) and float32 on any other platform.

Both are pure functions of what they are given, so that the choice is tested on a CPU.
"""

from __future__ import annotations

import re
from typing import Mapping

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_env(asked: int, env: Mapping[str, str]) -> dict[str, str]:
    """The variables to set, before JAX is imported, for ``asked`` virtual CPU devices
    (nothing for 0: JAX's own choice of platform and devices)."""
    if asked <= 0:
        return {}
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).split()
    out = {"XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={asked}"])}
    if not env.get("JAX_PLATFORMS"):
        out["JAX_PLATFORMS"] = "cpu"
    return out


def resolve_dtype(dtype: str, platform: str) -> str:
    """The dtype of the weights and KV pages for ``--dtype`` on devices of ``platform``
    (``jax.Device.platform``: ``"tpu"``, ``"cpu"``, ``"gpu"``)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if platform == "tpu" else "float32"
