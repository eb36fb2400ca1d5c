"""What ``dpbus up`` does once its flags are read: start a ``launcher.Cluster``, keep its
state file, watch its processes (restarting those that exit, with ``--restart``) until
Ctrl-C or SIGTERM, then stop everything once."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Callable

from dpbus.services import bus
from dpbus.services.launcher import Cluster, ReadyAgain

Say = Callable[..., None]  # prints a line; err=True: on stderr


def claim_state(say: Say, note: bool = True) -> None:
    """Refuse to start next to a running `dpbus up` (its state file would be overwritten);
    a state file whose `up` is gone is replaced, with a note."""
    from dpbus.services.userstate import describe, is_up_process, read_raw, state_path

    old = read_raw()
    if old is None:
        return
    if is_up_process(int(old.get("pid", 0) or 0)) and old.get("pid") != os.getpid():
        raise RuntimeError(f"another dpbus up is running ({describe(old)}); stop it first (Ctrl-C in its "
                           f"terminal, or kill {old.get('pid')}), or give this one its own state with "
                           "XDG_STATE_HOME=DIR (client commands then need the same)")
    if note:
        say(f"note: replacing {state_path()}, left by a dpbus up that is gone (pid {old.get('pid')})")


class UpState:
    """The state file of this `up` (services/userstate.py): written when NATS listens,
    updated while the groups warm up and once they are ready."""

    def __init__(self, cluster: Cluster, say: Say) -> None:
        self.cluster, self.say, self.doc = cluster, say, {}
        cluster.on_listening, cluster.on_progress = self.listening, self.progress

    def users(self) -> dict[str, bus.NatsAuth]:
        from dpbus.services.userstate import STATE_USERS

        creds = self.cluster.credentials
        return {u: bus.auth_for(creds, u) for u in STATE_USERS if creds and u in creds.passwords}

    def listening(self) -> None:
        from dpbus.services.userstate import new_state

        claim_state(self.say, note=False)  # again: another `up` may have started meanwhile
        self.doc = new_state(self.cluster.nats_url, self.users(), os.getpid(), log_dir=str(self.cluster.log_dir),
                             dp_size=self.cluster.dp_size, prefix=self.cluster.prefix, http_url="")
        self.write()
        self.say(f"state (URL, passwords of client, operator and gateway) in {self.path}")

    def progress(self, said: str) -> None:
        self.write(progress=said, http_url=self.cluster.http_url)

    def write(self, **changes: Any) -> None:
        from dpbus.services.userstate import write_state

        if self.doc:
            self.doc.update(changes)
            self.path = write_state(self.doc)


def run(cluster: Cluster, restart: bool, say: Say) -> int:
    """Run ``cluster`` until stopped; the exit code of `dpbus up`."""
    state = UpState(cluster, say)
    try:
        asyncio.run(serve(cluster, state, restart, say))
    except (RuntimeError, TimeoutError) as e:
        say(f"dpbus up failed: {e}", err=True)
        return 1
    finally:
        stop(cluster, say)
    say("stopped")
    return 0


def stop(cluster: Cluster, say: Say) -> None:
    """Stop every process `up` started, once (a second Ctrl-C or SIGTERM kills them at once)."""
    from dpbus.services.userstate import clear_state

    def hurry(*_: Any) -> None:
        say("second signal: killing every process now")
        cluster.hurry()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, hurry)
    say("stopping every process dpbus started ...")
    clear_state(os.getpid())
    for problem in cluster.stop():
        say(f"warning: {problem}")


async def serve(cluster: Cluster, state: UpState, restart: bool, say: Say) -> None:
    """Start the cluster, say how to use it, then watch its processes until a signal."""
    from dpbus.services.lifecycle import Stopped, unless_stopped

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        seconds = await unless_stopped(stopping, cluster.start())
    except Stopped:
        return
    state.write(ready=True, progress="ready", http_url=cluster.http_url)
    announce(cluster, state, seconds, say)
    watch, nc = await watch_ready_again(cluster, say)
    while not stopping.is_set():
        if restart:
            supervise(cluster, watch, say)
        else:
            forget_exited(cluster, say)
        try:
            await asyncio.wait_for(stopping.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    await nc.close()


def announce(cluster: Cluster, state: UpState, seconds: float, say: Say) -> None:
    client = cluster.auth("client") if cluster.credentials else None
    who = f" as user {client.user!r} (password in {state.path})" if client else ""
    say(f"dpbus ready in {seconds:.1f}s: publish requests on {cluster.prefix}.generate at "
        f"{bus.redact(cluster.nats_url)}{who}; try: dpbus generate 'hello'. Ctrl-C stops everything")
    if cluster.http_url:
        say(f"OpenAI-compatible API at {cluster.http_url} (try: curl {cluster.http_url}/models)")


def supervise(cluster: Cluster, watch: ReadyAgain, say: Say) -> None:
    """Restart what exited (``Cluster.supervise``); ``watch`` then waits for its groups."""
    for line in cluster.supervise():
        say(f"warning: {line}")
    watch.restarted(cluster.recovering)
    cluster.recovering.clear()


def forget_exited(cluster: Cluster, say: Say) -> None:
    """Without --restart: report each process that exited, once."""
    for p in [p for p in cluster.procs if p.popen.poll() is not None]:
        say(f"warning: {p.name} exited with code {p.popen.returncode}; log {p.log_path}")
        cluster.procs.remove(p)


async def watch_ready_again(cluster: Cluster, say: Say) -> tuple[ReadyAgain, Any]:
    """Say "group g ready again" when a group that `up` restarted serves again."""
    from dpbus.schemas import Subjects
    from dpbus.schemas.internal import LoadReport, unpacker

    watch, decode = ReadyAgain(), unpacker(LoadReport)
    nc = await bus.connect_client(cluster.nats_url, auth=cluster.auth("operator"))

    async def on_load(msg: Any) -> None:
        report = decode.decode(msg.data)
        if watch.report(report):
            say(f"group {report.dp_rank} ready again")

    await nc.subscribe(Subjects(cluster.prefix).all_loads, cb=on_load)
    return watch, nc
