"""The invariants on what the services *send* to clients, checked after every event.

Terminal answers of an accepted request: ``done``, ``error`` (from its publisher) and
``publisher_lost`` and ``revoked`` (from an ingest: the holder went silent, or a move nobody took). A publisher sends a terminal answer with its settling
write right behind it: a death takes both or neither. Only when that write was lost (a
ledger fault) and the publisher died before writing it again does ingest answer as well:
the one way a client hears two terminal answers, counted in ``heard_twice``. ``refused`` is ingest's answer to a submit nobody
acknowledged; it ends an attempt nobody accepted, so it is recorded but is not one of
them (a later copy of the request is a new attempt, as a client's retry would be).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

TERMINALS = ("done", "error", "publisher_lost", "revoked")


class Violation(AssertionError):
    pass


@dataclass
class Checker:
    sent: list[tuple[float, str, str, str, int]] = field(default_factory=list)  # (t, by, rid, kind, index)
    checked: int = 0
    terminals: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    next_chunk: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refused: set[str] = field(default_factory=set)
    # requests whose publisher died after sending their terminal answer and before its
    # settling write landed (a write lost first): ingest answers them once more
    died_unsettled: set[str] = field(default_factory=set)
    heard_twice: list[str] = field(default_factory=list)

    def record(self, t: float, by: str, rid: str, kind: str, index: int = -1) -> None:
        self.sent.append((t, by, rid, kind, index))

    def check(self) -> None:
        """Look at everything sent since the last check."""
        while self.checked < len(self.sent):
            t, by, rid, kind, index = self.sent[self.checked]
            self.checked += 1
            where = f"at t={t:.3f} {by} sent {kind}{'' if index < 0 else f' #{index}'} for {rid}"
            if kind == "refused":
                self.refused.add(rid)
                continue
            if self.terminals[rid]:
                if kind == "publisher_lost" and rid in self.died_unsettled and len(self.terminals[rid]) == 1:
                    self.heard_twice.append(rid)  # the one exception, counted
                    self.terminals[rid].append(f"{kind} by {by}")
                    continue
                raise Violation(f"{where} after its terminal {self.terminals[rid][0]}")
            if kind in TERMINALS:
                self.terminals[rid].append(f"{kind} by {by}")
            elif index != self.next_chunk[rid]:
                raise Violation(f"{where}; the next chunk was #{self.next_chunk[rid]}")
            else:
                self.next_chunk[rid] += 1

    def check_settled(self, accepted: set[str], died_in_doubt: set[str] = frozenset()) -> None:
        """At quiescence: every accepted request got its one terminal, except one whose
        terminal answer was won by a service that died before it learnt so (its winning
        write landed, its acknowledgement was lost): winning and sending cannot be one
        atomic act, and nobody else may send after the win. Those are counted."""
        silent = sorted(rid for rid in accepted if not self.terminals[rid])
        self.died_winning = [rid for rid in silent if rid in died_in_doubt]
        silent = [rid for rid in silent if rid not in died_in_doubt]
        if silent:
            raise Violation(f"accepted requests without a terminal answer: {silent}")
