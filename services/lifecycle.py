"""How a service process starts and stops.

SIGTERM and Ctrl-C (SIGINT) set one ``stop`` event, whatever the service is doing:

* still connecting to NATS, or still loading / compiling the model (work done in a
  thread, which cannot be interrupted): the service gives up at once (``Stopped``);
* serving: it stops taking new work, lets what is in flight finish for at most
  ``drain_timeout`` seconds, answers the rest ``unavailable``, and closes.

A second signal ends the process at once. When a thread is still busy in JAX (a compile,
a step, the collectives of a JAX job spanning processes) the process leaves with
``os._exit`` after flushing its output: neither the interpreter's nor JAX's exit
handlers may wait for work nobody wants any more (``jax.distributed.shutdown`` waits
for every member of the job).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any, Awaitable, TypeVar

T = TypeVar("T")

EXIT_SECOND_SIGNAL = 1
EXIT_BROKEN_JOB = 70  # a member of a group spanning processes left a JAX job that broke (a peer is gone)


class Stopped(Exception):
    """Stop was asked before the service was serving: nothing to drain."""


async def unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T:
    """The result of ``work``, or ``Stopped`` as soon as ``stop`` is set (``work`` is cancelled;
    a thread behind it runs on, unwanted, until the process exits)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise Stopped()


def install_stop_signals(stop: asyncio.Event, log: Any = None) -> None:
    """SIGTERM / SIGINT set ``stop``; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            if log is not None:
                log.warning("second_signal", signal=sig.name, action="exiting now")
            flush_and_exit(EXIT_SECOND_SIGNAL)
        if log is not None:
            log.info("stopping", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def flush_and_exit(code: int) -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_services(services: list[Any], log: Any, setup: Any = None) -> int:
    """Run every service's ``run(stop)`` until they return (after a signal); 0 on a clean stop.
    ``setup()`` runs first, on the event loop (e.g. serving metrics)."""

    async def main() -> bool:
        """Whether a service was stopped before it served (nothing of this process to drain)."""
        stop = asyncio.Event()
        install_stop_signals(stop, log)
        if setup is not None:
            setup()
        try:
            await asyncio.gather(*(s.run(stop) for s in services))
        except Stopped:
            log.info("stopped_before_serving")
            return True
        return False

    loop = asyncio.new_event_loop()
    early = False
    try:
        early = loop.run_until_complete(main())
    finally:
        if early and _busy_threads():
            # a thread still loads or compiles (a warm-up): leave now. Waiting for the other
            # services' tasks to unwind (a publisher beside the worker in `dpbus node`) once
            # kept a node past its stop bound; none of them holds work yet (the group never
            # served), and the output is flushed on the way out
            log.info("stopped")
            flush_and_exit(0)
        _close(loop)
    log.info("stopped")
    if _busy_threads() or _in_jax_job():
        flush_and_exit(0)
    return 0


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the loop without waiting for its executor's threads (``asyncio.run`` would)."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def _busy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]


def _in_jax_job() -> bool:
    jax = sys.modules.get("jax")
    return bool(jax is not None and jax.distributed.is_initialized())
