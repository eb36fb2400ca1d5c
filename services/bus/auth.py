"""Who a NATS connection is and how it proves it: users, passwords, nkeys, TLS, the
servers of a URL, and the refusal of known placeholder passwords."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from dpbus.services.natsconf import inbox_prefix, placeholder


class FatalConnectError(ConnectionError):
    """NATS refused us (wrong credentials, TLS): retrying cannot help."""


class PlaceholderPasswordError(FatalConnectError):
    """A known placeholder password (natsconf.PLACEHOLDER_PASSWORDS): dpbus never sends one."""


@dataclass
class NatsAuth:
    """Who a connection is and how it proves it. ``user`` also names its inbox
    (``_INBOX.<user>``), the only one its permissions let it read."""

    user: str = ""
    password: str = field(default="", repr=False)
    nkey_seed: str = ""  # path of a file holding an nkey seed
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def kwargs(self, url: str) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        user = self.user or url_user(url)
        if user:
            kw["inbox_prefix"] = inbox_prefix(user)
        if self.user and self.password:
            kw["user"], kw["password"] = self.user, self.password
        if self.nkey_seed:
            kw["nkeys_seed"] = self.nkey_seed
        if self.tls_ca or self.tls_cert or any(u.startswith("tls://") for u in servers(url)):
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
            kw["tls"] = ctx
        return kw

    def who(self, url: str) -> str:
        return f"user {self.user or url_user(url) or '(none)'} at {redact(url)}"


def servers(url: str) -> list[str]:
    """The servers of ``url``: one URL, or several separated by commas (a NATS cluster;
    tried in the order given)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def url_user(url: str) -> str:
    return unquote(urlsplit(servers(url)[0] if url else "").username or "")


def redact(url: str) -> str:
    """``url`` (or a comma-separated list of them) without passwords, for messages and logs."""
    if "," in url:
        return ",".join(redact(u) for u in servers(url))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{parts.username}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def refuse_placeholder(url: str, auth: NatsAuth) -> None:
    """Raise PlaceholderPasswordError, naming the user, if ``auth`` or a server of ``url``
    carries a known placeholder password: a server that takes it takes it from anyone who
    has read the example it came from. A user named with no password nor nkey is refused
    too (what compose gives a service run without its env file). (No user at all, on an
    open server, is not refused.)"""
    if auth.user and not auth.password and not auth.nkey_seed and not any(urlsplit(u).password for u in servers(url)):
        raise PlaceholderPasswordError(
            f"NATS user {auth.user} at {redact(url)} has no password: `dpbus nats-config --out DIR` writes every "
            "user's (DIR/credentials.json for --nats-credentials; under compose, pass --env-file DIR/compose.env)")
    given = [(auth.user or url_user(url), auth.password)] if auth.password else []
    for u in servers(url):
        parts = urlsplit(u)
        if parts.password:
            given.append((unquote(parts.username or ""), unquote(parts.password)))
    for user, password in given:
        if why := placeholder(password, user):
            raise PlaceholderPasswordError(
                f"NATS user {user or '(none)'} at {redact(url)} has {why}: refusing to connect with it. Give every "
                "user its own secret: `dpbus nats-config --out DIR` writes random ones (DIR/credentials.json, "
                "DIR/compose.env)")


def auth_for(creds: Any, user: str) -> NatsAuth:
    """How ``user`` of a ``natsconf.Credentials`` connects (password or nkey seed)."""
    name, password = creds.user(user)
    return NatsAuth(name, password, creds.nkey_seeds.get(name, ""), creds.tls_ca)


def auth_from(settings: Any, default_user: str = "") -> NatsAuth:
    """The NatsAuth of a service's settings: explicit user/password, else the role's entry
    in ``nats_credentials`` (a file from `dpbus nats-config` / `dpbus up`)."""
    if settings.nats_credentials and not settings.nats_password and not settings.nats_nkey_seed:
        from dpbus.services.natsconf import Credentials

        auth = auth_for(Credentials.load(settings.nats_credentials), settings.nats_user or default_user)
        auth.tls_ca = settings.tls_ca or auth.tls_ca
        auth.tls_cert, auth.tls_key = settings.tls_cert, settings.tls_key
        return auth
    return NatsAuth(settings.nats_user, settings.nats_password, settings.nats_nkey_seed, settings.tls_ca,
                    settings.tls_cert, settings.tls_key)


def answer_auth(settings: Any, main: NatsAuth) -> NatsAuth | None:
    """How a service connects to answer clients (``answer_nats_user``), when it does so
    apart from its main connection: given a password, or found in ``nats_credentials``.
    None on an open server (one connection does everything); a secured service without
    it is refused at start-up (its main user may not publish to client inboxes)."""
    user = settings.answer_nats_user
    if settings.answer_nats_password:
        return NatsAuth(user, settings.answer_nats_password, "", main.tls_ca, main.tls_cert, main.tls_key)
    if settings.nats_credentials:
        from dpbus.services.natsconf import Credentials

        creds = Credentials.load(settings.nats_credentials)
        if user in creds.passwords or user in creds.nkey_seeds:
            auth = auth_for(creds, user)
            auth.tls_ca, auth.tls_cert, auth.tls_key = main.tls_ca or auth.tls_ca, main.tls_cert, main.tls_key
            return auth
    if main.user or main.nkey_seed:
        raise FatalConnectError(
            f"{main.user or 'this service'} answers clients over a connection of its own as NATS user {user}, and "
            f"has no credentials for it: give --answer-nats-password (DPBUS_ANSWER_NATS_PASSWORD) or "
            "--nats-credentials with that user (`dpbus nats-config` writes it)")
    return None


