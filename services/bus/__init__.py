"""The NATS side every service and client shares, by concern:

- ``auth``: who a connection is (``NatsAuth``), credentials, placeholder refusal;
- ``connection``: ``connect`` (services), ``connect_client`` (CLI), ``close``, a
  connection's own request subjects;
- ``messaging``: ``publish``, ``subscribe``, ``request`` with dpbus's limits and retries;
- ``outbox``: ``ClientOutbox``, answers to clients that survive outages;
- ``replies``: ``Replies``, many request/reply exchanges over one subscription.

The names callers use are taken from here (``from dpbus.services import bus; bus.connect``)."""

from dpbus.services.bus.auth import (FatalConnectError, NatsAuth, PlaceholderPasswordError, answer_auth, auth_for,
                                     auth_from, redact, refuse_placeholder, servers)
from dpbus.services.bus.connection import close, connect, connect_client, reply_subject, request_subjects
from dpbus.services.bus.messaging import at_server, publish, request, service_stats, subscribe
from dpbus.services.bus.outbox import ClientOutbox
from dpbus.services.bus.replies import Replies

__all__ = ["at_server", "ClientOutbox", "FatalConnectError", "NatsAuth", "PlaceholderPasswordError", "Replies", "answer_auth",
           "auth_for", "auth_from", "close", "connect", "connect_client", "publish", "redact", "refuse_placeholder",
           "reply_subject", "request", "request_subjects", "servers", "service_stats", "subscribe"]
