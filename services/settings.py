"""One typed settings object per service, filled from CLI flags and ``DPBUS_*`` variables.

Each field of a settings Struct becomes a flag ``--field-name``; its default comes from
the environment variable ``DPBUS_FIELD_NAME`` when set, else from the Struct. Values are
checked by msgspec (types and bounds), so a bad ``DPBUS_DP_SIZE=two`` fails at start-up
with a message naming the setting.
"""

from __future__ import annotations

import argparse
import os
import typing
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from services.model_path import resolve_model_path

S = TypeVar("S", bound=Struct)
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]


class Common(Struct, kw_only=True, forbid_unknown_fields=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # who this service is on NATS (see services/natsconf.py); the password is never logged
    nats_user: str = ""  # empty: from the URL, or this role's user in --nats-credentials
    nats_password: str = ""
    nats_credentials: str = ""  # a credentials.json written by `dpbus nats-config` or `dpbus up`
    nats_nkey_seed: str = ""  # a file holding the user's nkey seed (instead of a password)
    tls_ca: str = ""  # CA file that signed the server's certificate (turns TLS on)
    tls_cert: str = ""  # this service's client certificate, when the server verifies clients
    tls_key: str = ""
    prefix: str = "dpbus"
    dp_size: Positive = 1
    nnodes: Positive = 1
    enable_dp_attention: bool = True
    log_level: str = "info"
    log_json: bool = True
    # the model every role agrees on (ingest checks prompts against its vocabulary and context)
    # a Hugging Face model directory, or a hub id (org/name, fetched once into the HF cache);
    # empty: the built-in model
    model_path: str = ""
    max_seq_len: Annotated[int, Meta(ge=32)] = 1024
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 0  # Prometheus metrics on this port; 0: off
    metrics_host: str = "127.0.0.1"
    # on SIGTERM / Ctrl-C: how long work in flight may finish before it is answered `unavailable`
    drain_timeout: Seconds = 3.0
    # a publisher silent this long (its lease in the request ledger lapsed): ingest answers its
    # requests; the publisher stops answering before that (see services/ledger.py)
    publisher_timeout: Annotated[float, Meta(gt=1.0)] = 5.0
    ledger_replicas: Annotated[int, Meta(ge=1, le=5)] = 1  # copies of the request ledger (NATS cluster size)


class IngestSettings(Common):
    # ingest answers clients over a connection of its own, as a user that may publish
    # nothing but client inboxes (its main user may not): see services/natsconf.py
    answer_nats_user: str = "ingest-answers"
    answer_nats_password: str = ""  # empty: the user's entry in --nats-credentials
    submit_timeout: Seconds = 5.0
    max_inflight: Positive = 4096  # requests being handed to a group at once
    reconcile_interval: Seconds = 1.0  # how often ingest sweeps the ledger for lapsed leases
    policy: Literal["round_robin", "shortest_queue", "least_tokens", "prefix_affinity"] = "round_robin"
    affinity_skew: Annotated[float, Meta(ge=1.0)] = 2.0  # prefix_affinity gives up past this load ratio
    affinity_prefix_tokens: Positive = 32  # prefix_affinity hashes this many leading prompt tokens
    load_stale_after: Seconds = 3.0  # a group without a load report for this long is unavailable
    default_client: str = "client"  # the user whose requests come on the plain generate/abort subjects
    max_inflight_per_client: NonNegative = 1024  # one client's requests held at once (0: no limit)
    client_tokens_per_s: NonNegative = 0  # one client's prompt + max_new_tokens per second (0: no limit)
    client_burst_s: Seconds = 10.0  # ... of which it may spend this many seconds' worth at once


class GatewaySettings(Common):
    """The OpenAI-compatible HTTP gateway (a client of the bus: NATS user ``gateway``)."""

    http_host: str = "127.0.0.1"  # 0.0.0.0 to serve other hosts
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    api_key: str = ""  # when set, /v1/* needs "Authorization: Bearer <key>"
    served_model_name: str = ""  # default: the hub id or the model directory's name, or dpbus-builtin
    request_timeout: Seconds = 600.0  # longest wait for the next answer of a request (then 504, and it is aborted)
    # larger request bodies get 413, found from Content-Length or while the body arrives: a whole
    # 128k-token context fits, as a JSON list of ids or as text with every character JSON-escaped
    # (six bytes each)
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 << 20
    metrics_key: str = ""  # when set, /metrics needs "Authorization: Bearer <key>"
    metrics_use_api_key: bool = False  # /metrics takes the API key as well (needs --api-key)


class EngineSettings(Common):
    """How a group runs its requests; the publisher and the workers must agree on these."""

    max_running_requests: Positive = 16
    max_prefill_tokens: Annotated[int, Meta(ge=16)] = 256
    page_size: Annotated[int, Meta(ge=1, le=4096)] = 16
    num_pages: NonNegative = 0  # 0: enough for every running request at full context


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def total_pages(s: EngineSettings, max_seq_len: int) -> int:
    """Pages in a group's pool, page 0 (the trash page) included."""
    if s.num_pages:
        return s.num_pages
    return s.max_running_requests * pages_needed(max_seq_len, s.page_size) + 1


class PublisherSettings(EngineSettings):
    dp_rank: NonNegative = 0
    prefix_cache: bool = True  # keep filled KV pages after requests end and reuse shared prompt prefixes
    max_waiting: Positive = 1024
    step_timeout: Seconds = 60.0
    resend_interval: Seconds = 1.0  # re-publish a step whose acknowledgements are late
    replay_window: Positive = 256  # recent steps kept for workers that missed some
    steps_in_flight: Positive = 2  # overlapped steps: the next is on the wire while the group computes (1: one at a time)
    stream_interval: Positive = 1  # tokens per streamed chunk (the last may have fewer): fewer, larger messages
    heartbeat_timeout: Seconds = 10.0
    load_interval: Seconds = 0.5
    queue_timeout: Seconds = 300.0


class WorkerSettings(EngineSettings):
    node_rank: NonNegative = 0
    local_devices: NonNegative = 0  # 0: use the devices JAX finds; N: N virtual CPU devices
    load_format: str = "dummy"
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights and KV pages (bfloat16 halves what a step reads)
    seed: NonNegative = 0
    heartbeat_interval: Seconds = 0.5
    warmup: bool = True
    coordinator: str = ""  # HOST:PORT of the group's JAX job (its leader node), when a group spans nodes
    join_timeout: Seconds = 120.0  # wait this long for every node of the group at start-up
    stall_timeout: Seconds = 120.0  # a step running longer means a peer died mid-collective: exit
    replay_timeout: Seconds = 2.0  # per attempt, when fetching missed steps from the publisher


def _merged(name: str, *parts: type[Struct]) -> type[Struct]:
    seen: dict[str, tuple] = {}
    for part in parts:
        for f in msgspec.structs.fields(part):
            seen.setdefault(f.name, (f.name, f.type, f.default))
    return msgspec.defstruct(name, list(seen.values()), kw_only=True, forbid_unknown_fields=True)


# What ``dpbus node`` runs: a worker, plus its group's publisher when it leads.
NodeSettings = _merged("NodeSettings", WorkerSettings, PublisherSettings)


# Every service setting `dpbus up` and `dpbus demo` pass on to the services they start
# (as DPBUS_* variables; each service reads its own): all of them but those `up` decides.
UP_DECIDES = {"nats_url", "nats_user", "nats_password", "nats_credentials", "answer_nats_user", "answer_nats_password", "nats_nkey_seed", "tls_ca", "tls_cert",
              "tls_key", "prefix", "dp_size", "nnodes", "node_rank", "dp_rank", "local_devices", "coordinator",
              "http_port", "log_json", "metrics_port"}
ServiceFlags = _merged("ServiceFlags", IngestSettings, PublisherSettings, WorkerSettings, GatewaySettings)


def service_env(ns: argparse.Namespace) -> dict[str, str]:
    """The DPBUS_* variables of the service flags given to `up`, checked now (a bad value
    is refused before anything starts, naming the setting)."""
    given = {f.name: getattr(ns, f.name) for f in msgspec.structs.fields(ServiceFlags)
             if f.name not in UP_DECIDES and getattr(ns, f.name, None) is not None}
    build(ServiceFlags, env={}, resolve_model=False, **given)  # raises ValueError naming a bad one
    return {env_name(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in given.items()}


def project(settings: Struct, cls: type[S], **overrides: Any) -> S:
    """The part of ``settings`` that ``cls`` has (e.g. a node's publisher settings)."""
    names = {f.name for f in msgspec.structs.fields(cls)}
    raw = {k: v for k, v in msgspec.structs.asdict(settings).items() if k in names}
    return msgspec.convert({**raw, **overrides}, cls)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "DPBUS_" + name.upper()


def add_settings_args(parser: argparse.ArgumentParser, cls: type[Struct], skip: set[str] = frozenset()) -> None:
    """Add one flag per field of ``cls``; defaults are resolved later, in ``build``."""
    for f in msgspec.structs.fields(cls):
        if f.name in skip:
            continue
        if f.type is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"(env {env_name(f.name)}, default {f.default})")
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"(env {env_name(f.name)}, default {f.default})")


def build(cls: type[S], ns: argparse.Namespace | None = None, env: dict[str, str] | None = None,
          resolve_model: bool = True, **overrides: Any) -> S:
    """Flags beat ``DPBUS_*`` variables beat defaults (``NATS_URL`` is honoured too). Raises ValueError naming the bad setting.
    ``model_path`` comes back as a local directory (a hub id is fetched: ``services/model_path.py``)
    unless ``resolve_model`` is false."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for f in msgspec.structs.fields(cls):
        value = overrides.get(f.name)
        if value is None and ns is not None:
            value = getattr(ns, f.name, None)
        if value is None:
            value = env.get(env_name(f.name))
        if value is None:
            continue
        raw[f.name] = value
    if "nats_url" not in raw and env.get("NATS_URL"):
        raw["nats_url"] = env["NATS_URL"]
    try:
        settings = msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as e:
        hint = ""
        for f in msgspec.structs.fields(cls):
            if f"$.{f.name}`" in str(e) and typing.get_origin(f.type) is Literal:
                hint = f"; valid values: {', '.join(typing.get_args(f.type))}"
        raise ValueError(f"bad setting: {e}{hint} (flags or DPBUS_* variables)") from None
    return with_local_model(settings) if resolve_model else settings


def with_local_model(settings: S) -> S:
    """``settings`` with ``model_path`` a local directory (a hub id fetched once, here); a
    gateway without ``served_model_name`` serves the model under its hub id."""
    given = getattr(settings, "model_path", "")
    local = resolve_model_path(given)
    if local == given:
        return settings
    changes: dict[str, Any] = {"model_path": local}
    if getattr(settings, "served_model_name", None) == "":
        changes["served_model_name"] = given
    return msgspec.structs.replace(settings, **changes)
