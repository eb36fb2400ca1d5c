"""The typed errors of the services. Each carries the ErrorCode it becomes on the wire."""

from __future__ import annotations

from dpbus.schemas.errors import ErrorCode


class DpbusError(Exception):
    code = ErrorCode.INTERNAL

    def __init__(self, code: ErrorCode | None, message: str) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class Rejected(DpbusError):
    """Ingest refuses a request (answered with an ``error`` at once, naming the request's
    ``rid`` when it gave one)."""

    rid: str | None = None


class GroupFailure(DpbusError):
    """A DP group cannot go on with its running requests; it resets into a new epoch."""


class SendDataError(DpbusError):
    """A message could not be handed to NATS after bounded retries."""

    code = ErrorCode.UNAVAILABLE


class ReceiveDataError(DpbusError):
    """An expected message or reply did not arrive after bounded retries."""

    code = ErrorCode.UNAVAILABLE
