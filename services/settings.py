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

from dpbus.services.model_path import resolve_model_path

S = TypeVar("S", bound=Struct)
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]


def Help(text: str) -> Meta:
    """A setting's one-line description: its flag's help (``dpbus <command> --help``)."""
    return Meta(description=text)


class Common(Struct, kw_only=True, forbid_unknown_fields=True):
    nats_url: Annotated[str, Help("the NATS server (several: comma-separated, tried in that order)")] = \
        "nats://127.0.0.1:4222"
    # who this service is on NATS (see services/natsconf.py); the password is never logged
    nats_user: Annotated[str, Help("this service's NATS user (empty: from the URL, or its role's user in "
                                   "--nats-credentials)")] = ""
    nats_password: Annotated[str, Help("that user's password (empty: from the URL or --nats-credentials)")] = ""
    nats_credentials: Annotated[str, Help("a credentials.json written by `dpbus nats-config` or `dpbus up`: "
                                          "the service takes its role's user from it")] = ""
    nats_nkey_seed: Annotated[str, Help("a file holding the user's nkey seed (instead of a password)")] = ""
    tls_ca: Annotated[str, Help("the CA file that signed the server's certificate (turns TLS on)")] = ""
    tls_cert: Annotated[str, Help("this service's client certificate, when the server verifies clients")] = ""
    tls_key: Annotated[str, Help("the private key of --tls-cert")] = ""
    prefix: Annotated[str, Help("the first token of every subject: deployments with different prefixes share "
                                "a server")] = "dpbus"
    dp_size: Annotated[Positive, Help("attention data-parallel groups in the deployment: give every service "
                                      "the same number")] = 1
    nnodes: Annotated[Positive, Help("worker processes (nodes) in the deployment, split into dp-size groups of "
                                     "consecutive node ranks")] = 1
    enable_dp_attention: Annotated[bool, Help("dp-size groups, each with its own scheduler and KV cache "
                                              "(off: one group of every node)")] = True
    log_level: Annotated[Literal["debug", "info", "warning", "error"], Help("the least severe log lines "
                                                                             "written")] = "info"
    log_json: Annotated[bool, Help("log JSON lines (off: lines for people)")] = True
    # the model every role agrees on (ingest checks prompts against its vocabulary and context)
    model_path: Annotated[str, Help("a Hugging Face model directory or hub id (org/name, fetched once "
                                    "into the HF cache), the same for every role; empty: the built-in model")] = ""
    max_seq_len: Annotated[int, Meta(ge=32), Help("context length, prompt + output (a checkpoint's own caps "
                                                  "it)")] = 1024
    metrics_port: Annotated[int, Meta(ge=0, le=65535), Help("serve Prometheus metrics on this port (0: "
                                                            "off)")] = 0
    metrics_host: Annotated[str, Help("the address --metrics-port listens on")] = "127.0.0.1"
    drain_timeout: Annotated[Seconds, Help("on SIGTERM / Ctrl-C, seconds work in flight may go on before it "
                                           "is answered `unavailable`")] = 3.0
    # the publisher stops answering before ingest takes over (see services/ledger.py)
    publisher_timeout: Annotated[float, Meta(gt=1.0), Help("seconds a publisher may be silent (its lease in "
                                                           "the request ledger lapses) before ingest answers "
                                                           "its requests")] = 5.0
    ledger_replicas: Annotated[int, Meta(ge=1, le=5), Help("copies of the request ledger (the NATS cluster's "
                                                           "size)")] = 1


class IngestSettings(Common):
    # ingest answers clients over a connection of its own, as a user that may publish
    # nothing but client inboxes (its main user may not): see services/natsconf.py
    answer_nats_user: Annotated[str, Help("the NATS user ingest answers clients as (it may publish only "
                                          "into client inboxes)")] = "ingest-answers"
    answer_nats_password: Annotated[str, Help("that user's password (empty: its entry in "
                                              "--nats-credentials)")] = ""
    submit_timeout: Annotated[Seconds, Help("seconds a group has to acknowledge a request handed to "
                                            "it")] = 5.0
    max_inflight: Annotated[Positive, Help("requests being handed to groups at once")] = 4096
    reconcile_interval: Annotated[Seconds, Help("seconds between ingest's sweeps of the ledger for lapsed "
                                                "leases")] = 1.0
    policy: Annotated[Literal["round_robin", "shortest_queue", "least_tokens", "prefix_affinity"],
                      Help("how ingest picks the group of a request that names none (docs/engine.md, "
                           "'Routing policies')")] = "round_robin"
    affinity_skew: Annotated[float, Meta(ge=1.0), Help("prefix_affinity gives up on a group past this "
                                                       "multiple of the others' mean load")] = 2.0
    affinity_prefix_tokens: Annotated[Positive, Help("prefix_affinity hashes this many leading prompt "
                                                     "tokens")] = 32
    load_stale_after: Annotated[Seconds, Help("a group without a load report for this many seconds gets no "
                                              "requests")] = 3.0
    start_grace: Annotated[Seconds, Help("a deployment coming up opens when every group is ready, or when its "
                                         "first group has been ready this many seconds (until then requests "
                                         "get `unavailable`, as before any group is ready)")] = 60.0
    default_client: Annotated[str, Help("the user whose requests come on the plain generate and abort "
                                        "subjects")] = "client"
    max_inflight_per_client: Annotated[NonNegative, Help("requests one client may hold at once (0: no "
                                                         "limit)")] = 1024
    client_tokens_per_s: Annotated[NonNegative, Help("prompt + max_new_tokens one client may send a second "
                                                     "(0: no limit)")] = 0
    client_burst_s: Annotated[Seconds, Help("... of which it may spend this many seconds' worth at "
                                            "once")] = 10.0


class GatewaySettings(Common):
    """The OpenAI-compatible HTTP gateway (a client of the bus: NATS user ``gateway``)."""

    http_host: Annotated[str, Help("the address the HTTP API listens on (0.0.0.0: every interface)")] = \
        "127.0.0.1"
    http_port: Annotated[int, Meta(ge=0, le=65535), Help("the HTTP API's port")] = 8000
    http_fd: Annotated[int, Meta(ge=-1), Help("serve on this inherited listening socket instead of binding "
                                              "http_host:http_port (dpbus up binds the port itself)")] = -1
    api_key: Annotated[str, Help("when set, /v1/* needs \"Authorization: Bearer <key>\"")] = ""
    served_model_name: Annotated[str, Help("the model's name in the API (empty: the hub id or the model "
                                           "directory's name, or dpbus-builtin)")] = ""
    request_timeout: Annotated[Seconds, Help("longest wait in seconds for a request's next answer (then 504, "
                                             "and it is aborted)")] = 600.0
    ack_timeout: Annotated[Seconds, Help("ask for `accepted` and send a request again (same rid) while nothing "
                                         "came back for this many seconds, then twice that, ... (0: once)")] = 3.0
    # a whole 128k-token context fits, as a JSON list of ids or as text with every character
    # JSON-escaped (six bytes each)
    max_body_bytes: Annotated[int, Meta(ge=1024), Help("larger request bodies get 413")] = 4 << 20
    metrics_key: Annotated[str, Help("when set, /metrics needs \"Authorization: Bearer <key>\"")] = ""
    metrics_use_api_key: Annotated[bool, Help("/metrics takes the API key as well (needs "
                                              "--api-key)")] = False


class EngineSettings(Common):
    """How a group runs its requests; the publisher and the workers must agree on these."""

    max_running_requests: Annotated[Positive, Help("requests decoding together in a group (the "
                                                   "batch)")] = 16
    max_prefill_tokens: Annotated[int, Meta(ge=16), Help("prompt tokens prefilled per step, in "
                                                         "all")] = 256
    page_size: Annotated[int, Meta(ge=1, le=4096), Help("positions per KV page")] = 16
    heartbeat_timeout: Annotated[Seconds, Help("a worker silent this many seconds makes its group not "
                                               "ready (in a world, every worker leaves the world)")] = 10.0
    num_pages: Annotated[NonNegative, Help("KV pages per group, page 0 included (0: enough for every running "
                                           "request at full context)")] = 0


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def total_pages(s: EngineSettings, max_seq_len: int) -> int:
    """Pages in a group's pool, page 0 (the trash page) included."""
    if s.num_pages:
        return s.num_pages
    return s.max_running_requests * pages_needed(max_seq_len, s.page_size) + 1


class PublisherSettings(EngineSettings):
    dp_rank: Annotated[NonNegative, Help("the group this publisher schedules")] = 0
    prefix_cache: Annotated[bool, Help("keep filled KV pages after requests end and reuse shared prompt "
                                       "prefixes")] = True
    max_waiting: Annotated[Positive, Help("requests queued per group; past it, `overloaded`")] = 1024
    step_timeout: Annotated[Seconds, Help("a step without a result in this many seconds fails the group's "
                                          "running requests")] = 60.0
    resend_interval: Annotated[Seconds, Help("seconds before a step whose acknowledgements are late is "
                                             "published again")] = 1.0
    replay_window: Annotated[Positive, Help("recent steps kept for workers that missed some")] = 256
    steps_in_flight: Annotated[Positive, Help("overlapped steps: the next is on the wire while the group "
                                              "computes (1: one at a time)")] = 2
    stream_interval: Annotated[Positive, Help("tokens per streamed chunk (the last may have fewer): fewer, "
                                              "larger messages")] = 1
    load_interval: Annotated[Seconds, Help("seconds between the group's load reports to ingest")] = 0.5
    queue_timeout: Annotated[Seconds, Help("a request waiting longer than this many seconds gets an "
                                           "error")] = 300.0


class WorkerSettings(EngineSettings):
    node_rank: Annotated[NonNegative, Help("this node's rank, 0 .. nnodes-1 (its group: node_rank // (nnodes "
                                           "/ dp_size))")] = 0
    local_devices: Annotated[NonNegative, Help("0: the devices JAX finds (a TPU VM's chips; one on a CPU); "
                                               "N: N virtual CPU devices")] = 0
    load_format: Annotated[str, Help("without --model-path: dummy, weights drawn from --seed")] = "dummy"
    dtype: Annotated[Literal["auto", "float32", "bfloat16"], Help("weights and KV pages (bfloat16 halves what "
                                                                  "a step reads); auto: bfloat16 on TPU, "
                                                                  "float32 elsewhere")] = "auto"
    seed: Annotated[NonNegative, Help("the seed of the dummy weights")] = 0
    heartbeat_interval: Annotated[Seconds, Help("seconds between this worker's heartbeats")] = 0.5
    warmup: Annotated[bool, Help("compile every step shape at start-up")] = True
    mlp_scope: Annotated[Literal["group", "world"], Help("group: each group a whole model (replicas); world: "
                                                         "attention per group, the MLP and experts split over "
                                                         "every group's devices, all groups stepping together "
                                                         "(one JAX job of every node)")] = "group"
    world_layout: Annotated[Literal["auto", "per_step", "max_len"], Help(
        "with --mlp-scope world, how the MLP sees every group's tokens: per_step (SUM_LEN, the real tokens end "
        "to end, when they fit in one group's slots, else MAX_LEN, every group's padded slots), max_len "
        "(always), auto (per_step on TPU and GPU; max_len on CPU, where gloo's all-reduce costs more than "
        "the padding it saves: measured in make bench)")] = "auto"
    coordinator: Annotated[str, Help("HOST:PORT of the JAX job (the leader node of the group, or node 0 of the "
                                     "world), when a job spans nodes")] = ""
    join_timeout: Annotated[Seconds, Help("seconds to wait at start-up for every node of the group")] = 120.0
    stall_timeout: Annotated[Seconds, Help("a step running longer than this many seconds means a peer died "
                                           "mid-collective: exit")] = 120.0
    replay_timeout: Annotated[Seconds, Help("seconds per attempt when fetching missed steps from the "
                                            "publisher")] = 2.0
    compile_cache: Annotated[str, Help("keep XLA's compiled step shapes in this directory: a second start skips "
                                       "compiling (\"\": off)")] = "~/.cache/dpbus/jax"


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


def help_of(cls: type[Struct], name: str) -> str:
    """The description of setting ``name`` of ``cls`` (``Help`` in its type)."""
    f = next(f for f in msgspec.structs.fields(cls) if f.name == name)
    return _description(f.type)


def _description(t: Any) -> str:
    metas = getattr(t, "__metadata__", ()) if typing.get_origin(t) is Annotated else ()
    return next((m.description for m in metas if isinstance(m, Meta) and m.description), "")


def _base(t: Any) -> Any:
    """The type under ``Annotated``: ``bool``, ``int``, a ``Literal[...]``, ..."""
    return typing.get_args(t)[0] if typing.get_origin(t) is Annotated else t


def choices(t: Any) -> tuple[str, ...]:
    """The values a ``Literal`` setting takes (empty for any other)."""
    base = _base(t)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()


def flag_help(f: msgspec.structs.FieldInfo) -> str:
    """One line for ``--help``: what the setting is, its default and its variable (a
    ``Literal``'s values are the flag's metavar)."""
    default = "empty" if f.default == "" else f.default
    return f"{_description(f.type)} (default {default}; env {env_name(f.name)})".replace("%", "%%")


def add_settings_args(parser: argparse.ArgumentParser, cls: type[Struct], skip: set[str] = frozenset()) -> None:
    """Add one flag per field of ``cls``; defaults are resolved later, in ``build``."""
    for f in msgspec.structs.fields(cls):
        if f.name in skip:
            continue
        if _base(f.type) is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=flag_help(f))
        else:
            values = choices(f.type)
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=flag_help(f),
                                metavar="{" + ",".join(values) + "}" if values else f.name.upper())


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
            if f"$.{f.name}`" in str(e) and choices(f.type):
                hint = f"; valid values: {', '.join(choices(f.type))}"
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
