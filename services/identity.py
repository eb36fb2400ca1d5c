"""Who sent a request, as the NATS server vouches for it, and where its answers may go.

On a secured deployment (``services/natsconf.py``) user ``u`` may publish requests only on
its own subjects ``<prefix>.generate.u`` and ``<prefix>.abort.u`` (and the default client,
``client``, on the plain ``<prefix>.generate`` and ``<prefix>.abort`` too), and may read
only its own inbox ``_INBOX.u.>``. So the subject a request arrived on names its sender,
and the only reply subjects worth answering are inside that sender's inbox: anything else
is a request to write somewhere the sender could not (another client's inbox, the request
ledger, a step subject). Such a request gets no answer anywhere; ingest counts it.

On an open server (no users) nobody is vouched for: a reply must still be inside
``_INBOX.``, and the inbox prefix it carries names the client, as before.

Rules only, no I/O: ingest runs them on every request and abort, publishers again on
every request handed to them.
"""

from __future__ import annotations

import re

from dpbus.schemas.internal import client_of
from dpbus.services.natsconf import INBOX_ROOT, NAME

# a reply subject dpbus will publish to: _INBOX.<token>(.<token>)*, plain tokens only
# (no wildcards, no empty tokens, no spaces or control characters)
_TOKEN = r"[A-Za-z0-9_\-]+"
REPLY = re.compile(rf"^{INBOX_ROOT}\.{_TOKEN}(\.{_TOKEN})*$")
MAX_REPLY = 512


def is_client_inbox(subject: str) -> bool:
    """Is ``subject`` one a service may answer at all: some client's inbox, plain tokens only?"""
    return len(subject) <= MAX_REPLY and bool(REPLY.match(subject))


class ForeignReply(ValueError):
    """The reply subject is not one the sender may read: answering it would let the
    sender write where it could not."""


def sender_of(subject: str, base: str) -> str | None:
    """The user named by a per-user subject (``dpbus.generate.alice`` -> ``alice``),
    ``""`` for the plain subject ``base`` itself, None for anything else."""
    if subject == base:
        return ""
    head, _, user = subject.rpartition(".")
    return user if head == base and NAME.match(user) else None


def inbox_of(user: str) -> str:
    return f"{INBOX_ROOT}.{user}"


def client_key(subject: str, base: str, reply: str, *, secured: bool, default_client: str) -> str:
    """The name of the client that sent a message on ``subject`` with ``reply``, which is
    also the inbox its answers go to (``_INBOX.alice``); raises ForeignReply when
    ``reply`` lies outside what that client may read.

    ``base``: the plain subject (``dpbus.generate``); ``secured``: the server checks who
    publishes (only ``default_client`` may publish on ``base``)."""
    if not is_client_inbox(reply):
        raise ForeignReply(f"reply subject {reply[:80]!r} is not a client inbox ({INBOX_ROOT}.<user>.<...>)")
    user = sender_of(subject, base)
    if user is None:
        raise ForeignReply(f"{subject!r} is not a request subject")
    if not user and secured:
        user = default_client
    if user:
        own = inbox_of(user)
        if not reply.startswith(own + "."):
            raise ForeignReply(f"reply subject {reply[:80]!r} is outside the sender's inbox {own}.>")
        return own
    return client_of(reply)  # an open server: the reply names the client, as far as anyone can tell


def answerable(reply: str, client: str) -> bool:
    """May a service send an answer for ``client`` (a ``client_key``) to ``reply``?
    The check a publisher makes again on every request handed to it."""
    return is_client_inbox(reply) and (reply == client or reply.startswith(client + "."))
