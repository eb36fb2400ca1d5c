"""The worker service: loads the model, applies its group's steps strictly in order,
and (when it leads the group) reports the sampled tokens.

A step whose sequence number is not the next one is never run: a gap is reported to
the publisher as a ``StepFailure`` (the publisher resets the group with a new epoch),
a repeat is logged, counted and dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats.micro

from schemas import ErrorCode, Subjects
from schemas.internal import Heartbeat, Step, StepFailure, StepResult, pack, unpacker
from services import bus
from services.model_config import model_config_for
from services.settings import WorkerSettings, total_pages
from services.topology import place_node

VERSION = "0.1.0"


def load_runner(s: WorkerSettings, log: Any):
    """Build the group's mesh and model (imports JAX: call after XLA_FLAGS is set)."""
    from services.worker.model import dummy_weights
    from services.worker.runner import ModelRunner, make_group_mesh

    cfg = model_config_for(s.model_path, s.max_seq_len)
    mesh = make_group_mesh()
    log.info("model_loading", devices=mesh.devices.size, config=str(cfg), path=s.model_path or "(dummy)")
    if s.model_path:
        from services.worker.checkpoint import load_hf_weights
        weights = load_hf_weights(s.model_path, cfg)
    elif s.load_format == "dummy":
        weights = dummy_weights(cfg, s.seed)
    else:
        raise ValueError(f"load_format={s.load_format!r} needs --model-path; without one use 'dummy'")
    runner = ModelRunner(cfg, mesh, num_pages=total_pages(s, cfg.max_seq_len), page_size=s.page_size,
                         max_running_requests=s.max_running_requests, max_prefill_tokens=s.max_prefill_tokens,
                         host_weights=weights)
    if s.warmup:
        def progress(i: int, n: int, what: str) -> None:
            log.info("warmup", done=i, total=n, compiling=what)
        seconds = runner.warmup(progress)
        log.info("warmup_done", seconds=round(seconds, 2), compiled_shapes=runner.compiled_shapes())
    return runner


class Worker:
    def __init__(self, settings: WorkerSettings, log: Any) -> None:
        self.s = settings
        self.place = place_node(settings.node_rank, settings.nnodes, settings.dp_size, settings.enable_dp_attention)
        if self.place.nodes_per_group > 1:
            raise ValueError(
                f"nnodes={settings.nnodes} with dp_size={settings.dp_size} puts {self.place.nodes_per_group} "
                "processes in each group; groups that span processes are not supported yet (use nnodes == dp_size)"
            )
        self.subjects = Subjects(settings.prefix)
        self.log = log.bind(dp_rank=self.place.dp_rank, node_rank=settings.node_rank)
        self.epoch = -1
        self.last_seq = 0
        self.in_sync = False
        self.ready = False
        self.counts = {"steps": 0, "repeated": 0, "gaps": 0, "failures": 0}
        self.runner = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._decode_step = unpacker(Step)

    def stats(self, *_: Any) -> dict:
        return {**self.counts, "epoch": self.epoch, "last_seq": self.last_seq,
                "compiled_at_warmup": self.compiled_at_warmup, "compiled_now": self.runner.compiled_shapes()}

    async def run(self, stop: asyncio.Event) -> None:
        self.runner = await asyncio.to_thread(load_runner, self.s, self.log)
        self.compiled_at_warmup = self.runner.compiled_shapes()
        g = self.place.dp_rank
        self.nc = await bus.connect(self.s.nats_url, f"dpbus-worker-{self.s.node_rank}", self.log)
        await bus.subscribe(self.nc, self.subjects.step(g), self.on_step)
        svc = await nats.micro.add_service(
            self.nc, name="dpbus-worker", version=VERSION,
            description=f"dpbus worker node {self.s.node_rank} of group {g}",
            metadata={"node_rank": str(self.s.node_rank), "dp_rank": str(g), "prefix": self.s.prefix},
            stats_handler=self.stats,
        )
        await svc.add_endpoint(name="status", subject=f"{self.subjects.group(g)}.worker.{self.s.node_rank}.status",
                               handler=self.on_status)
        self.ready = True
        self.log.info("worker_ready", subject=self.subjects.step(g))
        tasks = [asyncio.create_task(self.heartbeat_loop(stop)), asyncio.create_task(self.step_loop())]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await svc.stop()
        await self.nc.drain()

    async def on_step(self, msg: Any) -> None:
        self.queue.put_nowait(msg.data)

    async def on_status(self, req: Any) -> None:
        await req.respond(pack(self.heartbeat()))

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.s.node_rank, self.place.dp_rank, self.place.attn_tp_rank, self.ready,
                         self.epoch, self.last_seq, time.time())

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        subject = self.subjects.heartbeat(self.place.dp_rank)
        while not stop.is_set():
            try:
                await self.nc.publish(subject, pack(self.heartbeat()))
            except Exception as e:  # noqa: BLE001 - reconnecting; the next beat retries
                self.log.warning("heartbeat_failed", error=repr(e))
            await asyncio.sleep(self.s.heartbeat_interval)

    def check_order(self, step: Step) -> str | None:
        """None when ``step`` is the next one to run; else why not (and the state is updated)."""
        if step.epoch != self.epoch:
            if step.seq != 1:
                self.in_sync = False
                return f"joined epoch {step.epoch} at step {step.seq}, missed steps 1..{step.seq - 1}"
            self.epoch, self.last_seq, self.in_sync = step.epoch, 0, True
            self.log.info("new_epoch", epoch=step.epoch)
        if not self.in_sync:
            return f"out of sync in epoch {self.epoch}; waiting for a new epoch"
        if step.seq != self.last_seq + 1:
            if step.seq <= self.last_seq:
                return "repeat"
            self.in_sync = False
            return f"gap in epoch {self.epoch}: expected step {self.last_seq + 1}, got {step.seq}"
        return None

    async def step_loop(self) -> None:
        result_subject = self.subjects.result(self.place.dp_rank)
        while True:
            data = await self.queue.get()
            try:
                step = self._decode_step.decode(data)
            except Exception as e:  # noqa: BLE001
                self.counts["failures"] += 1
                self.log.error("bad_step", error=str(e))
                continue
            problem = self.check_order(step)
            if problem == "repeat":
                self.counts["repeated"] += 1
                self.log.warning("step_repeated", epoch=step.epoch, seq=step.seq, last_seq=self.last_seq)
                continue
            if problem is not None:
                self.counts["gaps"] += 1
                self.log.error("step_out_of_order", epoch=step.epoch, seq=step.seq, reason=problem)
                reply: Any = StepFailure(step.epoch, step.seq, self.s.node_rank, ErrorCode.DIVERGED, problem)
            else:
                try:
                    reply = await asyncio.to_thread(self.run_step, step)
                    self.last_seq = step.seq
                    self.counts["steps"] += 1
                except Exception as e:  # noqa: BLE001 - reported, the group resets
                    self.counts["failures"] += 1
                    self.in_sync = False
                    self.log.exception("step_failed", epoch=step.epoch, seq=step.seq)
                    reply = StepFailure(step.epoch, step.seq, self.s.node_rank, ErrorCode.INTERNAL, repr(e))
            if self.place.is_leader or isinstance(reply, StepFailure):
                await self.nc.publish(result_subject, pack(reply))

    def run_step(self, step: Step) -> StepResult:
        t0 = time.perf_counter()
        prefill_tokens = []
        for item in step.prefill:
            token, _ = self.runner.prefill(item)
            prefill_tokens.append(token if item.sample else -1)
        decode_tokens = self.runner.decode(step.decode)[0] if step.decode else []
        return StepResult(step.epoch, step.seq, self.s.node_rank, prefill_tokens, decode_tokens,
                          (time.perf_counter() - t0) * 1000)
