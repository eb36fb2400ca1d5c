"""The publisher's side of each request, without I/O: where its answers go and how
(``Delivery``: reply subject, encoding, the text decoded so far and what is not streamed
yet), its standing in the request ledger (the entry's revision, the instance that holds
it, whether its terminal answer was won, given up or lost with a connection), and the
decisions of the answer protocol. The scheduler knows none of this: a ``Sequence``
carries its ``Delivery`` for the publisher (``seq.delivery``).

The answer protocol (the publisher service does the I/O; the protocol simulation,
``tests/sim/world.py``, calls the same functions on virtual time):

* a request's answers go out only while ``may_answer``: it won its terminal answer, or
  this instance holds it under a valid lease and has not given it up;
* a request that may not be answered from here is given up (``give_up``); the first one
  of an instance whose lease lapsed (or ``force``: the ledger stayed out of reach) gives
  up every request of the instance;
* the terminal answer goes first and its settling write right behind it (a request
  this group moved to another is not answered here: its entry says ``moved``, and it
  comes back only when the other group refused it, held here again at a new revision);
* the settling write is retried while ``settle_guard`` holds: always for an answer sent
  already, else while the request may be answered;
* ``settle_terminal`` makes the settling write, ``resolve_terminal`` follows one whose
  outcome is unknown to its end (the publisher off its step path);
  ``after_settle``/``after_resolve`` say what a settling write's outcome leads to; a won
  answer (``won``) is sent (again) when it did not go first or was withdrawn (lost with a
  connection while this instance could no longer answer: ``may_resend``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dpbus.schemas import Chunk, FinishReason
from dpbus.schemas.codec import Encoding
from dpbus.services import ownership
from dpbus.services.publisher.stops import StopMatcher
from dpbus.services.tokenizer import ByteStream, StreamDecoder


@dataclass(eq=False)
class Delivery:
    reply: str  # the client's inbox for this request
    encoding: Encoding
    stream: bool  # chunks as tokens come, or the whole text in the terminal answer
    stops: list[str] = field(default_factory=list)  # the request's stop strings
    detok: StreamDecoder = field(default_factory=ByteStream)
    pinned: bool = False  # it may not move to another group
    attempt: str = ""  # the admission it came from (see services/ledger.py)
    ack: bool = False  # the client asked for an ``accepted`` message
    ledger_rev: int = 0  # the revision of its ledger entry held by this publisher
    owner: int = 0  # the publisher instance that claimed it (see services/ledger.py)
    abandoned: bool = False  # its publisher lost the lease: someone else answers it
    settled: bool = False  # its publisher won its terminal answer in the ledger
    withdrawn: bool = False  # its terminal answer, sent before it was settled, was lost with a connection
    unsent: list[int] = field(default_factory=list)  # sampled, not streamed yet (see stream_interval)
    unsent_text: str = ""  # their text
    chunks: int = 0  # chunks streamed so far: the next one's index
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.stop_strings = StopMatcher(self.stops)
        self.text_parts: list[str] = []  # the answer's text so far, when it is not streamed

    def stamp(self, now: float) -> float | None:
        """A token came at ``now``: the time since the one before, if there was one."""
        gap = now - self.last_token_at if self.first_token_at and self.last_token_at else None
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        return gap

    def take(self, token: int, reason: FinishReason | None) -> FinishReason | None:
        """Decode a sampled token (``reason``: how it ends the request, if it does) into
        the text to stream or to answer; how the request ends now: a stop string that
        completes here ends it too (its text is not sent)."""
        text, hit = self.stop_strings.feed(self.detok.feed([token], final=reason is not None))
        if hit and reason is None:
            reason = FinishReason.STOP
        elif reason is not None and not hit:
            text += self.stop_strings.flush()  # held as a possible stop string: it was not one
        if self.stream:
            self.unsent.append(token)
            self.unsent_text += text
        else:
            self.text_parts.append(text)
        return reason

    def chunk_due(self, stream_interval: int, ended: bool) -> bool:
        return self.stream and (len(self.unsent) >= stream_interval or ended)

    def next_chunk(self, rid: str) -> Chunk | None:
        """The tokens sampled since the last chunk, as the next one (None if there are none)."""
        if not self.unsent:
            return None
        chunk = Chunk(rid, self.chunks, self.unsent, self.unsent_text)
        self.chunks += 1
        self.unsent, self.unsent_text = [], ""
        return chunk


# what comes after a settling write (``after_settle``) or a write in doubt (``after_resolve``)
SEND, DONE, TAKEN, RESOLVE, AGAIN, GIVE_UP = "send", "done", "taken", "resolve", "again", "give up"
GIVE_UP_ALL = "give up all"  # the ledger stayed out of reach while settling: give up every request


def may_answer(d: Delivery, instance: int, lease_valid: bool) -> bool:
    return ownership.may_answer(d.settled, d.abandoned, d.owner, instance, lease_valid)


def give_up(d: Delivery, instance: int, lease_valid: bool, force: bool = False) -> bool:
    """``d`` may not be answered from here: mark it given up. True when the instance must
    give up every request it holds (once: the first of its requests to find out)."""
    everything = not d.abandoned and d.owner == instance and (force or not lease_valid)
    d.abandoned = True
    return everything


def settle_guard(sent: bool, may: Callable[[], bool]) -> Callable[[], bool]:
    """While a settling write is tried: an answer sent already is settled whatever the
    lease says meanwhile (winning late still keeps ingest from answering too)."""
    return (lambda: True) if sent else may


def after_settle(d: Delivery, how: str, sent: bool) -> str:
    """What a settling write that ended ``how`` (``ownership.settle``) leads to."""
    if how == ownership.WON:
        return won(d, sent)
    if how == ownership.TAKEN:
        return TAKEN
    return RESOLVE if how == ownership.UNKNOWN else GIVE_UP


def after_resolve(d: Delivery, ours: bool, sent: bool, may: bool) -> str:
    """A settling write in doubt was resolved: ``ours`` if it landed; ``may``: the request
    may still be answered. Then none of our writes landed and nobody else answers it
    (ingest answers only for a dead holder): settle again."""
    if ours:
        return won(d, sent)
    return AGAIN if may else GIVE_UP


async def settle_terminal(ledger, key: str, done, d: Delivery, sent: bool, may: Callable[[], bool], sleep) -> str:
    """One settling write of a terminal answer (``ownership.settle``, from the held
    revision to ``done``) and what it leads to: ``SEND``, ``DONE``, ``TAKEN``, ``RESOLVE``
    (its outcome is unknown: ``resolve_terminal``) or ``GIVE_UP_ALL``. ``may``: the request
    may still be answered from here. The publisher and the simulation both run it."""
    how = await ownership.settle(ledger, key, done, d.ledger_rev, settle_guard(sent, may), sleep)
    then = after_settle(d, how, sent)
    return GIVE_UP_ALL if then == GIVE_UP else then


async def resolve_terminal(ledger, key: str, done, d: Delivery, sent: bool, may: Callable[[], bool], sleep,
                           again: Callable[[], None] = lambda: None) -> str:
    """A settling write in doubt, to its end: read it back (``ownership.resolve``); while
    it did not land and the request may still be answered, settle again (``again`` is
    told). ``SEND``, ``DONE``, ``TAKEN``, ``GIVE_UP`` (ours no longer) or ``GIVE_UP_ALL``."""
    while True:
        then = after_resolve(d, await ownership.resolve(ledger, key, done, sleep), sent, may())
        if then != AGAIN:
            return then
        again()
        then = await settle_terminal(ledger, key, done, d, sent, may, sleep)
        if then != RESOLVE:
            return then


def won(d: Delivery, sent: bool) -> str:
    """The terminal answer is ours: send it now unless it went first and stayed out."""
    d.settled = True
    return SEND if not sent or d.withdrawn else DONE


def may_resend(d: Delivery, may: bool) -> bool:
    """May the outbox send a terminal answer lost with a connection again? Not when this
    instance may no longer answer: the answer is withdrawn, and sent once more if the
    settling write proves ours after all (``won``)."""
    if not may:
        d.withdrawn = True
    return may
