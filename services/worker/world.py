"""The world scope (``--mlp-scope world``): every group's step in one forward.

One mesh spans the devices of every group: ``"data"`` over the groups, ``"tensor"`` inside
each. Attention and its pages stay per group; the MLP and the experts are split over the
whole world (``model.world_forward``). So every group takes part in every world step: a
group with nothing to run feeds an empty batch (all padding, written to its trash page).

All groups of one world step share one compiled shape: ``world_shape`` pads them to the
largest group's sizes, and ``world_layout`` picks how the MLP sees every group's tokens
(MAX_LEN: each group's padded slots side by side; SUM_LEN: the real tokens end to end,
when they fit in one group's slots), which every process computes alike from the sizes
``agree`` gathers. A process feeds only the groups whose devices it holds; the other
groups' parts of an input are never asked of it (``model.global_array``'s callback covers
its own devices only), and it reads back its own groups' tokens only.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from dpbus.schemas.internal import DecodeItem, PrefillItem, Step
from dpbus.services.worker import model
from dpbus.services.worker.attention import Shape
from dpbus.services.worker.model import DATA, TENSOR, Config
from dpbus.services.worker.runner import Launched, ModelRunner, _inputs
from dpbus.services.worker.sampling import sample

Part = tuple[Sequence[PrefillItem], Sequence[DecodeItem]]  # one group's step: its chunks, its decode rows
NOTHING: Part = ((), ())


def make_world_mesh(groups: int, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """``("data", "tensor")`` over ``devices`` (all by default, in order): group g holds the
    g-th run of ``len(devices) // groups`` devices."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) % groups:
        raise ValueError(f"{len(devices)} devices cannot be split into {groups} equal groups")
    return jax.make_mesh((groups, len(devices) // groups), (DATA, TENSOR),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def _world_step_fn(cfg: Config, mesh, int_shapes, float_shapes, sum_len, weights, cache, last_tokens, ints, floats):
    """``_step_fn`` for every group at once: inputs ``[group, ...]``, tokens ``[group, rows]``
    (``sum_len``: the SUM_LEN layout's length, 0 for MAX_LEN)."""
    unpack = functools.partial(_inputs, int_shapes, float_shapes)
    batch, sampling, keep_rows = jax.vmap(unpack)(ints, floats, last_tokens)
    logits, cache = model.world_forward(cfg, weights, cache, batch, mesh, sum_len)
    groups, rows = logits.shape[:2]
    # one batch of every group's rows: the all-greedy fast path holds when every row is greedy
    tokens = sample(logits.reshape(groups * rows, -1), *(a.reshape(groups * rows) for a in sampling))
    tokens = tokens.reshape(groups, rows)
    last_tokens = jax.vmap(lambda last, keep, t: last.at[keep].set(t, mode="drop"))(last_tokens, keep_rows, tokens)
    return tokens, logits, cache, last_tokens


class WorldRunner(ModelRunner):
    """The model for every group of a world: weights split by ``model.WORLD_RULES``, a page
    pool per group, one jitted world step. ``groups_here`` are the groups whose devices
    this process holds (every group in a process of its own)."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, *, num_pages: int, page_size: int,
                 max_running_requests: int, max_prefill_tokens: int, host_weights: dict[str, Any],
                 dtype: str = "float32", layout: str = "per_step") -> None:
        self.groups = mesh.shape[DATA]
        self.layout = layout  # "per_step": SUM_LEN when it fits (``end_to_end_len``); "max_len": never
        cfg.check_world_size(self.groups, mesh.shape[TENSOR])
        self._layout(cfg, mesh, num_pages, page_size, max_running_requests, max_prefill_tokens, dtype)
        self.weights = model.place_weights(host_weights, cfg, mesh, dtype, scope="world")
        self.cache = model.new_cache(cfg, num_pages, page_size, mesh, dtype, scope="world")
        self._rows = NamedSharding(mesh, jax.P(DATA))  # one row of an input per group, on its devices
        cache_sh = [(model.cache_sharding(mesh, "world"),) * 2 for _ in range(cfg.n_layers)]
        self._step = jax.jit(functools.partial(_world_step_fn, cfg, mesh), static_argnums=(0, 1, 2),
                             donate_argnums=(4, 5), out_shardings=(self._rows, self._rows, cache_sh, self._rows))
        local = {d.id for d in jax.local_devices()}
        self.groups_here = [g for g in range(self.groups) if any(d.id in local for d in mesh.devices[g])]
        self.last_tokens = self._per_group({g: np.zeros(self.max_rows, np.int32) for g in self.groups_here},
                                           (self.max_rows,), np.int32)

    def _per_group(self, rows: Mapping[int, np.ndarray], shape: tuple[int, ...], dtype) -> jax.Array:
        """A ``[group, *shape]`` input sharded over the groups, from this process's groups' rows."""
        host = np.zeros((self.groups, *shape), dtype)
        for g, row in rows.items():
            host[g] = row
        return model.global_array(host, self._rows)

    def world_shape(self, sizes: Sequence[tuple[int, int, int]]) -> Shape:
        """The one shape of a world step from every group's (decode rows, chunks, prefill
        tokens): the largest of each, bucketed as one group's step would be. Each group's
        step fits its rows (checked before: ``check_part``); the largest decode batch of one
        group and another's chunks together need not (a prefill shape has every decode slot
        anyway)."""
        return self._shape_fitting(max(s[0] for s in sizes), max(s[1] for s in sizes), max(s[2] for s in sizes))

    def world_layout(self, shape: Shape, sizes: Sequence[tuple[int, int, int]]) -> int:
        """The SUM_LEN layout's length for a world step of ``shape`` whose groups have
        ``sizes``, or 0 for MAX_LEN (``--world-layout``)."""
        return end_to_end_len(shape, sizes) if self.layout == "per_step" else 0

    @staticmethod
    def sizes(part: Part) -> tuple[int, int, int]:
        prefill, decode = part
        return len(decode), len(prefill), sum(len(it.token_ids) for it in prefill)

    def check_part(self, part: Part) -> None:
        """Refuse a part ``launch_world`` could not run (raises ``ValueError``): checked before
        the world step, since a process that fails inside it would leave the others waiting
        in its collectives."""
        self._check(*part)

    def launch_world(self, parts: Mapping[int, Part], shape: Shape, sum_len: int = 0) -> dict[int, Launched]:
        """Dispatch one world step, every group of this process running its part of
        ``parts`` (none: an empty batch; each part checked by ``check_part``), padded to
        ``shape``, its MLP in the layout ``sum_len`` says (``world_layout``): the launch of
        each."""
        ints, floats = {}, {}
        for g in self.groups_here:
            prefill, decode = parts.get(g, NOTHING)
            ints[g], int_shapes, floats[g], float_shapes = self._host_inputs(shape, prefill, decode)
        n_int, n_float = len(ints[self.groups_here[0]]), len(floats[self.groups_here[0]])
        tokens, _, self.cache, self.last_tokens = self._step(
            int_shapes, float_shapes, sum_len, self.weights, self.cache, self.last_tokens,
            self._per_group(ints, (n_int,), np.int32), self._per_group(floats, (n_float,), np.float32))
        mine = {s.index[0].start: s.data for s in tokens.addressable_shards}  # group -> [1, rows], on its device
        return {g: Launched(mine[g][0], shape.decode, [it.sample for it in parts.get(g, NOTHING)[0]],
                            len(parts.get(g, NOTHING)[1])) for g in self.groups_here}

    def step_world(self, parts: Mapping[int, Part]) -> dict[int, tuple[list[int], list[int]]]:
        """One world step of this process's groups and its tokens per group, in one process
        that holds every group (tests, benchmarks): the shape and layout from the parts."""
        for part in parts.values():
            self.check_part(part)
        sizes = [self.sizes(parts.get(g, NOTHING)) for g in range(self.groups)]
        shape = self.world_shape(sizes)
        launched = self.launch_world(parts, shape, self.world_layout(shape, sizes))
        return {g: one.tokens() for g, one in launched.items()}

    def launch(self, prefill: Sequence[PrefillItem], decode: Sequence[DecodeItem]) -> Launched:
        raise TypeError("a world runs every group's step together: launch_world")

    def _warm(self, shape: Shape) -> None:
        """Compile ``shape``, in both layouts, with every group's part empty (padding only,
        on the trash pages)."""
        for sum_len in (0, shape.decode + shape.prefill) if self.layout == "per_step" else (0,):
            for launched in self.launch_world({}, shape, sum_len).values():
                launched.tokens()


def end_to_end_len(shape: Shape, sizes: Sequence[tuple[int, int, int]]) -> int:
    """SUM_LEN's length for a world step of ``shape`` whose groups have ``sizes`` (decode
    rows, chunks, prefill tokens), or 0: MAX_LEN. sgl-jax lays the tokens end to end when
    their sum is at most half the padded total (``sum * 2 <= max * groups``); here the
    end-to-end buffer is one group's slots (``T``, so each shape compiles one twin, not a
    shape per sum), taken whenever every group's real tokens fit in it: with two groups
    the same rule, with more a stricter one. The MLP then runs on ``T`` rows, not
    ``groups * T``."""
    slots = shape.decode + shape.prefill
    return slots if sum(d + t for d, _, t in sizes) <= slots else 0


def agree(mesh: jax.sharding.Mesh, mine: Sequence[int], after: jax.Array | None = None) -> np.ndarray:
    """What every process of the world says, gathered for all: ``mine`` (a few ints, the
    same length everywhere) is put on each of this process's devices and the result is
    ``[group, device of the group, len(mine)]``, identical in every process. One small
    all-gather; every process must call it, in the same order as the world steps.

    ``after``: an output of the last world step. The gather waits for it: on CPU, XLA runs
    programs that share no data side by side, and this gather's collective must not be
    paired with one of that step's (gloo matches them in the order each process issues
    them)."""
    n = len(mine)
    flat = NamedSharding(mesh, jax.P((DATA, TENSOR)))
    host = np.tile(np.asarray(mine, np.int32), (mesh.devices.size, 1))
    if after is None:
        after = model.global_array(np.zeros((), np.int32), NamedSharding(mesh, jax.P()))
    gathered = _gather(mesh)(model.global_array(host, flat), after)
    return np.asarray(gathered).reshape(*mesh.devices.shape, n)


@functools.cache
def _gather(mesh: jax.sharding.Mesh):
    return jax.jit(lambda x, after: x, out_shardings=NamedSharding(mesh, jax.P()), keep_unused=True)


# what a process says before each world step: whether it holds its group's next step, which
# one, and its sizes (decode rows, chunks, prefill tokens)
SAYS = ("has", "epoch", "seq", "decode", "chunks", "tokens")


def step_sizes(step: Step) -> tuple[int, int, int]:
    return len(step.decode), len(step.prefill), sum(len(c.token_ids) for c in step.prefill)


def plan(said: np.ndarray) -> tuple[list[bool], list[tuple[int, int, int]]]:
    """Which groups run their step in a world step, and each group's sizes (nothing for a
    group that sits out), from what every device said (``agree``'s ``[group, device,
    SAYS]``): a group runs its step when every one of its devices holds that same step."""
    runs, sizes = [], []
    for rows in said:
        ready = bool(rows[0][0]) and bool((rows == rows[0]).all())
        runs.append(ready)
        sizes.append(tuple(int(v) for v in rows[0][3:6]) if ready else (0, 0, 0))
    return runs, sizes


class WorldStepper:
    """This process's side of the world's lockstep. Its group's steps come in order
    (``launch``, one at a time); the loop (``run``) takes part in every world step: it says
    what it holds (``agree``), and the world steps with every group whose members all hold
    their next step, the others sitting out with an empty part.

    When no group can run (no work anywhere, or only members still waiting for a step)
    nothing is launched, and the next agreement follows a pause of ``idle_s`` (cut short by
    a step of its own). Under load that happens between most steps (a publisher's next step
    often waits for the last one's tokens), so the pause stays short for ``hot_steps`` idle
    agreements in a row; then it doubles each time up to ``idle_max_s``: an idle world
    neither spins a core nor keeps a new request waiting more than ``idle_max_s``."""

    def __init__(self, runner: WorldRunner, group: int, apply: Callable[[Step], Part],
                 idle_s: float = 0.001, idle_max_s: float = 0.05, hot_steps: int = 100) -> None:
        self.runner, self.group, self.apply = runner, group, apply
        self.idle_s, self.idle_max_s, self.hot_steps = idle_s, idle_max_s, hot_steps
        self.waiting: tuple[Step, asyncio.Future] | None = None
        self.wake = asyncio.Event()
        self.counts = {"world_steps": 0, "ran": 0, "sat_out": 0, "idle": 0, "max_len": 0, "sum_len": 0}
        self.agree_ms = 0.0  # the agreements' time, waits for the step before included
        self.last: dict[str, Any] = {}  # the last world step run: each group's sizes, the shape

    async def launch(self, step: Step) -> Launched:
        """Run ``step`` in the next world step that every member of the group holds it in."""
        done = asyncio.get_running_loop().create_future()
        self.waiting = (step, done)
        self.wake.set()
        try:
            return await done
        finally:
            if self.waiting is not None and self.waiting[1] is done:  # cancelled before it ran
                self.waiting = None

    async def run(self) -> None:
        """Forever, in step with every other process of the world (a failure here means the
        world's job is broken: the caller leaves it)."""
        pause, idle_streak = self.idle_s, 0
        while True:
            waiting = self.waiting
            mine = (1, waiting[0].epoch, waiting[0].seq, *step_sizes(waiting[0])) if waiting else (0,) * len(SAYS)
            t0 = time.perf_counter()
            said = await asyncio.to_thread(agree, self.runner.mesh, mine, self.runner.last_tokens)
            self.agree_ms += (time.perf_counter() - t0) * 1000
            runs, sizes = plan(said)
            self.count(runs, sizes)
            if not any(runs):  # every process sees the same: none of them steps
                self.wake.clear()
                if self.waiting is waiting:  # nothing new of ours since we spoke: pause
                    try:
                        await asyncio.wait_for(self.wake.wait(), pause)
                    except TimeoutError:
                        pass
                idle_streak += 1
                if idle_streak > self.hot_steps:  # quiet for a while: back off
                    pause = min(pause * 2, self.idle_max_s)
                continue
            pause, idle_streak = self.idle_s, 0
            shape = self.runner.world_shape(sizes)
            sum_len = self.runner.world_layout(shape, sizes)
            self.counts["sum_len" if sum_len else "max_len"] += 1
            self.last = {"sizes": sizes, "decode": shape.decode, "prefill": shape.prefill,
                         "layout": "sum_len" if sum_len else "max_len"}
            parts: dict[int, Part] = {}
            failed: BaseException | None = None
            if runs[self.group] and waiting:
                self.waiting = None  # taken: it runs in this world step, never in another
                try:  # the same on every member of the group: they all sit it out
                    parts[self.group] = self.apply(waiting[0])
                    self.runner.check_part(parts[self.group])
                except ValueError as e:
                    parts, failed = {}, e
            launched = await asyncio.to_thread(self.runner.launch_world, parts, shape, sum_len)
            if waiting and runs[self.group] and not waiting[1].done():  # (done: cancelled)
                if failed is not None:
                    waiting[1].set_exception(failed)
                else:
                    waiting[1].set_result(launched[self.group])

    def count(self, runs: list[bool], sizes: list[tuple[int, int, int]]) -> None:
        self.counts["world_steps"] += 1
        self.counts["idle" if not any(runs) else "ran" if runs[self.group] else "sat_out"] += 1


class MemberWatch:
    """Which member of the world is gone, from the heartbeats every member sends (no I/O).

    Gloo notices a dead peer only while a collective reads from it (a reset connection); a
    collective still connecting to it waits, and JAX's coordination service later aborts the
    process. The heartbeats tell sooner and always: a member that was ready is gone once it
    says it is not (it is leaving a broken world) or stays silent for ``timeout`` seconds.
    A member never seen ready is still starting, and not watched yet."""

    def __init__(self, members: Sequence[int], timeout: float) -> None:
        self.members = set(members)
        self.timeout = timeout
        self.seen: dict[int, float] = {}  # member -> when it last beat, once it was ready
        self.left: int | None = None  # a member that said it is not ready after it was
        self.stopping: set[int] = set()  # members that said they were stopped (draining)

    def beat(self, member: int, ready: bool, now: float, stopping: bool = False) -> None:
        if member not in self.members:
            return
        if stopping:
            self.stopping.add(member)
        if ready:
            self.seen[member] = now
        elif member in self.seen and self.left is None:
            self.left = member

    def gone(self, now: float) -> str | None:
        """Why the world is broken (None: every member watched is here)."""
        if self.left is not None:
            return f"node {self.left} is leaving the world (it said it is not ready)"
        silent = sorted(m for m, at in self.seen.items() if now - at > self.timeout)
        if not silent:
            return None
        if self.stopping.issuperset(silent):
            return f"node(s) {silent} stopped"
        return f"node(s) {silent} silent for over {self.timeout:g}s"
