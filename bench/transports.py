"""Raw transports for step delivery, the yardstick for dpbus's own: one process publishes
a step (``--payload`` bytes, about a real step's size) to W subscriber processes, each
acknowledges it, and the round trip ends when all W acknowledgements are in; the next
step follows. Measured for W = 1, 2, 4 over

* ZeroMQ PUB/SUB, acknowledgements over PUSH/PULL (pyzmq: ``pip install -e '.[bench]'``);
* NATS with nats-py: publish, each subscriber publishes its acknowledgement.

``python -m bench.transports`` alone; ``make bench`` puts the numbers next to dpbus's
ordered step delivery (``bench/delivery.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
HERE = str(Path(__file__).resolve().parent.parent)
STOP = b"stop"
ACK = struct.Struct("<QH")  # step number, subscriber index


def percentiles_ms(samples_ns: list[int]) -> dict:
    s = sorted(samples_ns)
    at = lambda q: s[min(int(q * len(s)), len(s) - 1)] / 1e6  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": sum(s) / len(s) / 1e6, "n": len(s)}


def step(seq: int, payload: int) -> bytes:
    return struct.pack("<Q", seq) + b"s" * max(payload - 8, 0)


# ---- subscriber processes ---------------------------------------------------------------------
def zmq_subscriber(pub: str, ack: str, index: int) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub)
    push = ctx.socket(zmq.PUSH)
    push.connect(ack)
    while True:
        msg = sub.recv()
        if msg == STOP:
            break
        push.send(ACK.pack(struct.unpack_from("<Q", msg)[0], index))
    sub.close(linger=0)
    push.close(linger=0)
    ctx.term()


async def nats_subscriber(url: str, index: int) -> None:
    import nats

    from dpbus.services.bus.messaging import at_server

    nc = await nats.connect(url)
    done = asyncio.Event()

    async def on_step(msg) -> None:
        if msg.data == STOP:
            done.set()
            return
        await nc.publish("bench.ack", ACK.pack(struct.unpack_from("<Q", msg.data)[0], index))

    await nc.subscribe("bench.step", cb=on_step)
    await at_server(nc)  # (a plain flush's PING may overtake the subscription)
    print("subscribed", flush=True)
    await done.wait()
    await nc.close()


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "bench.transports", *args], cwd=HERE, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def end(procs: list[subprocess.Popen]) -> None:
    """Stop the processes started here, by their own handles."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---- ZeroMQ -----------------------------------------------------------------------------------
def zmq_round_trips(workers: int, rounds: int, payload: int, log_dir: Path) -> dict:
    import zmq

    ctx = zmq.Context()
    pub, pull = ctx.socket(zmq.PUB), ctx.socket(zmq.PULL)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    ack_port = pull.bind_to_random_port("tcp://127.0.0.1")
    procs = [spawn(["--zmq-sub", f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{ack_port}", str(i)],
                   log_dir / f"zmq-{workers}-{i}.log") for i in range(workers)]
    try:
        seq = join_zmq(pub, pull, workers, payload)
        samples = []
        for _ in range(rounds):
            seq += 1
            t0 = time.perf_counter_ns()
            pub.send(step(seq, payload))
            got = 0
            while got < workers:
                if ACK.unpack(pull.recv())[0] == seq:
                    got += 1
            samples.append(time.perf_counter_ns() - t0)
        pub.send(STOP)
    finally:
        end(procs)
        pub.close(linger=0)
        pull.close(linger=0)
        ctx.term()
    return percentiles_ms(samples)


def join_zmq(pub, pull, workers: int, payload: int, timeout: float = 30.0) -> int:
    """Send probe steps until one reaches every subscriber (PUB drops what is sent before a
    subscriber connects); then a few more to warm up. Returns the last step number."""
    import zmq

    seq, deadline = 0, time.monotonic() + timeout
    while True:
        seq += 1
        pub.send(step(seq, payload))
        heard: set[int] = set()
        until = time.monotonic() + 0.1
        while time.monotonic() < until and len(heard) < workers:
            if pull.poll(10, zmq.POLLIN):
                n, i = ACK.unpack(pull.recv())
                if n == seq:
                    heard.add(i)
        if len(heard) == workers:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(heard)} of {workers} ZeroMQ subscribers joined")
    for _ in range(200):  # warm: the same loop as measured
        seq += 1
        pub.send(step(seq, payload))
        got = 0
        while got < workers:
            if ACK.unpack(pull.recv())[0] == seq:
                got += 1
    return seq


# ---- NATS -------------------------------------------------------------------------------------
async def nats_round_trips(url: str, workers: int, rounds: int, payload: int, log_dir: Path) -> dict:
    import nats

    procs = [spawn(["--nats-sub", url, str(i)], log_dir / f"nats-{workers}-{i}.log") for i in range(workers)]
    nc = await nats.connect(url)
    state = {"seq": 0, "got": 0}
    all_in = asyncio.Event()

    async def on_ack(msg) -> None:
        if ACK.unpack(msg.data)[0] == state["seq"]:
            state["got"] += 1
            if state["got"] == workers:
                all_in.set()

    async def one() -> int:
        state["seq"] += 1
        state["got"] = 0
        all_in.clear()
        t0 = time.perf_counter_ns()
        await nc.publish("bench.step", step(state["seq"], payload))
        await all_in.wait()
        return time.perf_counter_ns() - t0

    try:
        await nc.subscribe("bench.ack", cb=on_ack)
        await wait_subscribed(log_dir, workers)
        for _ in range(200):
            await one()
        samples = [await one() for _ in range(rounds)]
        await nc.publish("bench.step", STOP)
        await nc.flush()
    finally:
        await nc.close()
        end(procs)
    return percentiles_ms(samples)


async def wait_subscribed(log_dir: Path, workers: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    logs = [log_dir / f"nats-{workers}-{i}.log" for i in range(workers)]
    while not all(p.exists() and "subscribed" in p.read_text() for p in logs):
        if time.monotonic() > deadline:
            raise RuntimeError("NATS subscribers did not start: " + " | ".join(p.read_text() for p in logs
                                                                               if p.exists()))
        await asyncio.sleep(0.05)


def start_nats(log_dir: Path) -> tuple[subprocess.Popen, str]:
    from dpbus.services.launcher import Proc, free_port, nats_server_binary, wait_listening

    port = free_port()
    with open(log_dir / "nats-server.log", "ab") as out:
        proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    wait_listening(port, Proc("nats-server", None, proc, log_dir / "nats-server.log"))
    return proc, f"nats://127.0.0.1:{port}"


def have_zmq() -> bool:
    import importlib.util

    return importlib.util.find_spec("zmq") is not None


def run(workers=(1, 2, 4), rounds: int = 2000, payload: int = 400, zmq: bool = True) -> dict:
    out: dict = {"payload_bytes": payload, "rounds": rounds, "nats": {}, "zmq": {}}
    with tempfile.TemporaryDirectory(prefix="dpbus-bench-transports-") as d:
        log_dir = Path(d)
        server, url = start_nats(log_dir)
        try:
            for w in workers:
                out["nats"][w] = asyncio.run(nats_round_trips(url, w, rounds, payload, log_dir))
        finally:
            end([server])
        if zmq and not have_zmq():
            print("pyzmq is not installed (pip install -e '.[bench]'): no ZeroMQ numbers")
            zmq = False
        for w in workers if zmq else ():
            out["zmq"][w] = zmq_round_trips(w, rounds, payload, log_dir)
    report(out)
    return out


def report(out: dict) -> None:
    print(f"raw transports, a {out['payload_bytes']}-byte step to W subscriber processes, all acknowledged "
          f"(round trip, ms):")
    for name in ("zmq", "nats"):
        for w, r in out[name].items():
            print(f"  {name:4} W={w}: p50 {r['p50']:.3f}  p90 {r['p90']:.3f}  p99 {r['p99']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.transports", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4", help="subscriber processes, comma-separated")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--payload", type=int, default=400, help="bytes per step")
    p.add_argument("--no-zmq", action="store_true", help="NATS only")
    p.add_argument("--out", default=str(RESULTS / "transports.json"))
    p.add_argument("--zmq-sub", nargs=3, metavar=("PUB", "ACK", "INDEX"), help=argparse.SUPPRESS)
    p.add_argument("--nats-sub", nargs=2, metavar=("URL", "INDEX"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.zmq_sub:
        return zmq_subscriber(a.zmq_sub[0], a.zmq_sub[1], int(a.zmq_sub[2]))
    if a.nats_sub:
        return asyncio.run(nats_subscriber(a.nats_sub[0], int(a.nats_sub[1])))
    out = run([int(w) for w in a.workers.split(",")], a.rounds, a.payload, not a.no_zmq)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
