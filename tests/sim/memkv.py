"""An in-memory stand-in for the JetStream key-value bucket behind ``dpbus.services.ledger.Ledger``:
the same compare-and-set semantics (create only if absent or deleted, update only at the
last revision, delete only at the last revision), one revision counter for the bucket,
and watchers told of every change. Its coroutines never suspend, so ``run`` completes
a ``Ledger`` call at once, inside one simulated event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError


@dataclass
class Got:
    key: str
    revision: int
    value: bytes


class MemoryKV:
    def __init__(self) -> None:
        self.values: dict[str, tuple[int, bytes]] = {}  # live keys only
        self.last: dict[str, int] = {}  # key -> revision of its last operation (a delete too)
        self.revision = 0
        self.watchers: list[Callable[[str, int, bytes | None], None]] = []
        self.fault: Callable[[], str | None] = lambda: None  # "lost" (not applied), "unanswered" (applied)
        self.unanswered: Callable[[str, bytes | None], None] = lambda key, value: None  # told of such writes

    def _call(self, apply: Callable[[], int], key: str, value: bytes | None) -> int:
        """One request to the bucket: it may be lost, or applied with its reply lost; both
        time out, as a JetStream request does."""
        fault = self.fault()
        if fault == "lost":
            raise NatsTimeout()
        try:
            revision = apply()
        except KeyWrongLastSequenceError:
            if fault == "unanswered":
                raise NatsTimeout() from None
            raise
        if fault == "unanswered":
            self.unanswered(key, value)
            raise NatsTimeout()
        return revision

    def _write(self, key: str, value: bytes | None) -> int:
        self.revision += 1
        self.last[key] = self.revision
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = (self.revision, value)
        for watcher in list(self.watchers):
            watcher(key, self.revision, value)
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        def apply() -> int:
            if key in self.values:
                raise KeyWrongLastSequenceError()
            return self._write(key, value)
        return self._call(apply, key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        def apply() -> int:
            if self.last.get(key, 0) != last or key not in self.values:
                raise KeyWrongLastSequenceError()
            return self._write(key, value)
        return self._call(apply, key, value)

    async def put(self, key: str, value: bytes) -> int:
        return self._call(lambda: self._write(key, value), key, value)

    async def get(self, key: str) -> Got:
        if self.fault() is not None:
            raise NatsTimeout()
        if key not in self.values:
            raise KeyNotFoundError()
        revision, value = self.values[key]
        return Got(key, revision, value)

    async def delete(self, key: str, last: int | None = None) -> bool:
        def apply() -> int:
            if last is not None and self.last.get(key, 0) != last:  # as nats-py raises it for a delete
                raise BadRequestError(code=400, err_code=10071, description=f"wrong last sequence: {self.last.get(key, 0)}")
            return self._write(key, None)
        self._call(apply, key, None)
        return True

    def snapshot(self) -> list[tuple[str, int, bytes]]:
        """What a new watcher is told first: every live key at its last revision."""
        return [(k, rev, v) for k, (rev, v) in sorted(self.values.items(), key=lambda kv: kv[1][0])]


def run(coro):
    """Complete a coroutine that never suspends (every ``Ledger`` call on a ``MemoryKV``)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a simulated ledger call suspended")
