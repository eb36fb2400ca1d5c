"""What a newcomer meets first: `dpbus --help` and `--version`, the devices and dtype a
worker picks by default, and a runtime install without the test-only packages."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import msgspec
import pytest

from dpbus.services import settings as st
from dpbus.services.cli import parser
from dpbus.services.devices import resolve_dtype, xla_env

DPBUS = [sys.executable, "-m", "dpbus.services.cli"]
ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_flag_of_every_command_says_what_it_is(command):
    q = subcommands()[command]
    flags = [a for a in q._actions if not isinstance(a, argparse._HelpAction)]
    assert flags
    silent = [a.option_strings or a.dest for a in flags if not (a.help or "").strip()]
    assert silent == [], f"dpbus {command}: flags without help: {silent}"
    text = q.format_help()  # what --help prints: the help strings format (a stray % would raise)
    for a in flags:
        assert (a.option_strings or [a.dest])[0] in text


def test_every_setting_has_a_description_and_choices_are_listed():
    for cls in (st.IngestSettings, st.GatewaySettings, st.PublisherSettings, st.WorkerSettings):
        for f in msgspec.structs.fields(cls):
            assert st.help_of(cls, f.name), f"{cls.__name__}.{f.name} has no Help(...)"
    out = subprocess.run([*DPBUS, "up", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag, values in (("--policy", "round_robin,shortest_queue,least_tokens,prefix_affinity"),
                         ("--dtype", "auto,float32,bfloat16"), ("--log-level", "debug,info,warning,error")):
        assert f"{flag} {{{values}}}" in out.stdout, flag
    assert "env DPBUS_MAX_RUNNING_REQUESTS" in out.stdout
    bad = subprocess.run([*DPBUS, "worker", "--log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "valid values: debug, info, warning, error" in bad.stderr, bad.stderr


def test_version_is_the_installed_package_version():
    out = subprocess.run([*DPBUS, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"dpbus {version('dpbus')}"
    assert version("dpbus") in (ROOT / "pyproject.toml").read_text()


def test_workers_take_the_devices_jax_finds_unless_asked_for_cpu_devices():
    """`up`, `bench` and every worker default to 0: JAX's own platform and devices."""
    assert parser().parse_args(["up"]).local_devices == 0
    assert parser().parse_args(["demo"]).local_devices == 0
    assert parser().parse_args(["bench", "--engine-only"]).local_devices == 0
    assert st.build(st.WorkerSettings, parser().parse_args(["node"]), env={}).local_devices == 0
    assert xla_env(0, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}) == {}  # nothing forced: a TPU stays a TPU
    asked = xla_env(2, {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"})
    assert asked == {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2",
                     "JAX_PLATFORMS": "cpu"}
    assert xla_env(2, {"JAX_PLATFORMS": "cpu,tpu"}) == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.mark.parametrize("asked, platform, dtype", [
    ("auto", "tpu", "bfloat16"), ("auto", "cpu", "float32"), ("auto", "gpu", "float32"),
    ("float32", "tpu", "float32"), ("bfloat16", "cpu", "bfloat16"),
])
def test_dtype_auto_is_bfloat16_on_tpu_only(asked, platform, dtype):
    assert resolve_dtype(asked, platform) == dtype


def test_auto_dtype_runs_float32_on_this_cpu():
    from dpbus.services import logs
    from dpbus.services.worker.service import load_runner

    s = st.build(st.WorkerSettings, env={}, max_seq_len=64, max_running_requests=2, max_prefill_tokens=16,
                 warmup=False)
    assert s.dtype == "auto"
    assert load_runner(s, logs.configure("warning")).dtype == "float32"


def test_the_services_import_without_torch_or_transformers():
    """The runtime install has neither (they are in the `dev` extra, for the checkpoint
    tests): every module of dpbus imports with both blocked, and a checkpoint's
    tokenizer.json loads through `tokenizers`."""
    code = """
import importlib, pkgutil, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from dpbus import schemas, services
names = [m.name for pkg in (schemas, services) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
from tokenizers import Tokenizer, models, pre_tokenizers
tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.save(sys.argv[1] + "/tokenizer.json")
from dpbus.services.tokenizer import HFTokenizer, load_tokenizer
t = load_tokenizer(sys.argv[1])
assert isinstance(t, HFTokenizer) and t.encode("hello world") == [1, 2], t
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print(len(names))
"""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) > 30  # every module, not an empty walk


def test_runtime_dependencies_leave_out_the_test_only_packages():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"]).lower()
    assert "torch" not in runtime and "transformers" not in runtime
    assert any(d.startswith(("torch", "transformers")) for d in project["optional-dependencies"]["dev"])
    assert any(d.startswith("jax[tpu]") for d in project["optional-dependencies"]["tpu"])


def test_make_test_installs_dev_even_after_make_demo(tmp_path):
    """`make demo` installs the runtime only; `make test` adds `dev` on top, whichever ran
    first (a dry run of make: what it would do)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)

    def plan(target: str) -> str:
        out = subprocess.run(["make", "-n", target, f"VENV={venv}"], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    demo = plan("demo")
    assert "pip install --quiet -e .\n" in demo and "[dev]" not in demo and "--local-devices 2" in demo
    (venv / ".installed").touch()  # as `make demo` leaves it
    test = plan("test")
    assert "pip install --quiet -e '.[dev]'" in test and "pytest" in test
    assert "pip install --quiet -e .\n" not in test
    (venv / ".dev-installed").touch()
    assert "pip install" not in plan("test") and "pip install" not in plan("demo")


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """Everything installs under ``dpbus.``: nothing called ``services`` or ``schemas`` lands
    in site-packages beside other projects' packages."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("dpbus-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dpbus"}, tops
    assert any(name.startswith("dpbus/services/publisher/") for name in zipfile.ZipFile(wheel).namelist())
