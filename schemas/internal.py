"""Messages between dpbus services (always msgpack). Not part of the public contract,
but versioned with it: every service of one deployment runs the same dpbus.

Flow for one group g::

    ingest  --Submit (request/reply: SubmitAck)-->  publisher g
    publisher g  --Step (epoch, seq; rows' changes)-->  every worker of g
    leader worker of g  --StepResult | StepFailure-->  publisher g
    each worker of g  --Heartbeat-->  publisher g
    publisher g  --LoadReport-->  ingest
"""

from __future__ import annotations

from typing import Union

import msgspec
from msgspec import Struct

from dpbus.schemas.codec import Encoding
from dpbus.schemas.errors import ErrorCode
from dpbus.schemas.public import SamplingParams


class Submit(Struct):
    """A validated, tokenized request routed to one group."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool
    reply: str                 # the client's reply subject
    encoding: Encoding         # answers go back in the request's encoding
    accepted_at: float         # unix time when ingest accepted it
    dp_rank: int
    pinned: bool = False       # the client chose dp_rank: never move it to another group
    client: str = ""           # who sent it (client_of(reply)); (client, rid) names the request
    attempt: str = ""          # which admission by ingest (a retry by the client is a new one)
    moved_from: int = 0        # the publisher instance that moves it here (0: from ingest)
    moved_group: int = -1      # ... and its group (whose ledger entry says it moved it here)
    ack: bool = False          # the client asked for an ``accepted`` message
    resend: int = 0            # the client's copy number (the retry rule): a copy is never a new attempt

    @property
    def key(self) -> tuple[str, str]:
        return (self.client, self.rid)


def client_of(reply: str) -> str:
    """Who sent a request, from its reply subject: the inbox prefix ``_INBOX.<user>`` of a
    user with a private inbox (the first two tokens), else the whole reply subject (a
    client without its own prefix is only ever the same client on the same subject).
    Two clients may use the same ``rid``; (client, rid) names a request everywhere."""
    tokens = reply.split(".")
    return ".".join(tokens[:2]) if len(tokens) >= 3 else reply


Key = tuple[str, str]  # (client, rid)


class SubmitAck(Struct, omit_defaults=True):
    accepted: bool
    code: ErrorCode | None = None
    message: str = ""
    waiting: int = 0
    instance: int = 0          # which run of the publisher holds it (changes on a restart)
    duplicate: bool = False    # it held or answered this (client, rid) already: not run again


class GroupAbort(Struct):
    """ingest -> publisher g: cancel ``rid``, honoured only if ``reply`` is the request's own
    reply subject (the proof that the sender owns it)."""

    rid: str
    reply: str


# A decode token equal to this (``DecodeRow.token``, ``DecodeItem.token``) means "the token
# this row sampled last, kept by the workers": a step can be sent before the tokens of
# the step before it are known.
LAST_TOKEN = -1


class RowSampling(Struct, array_like=True):
    temperature: float
    top_p: float
    top_k: int
    seed: int


class PrefillItem(Struct, array_like=True):
    """The runner's input for one prompt chunk (not a wire type: a worker rebuilds it from
    its page tables and a step's ``PrefillChunk``). Write ``token_ids`` at positions
    ``start``.. of the sequence whose KV pages are ``pages`` (all of them, in order); when
    ``sample``, draw the next token after the last one."""

    start: int
    token_ids: list[int]
    sample: bool
    pages: list[int]
    sampling: RowSampling
    row: int = -1              # the step's row it runs in; -1: no row (see ``DecodeItem``)


class DecodeItem(Struct, array_like=True):
    """The runner's input for one decode row (not a wire type, see ``PrefillItem``): feed
    ``token`` at ``position`` of the sequence whose KV pages are ``pages``; ``counter`` =
    tokens generated so far.

    ``row`` is the row the item runs in (a worker's items carry their step's rows); -1
    when the caller has no rows (the runner driven alone, tests). The runner keeps the
    token each row sampled last: an item with a row records its sample there, one with
    row -1 neither records nor reads. ``token`` = ``LAST_TOKEN`` feeds the token kept for
    ``row``, so such an item must have a row."""

    token: int
    position: int
    counter: int
    pages: list[int]
    sampling: RowSampling
    row: int = -1


# ---- steps on the wire -------------------------------------------------------------------
# A step names each running sequence by its *row*: a small number (0 .. max_running_requests
# - 1) the publisher gives the sequence when it joins the batch and takes back when it
# leaves (finished, aborted, preempted), unique among the rows alive in the epoch. Workers
# keep every live row's page table and sampling; a step carries only what changed, so its
# size is O(changes), never O(context). A row is a slot a worker indexes device state by:
# the workers keep the token each row sampled last, which a decode row can feed by naming
# ``LAST_TOKEN`` instead of a token.


class RowStart(Struct, array_like=True):
    """A sequence joins the batch as ``row``: its KV pages so far (a prefix-cache hit and
    its first chunk's pages) and its sampling, fixed for the row's life."""

    row: int
    pages: list[int]
    sampling: RowSampling


class RowPages(Struct, array_like=True):
    """``pages`` appended, in order, to the page table of ``row``."""

    row: int
    pages: list[int]


class PrefillChunk(Struct, array_like=True):
    """Write ``token_ids`` at positions ``start``.. of ``row``; when ``sample``, draw the
    next token after the last one."""

    row: int
    start: int
    token_ids: list[int]
    sample: bool


class DecodeRow(Struct, array_like=True):
    """Feed ``token`` at ``position`` of ``row``; ``counter`` = tokens generated so far.
    ``token`` = ``LAST_TOKEN`` feeds the token the row sampled in its latest step (by a
    prefill chunk that samples or a decode row), kept by the workers; a row that has not
    sampled in this epoch (a row just started, or freed and started again) has none, and
    a step that asks for it is refused."""

    row: int
    token: int
    position: int
    counter: int


class Step(Struct, omit_defaults=True):
    """One scheduling step of a group. ``seq`` counts 1, 2, 3... within an ``epoch``;
    a new epoch (a publisher restart or a reset after a failure) starts again at 1, with
    no rows: the page tables are built by the epoch's steps from its first one, exactly
    as the KV cache is, so a worker that lacks them replays the epoch from step 1 or
    waits for a new epoch.

    A worker applies a step in field order: ``freed`` rows are dropped (they left the
    batch since the previous step; their row numbers may be reused at once), ``started``
    rows are created, ``grown`` rows get their new pages, then the ``prefill`` chunks run
    (in order) and the ``decode`` batch. Fields have defaults so that later ones (e.g. a
    step every group takes part in) can be added without breaking the format."""

    epoch: int
    seq: int
    freed: list[int] = []
    started: list[RowStart] = []
    grown: list[RowPages] = []
    prefill: list[PrefillChunk] = []
    decode: list[DecodeRow] = []


class StepResult(Struct, tag="result", tag_field="type"):
    """Every worker acknowledges every step with the digest of what it sampled; only the
    leader sends the tokens themselves."""

    epoch: int
    seq: int
    node_rank: int
    prefill_tokens: list[int]   # one per prefill item; -1 where it did not sample (leader only)
    decode_tokens: list[int]    # one per decode item (leader only)
    elapsed_ms: float
    digest: str = ""


def token_digest(prefill_tokens: list[int], decode_tokens: list[int]) -> str:
    """A short digest of a step's sampled tokens: equal digests, equal samples."""
    import hashlib

    raw = ",".join(map(str, prefill_tokens)) + "|" + ",".join(map(str, decode_tokens))
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


class Replay(Struct):
    """A worker that missed steps asks the publisher for ``epoch`` steps ``first``..``last``."""

    epoch: int
    first: int
    last: int


class ReplayReply(Struct):
    steps: list[bytes]  # packed steps from ``first`` on, in order, as many as fit; empty when not held


class StepFailure(Struct, tag="failure", tag_field="type"):
    epoch: int
    seq: int
    node_rank: int
    code: ErrorCode
    message: str


StepReply = Union[StepResult, StepFailure]


class Heartbeat(Struct):
    node_rank: int
    dp_rank: int
    attn_tp_rank: int
    ready: bool
    epoch: int
    last_seq: int
    time: float
    stopping: bool = False  # draining after a stop: its silence next is a stop, not a death


class LoadReport(Struct):
    dp_rank: int
    seq: int
    time: float
    ready: bool
    waiting: int
    running: int
    free_slots: int              # running requests it could still admit
    outstanding_tokens: int      # prompt tokens to prefill + tokens still to generate
    free_pages: int = 0          # KV pages free in the group's pool (cached ones no request holds included)
    page_size: int = 0           # positions per KV page (0: no prefix cache)
    cached: bytes = b""          # the prefix cache: PAGE_HASH_BYTES per cached page (see page_hashes)
    starting: bool = False       # never ready yet since the publisher started, its workers loading
    ready_for: float = 0.0       # seconds the group has been ready without a break (0: not ready)


PAGE_HASH_BYTES = 8


def page_hashes(tokens: list[int], page_size: int, known: list[bytes] | None = None,
                pages: int | None = None) -> list[bytes]:
    """Chain hashes of the whole pages of ``tokens``: page i's hash covers every token up to
    the end of page i (it hashes page i's tokens with page i-1's hash), so equal hashes mean
    equal prefixes, and so equal K/V. ``known`` (the first hashes, already computed) is
    extended in place up to ``pages`` pages (default: every whole page) and returned.
    The publisher's prefix cache and the router's ``prefix_affinity`` share this definition."""
    import hashlib
    from array import array

    out = [] if known is None else known
    n = len(tokens) // page_size if pages is None else min(pages, len(tokens) // page_size)
    prev = out[-1] if out else page_size.to_bytes(4, "little")
    for i in range(len(out), n):
        chunk = array("i", tokens[i * page_size:(i + 1) * page_size]).tobytes()
        prev = hashlib.blake2b(prev + chunk, digest_size=PAGE_HASH_BYTES).digest()
        out.append(prev)
    return out


_enc = msgspec.msgpack.Encoder()


def pack(msg: Struct) -> bytes:
    return _enc.encode(msg)


def unpacker(typ):
    """A fast msgpack decoder for one internal message type (or union)."""
    return msgspec.msgpack.Decoder(typ)
