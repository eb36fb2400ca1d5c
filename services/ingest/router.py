"""Which DP group gets the next request.

Round robin over the groups that are available: a group is skipped while its latest
load report says it is not ready, or while no report arrived for ``stale_after``
seconds (once reports have been seen). A valid ``dp_rank`` in the request always wins.
"""

from __future__ import annotations

import time

from schemas.internal import LoadReport


class Router:
    def __init__(self, dp_size: int, stale_after: float = 5.0) -> None:
        self.dp_size = dp_size
        self.stale_after = stale_after
        self.loads: dict[int, tuple[float, LoadReport]] = {}
        self._next = 0

    def on_load(self, report: LoadReport) -> None:
        if 0 <= report.dp_rank < self.dp_size:
            self.loads[report.dp_rank] = (time.monotonic(), report)

    def available(self, g: int, now: float | None = None) -> bool:
        seen = self.loads.get(g)
        if seen is None:
            return not self.loads  # before any report, assume every group may serve
        now = time.monotonic() if now is None else now
        return seen[1].ready and now - seen[0] <= self.stale_after

    def order(self, exclude: set[int] = frozenset()) -> list[int]:
        """Groups to try, best first: available ones in round-robin order, then the others."""
        start = self._next
        self._next = (self._next + 1) % self.dp_size
        ring = [(start + i) % self.dp_size for i in range(self.dp_size)]
        ring = [g for g in ring if g not in exclude]
        now = time.monotonic()
        return [g for g in ring if self.available(g, now)] + [g for g in ring if not self.available(g, now)]
