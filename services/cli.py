"""The ``dpbus`` command.

    dpbus up         the whole system on this machine (embedded NATS unless --nats-url)
    dpbus demo       up + a few concurrent requests + a summary table + clean shutdown
    dpbus generate   send one request and print the streamed answer
    dpbus node       what one TPU VM runs: a worker, plus its group's publisher if it leads
    dpbus ingest | publisher | worker    one service (what `up` and compose start)
    dpbus gateway    the OpenAI-compatible HTTP API, one more client of the bus
    dpbus status     wait until every group is ready and ingest answers
    dpbus bench      a serving benchmark (a running deployment, or --engine-only)
    dpbus schemas    the JSON Schema of every public message
    dpbus nats-config  a NATS server config with one user per role, for a layout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from dpbus.services import bus
from dpbus.services import version as package_version
from dpbus.services import settings as st
from dpbus.services.model_path import resolve_model_path

ROLE_SETTINGS = {"ingest": st.IngestSettings, "publisher": st.PublisherSettings,
                 "worker": st.WorkerSettings, "node": st.NodeSettings, "gateway": st.GatewaySettings}


def use_local_devices(n: int) -> None:
    """Ask XLA for ``n`` virtual CPU devices (0: the devices JAX finds). Must run before JAX is imported."""
    from dpbus.services.devices import xla_env

    os.environ.update(xla_env(n, os.environ))


def serve_metrics(services: list, port: int, host: str) -> None:
    """Prometheus metrics of this process's services on ``host:port``: their micro stats
    (read on the event loop at scrape time) and the publisher's latency histograms."""
    from prometheus_client import CollectorRegistry

    from dpbus.services import metrics as m

    registry = CollectorRegistry()
    loop = asyncio.get_running_loop()
    for svc in services:
        kind = type(svc).__name__.lower()
        labels = {"dp_rank": str(svc.g)} if kind == "publisher" else {}
        if kind == "worker":
            labels = {"dp_rank": str(svc.place.dp_rank), "node_rank": str(svc.s.node_rank)}
        if kind == "publisher":
            svc.metrics = m.PublisherMetrics(registry, svc.g)
        if kind != "gateway":  # the gateway serves its own on its HTTP port
            registry.register(m.StatsCollector(kind, svc.stats, loop, labels, m.LEVELS))
    m.serve(port, host, registry)


def run_role(role: str, cfg: Any) -> int:
    from dpbus.services import logs
    from dpbus.services.lifecycle import run_services

    if role in ("worker", "node"):
        use_local_devices(cfg.local_devices)
    context = {"service": role}
    if role in ("worker", "node"):
        context["node_rank"] = cfg.node_rank
    log = logs.configure(cfg.log_level, cfg.log_json, **context)
    services: list[Any] = []
    if role == "ingest":
        from dpbus.services.ingest.service import Ingest
        services.append(Ingest(cfg, log))
    elif role == "publisher":
        from dpbus.services.publisher.service import Publisher
        services.append(Publisher(cfg, log))
    elif role == "gateway":
        from dpbus.services.gateway.app import Gateway
        services.append(Gateway(cfg, log))
    else:
        from dpbus.services.worker.service import Worker
        worker_cfg = st.project(cfg, st.WorkerSettings) if role == "node" else cfg
        auth = None
        if role == "node":  # the group's leader connects as its node user (worker and publisher),
            from dpbus.services.launcher import node_user  # every other member as its own worker user
            from dpbus.services.topology import should_run_publisher
            leader = should_run_publisher(cfg)
            groups = cfg.dp_size if cfg.enable_dp_attention else 1
            auth = bus.auth_from(cfg, node_user(cfg.node_rank, cfg.nnodes, groups))
        worker = Worker(worker_cfg, log, auth=auth)
        services.append(worker)
        if role == "node":
            from dpbus.services.publisher.service import Publisher
            if leader:
                services.append(Publisher(st.project(cfg, st.PublisherSettings, dp_rank=worker.place.dp_rank), log,
                                          auth=worker.auth))
    setup = (lambda: serve_metrics(services, cfg.metrics_port, cfg.metrics_host)) if cfg.metrics_port else None
    return run_services(services, log, setup)


# ---- user commands ----------------------------------------------------------------------
def cluster_from(a: argparse.Namespace, **kw: Any):
    """The Cluster `up` and `demo` run, from their shared flags."""
    from dpbus.services.launcher import Cluster
    from dpbus.services.natsconf import Credentials

    creds = Credentials.load(a.nats_credentials) if a.nats_credentials else None
    url = a.nats_url or os.environ.get("NATS_URL") or (creds.url if creds else None) or None
    return Cluster(a.dp_size, a.nnodes, a.local_devices, nats_url=url, prefix=a.prefix, log_dir=a.log_dir,
                   node_processes=a.node_processes, ingests=a.ingests, secure=not a.insecure, credentials=creds,
                   nats_port=a.nats_port, tls=tls_files(a), http_port=a.http_port, extra=local_model(st.service_env(a)),
                   metrics=a.metrics, nats_cluster=a.nats_cluster, **kw)


def local_model(env: dict[str, str]) -> dict[str, str]:
    """The services' variables with a hub id in --model-path fetched once, here, before any
    service starts: each is given the local directory (and the gateway the id as its name)."""
    given = env.get("DPBUS_MODEL_PATH", "")
    local = resolve_model_path(given)
    if local == given:
        return env
    return {"DPBUS_SERVED_MODEL_NAME": given, **env, "DPBUS_MODEL_PATH": local}


def tls_files(a: argparse.Namespace):
    """The server's TLS files from --tls-ca/--tls-cert/--tls-key (all or none); checked here."""
    from dpbus.services.natsconf import Tls

    given = [a.tls_ca, a.tls_cert, a.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("TLS needs all of --tls-ca, --tls-cert and --tls-key (infra/tls/make-dev-certs.sh makes a "
                         "dev set)")
    for f in given:
        if not os.path.exists(f):
            raise ValueError(f"TLS file {f} does not exist (infra/tls/make-dev-certs.sh makes a dev set)")
    return Tls(*(os.path.abspath(f) for f in given), verify=getattr(a, "tls_verify", False))


def say(line: str = "", err: bool = False) -> None:
    """Print a line and flush it; once the reader is gone (``| tee`` ended by the same
    Ctrl-C), go on silently: the output goes to /dev/null, never a BrokenPipeError."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def check_model_path(a: argparse.Namespace) -> None:
    """Refuse a --model-path the services could not load, before anything starts (the
    same loader every role uses, so what it accepts is accepted here). A hub id is
    fetched now (``resolve_model_path`` raises its own one-line error)."""
    path = getattr(a, "model_path", None) or os.environ.get("DPBUS_MODEL_PATH", "")
    if not path:
        return
    from dpbus.services.model_config import model_config_for

    local = resolve_model_path(path)
    try:
        model_config_for(local, int(getattr(a, "max_seq_len", None) or 1 << 30))
    except Exception as e:  # noqa: BLE001 - whatever the loader says, in one line
        raise ValueError(f"--model-path {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def cmd_up(a: argparse.Namespace) -> int:
    from dpbus.services import up

    check_model_path(a)
    up.claim_state(say)
    return up.run(cluster_from(a, say=say, stop_grace=a.stop_grace), a.restart, say)


def cmd_generate(a: argparse.Namespace) -> int:
    import msgspec

    from dpbus.schemas import Chunk, Done
    from dpbus.services.client import stream

    req: dict[str, Any] = {"text": a.text, "stream": not a.no_stream}
    sampling = {k: v for k, v in (("max_new_tokens", a.max_new_tokens), ("temperature", a.temperature),
                                  ("seed", a.seed)) if v is not None}
    if sampling:  # only what the flags set: the wire's defaults apply to the rest
        req["sampling"] = sampling
    if a.dp_rank is not None:
        req["dp_rank"] = a.dp_rank

    async def main() -> int:
        code = 1
        try:
            nc = await bus.connect_client(*client_target(a))
        except ConnectionError as e:
            print(f"dpbus generate: {e}", file=sys.stderr)
            return 1
        try:
            async for ans in stream(nc, req, msgpack=a.msgpack, timeout=a.timeout, with_accepted=a.raw,
                                    ack_timeout=a.ack_timeout or None):
                code = 0 if isinstance(ans, Done) else code
                if a.raw:
                    print(msgspec.json.encode(ans).decode(), flush=True)
                elif isinstance(ans, Chunk):
                    print(ans.text, end="", flush=True)
                elif isinstance(ans, Done):
                    if ans.text:
                        print(ans.text, end="")
                    clamp = (f", max_new_tokens clamped to {ans.clamped_max_new_tokens} by the context"
                             if ans.clamped_max_new_tokens is not None else "")
                    print(f"\n[{ans.finish_reason.value}: group {ans.dp_rank}, {ans.completion_tokens} tokens, "
                          f"first token {ans.timings.ttft_ms:.0f} ms, total {ans.timings.total_ms:.0f} ms{clamp}]",
                          file=sys.stderr)
                else:
                    print(f"\nerror {ans.code.value}: {ans.message}", file=sys.stderr)
        except (ConnectionError, TimeoutError) as e:
            print(f"dpbus generate: {e or 'no answer in time'}", file=sys.stderr)
        finally:
            await nc.close()
        return code

    return asyncio.run(main())


def client_target(a: argparse.Namespace) -> tuple[str, float, Any]:
    """(url, timeout, auth) of a client command's connection (see services/userstate.py);
    refused while the `dpbus up` it found is still warming up."""
    from dpbus.services.userstate import client_target as target
    from dpbus.services.userstate import ready_or_warn

    url, auth, state = target(a.nats_url, a.nats_user, "", a.nats_credentials, a.tls_ca)
    if state is not None:
        ready_or_warn(state, a.command)
    return url, 5.0, auth


def cmd_status(a: argparse.Namespace) -> int:
    """Wait until every group is ready and an ingest answers (what `up` waits for)."""
    from dpbus.services.launcher import wait_groups_ready
    from dpbus.services.userstate import client_target as target
    from dpbus.services.userstate import describe

    url, auth, state = target(a.nats_url, a.nats_user, "", a.nats_credentials, a.tls_ca, default_user="operator")
    dp_size = a.dp_size or (state or {}).get("dp_size") or 2
    prefix = a.prefix or (state or {}).get("prefix") or "dpbus"
    if state is not None:
        say(f"dpbus up found ({describe(state)}); {state.get('progress')}")

    async def main() -> int:
        nc = await bus.connect_client(url, auth=auth)
        try:
            seconds = await wait_groups_ready(nc, prefix, dp_size, a.wait, say)
            world = await world_steps(nc, prefix)
        finally:
            await nc.close()
        say(f"ready: {dp_size} group(s) and ingest at {bus.redact(url)} (waited {seconds:.1f}s)")
        for line in world:
            say(line)
        return 0

    return asyncio.run(main())


async def world_steps(nc: Any, prefix: str) -> list[str]:
    """What the workers of a world (``--mlp-scope world``) say of its steps, a line per
    group (none for groups stepping alone), from their nats.micro STATS."""
    lines = []
    for doc in await bus.service_stats(nc, "dpbus-worker", prefix):
        w = doc["endpoints"][0]["data"].get("world") if doc.get("endpoints") else None
        if w:
            last = w.get("last") or {}
            lines.append(f"  world, group {doc['metadata']['dp_rank']} (node {doc['metadata']['node_rank']}): "
                         f"{w['world_steps']} world steps: ran {w['ran']}, sat out {w['sat_out']}, idle "
                         f"{w['idle']}, MLP on tokens end to end {w.get('sum_len', 0)} (padded "
                         f"{w.get('max_len', 0)}); last: sizes per group {last.get('sizes')} (decode rows, "
                         f"chunks, tokens), shape decode {last.get('decode')} prefill {last.get('prefill')}, "
                         f"{last.get('layout', 'max_len')}")
    return sorted(lines)


def gateway_from_state(a: argparse.Namespace) -> dict[str, str]:
    """`dpbus gateway` given no NATS server or user: the running `dpbus up`'s, as user
    ``gateway`` (from its state file), as `generate` finds it."""
    from dpbus.services.userstate import describe, read_state, state_auth, state_path

    given = [a.nats_url, a.nats_user, a.nats_password, a.nats_credentials, a.nats_nkey_seed]
    named = ("NATS_URL", "DPBUS_NATS_URL", "DPBUS_NATS_USER", "DPBUS_NATS_PASSWORD", "DPBUS_NATS_CREDENTIALS")
    state = None if any(given) or any(os.environ.get(v) for v in named) else read_state()
    if state is None:
        return {}
    auth = state_auth(state, "gateway")
    say(f"dpbus gateway: using the running dpbus up ({describe(state)}) as user {auth.user or '(none)'!r}, "
        f"from {state_path()}", err=True)
    out = {"nats_url": state["url"], "nats_user": auth.user, "nats_password": auth.password}
    if auth.tls_ca and not a.tls_ca:
        out["tls_ca"] = auth.tls_ca
    if a.prefix is None and not os.environ.get("DPBUS_PREFIX") and state.get("prefix"):
        out["prefix"] = state["prefix"]
    return out


def cmd_nats_config(a: argparse.Namespace) -> int:
    from dpbus.services.natsconf import Limits, layout_members, layout_users, loopback, monitor_address, read_hashes, refuse_placeholders, \
        size, write_config
    from dpbus.services.topology import place_node

    for r in range(a.nnodes):  # refuse bad layouts, as every service does
        place_node(r, a.nnodes, a.dp_size)
    tls = tls_files(a)
    limits = Limits(a.max_connections, a.max_subscriptions, size(a.max_payload), a.client_max_connections,
                    a.client_max_subscriptions, size(a.client_max_payload or 0))
    passwords = {}
    if a.password is not None:  # the same password for every user: only for throwaway setups
        refuse_placeholders({"every user": a.password})
        passwords = {u: a.password for u in ("sys", *layout_users(a.dp_size, a.client or ["client"],
                                                                   layout_members(a.dp_size, a.nnodes)))}
    http = monitor_address(a.http)
    if http and not loopback(http):
        print(f"note: HTTP monitoring on {http} has no authentication; /connz and /subsz show every connection's "
              "subjects and inbox to whoever reaches it", file=sys.stderr)
    old = os.path.join(a.out, "auth.conf")
    hashes = read_hashes(old) if os.path.exists(old) else {}
    scheme = "tls" if tls else "nats"
    host = a.listen.rsplit(":", 1)
    url = f"{scheme}://{'127.0.0.1' if host[0] in ('0.0.0.0', '') else host[0]}:{host[-1]}"
    peers = config_peers(a.cluster, a.listen, http, a.route_port, a.store_dir)
    if peers:  # clients list every server (hosts nats-0, nats-1, ...)
        url = ",".join(f"{scheme}://{p.name}:{host[-1]}" for p in peers)
        if a.password is not None:
            passwords["route"] = a.password
    write_config(a.out, dp_size=a.dp_size, clients=a.client or ["client"], prefixes=a.prefix or ["dpbus"],
                 passwords=passwords, listen=a.listen, http=http, store_dir=a.store_dir, tls=tls, url=url,
                 existing_hashes=hashes, nkey_users=a.nkeys, peers=peers, limits=limits, sealed=a.sealed,
                 nnodes=a.nnodes)
    confs = ", ".join(p.conf for p in peers) or "nats.conf"
    secrets = " (sealed: no credentials written, nobody can log in)" if a.sealed else \
        ", credentials.json and compose.env"
    print(f"wrote {confs}, auth.conf{secrets} to {a.out} "
          f"(dp_size {a.dp_size}, clients {', '.join(a.client or ['client'])}); check it with: "
          f"nats-server -t -c {os.path.join(a.out, (peers[0].conf if peers else 'nats.conf'))}")
    return 0


def config_peers(n: int, listen: str, http: str, route_port: int, store_dir: str) -> list:
    """A cluster of ``n`` servers on hosts ``nats-0`` ... (one each), for `nats-config --cluster`."""
    from dpbus.services.natsconf import Peer

    if n < 2:
        return []
    return [Peer(f"nats-{i}", listen, f"nats-{i}:{route_port}", http or None, f"{store_dir}-nats-{i}")
            for i in range(n)]


def cmd_bench(a: argparse.Namespace) -> int:
    """A serving benchmark against a running deployment, or the engine alone (--engine-only)."""
    import json as _json

    from rich.console import Console
    from rich.progress import Progress

    from dpbus.services import benchmark as b

    w = b.Workload(a.requests, a.input_len, a.output_len, a.range_ratio, a.concurrency, a.rate, a.seed)
    console = Console(width=None if sys.stdout.isatty() else 160)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("engine only" if a.engine_only else "requests", total=w.requests)
        tick = lambda: bar.advance(task)  # noqa: E731
        warm = b.warm_up_workload(w, a.warmup_requests)
        if a.engine_only:
            use_local_devices(a.local_devices)
            settings = st.build(st.WorkerSettings, a, seed=int(os.environ.get("DPBUS_SEED", 0)))
            engine = b.load_engine(settings)
            if warm is not None:
                b.bench_engine(warm, engine, steps_in_flight=a.steps_in_flight)
            result = b.bench_engine(w, engine, tick, a.steps_in_flight)
        else:
            async def main() -> dict:
                nc = await bus.connect_client(*client_target(a))
                try:
                    if warm is not None:
                        await b.bench_system(nc, warm, a.prefix)
                    return await b.bench_system(nc, w, a.prefix, tick)
                finally:
                    await nc.close()
            result = asyncio.run(main())
    console.print(b.table([result]))
    if a.json:
        with open(a.json, "w") as f:
            _json.dump(result, f, indent=2)
        console.print(f"wrote {a.json}")
    return 0 if result["completed"] == result["requests"] else 1


def cmd_demo(a: argparse.Namespace) -> int:
    from dpbus.services.demo import run_demo

    check_model_path(a)
    return run_demo(a)


def cmd_schemas(a: argparse.Namespace) -> int:
    import msgspec

    from dpbus.schemas.public import PUBLIC_MESSAGES

    doc = {name: msgspec.json.schema(typ) for name, typ in PUBLIC_MESSAGES.items()}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        for name, schema in doc.items():
            with open(os.path.join(a.out, f"{name}.schema.json"), "w") as f:
                json.dump(schema, f, indent=2)
        print(f"wrote {len(doc)} schemas to {a.out}")
    else:
        print(json.dumps(doc, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpbus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dpbus {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def layout(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dp-size", type=int, default=2,
                       help="attention data-parallel groups (default 2 here, to show routing between groups on "
                            "one machine; a service started alone defaults to 1)")
        q.add_argument("--nnodes", type=int, default=None, help="worker processes (default: dp-size)")
        q.add_argument("--local-devices", type=int, default=0,
                       help="devices per worker: 0 (default) the devices JAX finds (on a TPU VM, its chips: "
                            "one worker per host, --dp-size 1); N: N virtual CPU devices each (`make demo` "
                            "uses 2)")
        q.add_argument("--nats-url", default=None, help="use this NATS server instead of the embedded one")
        q.add_argument("--prefix", default="dpbus", help="subject prefix (default dpbus)")
        q.add_argument("--log-dir", default=None, help="where service logs go (default: a new temp dir)")
        q.add_argument("--ingests", type=int, default=1, help="ingest instances sharing the load (default 1)")
        q.add_argument("--node-processes", action="store_true",
                       help="run one `dpbus node` per node (worker + its group's publisher), as on TPU VMs")
        q.add_argument("--nats-port", type=int, default=None,
                       help="embedded server's port (default 4222 when free, else any free port; 0: any)")
        q.add_argument("--nats-cluster", type=int, default=0,
                       help="embedded NATS: a cluster of this many servers on free ports (routes authenticated, "
                            "JetStream and the request ledger replicated on each)")
        q.add_argument("--insecure", action="store_true",
                       help="embedded server without users or passwords (debugging only)")
        q.add_argument("--nats-credentials", default=None,
                       help="credentials.json from `dpbus nats-config`: each service connects as its role's user")
        q.add_argument("--http-port", type=int, default=8000,
                       help="the OpenAI-compatible gateway's port on 127.0.0.1 (default 8000, or a free one if "
                            "taken; 0: no gateway)")
        q.add_argument("--tls-ca", default="", help="embedded server: serve TLS (with --tls-cert, --tls-key)")
        q.add_argument("--tls-cert", default="", help="embedded server: its TLS certificate")
        q.add_argument("--tls-key", default="", help="embedded server: the private key of --tls-cert")
        q.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                       help="every service serves Prometheus metrics on its own port (listed in "
                            "LOG_DIR/prometheus-targets.json); default on")
        engine = q.add_argument_group("service settings, passed to every service that has them "
                                      "(--model-path, --max-seq-len, --max-running-requests, --policy, ...)")
        st.add_settings_args(engine, st.ServiceFlags, skip=st.UP_DECIDES)

    def client_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--nats-url", default=None,
                       help="default: $NATS_URL, else the running `dpbus up` (its state file), else 127.0.0.1:4222; "
                            "user:password@ in the URL authenticates")
        q.add_argument("--nats-credentials", default=None, help="a credentials.json (`dpbus nats-config`)")
        q.add_argument("--nats-user", default="", help="the user in --nats-credentials (default: client; "
                                                       "status: operator)")
        q.add_argument("--tls-ca", default="", help="CA of the server's TLS certificate")

    q = sub.add_parser("up", help="run the whole system on this machine")
    layout(q)
    q.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                   help="restart a service that exits (with its group's peers); default on")
    q.add_argument("--stop-grace", type=float, default=15.0,
                   help="on Ctrl-C / SIGTERM, seconds a service may take to drain and stop before it is killed "
                        "(default 15; a second Ctrl-C kills at once)")
    q.set_defaults(fn=cmd_up)
    q = sub.add_parser("demo", help="up + concurrent requests + summary table + shutdown")
    layout(q)
    q.add_argument("--requests", type=int, default=8, help="concurrent requests to send (default 8)")
    q.add_argument("--max-new-tokens", type=int, default=24, help="tokens per answer (default 24)")
    q.set_defaults(fn=cmd_demo)
    q = sub.add_parser("generate", help="send one request and print the streamed answer",
                       description="Send one request and print the streamed answer. Only the sampling fields "
                                   "given as flags are sent: the others take the wire's defaults "
                                   "(docs/wire-contract.md, 'Request fields and their defaults': max_new_tokens 32, "
                                   "temperature 1.0, a random seed).")
    q.add_argument("text", help="the prompt")
    client_flags(q)
    q.add_argument("--max-new-tokens", type=int, default=None, help="default: the wire's (32)")
    q.add_argument("--temperature", type=float, default=None, help="0: greedy; default: the wire's (1.0)")
    q.add_argument("--seed", type=int, default=None, help="default: a random seed per request")
    q.add_argument("--dp-rank", type=int, default=None, help="pin the request to this group")
    q.add_argument("--no-stream", action="store_true", help="only the final answer")
    q.add_argument("--msgpack", action="store_true", help="send the request as msgpack")
    q.add_argument("--raw", action="store_true", help="print every answer message as JSON")
    q.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the next answer (default 120)")
    q.add_argument("--ack-timeout", type=float, default=3.0,
                   help="ask for `accepted`, and send the request again (same rid) while nothing came back "
                        "for this many seconds, then twice that, ... (default 3; 0: send it once)")
    q.set_defaults(fn=cmd_generate)
    q = sub.add_parser("bench", help="a serving benchmark: a running deployment, or --engine-only")
    client_flags(q)
    q.add_argument("--prefix", default="dpbus", help="the deployment's subject prefix (default dpbus)")
    q.add_argument("--requests", type=int, default=64, help="requests in the workload (default 64)")
    q.add_argument("--input-len", type=int, default=128, help="longest prompt, in tokens (default 128)")
    q.add_argument("--output-len", type=int, default=64, help="longest answer, in tokens (default 64)")
    q.add_argument("--range-ratio", type=float, default=0.5, help="lengths vary down to len * (1 - ratio)")
    q.add_argument("--concurrency", type=int, default=8, help="requests in flight (unless --rate)")
    q.add_argument("--rate", type=float, default=0.0, help="requests/s, Poisson arrivals (0: use --concurrency)")
    q.add_argument("--seed", type=int, default=0, help="the workload's seed: lengths and prompts (default 0)")
    q.add_argument("--json", default=None, help="also write the results here")
    q.add_argument("--warmup-requests", type=int, default=8,
                   help="requests sent first and not measured (default 8; 0: none): a first run after start-up "
                        "would otherwise time what it compiles or loads")
    q.add_argument("--engine-only", action="store_true",
                   help="the same workload through the scheduler and model runner in this process, no bus")
    q.add_argument("--local-devices", type=int, default=0,
                   help="--engine-only: 0 (default) the devices JAX finds; N: N virtual CPU devices")
    q.add_argument("--steps-in-flight", type=int, default=2,
                   help="--engine-only: steps launched before the oldest one's tokens are taken, as a publisher "
                        "keeps them (1: one step after another)")
    st.add_settings_args(q, st.EngineSettings, skip={*st.UP_DECIDES, "max_waiting", "seed"})
    q.set_defaults(fn=cmd_bench)
    q = sub.add_parser("status", help="wait until every group is ready and ingest answers",
                       description="Connects as the operator user (from --nats-credentials, the URL, or the "
                                   "running dpbus up's state file) and waits until every group reports ready and "
                                   "an ingest answers; against a dpbus up still warming up, it waits for it.")
    client_flags(q)
    q.add_argument("--dp-size", type=int, default=None,
                   help="groups to wait for (default: the running dpbus up's, else 2)")
    q.add_argument("--prefix", default=None, help="subject prefix (default: the running dpbus up's, else dpbus)")
    q.add_argument("--wait", type=float, default=300.0, help="give up after this many seconds (default 300)")
    q.set_defaults(fn=cmd_status)
    q = sub.add_parser("nats-config", help="write a NATS server config with one user per role for a layout")
    q.add_argument("--out", required=True, help="directory for nats.conf, auth.conf, credentials.json, compose.env")
    q.add_argument("--dp-size", type=int, default=2, help="attention data-parallel groups (default 2)")
    q.add_argument("--nnodes", type=int, default=None, help="worker processes (default: dp-size)")
    q.add_argument("--prefix", action="append", default=None, help="subject prefix (repeatable; default dpbus)")
    q.add_argument("--client", action="append", default=None,
                   help="a client application's user name, with its own private inbox (repeatable; default client)")
    q.add_argument("--listen", default="0.0.0.0:4222", help="where clients connect (default 0.0.0.0:4222)")
    q.add_argument("--http", default="127.0.0.1:8222",
                   help="HTTP monitoring address (default 127.0.0.1:8222; a bare port binds 127.0.0.1; '' for none). "
                        "It has no authentication and /connz lists every inbox: 0.0.0.0:8222 only behind a firewall")
    q.add_argument("--store-dir", default="jetstream", help="JetStream store (relative: where the server starts)")
    q.add_argument("--password", default=None, help="one password for every user instead of random ones "
                                                    "(throwaway setups; known placeholders are refused)")
    q.add_argument("--sealed", action="store_true",
                   help="write the server files with every password thrown away (no credentials.json, no "
                        "compose.env): a config nobody can log in to, as infra/nats ships")
    q.add_argument("--max-connections", type=int, default=4096,
                   help="connections the server takes, every user together (default 4096; see "
                        "--client-max-connections for one client's share)")
    q.add_argument("--max-subscriptions", type=int, default=65536,
                   help="subscriptions of one connection, whoever it is (default 65536; 0: no limit). A dpbus "
                        "client holds one per request in flight")
    q.add_argument("--max-payload", default="8MB", help="largest message, for every connection (default 8MB, "
                                                        "at most 64MB)")
    q.add_argument("--client-max-connections", type=int, default=256,
                   help="connections one client (each --client, and the gateway) may hold at once: its own NATS "
                        "account's limit (default 256)")
    q.add_argument("--client-max-subscriptions", type=int, default=65536,
                   help="subscriptions of one client connection (default 65536; 0: no limit)")
    q.add_argument("--client-max-payload", default="",
                   help="largest message a client may send (default: --max-payload)")
    q.add_argument("--tls-ca", default="", help="the CA that signed --tls-cert (and, with --tls-verify, "
                                                "the clients' certificates)")
    q.add_argument("--tls-cert", default="", help="server certificate: turns TLS on")
    q.add_argument("--tls-key", default="", help="the private key of --tls-cert")
    q.add_argument("--tls-verify", action="store_true", help="also require client certificates")
    q.add_argument("--nkeys", action="store_true", help="users authenticate with nkeys (seeds in OUT/nkeys/) "
                                                        "instead of passwords")
    q.add_argument("--cluster", type=int, default=0,
                   help="a NATS cluster of this many servers on hosts nats-0, nats-1, ...: OUT/nats-<i>.conf each, "
                        "routes authenticated (JetStream clustered)")
    q.add_argument("--route-port", type=int, default=6222, help="--cluster: the port routes use on every host")
    q.set_defaults(fn=cmd_nats_config)
    q = sub.add_parser("schemas", help="print the JSON Schema of every public message")
    q.add_argument("--out", default=None, help="write one file per message into this directory")
    q.set_defaults(fn=cmd_schemas)
    helps = {"node": "a worker, plus its group's publisher when should_run_publisher says so",
             "gateway": "the OpenAI-compatible HTTP API (a client of the bus)",
             "ingest": "the ingest service", "publisher": "the publisher of one DP group", "worker": "one worker"}
    for role, cls in ROLE_SETTINGS.items():
        q = sub.add_parser(role, help=helps[role])
        st.add_settings_args(q, cls, skip={"dp_rank"} if role == "node" else set())
        q.set_defaults(fn=None, role=role)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if getattr(a, "nnodes", 0) is None:
        a.nnodes = a.dp_size
    try:
        if a.fn is None:
            if a.role in ("node", "worker"):
                check_model_path(a)
            found = gateway_from_state(a) if a.role == "gateway" else {}
            return run_role(a.role, st.build(ROLE_SETTINGS[a.role], a, **found))
        return a.fn(a)
    except ValueError as e:
        print(f"dpbus {a.command}: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError, TimeoutError) as e:
        print(f"dpbus {a.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
