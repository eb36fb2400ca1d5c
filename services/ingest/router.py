"""Which DP group gets the next request (pure: no I/O; time and randomness injectable).

Policies (``--policy``):

* ``round_robin``: each available group in turn. Balanced in request counts, blind to
  their sizes.
* ``shortest_queue``: the fewest requests waiting + running.
* ``least_tokens``: the fewest outstanding tokens (prompt still to prefill + tokens still
  to generate).
* ``prefix_affinity``: a request goes to the group whose prefix cache holds the longest
  prefix of its prompt, by the page hashes each group lists in its load report (see
  ``dpbus.schemas.internal.page_hashes``) plus those of the prompts this router sent it since
  (ties: the less loaded). When no group holds any of it, requests whose first
  ``prefix_tokens`` tokens are equal go to the same group (rendezvous hashing over the
  available groups, so a group that leaves or comes back moves only its own prefixes).
  Either way, a group carrying more than ``affinity_skew`` times the mean load of the
  other groups (at least one request's worth) is passed over for ``least_tokens``.

A group's load is its latest ``LoadReport`` plus what this router dispatched to it since
that report (``sent``), so that a burst arriving between two reports spreads instead of
all landing on the group that looked emptiest. Several ingest instances see the same
reports but only their own dispatches, so each picks at random among the groups within
one request of the least loaded, and round robin starts at a random group: instances
that receive requests at the same moment do not all herd onto one group.

A group is unavailable while no report came from it for ``stale_after`` seconds or its
latest report says it is not ready. Before any report at all (start-up) every group is
assumed available. A deployment coming up opens as one: while a group is ``starting`` (its
workers still loading, never ready yet) and every ready group became ready less than
``start_grace`` seconds ago, no group is available, so the first requests do not all land
on whichever group compiled first. A group that restarts in a deployment already serving
holds up nothing (the others have been ready longer).
"""

from __future__ import annotations

import hashlib
import random
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dpbus.schemas.internal import PAGE_HASH_BYTES, LoadReport, page_hashes

POLICIES = ("round_robin", "shortest_queue", "least_tokens", "prefix_affinity")
DEFAULT_PREFIX_TOKENS = 32


@dataclass
class GroupLoad:
    report: LoadReport | None = None
    seen_at: float = 0.0      # router clock when the report arrived
    sent_requests: int = 0    # dispatched here since that report
    sent_tokens: int = 0
    cached: frozenset[bytes] = frozenset()  # page hashes of the group's prefix cache (its report)
    sent_pages: set[bytes] | None = None    # page hashes of prompts dispatched here since that report

    @property
    def requests(self) -> int:
        r = self.report
        return (r.waiting + r.running if r else 0) + self.sent_requests

    @property
    def tokens(self) -> int:
        return (self.report.outstanding_tokens if self.report else 0) + self.sent_tokens


def prefix_key(input_ids: Sequence[int], n: int) -> bytes:
    """A digest of the first ``n`` tokens, the same in every process."""
    return hashlib.blake2b(array("q", input_ids[:n]).tobytes(), digest_size=16).digest()


def _rendezvous(key: bytes, g: int) -> bytes:
    return hashlib.blake2b(key + g.to_bytes(4, "little"), digest_size=8).digest()


class Router:
    def __init__(self, dp_size: int, policy: str = "round_robin", *, stale_after: float = 3.0,
                 affinity_skew: float = 2.0, prefix_tokens: int = DEFAULT_PREFIX_TOKENS, start_grace: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (--policy / DPBUS_POLICY); "
                             f"valid policies: {', '.join(POLICIES)}")
        if dp_size < 1 or prefix_tokens < 1:
            raise ValueError(f"dp_size ({dp_size}) and prefix_tokens ({prefix_tokens}) must be at least 1")
        self.dp_size, self.policy = dp_size, policy
        self.stale_after, self.affinity_skew, self.prefix_tokens = stale_after, affinity_skew, prefix_tokens
        self.start_grace = start_grace
        self.clock = clock
        self.rng = rng or random.Random()
        self.groups = [GroupLoad() for _ in range(dp_size)]
        self._next = self.rng.randrange(dp_size)
        self._choose = getattr(self, "_" + policy)

    # ---- what the router knows -------------------------------------------------------
    def on_load(self, report: LoadReport) -> None:
        if 0 <= report.dp_rank < self.dp_size:
            held = report.cached
            cached = frozenset(held[i:i + PAGE_HASH_BYTES] for i in range(0, len(held), PAGE_HASH_BYTES))
            self.groups[report.dp_rank] = GroupLoad(report, self.clock(), cached=cached)  # local counts restart

    def remember(self, g: int, input_ids: Sequence[int]) -> None:
        """A prompt is being dispatched to ``g``: its pages will be in g's cache (the next
        report says so; until then, this router remembers)."""
        st = self.groups[g]
        if st.report is not None and st.report.page_size:
            if st.sent_pages is None:
                st.sent_pages = set()
            st.sent_pages.update(page_hashes(list(input_ids), st.report.page_size))

    def cached_tokens(self, g: int, input_ids: Sequence[int], hashes: dict[int, list[bytes]] | None = None) -> int:
        """How many leading tokens of the prompt ``g`` holds in its prefix cache (by its last
        report and what was sent to it since)."""
        st = self.groups[g]
        size = st.report.page_size if st.report is not None else 0
        if not size or not (st.cached or st.sent_pages):
            return 0
        hashes = {} if hashes is None else hashes
        if size not in hashes:
            hashes[size] = page_hashes(list(input_ids), size)
        n = 0
        for h in hashes[size]:
            if h not in st.cached and not (st.sent_pages and h in st.sent_pages):
                break
            n += 1
        return n * size

    def sent(self, g: int, tokens: int, input_ids: Sequence[int] = ()) -> None:
        """A request of ``tokens`` outstanding tokens (prompt ``input_ids``) is being
        dispatched to ``g``."""
        st = self.groups[g]
        st.sent_requests += 1
        st.sent_tokens += tokens
        if self.policy == "prefix_affinity" and input_ids:
            self.remember(g, input_ids)

    def unsent(self, g: int, tokens: int) -> None:
        """``g`` did not take it after all."""
        st = self.groups[g]
        st.sent_requests = max(st.sent_requests - 1, 0)
        st.sent_tokens = max(st.sent_tokens - tokens, 0)

    def unavailable_reason(self, g: int, now: float | None = None) -> str | None:
        """Why ``g`` gets nothing new right now, or None when it is available."""
        if all(st.report is None for st in self.groups):
            return None  # start-up: nothing heard yet, let the groups answer for themselves
        now = self.clock() if now is None else now
        st = self.groups[g]
        if st.report is None:
            return "no load report yet"
        age = now - st.seen_at
        if age > self.stale_after:
            return f"no load report for {age:.1f}s (load_stale_after {self.stale_after}s)"
        if not st.report.ready:
            return "starting (its workers are loading)" if st.report.starting else "not ready"
        waited_for = self.opening(now)
        if waited_for:
            return (f"the deployment is starting: it opens when group(s) {waited_for} are ready too "
                    f"(at most {self.start_grace:g}s after its first group was)")
        return None

    def opening(self, now: float) -> list[int]:
        """The groups a deployment coming up still waits for (empty: it is open). A group
        is waited for while it is starting and no ready group has been ready ``start_grace``
        seconds."""
        fresh = [st for st in self.groups if st.report is not None and st.seen_at >= now - self.stale_after]
        starting = [st.report.dp_rank for st in fresh if st.report.starting and not st.report.ready]
        if not starting:
            return []
        ready_for = [st.report.ready_for + (now - st.seen_at) for st in fresh if st.report.ready]
        return starting if ready_for and max(ready_for) < self.start_grace else []

    def available(self, g: int, now: float | None = None) -> bool:
        return self.unavailable_reason(g, now) is None

    def live(self, now: float) -> list[int]:
        """The available groups (what ``available`` says of each, in one pass: this runs
        for every request)."""
        if all(st.report is None for st in self.groups):
            return list(range(self.dp_size))
        stale = now - self.stale_after
        live = [g for g, st in enumerate(self.groups)
                if st.report is not None and st.report.ready and st.seen_at >= stale]
        return [] if live and self.opening(now) else live

    # ---- the decision ----------------------------------------------------------------
    def order(self, input_ids: Sequence[int] = (), max_new_tokens: int = 0) -> list[int]:
        """The available groups to offer a request to, best first; empty when none is."""
        live = self.live(self.clock())
        if not live:
            return []
        first = self._choose(live, input_ids, max(len(input_ids) + max_new_tokens, 1))
        if len(live) == 1:
            return [first]
        rest = sorted((g for g in live if g != first), key=lambda g: self.groups[g].tokens)
        return [first, *rest]

    def home(self, input_ids: Sequence[int], live: Sequence[int]) -> int:
        """The group ``prefix_affinity`` sends this prompt's prefix to."""
        key = prefix_key(input_ids, self.prefix_tokens)
        return max(live, key=lambda g: _rendezvous(key, g))

    def _least(self, live: list[int], load: Callable[[int], int], slack: int) -> int:
        best = min(load(g) for g in live)
        return self.rng.choice([g for g in live if load(g) < best + slack])

    def _round_robin(self, live: list[int], input_ids: Sequence[int], cost: int) -> int:
        g = next(g for i in range(self.dp_size) if (g := (self._next + i) % self.dp_size) in live)
        self._next = (g + 1) % self.dp_size
        return g

    def _shortest_queue(self, live: list[int], input_ids: Sequence[int], cost: int) -> int:
        return self._least(live, lambda g: self.groups[g].requests, 1)

    def _least_tokens(self, live: list[int], input_ids: Sequence[int], cost: int) -> int:
        return self._least(live, lambda g: self.groups[g].tokens, cost)

    def _prefix_affinity(self, live: list[int], input_ids: Sequence[int], cost: int) -> int:
        hashes: dict[int, list[bytes]] = {}
        held = {g: self.cached_tokens(g, input_ids, hashes) for g in live}
        most = max(held.values())
        if most > 0:
            home = min((g for g in live if held[g] == most), key=lambda g: self.groups[g].tokens)
        else:
            home = self.home(input_ids, live)
        others = [self.groups[g].tokens for g in live if g != home]
        if others and self.groups[home].tokens > self.affinity_skew * max(sum(others) / len(others), cost):
            return self._least_tokens(live, input_ids, cost)
        return home

    def snapshot(self) -> dict[str, dict]:
        """Per group: available (or why not), estimated requests and tokens, report age."""
        now = self.clock()
        out = {}
        for g, st in enumerate(self.groups):
            why = self.unavailable_reason(g, now)
            out[str(g)] = {"available": why is None, "requests": st.requests, "tokens": st.tokens,
                           "report_age_s": round(now - st.seen_at, 3) if st.report else None}
            if why:
                out[str(g)]["why"] = why
        return out
