"""``--model-path`` takes a Hugging Face hub id as well as a directory: the id is resolved
with ``huggingface_hub.snapshot_download`` to its snapshot in the local cache. Tested with no
network: a hub cache laid out as huggingface_hub writes it, ``HF_HUB_OFFLINE=1``, in a fresh
process (huggingface_hub reads its environment when imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpbus.services.cli import main
from dpbus.services.model_path import looks_like_hub_id, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """``cache/models--org--name/{refs/main, snapshots/<commit>/...}``; the snapshot dir."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def run_offline(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DPBUS_"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, "HF_HUB_OFFLINE": "1", **env})


TINY_LLAMA = json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128})

CHECK = """
import argparse, json, sys
from dpbus.services import settings as st
from dpbus.services.cli import check_model_path, local_model
from dpbus.services.model_path import resolve_model_path
out = {"resolved": resolve_model_path("org/tiny-model")}
for cls in (st.IngestSettings, st.PublisherSettings, st.WorkerSettings, st.GatewaySettings, st.NodeSettings):
    s = st.build(cls, env={"DPBUS_MODEL_PATH": "org/tiny-model"})
    out[cls.__name__] = [s.model_path, getattr(s, "served_model_name", None)]
out["up"] = local_model({"DPBUS_MODEL_PATH": "org/tiny-model", "DPBUS_MAX_SEQ_LEN": "64"})
check_model_path(argparse.Namespace(model_path="org/tiny-model", max_seq_len=None))  # up's check before start
print(json.dumps(out))
"""


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_resolves_to_its_cached_snapshot_for_every_role(tmp_path, where):
    cache = tmp_path / "hf" / ("hub" if where == "HF_HOME" else "")
    snapshot = fake_hub_cache(cache, "org/tiny-model", {"config.json": TINY_LLAMA, "tokenizer.json": "{}"})
    done = run_offline(CHECK, {where: str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["resolved"]) == snapshot
    for role in ("IngestSettings", "PublisherSettings", "WorkerSettings", "NodeSettings"):
        assert Path(out[role][0]) == snapshot, role
    assert Path(out["GatewaySettings"][0]) == snapshot
    assert out["GatewaySettings"][1] == "org/tiny-model"  # the gateway serves it under its id
    # `dpbus up` fetches once and hands every service the directory
    assert out["up"] == {"DPBUS_MODEL_PATH": out["resolved"], "DPBUS_MAX_SEQ_LEN": "64",
                         "DPBUS_SERVED_MODEL_NAME": "org/tiny-model"}


@pytest.mark.parametrize("role", ["ingest", "worker"])  # the worker checks the model before its settings
def test_an_id_that_cannot_be_fetched_is_one_clear_line(tmp_path, role):
    fake_hub_cache(tmp_path, "org/other", {"config.json": "{}"})
    done = run_offline(f"from dpbus.services.cli import main; import sys; sys.exit(main(['{role}', '--model-path', "
                       "'org/not-cached']))", {"HF_HUB_CACHE": str(tmp_path)})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dpbus {role}: --model-path org/not-cached: "), done.stderr
    assert "could not be fetched" in lines[0] and "LocalEntryNotFoundError" in lines[0]


def test_neither_a_directory_nor_an_id(tmp_path, capsys):
    for value in (str(tmp_path / "missing"), "./models/llama", "a/b/c", "~/llama"):
        assert not looks_like_hub_id(value)
        with pytest.raises(ValueError, match=r"no such directory, and not a Hugging Face model id"):
            resolve_model_path(value)
    assert main(["ingest", "--model-path", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dpbus ingest: --model-path {tmp_path / 'missing'}: no such directory, and not a Hugging Face " \
                  "model id (org/name)"


def test_directories_are_kept_as_given(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("") == ""
    assert all(looks_like_hub_id(v) for v in ("Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B", "a/b.c_d"))
