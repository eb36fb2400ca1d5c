"""The rules that say who sent a request and where its answers may go (services/identity.py)."""

from __future__ import annotations

import pytest

from dpbus.services.identity import ForeignReply, answerable, client_key, sender_of


def key(subject: str, reply: str, secured: bool = True) -> str:
    return client_key(subject, "dpbus.generate", reply, secured=secured, default_client="client")


def test_the_subject_names_the_sender_and_the_reply_must_be_in_its_inbox():
    assert key("dpbus.generate.alice", "_INBOX.alice.x1") == "_INBOX.alice"
    assert key("dpbus.generate.alice", "_INBOX.alice.a.b.c") == "_INBOX.alice"
    assert key("dpbus.generate", "_INBOX.client.abc") == "_INBOX.client"  # the default client's plain subject
    assert sender_of("dpbus.generate.alice", "dpbus.generate") == "alice"
    assert sender_of("dpbus.generate", "dpbus.generate") == ""
    assert sender_of("dpbus.generate.a.b", "dpbus.generate") is None
    assert sender_of("dpbus.generatex", "dpbus.generate") is None


@pytest.mark.parametrize("subject, reply", [
    ("dpbus.generate.alice", "_INBOX.bob.x"),          # another client's inbox
    ("dpbus.generate.alice", "_INBOX.alicex.y"),       # a longer name is another client
    ("dpbus.generate.alice", "_INBOX.alice"),          # the inbox root itself
    ("dpbus.generate.alice", "$KV.dpbus_requests.r.x"),  # the request ledger
    ("dpbus.generate.alice", "dpbus.dp.0.step"),
    ("dpbus.generate.alice", "_INBOX.alice.*"),        # wildcards
    ("dpbus.generate.alice", "_INBOX.alice.>"),
    ("dpbus.generate.alice", "_INBOX.alice..x"),       # an empty token
    ("dpbus.generate.alice", "_INBOX.alice.x y"),
    ("dpbus.generate.alice", "_INBOX.alice." + "x" * 600),  # too long
    ("dpbus.generate", "_INBOX.alice.x"),              # secured: the plain subject is the default client's
    ("dpbus.generate.a.b", "_INBOX.a.x"),              # not a request subject
])
def test_every_reply_outside_the_sender_s_inbox_is_refused(subject, reply):
    with pytest.raises(ForeignReply):
        key(subject, reply)


def test_on_an_open_server_only_client_inboxes_are_answered():
    assert key("dpbus.generate", "_INBOX.Zx81", secured=False) == "_INBOX.Zx81"
    assert key("dpbus.generate", "_INBOX.Zx81.7", secured=False) == "_INBOX.Zx81"
    for reply in ("$KV.dpbus_requests.r.x", "dpbus.dp.0.step", "reply", "_INBOX.>"):
        with pytest.raises(ForeignReply):
            key("dpbus.generate", reply, secured=False)


def test_a_publisher_answers_only_inside_the_client_s_inbox():
    assert answerable("_INBOX.alice.x", "_INBOX.alice")
    assert answerable("_INBOX.Zx81", "_INBOX.Zx81")  # an open server's client without a prefix
    assert not answerable("_INBOX.bob.x", "_INBOX.alice")
    assert not answerable("$KV.dpbus_requests.r.x", "$KV.dpbus_requests")
    assert not answerable("_INBOX.alicex.y", "_INBOX.alice")
