"""What a group's workers know of its running rows, and the steps that tell them the rest.

The scheduler plans a step with whole page lists (``Plan``: the runner's ``PrefillItem``
and ``DecodeItem``). ``RowTables`` turns a plan into a wire ``Step`` that carries only
what the workers do not know yet:

* a running sequence it has not seen gets a free row number and a ``RowStart`` with
  every page it holds (a sequence preempted and admitted again is a new row);
* a known row whose page list grew gets a ``RowPages`` with the new pages only;
* a row whose sequence left the batch (finished, aborted, stopped early or preempted)
  is listed in ``freed`` of the next step, and its number can be reused in that step.

Within a row's life its page list only grows at the end (the scheduler never drops or
reorders a running sequence's pages), so the number of pages already sent is all
``RowTables`` must remember: sending ``pages[sent:]`` rebuilds the whole list on the
workers. A list that shrank breaks that rule: ``step`` raises (a bug; the publisher
resets the group into a new epoch, which starts with no rows).

A new epoch starts from nothing (``reset``): the first step of an epoch finds every
running sequence new. The publisher calls ``reset`` whenever it starts an epoch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from dpbus.schemas.internal import DecodeRow, PrefillChunk, RowPages, RowSampling, RowStart, Step


@dataclass
class Row:
    seq: Any  # the scheduler's Sequence (kept so that its identity stays unique)
    life: int  # the sequence's preemption count when it got the row
    sent: int  # its first pages the workers know
    last_page: int  # the last of them (a cheap check that the list only grew)


class RowTables:
    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.reset()

    def reset(self) -> None:
        """No rows: a new epoch."""
        self.rows: dict[int, Row] = {}
        self.row_of: dict[int, int] = {}  # id(sequence) -> its row
        self.spare = list(range(self.max_rows))  # a heap: the lowest free row first

    def row(self, seq: Any) -> int | None:
        """The row ``seq`` runs in, if it has one."""
        return self.row_of.get(id(seq))

    def step(self, epoch: int, number: int, plan: Any, running: list) -> Step:
        """The wire step for ``plan``, after the scheduler built it; ``running`` is the
        scheduler's running list then (rows of sequences no longer in it are freed)."""
        step = Step(epoch, number)
        step.freed = self._free_gone(running)
        for seq, item in plan.prefill:
            row = self._place(step, seq, item.pages, item.sampling)
            step.prefill.append(PrefillChunk(row, item.start, item.token_ids, item.sample))
        for seq, item in plan.decode:
            row = self._place(step, seq, item.pages, item.sampling)
            step.decode.append(DecodeRow(row, item.token, item.position, item.counter))
        return step

    def _free_gone(self, running: list) -> list[int]:
        alive = {id(seq): seq.preempted for seq in running}
        gone = [row for row, r in self.rows.items() if alive.get(id(r.seq)) != r.life]
        for row in gone:
            del self.row_of[id(self.rows.pop(row).seq)]
            heapq.heappush(self.spare, row)
        return sorted(gone)

    def _place(self, step: Step, seq: Any, pages: list[int], sampling: RowSampling) -> int:
        """The row of ``seq``, telling ``step`` what the workers lack of its pages."""
        row = self.row_of.get(id(seq))
        if row is None:
            return self._start(step, seq, pages, sampling)
        r = self.rows[row]
        if len(pages) < r.sent or (r.sent and pages[r.sent - 1] != r.last_page):
            raise ValueError(f"row {row} ({seq.rid}): its page list changed other than by growing "
                             f"({r.sent} pages sent, {len(pages)} now)")
        if len(pages) > r.sent:
            step.grown.append(RowPages(row, pages[r.sent:]))
            r.sent, r.last_page = len(pages), pages[-1]
        return row

    def _start(self, step: Step, seq: Any, pages: list[int], sampling: RowSampling) -> int:
        if not self.spare:
            raise ValueError(f"no free row for {seq.rid}: {len(self.rows)} rows of {self.max_rows} in use")
        row = heapq.heappop(self.spare)
        self.rows[row] = Row(seq, seq.preempted, len(pages), pages[-1] if pages else 0)
        self.row_of[id(seq)] = row
        step.started.append(RowStart(row, list(pages), sampling))
        return row
