"""A worker's page tables: every live row's KV pages and sampling, kept from step to step.

Steps name rows and carry only changes (see ``dpbus.schemas.internal.Step``); ``apply`` makes
the changes in the step's order and rebuilds the runner's inputs (``PrefillItem`` and
``DecodeItem`` with whole page lists), exactly the items the publisher's plan held.

The tables belong to one epoch and are built from its first step: the worker clears them
whenever it (re)starts an epoch, then applies that epoch's steps from step 1, in order.
A step that does not fit the tables (it frees or grows a row that does not exist, starts
one that does, or runs one it never started) raises: the worker reports the step as
failed and the group starts a new epoch. ``apply`` checks the whole step before changing
anything, so a step it refuses leaves the tables as they were.

The tables also know which rows have sampled a token in the epoch (a prefill chunk that
samples, or a decode row): only those have a token kept by the runner, so a decode row
that asks for it (``LAST_TOKEN``) on any other row is refused. A row started again after
being freed has sampled nothing yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpbus.schemas.internal import LAST_TOKEN, DecodeItem, PrefillItem, RowSampling, Step


@dataclass
class Row:
    pages: list[int]
    sampling: RowSampling
    sampled: bool = False  # it sampled a token in an earlier step: the runner keeps it for this row


class PageTables:
    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows: dict[int, Row] = {}

    def clear(self) -> None:
        self.rows = {}

    def pages(self, row: int) -> list[int]:
        return self.rows[row].pages

    def apply(self, step: Step) -> tuple[list[PrefillItem], list[DecodeItem]]:
        """Make the step's changes and return the runner's inputs for it."""
        self.check(step)
        for row in step.freed:
            del self.rows[row]
        for start in step.started:
            self.rows[start.row] = Row(list(start.pages), start.sampling)
        for more in step.grown:
            self.rows[more.row].pages.extend(more.pages)
        prefill = [PrefillItem(c.start, c.token_ids, c.sample, list(self.rows[c.row].pages), self.rows[c.row].sampling,
                               c.row) for c in step.prefill]
        decode = [DecodeItem(d.token, d.position, d.counter, list(self.rows[d.row].pages), self.rows[d.row].sampling,
                             d.row) for d in step.decode]
        for row in [c.row for c in step.prefill if c.sample] + [d.row for d in step.decode]:
            self.rows[row].sampled = True
        return prefill, decode

    def check(self, step: Step) -> None:
        """Raise ValueError if ``step`` does not fit the tables as they are."""
        live = set(self.rows)
        for row in step.freed:
            if row not in live:
                raise ValueError(f"step {step.seq} frees row {row}, which is not in use")
            live.discard(row)
        for start in step.started:
            if not 0 <= start.row < self.max_rows:
                raise ValueError(f"step {step.seq} starts row {start.row}, outside 0..{self.max_rows - 1}")
            if start.row in live:
                raise ValueError(f"step {step.seq} starts row {start.row}, which is in use")
            live.add(start.row)
        for row in [m.row for m in step.grown] + [c.row for c in step.prefill] + [d.row for d in step.decode]:
            if row not in live:
                raise ValueError(f"step {step.seq} names row {row}, which is not in use")
        named = [c.row for c in step.prefill] + [d.row for d in step.decode]
        if len(named) != len(set(named)):
            raise ValueError(f"step {step.seq} runs a row twice")
        fresh = set(step.freed) | {start.row for start in step.started}
        for d in step.decode:
            if d.token == LAST_TOKEN and (d.row in fresh or not self.rows[d.row].sampled):
                raise ValueError(f"step {step.seq} feeds row {d.row} its last token, but the row has sampled none "
                                 "in this epoch")
