"""Ingest routing capacity: the real ingest service (a process, as ``dpbus up`` runs it)
in front of stand-in publishers that acknowledge every submit at once, after claiming
the request in the real ledger (``ownership.claim`` on the JetStream bucket, as a
publisher does) and, a moment later, settling it (the compare-and-set a publisher makes
when it finishes a request). Nothing runs a model, so what is measured is the front door.

Offered load: first a closed loop (a window of requests in flight, the next sent as a
stand-in answers one: what the whole chain carries at most), then requests published on
``dpbus.generate`` at a fixed rate for a while (a few rates, rising). For each: requests/s arriving at
the stand-ins, and the latency from the client's publish to the submit's arrival at a
stand-in (p50/p99; every process is on this machine, one monotonic clock), and the CPU
time each process spent per request. Next to it, one raw NATS request/reply round trip
on the same server.

``python -m bench.ingest`` alone; ``--ingest-from DIR`` runs ingest from another checkout
(e.g. the code before an optimization), so both run in the same setup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

RESULTS = Path(__file__).parent / "results"
CONTROL = "bench.standin"  # the stand-ins' control subjects (stats, reset), as the admin user
MODES = ("claim+settle", "claim", "ack")
TICK = 0.001  # the offered load is published in a burst every TICK seconds
DONE = b'{"type":"done"}'  # a stand-in's whole answer to the client
LEASE_TTL = 5.0  # the stand-ins' leases (a publisher's default --publisher-timeout)


# ---- the stand-in publishers (a child process) ---------------------------------------------
class Standins:
    """Every group's stand-in publisher, one connection each, in one process."""

    def __init__(self, groups: int, mode: str) -> None:
        self.groups, self.mode = groups, mode
        self.arrival_ns: list[int] = []  # publish -> arrival at a stand-in
        self.admit_ns: list[int] = []  # publish -> ingest admitted it (wall clocks of one machine)
        self.counts = {"submits": 0, "claimed": 0, "duplicates": 0, "claim_failed": 0, "settled": 0,
                       "settle_failed": 0, "renew_failed": 0}
        self.first = self.last = 0.0
        self.tasks: set[asyncio.Task] = set()

    def reset(self) -> None:
        self.arrival_ns.clear()
        self.admit_ns.clear()
        self.counts = dict.fromkeys(self.counts, 0)
        self.first = self.last = 0.0

    def stats(self) -> dict:
        return {**self.counts, "arrival_ms": percentiles_ms(self.arrival_ns), "admit_ms": percentiles_ms(self.admit_ns),
                "seconds": self.last - self.first, "in_progress": len(self.tasks)}

    async def serve(self, url: str, credentials: str, prefix: str) -> None:
        from dpbus.schemas import ErrorCode, Subjects
        from dpbus.schemas.internal import Submit, SubmitAck, pack, unpacker
        from dpbus.services import bus, ownership
        from dpbus.services.ledger import Lease, Ledger, request_key
        from dpbus.services.natsconf import Credentials, user_for

        creds = Credentials.load(credentials)
        subjects = Subjects(prefix)
        decode = unpacker(Submit).decode
        stop = asyncio.Event()
        subscribed: list[int] = []

        async def group(g: int) -> None:
            nc = await bus.connect_client(url, auth=bus.auth_for(creds, user_for("publisher", g)))
            ledger = await Ledger.open(nc, prefix)
            instance = secrets.randbits(62) | 1
            await ledger.renew(Lease(instance, g, LEASE_TTL))

            async def handle(msg, sub) -> None:
                if self.mode == "ack":  # no ledger at all: what ingest alone can route
                    self.counts["claimed"] += 1
                    await msg.respond(pack(SubmitAck(True, instance=instance)))
                    await nc.publish(sub.reply, DONE)
                    return
                key = request_key(g, sub.client, sub.rid)
                try:
                    rev = await ownership.claim(ledger, key, ownership.held_by(instance, g, sub), sub.attempt,
                                                ownership.source_of(sub))
                except Exception as e:  # noqa: BLE001 - counted; refused as a publisher refuses it
                    self.counts["claim_failed"] += 1
                    if self.counts["claim_failed"] <= 5:
                        print(f"claim failed: {e!r}", flush=True)
                    await msg.respond(pack(SubmitAck(False, ErrorCode.UNAVAILABLE,
                                                     f"the request ledger is unreachable: {e!r}")))
                    return
                if rev is None:
                    self.counts["duplicates"] += 1
                    await msg.respond(pack(SubmitAck(True, instance=instance, duplicate=True)))
                    return
                self.counts["claimed"] += 1
                await msg.respond(pack(SubmitAck(True, instance=instance)))
                await nc.publish(sub.reply, DONE)  # what the client waits for (a real one: the tokens)
                if self.mode == "claim+settle":  # the request "finishes": its terminal is ours
                    try:
                        if await ledger.swap(key, ownership.answered_by(instance, g, sub.rid, sub.client), rev):
                            self.counts["settled"] += 1
                    except Exception:  # noqa: BLE001 - a time-out: ingest answers it once the lease lapses
                        self.counts["settle_failed"] += 1

            async def on_submit(msg) -> None:
                now_ns, wall = time.monotonic_ns(), time.time()
                sub = decode(msg.data)
                _, sent_ns, sent_wall = sub.rid.split("-")
                self.arrival_ns.append(now_ns - int(sent_ns))
                self.admit_ns.append(int((sub.accepted_at - float(sent_wall)) * 1e9))
                self.counts["submits"] += 1
                self.first = self.first or wall
                self.last = wall
                task = asyncio.create_task(handle(msg, sub))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

            async def renew() -> None:  # as a publisher: a quarter of the lease's time-to-live apart
                while not stop.is_set():
                    await asyncio.sleep(LEASE_TTL / 4)
                    try:
                        await ledger.renew(Lease(instance, g, LEASE_TTL))
                    except Exception:  # noqa: BLE001 - the next one may get through
                        self.counts["renew_failed"] += 1

            await bus.subscribe(nc, subjects.submit(g), on_submit, queue=f"dpbus-publisher-{g}")
            await bus.at_server(nc)
            subscribed.append(g)
            await renew()

        admin = await bus.connect_client(url, auth=bus.auth_for(creds, "admin"))

        async def on_control(msg) -> None:
            what = msg.subject.rsplit(".", 1)[1]
            if what == "reset":
                self.reset()
            elif what == "stop":
                stop.set()
            await msg.respond(json.dumps(self.stats()).encode())

        await admin.subscribe(f"{CONTROL}.*", cb=on_control)
        await admin.flush()
        runs = [asyncio.create_task(group(g)) for g in range(self.groups)]
        while len(subscribed) < self.groups:  # every group listens before the load starts
            if any(r.done() for r in runs):
                await asyncio.gather(*runs)  # a group that could not start: its error ends this process
            await asyncio.sleep(0.05)
        print("standins ready", flush=True)
        await stop.wait()
        for r in runs:
            r.cancel()
        await admin.drain()


def percentiles_ms(ns: list[int]) -> dict:
    if not ns:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(ns)

    def at(q: float) -> float:
        return s[min(int(q * len(s)), len(s) - 1)] / 1e6

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": s[-1] / 1e6}


# ---- process CPU time ------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (its /proc stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the client side -------------------------------------------------------------------------
def request_body(i: int, kind: str) -> bytes:
    """A generate request whose rid carries when it was published (monotonic ns, wall s)."""
    rid = f"{i}-{time.monotonic_ns()}-{time.time():.6f}"
    if kind == "text":
        return msgspec.json.encode({"rid": rid, "text": "Summarize the plot of a short novel in two sentences, please.",
                                    "sampling": {"max_new_tokens": 16, "temperature": 0.0}})
    return msgspec.msgpack.encode({"rid": rid, "input_ids": list(range(40, 72)),
                                   "sampling": {"max_new_tokens": 16, "temperature": 0.0}})


class Load:
    """The client: publishes generate requests open loop (at a rate) or closed loop (a
    window of requests in flight, the next sent when one is answered)."""

    def __init__(self, nc, subject: str, kind: str) -> None:
        self.nc, self.subject, self.kind = nc, subject, kind
        self.inbox = nc.new_inbox()
        self.next_i = 0
        self.answered = 0
        self.errors: dict[str, int] = {}
        self.more = False  # closed loop: send another for each answer

    async def start(self) -> None:
        await self.nc.subscribe(self.inbox + ".*", cb=self.on_answer)

    async def send(self) -> None:
        i = self.next_i
        self.next_i += 1
        await self.nc.publish(self.subject, request_body(i, self.kind), reply=f"{self.inbox}.{i}")

    async def on_answer(self, msg) -> None:
        self.answered += 1
        if not msg.data.startswith(b'{"type":"done"'):  # ingest answers only what it refuses
            code = msgspec.json.decode(msg.data).get("code", "?") if msg.data[:1] == b"{" else "?"
            self.errors[code] = self.errors.get(code, 0) + 1
        if self.more:
            await self.send()

    async def at_rate(self, rate: float, seconds: float) -> int:
        """Publish ``rate`` requests/s for ``seconds`` (a burst every TICK); how many were sent."""
        t0, first = time.monotonic(), self.next_i
        while (elapsed := time.monotonic() - t0) < seconds:
            while self.next_i - first < int(elapsed * rate) + 1:
                await self.send()
            await asyncio.sleep(TICK)
        return self.next_i - first

    async def closed_loop(self, window: int, seconds: float) -> int:
        first = self.next_i
        self.more = True
        for _ in range(window):
            await self.send()
        await asyncio.sleep(seconds)
        self.more = False
        return self.next_i - first


async def control(admin, what: str) -> dict:
    return json.loads((await admin.request(f"{CONTROL}.{what}", b"", timeout=10)).data)


async def wait_settled(admin, load: "Load", timeout: float) -> dict:
    """Stand-in stats once every sent request was answered (a stand-in's done or ingest's
    refusal) and every one that arrived was handled (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await control(admin, "stats")
        answered = load.answered >= load.next_i
        if (answered and not st["in_progress"]) or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.1)


async def raw_round_trip(admin, n: int, server_pid: int) -> dict:
    """One NATS request/reply at a time, on the same server (admin to itself), and the
    server's CPU time per round trip."""
    async def echo(msg) -> None:
        await msg.respond(msg.data)

    sub = await admin.subscribe("bench.echo", cb=echo)
    payload = b"x" * 200
    for _ in range(100):
        await admin.request("bench.echo", payload, timeout=5)
    samples, cpu0 = [], cpu_seconds(server_pid)
    for _ in range(n):
        t0 = time.monotonic_ns()
        await admin.request("bench.echo", payload, timeout=5)
        samples.append(time.monotonic_ns() - t0)
    cpu = cpu_seconds(server_pid) - cpu0
    await sub.unsubscribe()
    return {**percentiles_ms(samples), "server_cpu_us": cpu / n * 1e6}


async def raw_kv_create(admin, n: int, server_pid: int) -> dict:
    """One JetStream key-value create at a time (a fresh key each: what a claim is), in a
    bucket made like the ledger's (file storage, one revision per key), and the server's
    CPU time per create."""
    from nats.js.api import KeyValueConfig, StorageType

    js = admin.jetstream(timeout=5)
    kv = await js.create_key_value(KeyValueConfig(bucket="bench_kv", history=1, storage=StorageType.FILE))
    value = b"x" * 100
    for i in range(100):
        await kv.create(f"warm.{i}", value)
    samples, cpu0 = [], cpu_seconds(server_pid)
    for i in range(n):
        t0 = time.monotonic_ns()
        await kv.create(f"k.{i}", value)
        samples.append(time.monotonic_ns() - t0)
    cpu = cpu_seconds(server_pid) - cpu0
    await js.delete_key_value("bench_kv")
    return {**percentiles_ms(samples), "server_cpu_us": cpu / n * 1e6}


async def measure(cluster, pids: dict[str, int], rates: list[float], seconds: float, kind: str,
                  rtt_samples: int, window: int) -> dict:
    from dpbus.services import bus

    client = await bus.connect_client(cluster.nats_url, auth=cluster.auth("client"))
    admin = await bus.connect_client(cluster.nats_url, auth=cluster.auth("admin"))
    load = Load(client, cluster.prefix + ".generate", kind)
    await load.start()
    out: dict = {"raw_nats_round_trip_ms": await raw_round_trip(admin, rtt_samples, pids["nats-server"]),
                 "raw_kv_create_ms": await raw_kv_create(admin, rtt_samples, pids["nats-server"]), "runs": []}
    # warm the path with the closed loop: an open loop faster than this machine routes would
    # leave ingest a backlog (and the client its share of it) that the first run pays for
    await load.closed_loop(window, 1.0)
    await wait_settled(admin, load, 30)
    for rate in [0, *rates]:  # the closed loop first: an overloading rate leaves a backlog behind
        await control(admin, "reset")
        load.errors.clear()
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu0["client"] = time.process_time()
        t0 = time.monotonic()
        sent = await (load.at_rate(rate, seconds) if rate else load.closed_loop(window, seconds))
        await client.flush()
        st = await wait_settled(admin, load, 30)
        wall = time.monotonic() - t0
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) for name, pid in pids.items()}
        cpu["client"] = time.process_time() - cpu0["client"]  # this process: the load and the control
        run = {"offered_per_s": rate or None, "window": None if rate else window, "sent": sent,
               "arrived": st["submits"], "claimed": st["claimed"], "settled": st["settled"],
               "refused": dict(load.errors), "arrived_per_s": st["submits"] / st["seconds"] if st["seconds"] else 0.0,
               "arrival_ms": st["arrival_ms"], "admit_ms": st["admit_ms"],
               "ledger_failures": {k: st[k] for k in ("claim_failed", "settle_failed", "renew_failed")},
               "cpu_us_per_request": {k: v / max(sent, 1) * 1e6 for k, v in cpu.items()},
               "cpu_busy_fraction": {k: v / wall for k, v in cpu.items()}}
        out["runs"].append(run)
        say(run)
    await client.close()
    await control(admin, "stop")
    await admin.close()
    return out


def say(run: dict) -> None:
    offered = f"{run['offered_per_s']:.0f}/s" if run["offered_per_s"] else f"window {run['window']}"
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in run["cpu_us_per_request"].items())
    print(f"  offered {offered:>7}: arrived {run['arrived_per_s']:8.0f}/s, publish->submit p50 "
          f"{run['arrival_ms']['p50']:.2f} ms p99 {run['arrival_ms']['p99']:.2f} ms (ingest admit p99 "
          f"{run['admit_ms']['p99']:.2f} ms), refused {run['refused'] or '-'}; CPU us/request: {cpu}", flush=True)


def start(groups: int, ingest_from: str | None, mode: str, log_dir: Path, profile: str = ""):
    """nats-server (secured, as ``dpbus up``), ingest and the stand-ins; returns the cluster
    and the pids to watch."""
    from dpbus.services.launcher import Cluster

    cluster = Cluster(dp_size=groups, nnodes=groups, local_devices=1, log_dir=log_dir, nats_port=0,
                      say=lambda _: None, extra={"DPBUS_LOG_LEVEL": "warning"})
    cluster.start_nats()
    env = cluster._service_env("ingest")  # noqa: SLF001 - the environment dpbus up gives ingest
    here = str(Path(__file__).resolve().parent.parent)
    if ingest_from:  # the other checkout's services/ and schemas/ as the dpbus package, ahead of this one's
        shim = log_dir / "ingest-from" / "dpbus"
        shim.mkdir(parents=True, exist_ok=True)
        for part in ("services", "schemas"):
            (shim / part).symlink_to(Path(ingest_from).resolve() / part)
        env = {**env, "PYTHONPATH": str(shim.parent)}
    profiler = ["-m", "cProfile", "-o", profile] if profile else []
    ingest = spawn_in(cluster, "ingest", [sys.executable, *profiler, "-m", "dpbus.services.cli", "ingest"], env,
                      ingest_from or here)
    standin = spawn_in(cluster, "standins", [sys.executable, "-m", "bench.ingest", "--standins", str(groups),
                                             "--url", cluster.nats_url, "--credentials",
                                             str(log_dir / "nats" / "credentials.json")]
                       + ["--mode", mode], {}, here)
    try:
        wait_line(standin, "standins ready", 30)
        asyncio.run(wait_ingest(cluster))
    except BaseException:  # e.g. an older ingest that does not start: stop what did
        cluster.stop()
        raise
    return cluster, {"ingest": ingest.popen.pid, "standins": standin.popen.pid,
                     "nats-server": cluster.procs[0].popen.pid}


def spawn_in(cluster, name: str, argv: list[str], env: dict, cwd: str):
    from dpbus.services.launcher import Proc

    log_path = cluster.log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=cwd,
                                 stdin=subprocess.DEVNULL)
    proc = Proc(name, None, popen, log_path, argv, env)
    cluster.procs.append(proc)
    return proc


def wait_line(proc, line: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in proc.log_path.read_text(errors="replace"):
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready in {timeout}s: {proc.tail()}")


async def wait_ingest(cluster, timeout: float = 60) -> None:
    from dpbus.services import bus

    nc = await bus.connect_client(cluster.nats_url, auth=cluster.auth("admin"))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                await nc.request("$SRV.PING.dpbus-ingest", b"", timeout=0.5)
                return
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.1)
        raise RuntimeError("ingest did not answer in time")
    finally:
        await nc.close()


def run(groups: int = 2, rates=(1000, 2000, 4000), seconds: float = 2.0, kind: str = "text", window: int = 256,
        ingest_from: str | None = None, mode: str = "claim+settle", rtt_samples: int = 2000, label: str = "",
        profile: str = "") -> dict:
    with tempfile.TemporaryDirectory(prefix="dpbus-bench-ingest-") as d:
        d = os.environ.get("DPBUS_BENCH_LOGS") or d  # keep the logs there
        cluster, pids = start(groups, ingest_from, mode, Path(d), profile)
        try:
            print(f"ingest routing{' (' + label + ')' if label else ''}: {groups} stand-in group(s), "
                  f"{kind} requests, {seconds:.0f} s per rate", flush=True)
            out = asyncio.run(measure(cluster, pids, list(rates), seconds, kind, rtt_samples, window))
        finally:
            cluster.stop()
    rtt, kv = out["raw_nats_round_trip_ms"], out["raw_kv_create_ms"]
    print(f"  raw NATS request/reply round trip: p50 {rtt['p50']:.3f} ms, p99 {rtt['p99']:.3f} ms, server CPU "
          f"{rtt['server_cpu_us']:.0f} us; raw KV create: p50 {kv['p50']:.3f} ms, p99 {kv['p99']:.3f} ms, "
          f"server CPU {kv['server_cpu_us']:.0f} us")
    out.update({"groups": groups, "kind": kind, "seconds_per_rate": seconds, "mode": mode,
                "ingest_from": ingest_from or "this checkout", "label": label,
                "capacity_per_s": max(r["arrived_per_s"] for r in out["runs"]),
                "best_rate_p99_under_1ms": max([r["arrived_per_s"] for r in out["runs"]
                                                if r["arrival_ms"]["p99"] <= 1.0 and not r["refused"]],
                                               default=0.0)})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=2, help="stand-in DP groups")
    p.add_argument("--rates", default="1000,2000,4000", help="offered requests/s, comma-separated (then a "
                   "closed loop: --window requests in flight, the next sent as one is answered)")
    p.add_argument("--window", type=int, default=256, help="requests in flight in the closed loop")
    p.add_argument("--seconds", type=float, default=2.0, help="how long each rate is offered")
    p.add_argument("--kind", choices=("text", "ids"), default="text", help="JSON text prompts or msgpack token ids")
    p.add_argument("--ingest-from", default=None, help="run ingest from this checkout (its services/, schemas/)")
    p.add_argument("--mode", choices=MODES, default=MODES[0],
                   help="what a stand-in does before acknowledging: claim the request in the ledger (and settle "
                        "it right after, as a finished request), only claim, or nothing")
    p.add_argument("--profile", default="", help="write a cProfile of the ingest process to this file")
    p.add_argument("--out", default=str(RESULTS / "ingest.json"))
    # the child process
    p.add_argument("--standins", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--url", default="", help=argparse.SUPPRESS)
    p.add_argument("--credentials", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.standins:
        asyncio.run(Standins(a.standins, a.mode).serve(a.url, a.credentials, "dpbus"))
        return
    rates = [float(r) for r in a.rates.split(",") if r.strip()]
    out = run(a.groups, rates, a.seconds, a.kind, a.window, a.ingest_from, a.mode, profile=a.profile)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
