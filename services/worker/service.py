"""The worker service: loads the model, applies its group's steps strictly in order,
and (when it leads the group) reports the sampled tokens.

A step whose sequence number is not the next one is never run: a gap is filled from the
publisher's replay window or reported as a ``StepFailure`` (the publisher resets the
group with a new epoch), a repeat is logged, counted and dropped. Steps name rows and
carry only their changes; the worker keeps each row's page table (``tables.py``),
rebuilt from the first step whenever it takes an epoch from its start.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import nats.micro

from dpbus.schemas import ErrorCode, Subjects
from dpbus.schemas.internal import (
    Heartbeat, Replay, ReplayReply, Step, StepFailure, StepResult, pack, token_digest, unpacker,
)
from dpbus.services import bus
from dpbus.services import version as package_version
from dpbus.services.errors import ReceiveDataError, SendDataError
from dpbus.services.lifecycle import EXIT_BROKEN_JOB, unless_stopped
from dpbus.services.model_config import model_config_for
from dpbus.services.natsconf import member_user
from dpbus.services.settings import WorkerSettings, total_pages
from dpbus.services.topology import dp_groups, group_nodes, place_node
from dpbus.services.worker.ordering import GAP, REPEAT, STALE, StepOrder
from dpbus.services.worker.tables import PageTables

if TYPE_CHECKING:
    from dpbus.services.worker.world import WorldStepper

VERSION = package_version()  # announced in NATS discovery
LAUNCH_AHEAD = 2  # steps launched whose tokens are not fetched yet (as many as the publisher keeps in flight)
STEPS_QUIET_S = 1.0  # stopping: no step for this long means the publisher has stopped sending
# Leaving a JAX job is a barrier of all its members. When the whole group stops they meet
# there at once; a member stopped alone waits LEAVE_WAIT_S, then exits without the barrier,
# well before JAX's own deadline (JOB_SHUTDOWN_TIMEOUT) would abort the process.
LEAVE_WAIT_S = 2.0
JOB_SHUTDOWN_TIMEOUT = 10


def load_runner(s: WorkerSettings, log: Any, devices: list | None = None, world_groups: int = 0):
    """Build the group's mesh (over ``devices``, default all) and model (imports JAX: call
    after XLA_FLAGS is set); with ``world_groups``, the world's mesh and runner instead."""
    from dpbus.services.devices import resolve_dtype
    from dpbus.services.worker.model import dummy_weights
    from dpbus.services.worker.runner import ModelRunner, make_group_mesh
    from dpbus.services.worker.world import WorldRunner, make_world_mesh

    use_compile_cache(s.compile_cache, log)
    cfg = model_config_for(s.model_path, s.max_seq_len)
    mesh = make_world_mesh(world_groups, devices) if world_groups else make_group_mesh(devices)
    platform = mesh.devices.flat[0].platform
    dtype = resolve_dtype(s.dtype, platform)
    log.info("model_loading", devices=mesh.devices.size, platform=platform, dtype=dtype, config=str(cfg),
             path=s.model_path or "(dummy)")
    show = Progress(log)
    if s.model_path:
        from dpbus.services.worker.checkpoint import load_hf_weights
        weights = load_hf_weights(s.model_path, cfg, show.step("loading", "load_tensor"))
    elif s.load_format == "dummy":
        weights = dummy_weights(cfg, s.seed)
    else:
        raise ValueError(f"load_format={s.load_format!r} needs --model-path; without one use 'dummy'")
    sizes = dict(num_pages=total_pages(s, cfg.max_seq_len), page_size=s.page_size,
                 max_running_requests=s.max_running_requests, max_prefill_tokens=s.max_prefill_tokens,
                 host_weights=weights, dtype=dtype)
    if world_groups:
        layout = s.world_layout if s.world_layout != "auto" else "max_len" if platform == "cpu" else "per_step"
        runner = WorldRunner(cfg, mesh, layout=layout, **sizes)
    else:
        runner = ModelRunner(cfg, mesh, **sizes)
    if s.warmup:
        seconds = runner.warmup(show.step("compiling", "warmup"))
        show.close()
        log.info("warmup_done", seconds=round(seconds, 2), compiled_shapes=runner.compiled_shapes())
    show.close()
    return runner


def use_compile_cache(path: str, log: Any) -> None:
    """Keep what XLA compiles under ``path`` (a directory, or a bucket URL JAX can write):
    the next start with the same model, shapes and devices loads each executable instead
    of compiling it, so warm-up takes seconds, not minutes. Every shape is kept, however
    quick its compile: warm-up compiles many small ones."""
    if not path:
        return
    import jax

    where = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    log.info("compile_cache", path=where)


class Progress:
    """Long start-up work made visible: a progress bar on a terminal, log lines otherwise."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import Progress as Bar

            self.bar = Bar(transient=False)
            self.bar.start()
        self.task = None

    def step(self, what: str, event: str):
        def report(i: int, n: int, name: str) -> None:
            if self.bar is None:
                self.log.info(event, done=i, total=n, item=name)
                return
            if self.task is None or self.bar.tasks[self.task].description != what:
                self.task = self.bar.add_task(what, total=n)
            self.bar.update(self.task, completed=min(i + 1, n), description=what)
        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def leave_jax_job(log: Any) -> None:
    """Leave the group's JAX job, waiting at most LEAVE_WAIT_S for the other members (they
    leave too when the whole group is stopped). The process must exit right after."""
    import threading

    import jax

    leaving = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    leaving.start()
    leaving.join(LEAVE_WAIT_S)
    log.info("left_jax_job", cleanly=not leaving.is_alive())


class Worker:
    def __init__(self, settings: WorkerSettings, log: Any, auth: bus.NatsAuth | None = None) -> None:
        self.s = settings
        self.place = place_node(settings.node_rank, settings.nnodes, settings.dp_size, settings.enable_dp_attention)
        groups = dp_groups(settings.dp_size, settings.enable_dp_attention)
        # --mlp-scope world: every node of every group is one JAX job (one group: the group scope)
        self.world_groups = groups if settings.mlp_scope == "world" and groups > 1 else 0
        self.job_size = settings.nnodes if self.world_groups else self.place.nodes_per_group
        if self.job_size > 1 and not settings.coordinator:
            raise ValueError(
                f"nnodes={settings.nnodes} with dp_size={settings.dp_size} and --mlp-scope {settings.mlp_scope} "
                f"makes {self.job_size} processes one JAX job: they need --coordinator HOST:PORT (the address "
                f"{'node 0' if self.world_groups else 'the group' + chr(39) + 's leader node'} listens on)"
            )
        self.members = group_nodes(self.place.dp_rank, settings.nnodes, groups)
        self.world: WorldStepper | None = None  # the world scope's lockstep, once the model is loaded
        self.auth = auth or bus.auth_from(settings, member_user(self.place.dp_rank, settings.node_rank))
        self.subjects = Subjects(settings.prefix)
        self.log = log.bind(dp_rank=self.place.dp_rank, node_rank=settings.node_rank)
        self.tables = PageTables(settings.max_running_requests)  # the rows of this epoch, built by its steps
        self.order = StepOrder(on_new_epoch=self.begin_epoch)
        self.ready = False
        self.counts = {"steps": 0, "repeated": 0, "gaps": 0, "replayed": 0, "failures": 0, "unsent": 0}
        # the device's time: computing steps, and waiting between one step's end and the next
        # one's dispatch while steps kept coming (gaps over STEPS_QUIET_S are periods without work)
        self.timing = {"device_ms": 0.0, "idle_ms": 0.0}
        self._replay_reply = unpacker(ReplayReply)
        self.runner = None
        self.started: dict[tuple[int, int], float] = {}  # steps launched, not answered yet: since when
        self.device_free_at = 0.0  # when the device finished the last step fetched
        self.failed: tuple[int, int] | None = None  # the last step this worker reported failed (epoch, seq)
        self.asked_again: set[tuple[int, int]] = set()  # repeats of steps that were still computing
        self.last_step_at = 0.0
        self.stopping = False
        self.compiled_at_warmup = 0
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._decode_step = unpacker(Step)
        # launched steps in order, each with its launch or the error that stopped it; the
        # finishing loop fetches their tokens and answers while the next one computes
        self.launches: asyncio.Queue[tuple[Step, Any, BaseException | None]] = asyncio.Queue()
        self.ahead = asyncio.Semaphore(LAUNCH_AHEAD)
        self.stepping: asyncio.Task | None = None
        self.finishing: asyncio.Task | None = None
        self.world_steps: asyncio.Task | None = None
        self.exit = os._exit  # how the process leaves a broken JAX job (tests replace it)

    def stats(self, *_: Any) -> dict:
        world = {"world": {**self.world.counts, "agree_ms": round(self.world.agree_ms, 1), "last": self.world.last}
                 } if self.world else {}
        return {**self.counts, **{k: round(v, 3) for k, v in self.timing.items()}, "epoch": self.order.epoch,
                "last_seq": self.order.last_seq, "rows": len(self.tables.rows),
                "compiled_at_warmup": self.compiled_at_warmup, "compiled_now": self.runner.compiled_shapes(),
                **world}

    async def wait_for_members(self) -> None:
        """Wait until every node of the group beats (so the JAX job can form), naming the missing."""
        seen = {self.s.node_rank}
        sub = await self.subscribe_beats(self.subjects.heartbeats(self.place.dp_rank),
                                         lambda beat: seen.add(beat.node_rank))
        deadline = time.monotonic() + self.s.join_timeout
        try:
            while not seen.issuperset(self.members):
                if time.monotonic() > deadline:
                    missing = sorted(set(self.members) - seen)
                    raise RuntimeError(f"group {self.place.dp_rank}: node(s) {missing} did not join within "
                                       f"{self.s.join_timeout:.0f}s (members {self.members})")
                await asyncio.sleep(0.2)
        finally:
            await sub.unsubscribe()

    async def subscribe_beats(self, subject: str, take: Callable[[Heartbeat], Any]) -> Any:
        """Subscribe to members' heartbeats on ``subject``: ``take`` gets each one whose sender
        speaks for itself (the node rank it names is its subject's); anything else is ignored."""
        decode = unpacker(Heartbeat)

        async def on_beat(msg: Any) -> None:
            try:
                beat = decode.decode(msg.data)
            except Exception:  # noqa: BLE001 - not a heartbeat
                return
            if beat.node_rank == Subjects.member_of(msg.subject):
                take(beat)

        return await self.nc.subscribe(subject, cb=on_beat)

    def join_jax_job(self) -> None:
        """Make the group's processes one JAX program (gloo collectives on CPU)."""
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU devices use it
        # JAX's preemption service installs its own SIGTERM handler, which would take SIGTERM
        # away from us; dpbus stops on SIGTERM itself (services/lifecycle.py)
        jax.config.update("jax_enable_preemption_service", False)
        process_id = self.s.node_rank if self.world_groups else self.place.attn_tp_rank
        self.log.info("joining_jax_job", coordinator=self.s.coordinator, processes=self.job_size,
                      process_id=process_id, world=bool(self.world_groups))
        jax.distributed.initialize(self.s.coordinator, num_processes=self.job_size, process_id=process_id,
                                   initialization_timeout=int(self.s.join_timeout), heartbeat_timeout_seconds=30,
                                   shutdown_timeout_seconds=JOB_SHUTDOWN_TIMEOUT)
        self.log.info("joined_jax_job", devices=len(jax.devices()), local_devices=len(jax.local_devices()))

    async def load(self, stop: asyncio.Event) -> Any:
        """The warmed-up model runner. In a group spanning processes, the warm-up runs the
        group's collectives: when a member leaves meanwhile (stopped, or dead), the next one
        fails here, and the JAX job is broken as when it fails serving; leave it the same way
        (exit 70) rather than end in JAX's exit handler, which waits for the member gone."""
        import jax

        try:
            return await unless_stopped(stop, asyncio.to_thread(load_runner, self.s, self.log, None,
                                                                self.world_groups))
        except jax.errors.JaxRuntimeError as e:
            if self.job_size == 1:
                raise
            self.log.error("leaving_broken_group", reason=f"group {self.place.dp_rank}'s JAX job broke while "
                                                          f"warming up ({e}); a member is gone")
            self.exit(EXIT_BROKEN_JOB)
            raise  # (only where a test replaced self.exit)

    async def run(self, stop: asyncio.Event) -> None:
        g = self.place.dp_rank
        # until serving, a stop ends the start-up at once (the thread loading the model runs on
        # until the process exits: XLA cannot be interrupted)
        self.nc = await unless_stopped(stop, bus.connect(self.s.nats_url, f"dpbus-worker-{self.s.node_rank}",
                                                         self.log, auth=self.auth))
        beating = asyncio.create_task(self.heartbeat_loop(stop))  # not ready yet: tells peers we are here
        if self.place.nodes_per_group > 1:
            await unless_stopped(stop, self.wait_for_members())
        if self.job_size > 1:  # (a world's other groups are waited for by the job's own start-up)
            await unless_stopped(stop, asyncio.to_thread(self.join_jax_job))
        self.runner = await self.load(stop)
        self.compiled_at_warmup = self.runner.compiled_shapes()
        if self.world_groups:
            from dpbus.services.worker.world import WorldStepper

            self.world = WorldStepper(self.runner, g, self.tables.apply)
        steps = await bus.subscribe(self.nc, self.subjects.step(g), self.on_step)
        svc = await nats.micro.add_service(
            self.nc, name="dpbus-worker", version=VERSION,
            description=f"dpbus worker node {self.s.node_rank} of group {g}",
            metadata={"node_rank": str(self.s.node_rank), "dp_rank": str(g), "prefix": self.s.prefix},
            stats_handler=self.stats,
        )
        await svc.add_endpoint(name="status", subject=self.subjects.worker_status(g, self.s.node_rank),
                               handler=self.on_status)
        self.ready = True
        self.log.info("worker_ready", subject=self.subjects.step(g))
        self.stepping = asyncio.create_task(self.step_loop())
        self.finishing = asyncio.create_task(self.finish_loop())
        tasks = [beating, self.stepping, self.finishing, asyncio.create_task(self.watchdog(stop))]
        if self.world:
            self.world_steps = asyncio.create_task(self.world_loop())
            tasks += [self.world_steps, asyncio.create_task(self.watch_world())]
        await stop.wait()
        self.stopping = True
        await self.serve_while_draining()
        await steps.unsubscribe()
        for t in tasks:
            t.cancel()
        await svc.stop()
        await bus.close(self.nc)
        if self.job_size > 1:
            await asyncio.to_thread(leave_jax_job, self.log)


    async def serve_while_draining(self) -> None:
        """After a stop, keep running steps while the publisher still sends them (it drains
        its requests for ``drain_timeout``, with everyone stopping at once), and leave when
        they have stopped coming for STEPS_QUIET_S."""
        deadline = time.monotonic() + self.s.drain_timeout + STEPS_QUIET_S
        while time.monotonic() < deadline and (self.started or not self.queue.empty()
                                               or time.monotonic() - self.last_step_at < STEPS_QUIET_S):
            await asyncio.sleep(0.05)

    async def on_step(self, msg: Any) -> None:
        self.last_step_at = time.monotonic()
        self.queue.put_nowait(msg.data)

    async def on_status(self, req: Any) -> None:
        await req.respond(pack(self.heartbeat()))

    def heartbeat(self) -> Heartbeat:
        # never "ready" without the loops that take and answer steps (and step the world)
        alive = all(t is None or not t.done() for t in (self.stepping, self.finishing, self.world_steps))
        return Heartbeat(self.s.node_rank, self.place.dp_rank, self.place.attn_tp_rank, self.ready and alive,
                         self.order.epoch, self.order.last_seq, time.time(), self.stopping)

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        subject = self.subjects.heartbeat(self.place.dp_rank, self.s.node_rank)
        while not stop.is_set():
            try:
                await self.nc.publish(subject, pack(self.heartbeat()))
            except Exception as e:  # noqa: BLE001 - reconnecting; the next beat retries
                self.log.warning("heartbeat_failed", error=repr(e))
            await asyncio.sleep(self.s.heartbeat_interval)
        try:  # a last beat: the silence that follows is a stop (a world's peers say so), not a death
            await self.nc.publish(subject, pack(msgspec.structs.replace(self.heartbeat(), stopping=True)))
        except Exception as e:  # noqa: BLE001 - then it looks like a death; the outcome is the same
            self.log.warning("heartbeat_failed", error=repr(e))

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Fail-stop when a step hangs: in a group spanning processes that means a peer is gone
        mid-collective, and only restarting the group's processes recovers. Exit so a
        supervisor (compose, systemd, `dpbus up`) sees it, instead of looking alive."""
        while not stop.is_set():
            await asyncio.sleep(1.0)
            oldest = min(self.started.items(), key=lambda kv: kv[1], default=None)
            if oldest and time.monotonic() - oldest[1] > self.s.stall_timeout:
                self.log.error("step_stalled", seconds=round(time.monotonic() - oldest[1], 1),
                               epoch=oldest[0][0], seq=oldest[0][1],
                               reason="a collective never completed; a peer of the group is probably gone")
                os._exit(EXIT_BROKEN_JOB)

    def begin_epoch(self, epoch: int) -> None:
        """Taking ``epoch`` from its first step: no rows yet (its steps build them)."""
        self.tables.clear()
        self.log.info("new_epoch", epoch=epoch)

    async def fetch_missing(self, step: Step) -> list[Step]:
        """The steps between the last one run and ``step``, from the publisher's replay window
        (each answer holds the first of the steps asked for; asked again for the rest)."""
        steps: list[Step] = []
        missing = self.order.missing(step.seq)
        while missing.start + len(steps) < missing.stop:
            first = missing.start + len(steps)
            data = await bus.request(self.nc, self.subjects.replay(self.place.dp_rank),
                                     pack(Replay(step.epoch, first, step.seq - 1)), timeout=self.s.replay_timeout)
            got = [self._decode_step.decode(b) for b in self._replay_reply.decode(data).steps]
            if not got or [s.seq for s in got] != list(range(first, first + len(got))) or got[-1].seq >= step.seq:
                raise ReceiveDataError(None, f"the publisher no longer holds steps {first}..{step.seq - 1} "
                                           f"of epoch {step.epoch}")
            steps += got
        return steps

    async def step_loop(self) -> None:
        """Take steps in arrival order, forever: a step that cannot be answered (NATS would
        not take the result) is logged and counted, and the loop goes on; the publisher
        re-sends the step and gets the kept result then."""
        result_subject = self.subjects.result(self.place.dp_rank, self.s.node_rank)
        while True:
            data = await self.queue.get()
            try:
                await self.take_step(data, result_subject)
            except SendDataError as e:
                self.counts["unsent"] += 1
                self.log.error("result_not_sent", error=e.message)
            except Exception:  # noqa: BLE001 - a bug: say so, keep the group's steps going
                self.counts["failures"] += 1
                self.log.exception("step_loop_error")

    async def take_step(self, data: bytes, result_subject: str) -> None:
        try:
            step = self._decode_step.decode(data)
        except Exception as e:  # noqa: BLE001
            self.counts["failures"] += 1
            self.log.error("bad_step", error=str(e))
            return
        kind = self.order.classify(step.epoch, step.seq)
        if kind in (REPEAT, STALE):
            self.counts["repeated"] += 1
            kept = self.order.reply_to_repeat(step.seq) if kind == REPEAT else None
            if kept is not None:
                await bus.publish(self.nc, result_subject, kept)  # our answer may have been lost
            elif (step.epoch, step.seq) in self.started:
                self.asked_again.add((step.epoch, step.seq))  # still computing: answered twice when done
            return
        todo = [step]
        if kind == GAP:
            self.counts["gaps"] += 1
            self.log.warning("steps_missed", epoch=step.epoch, have=self.order.last_seq, got=step.seq)
            try:
                todo = [*await self.fetch_missing(step), step]
                self.counts["replayed"] += len(todo) - 1
            except ReceiveDataError as e:
                self.order.lose_sync()
                self.log.error("replay_failed", epoch=step.epoch, seq=step.seq, error=str(e))
                failure = StepFailure(step.epoch, step.seq, self.s.node_rank, ErrorCode.DIVERGED, str(e))
                await bus.publish(self.nc, result_subject, pack(failure))
                return
        for s in todo:
            await self.run_in_order(s, result_subject)

    async def run_in_order(self, step: Step, result_subject: str) -> None:
        """Launch ``step`` (at most LAUNCH_AHEAD steps unanswered) and hand it to the
        finishing loop, which answers in launch order; the next step can be launched at
        once, while this one computes."""
        await self.ahead.acquire()
        if not self.order.in_sync:  # an earlier step failed (reported): only the next epoch is taken
            self.ahead.release()
            return
        self.started[(step.epoch, step.seq)] = time.monotonic()
        error = None
        try:
            if self.world:
                launched = await self.world.launch(step)
            else:
                launched = await asyncio.to_thread(self.launch_step, step)
            self.order.launched(step.seq)
        except Exception as e:  # noqa: BLE001 - reported in order by the finishing loop, the group resets
            launched, error = None, e
            self.order.lose_sync()
            self.log.exception("step_failed", epoch=step.epoch, seq=step.seq)
        self.launches.put_nowait((step, launched, error))

    async def finish_loop(self) -> None:
        """Answer launched steps in order, forever: fetch each one's tokens (the device
        meanwhile computes the next), report them or its failure."""
        subject = self.subjects.result(self.place.dp_rank, self.s.node_rank)
        while True:
            step, launched, error = await self.launches.get()
            try:
                await self.finish(step, launched, error, subject)
            except SendDataError as e:
                self.counts["unsent"] += 1
                self.log.error("result_not_sent", error=e.message)
            except Exception:  # noqa: BLE001 - a bug: say so, keep answering
                self.counts["failures"] += 1
                self.log.exception("finish_loop_error")
            finally:
                self.started.pop((step.epoch, step.seq), None)
                self.asked_again.discard((step.epoch, step.seq))
                self.ahead.release()

    async def finish(self, step: Step, launched: Any, error: BaseException | None, subject: str) -> None:
        if self.failed and self.failed[0] == step.epoch and step.seq > self.failed[1]:
            return  # launched after a step that failed in its epoch: that failure was reported
        if error is None:
            try:
                reply = await asyncio.to_thread(self.result_of, step, launched)
            except Exception as e:  # noqa: BLE001 - reported, the group resets
                error = e
                self.log.exception("step_failed", epoch=step.epoch, seq=step.seq)
        if error is not None:
            self.counts["failures"] += 1
            self.failed = (step.epoch, step.seq)
            if step.epoch == self.order.epoch:
                self.order.lose_sync()
            failure = StepFailure(step.epoch, step.seq, self.s.node_rank, ErrorCode.INTERNAL, repr(error))
            if self.job_size > 1 and not self.stopping:  # stopping: a peer left first
                await self.leave_broken_job(failure, subject)
            await bus.publish(self.nc, subject, pack(failure))
            return
        self.counts["steps"] += 1
        data = pack(reply)
        self.order.answered(step.epoch, step.seq, data)
        await bus.publish(self.nc, subject, data)
        if (step.epoch, step.seq) in self.asked_again:
            self.asked_again.discard((step.epoch, step.seq))
            await bus.publish(self.nc, subject, data)

    async def world_loop(self) -> None:
        """Take part in every world step; the world's job broken (a process of any group
        gone mid-collective) ends it for all: leave it like a broken group's job, so the
        world's processes are restarted as one."""
        try:
            await self.world.run()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a JAX job cannot take a process back
            await self.leave_broken_world(f"the world's JAX job broke ({e!r}); a process is gone")

    async def watch_world(self) -> None:
        """Leave the world as soon as a member of any group is gone (``MemberWatch``), even
        while this process waits in a collective that would never end."""
        from dpbus.services.worker.world import MemberWatch

        watch = MemberWatch([r for r in range(self.s.nnodes) if r != self.s.node_rank], self.s.heartbeat_timeout)
        sub = await self.subscribe_beats(self.subjects.all_heartbeats, lambda beat: watch.beat(
            beat.node_rank, beat.ready, time.monotonic(), beat.stopping))
        try:
            while not self.stopping:
                why = watch.gone(time.monotonic())
                if why:
                    await self.leave_broken_world(f"the world is broken: {why}")
                    return
                await asyncio.sleep(self.s.heartbeat_interval)
        finally:
            await sub.unsubscribe()

    async def leave_broken_world(self, reason: str) -> None:
        if not self.ready:  # already leaving
            return
        self.log.error("leaving_broken_world", reason=reason)
        self.ready = False  # say so first: the publisher stops taking work now, not at the heartbeat time-out
        try:
            await self.nc.publish(self.subjects.heartbeat(self.place.dp_rank, self.s.node_rank), pack(self.heartbeat()))
            await self.nc.flush(timeout=2)
        except Exception as e:  # noqa: BLE001 - the publisher notices our silence too
            self.log.error("not_ready_unsent", error=repr(e))
        self.exit(EXIT_BROKEN_JOB)

    async def leave_broken_job(self, failure: StepFailure, subject: str) -> None:
        """A step failing in a group of several processes means its JAX job is broken (most
        often a peer died mid-collective), and a JAX job cannot take a process back: report,
        then exit so a supervisor restarts the group's processes."""
        failure.code = ErrorCode.WORKER_LOST
        failure.message = f"group {self.place.dp_rank}'s JAX job broke ({failure.message}); a member is gone"
        try:
            await self.nc.publish(subject, pack(failure))
            await self.nc.flush(timeout=2)
        except Exception as e:  # noqa: BLE001 - the publisher also notices our silence
            self.log.error("failure_not_reported", error=repr(e))
        finally:
            self.log.error("leaving_broken_group", reason=failure.message)
            self.exit(EXIT_BROKEN_JOB)

    def launch_step(self, step: Step) -> Any:
        """Apply the step's changes to the row tables and launch its forward."""
        prefill, decode = self.tables.apply(step)
        return self.runner.launch(prefill, decode)

    def result_of(self, step: Step, launched: Any) -> StepResult:
        """Wait for a launched step's tokens: its result (the leader reports the tokens,
        the others vouch for them with the digest). Its time is the device's: from its
        dispatch, or the end of the step before it if that was later."""
        prefill_tokens, decode_tokens = launched.tokens()
        done = time.monotonic()
        began = max(launched.at, self.device_free_at)
        idle = launched.at - self.device_free_at
        if 0 < idle < STEPS_QUIET_S:
            self.timing["idle_ms"] += idle * 1000
        self.timing["device_ms"] += (done - began) * 1000
        self.device_free_at = done
        digest = token_digest(prefill_tokens, decode_tokens)
        if not self.place.is_leader:
            prefill_tokens, decode_tokens = [], []
        return StepResult(step.epoch, step.seq, self.s.node_rank, prefill_tokens, decode_tokens,
                          (done - began) * 1000, digest)

    def run_step(self, step: Step) -> StepResult:
        """A step from start to finish, with nothing launched around it."""
        return self.result_of(step, self.launch_step(step))
