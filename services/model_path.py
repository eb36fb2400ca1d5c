"""``--model-path``: a local Hugging Face model directory, or a hub id (``Qwen/Qwen2.5-0.5B-Instruct``)
fetched once with ``huggingface_hub.snapshot_download`` into its cache (``HF_HOME`` /
``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` uses only what is cached there).

``settings.build`` calls ``resolve_model_path`` for every role, so the config reader, the
tokenizer, the chat template and the worker's weight loader all see a local directory.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# what serving needs from a repository: configs, tokenizer, chat templates, weights
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "additional_chat_templates/*", "tokenizer.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` (a path with more parts, or one that starts with / . or ~, is a path)."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith((".", "-"))


@functools.lru_cache(maxsize=8)
def resolve_model_path(value: str) -> str:
    """A local directory for ``value`` (returned as given when it is one); a hub id is
    downloaded (or found in the cache), once per process. Raises ValueError, one line, when
    it is neither."""
    if not value or Path(value).expanduser().is_dir():
        return value
    if not looks_like_hub_id(value):
        raise ValueError(f"--model-path {value}: no such directory, and not a Hugging Face model id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(value, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo, offline cache miss
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model-path {value}: no such directory, and the Hugging Face hub id could not be "
                         f"fetched ({type(e).__name__}: {why})") from None
