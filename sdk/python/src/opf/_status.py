"""Statuses: google.rpc.Status on the wire, grpc.StatusCode for users."""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
FAILED_PRECONDITION = 9
RESOURCE_EXHAUSTED = 8
PERMISSION_DENIED = 7
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16


def code_of(n: int) -> grpc.StatusCode:
    """The StatusCode for a wire code; codes outside 0-16 are UNKNOWN (10.1)."""
    return _BY_NUMBER.get(n, grpc.StatusCode.UNKNOWN)


def number_of(code: grpc.StatusCode | int) -> int:
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    return int(code)


def new(code: grpc.StatusCode | int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=number_of(code), message=message)


def received(p: status_pb2.Status | None, default: int) -> status_pb2.Status:
    """A status as received: unset means default, unknown codes UNKNOWN."""
    if p is None:
        return new(default)
    if not 0 <= p.code <= 16:
        out = status_pb2.Status()
        out.CopyFrom(p)
        out.code = UNKNOWN
        return out
    return p


def describe(st: status_pb2.Status) -> str:
    """CODE "message", as the spec writes statuses."""
    name = code_of(st.code).name
    return f"{name} {st.message!r}" if st.message else name


class CallError(grpc.RpcError):
    """A read or write on a call that failed, or a call that has ended.

    Raised to handlers that keep reading or writing after the operator
    cancelled the call, its deadline passed, the tunnel closed, or the
    plugin aborted the stream. code() and details() tell why.
    """

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(describe(status))
        self._status = status

    def code(self) -> grpc.StatusCode:
        return code_of(self._status.code)

    def details(self) -> str:
        return str(self._status.message)

    @property
    def status(self) -> status_pb2.Status:
        return self._status
