"""The handler's context: grpc.aio.ServicerContext, and grpc.ServicerContext
for plain ``def`` handlers run in the executor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from opf import _metadata, _status, _wire
from opf._status import CallError

if TYPE_CHECKING:
    from opf._stream import HandlerStream

_DETAILS_KEY = "grpc-status-details-bin"


class Context(grpc.aio.ServicerContext[Any, Any]):
    """What an ``async def`` handler gets as its context.

    It behaves as grpc.aio's: see the README's table. Created by the SDK.
    """

    def __init__(
        self,
        stream: HandlerStream,
        *,
        request_streaming: bool,
        response_streaming: bool,
        deserializer: Callable[[bytes], Any] | None,
        serializer: Callable[[Any], bytes] | None,
    ) -> None:
        self._stream = stream
        self._request_streaming = request_streaming
        self._response_streaming = response_streaming
        self._deserializer = deserializer
        self._serializer = serializer
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._status_details: list[Any] | None = None  # google.protobuf.Any
        self._trailing: Any = None
        self._pending_headers: _wire.Encoded | None = None
        self._aborted = False
        self._done = False

    # --- messages ---------------------------------------------------------

    async def read(self) -> Any:
        if not self._request_streaming:
            raise grpc.aio.UsageError("read() is for handlers of client-streaming methods")
        data = await self._stream.recv()
        if data is None:
            return grpc.aio.EOF
        return self.deserialize(data)

    def deserialize(self, data: bytes) -> Any:
        if self._deserializer is None:
            return data
        try:
            return self._deserializer(data)
        except Exception as e:
            raise CallError(
                _status.new(
                    _status.INTERNAL, f"grpc: failed to unmarshal the received message: {e}"
                )
            ) from e

    def serialize(self, message: Any) -> bytes:
        if self._serializer is None:
            if isinstance(message, bytes):
                return message
            raise CallError(_status.new(_status.INTERNAL, "the response is not bytes"))
        try:
            return self._serializer(message)
        except Exception as e:
            raise CallError(
                _status.new(_status.INTERNAL, f"failed to serialize the response: {e!r}")
            ) from e

    async def write(self, message: Any) -> None:
        if not self._response_streaming:
            raise grpc.aio.UsageError("write() is for handlers of server-streaming methods")
        await self.send(self.serialize(message))

    async def send(self, data: bytes) -> None:
        """Sends one serialized response message, after any pending headers."""
        s = self._stream
        prefix, self._pending_headers = self._pending_headers, None
        s.headers_sent = True
        await s.send_message(data, prefix)

    # --- metadata ---------------------------------------------------------

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._stream.check_send()
        if self._stream.headers_sent or self._pending_headers is not None:
            raise grpc.aio.UsageError("the initial metadata was sent already")
        try:
            grouped = _metadata.encode(initial_metadata)
        except _metadata.MetadataError as e:
            st = _status.new(_status.INTERNAL, f"invalid response headers: {e}")
            self._stream.abort(st)
            raise CallError(st) from e
        if not grouped:
            self._stream.headers_sent = True
            return
        frame = _wire.headers(self._stream.id, grouped)
        if len(frame) > self._stream.tunnel.peer_max_batch:
            st = _status.new(_status.RESOURCE_EXHAUSTED, "response headers too large for a batch")
            self._stream.abort(st)
            raise CallError(st)
        if self._response_streaming:
            self._stream.headers_sent = True
            self._stream.tunnel.writer.enqueue(self._stream, frame)
        else:
            # A unary response's headers leave with it, in one batch (10.2).
            self._pending_headers = frame

    def take_pending_headers(self) -> _wire.Encoded | None:
        h, self._pending_headers = self._pending_headers, None
        return h

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = trailing_metadata

    def trailing_metadata(self) -> Any:
        return self._trailing if self._trailing is not None else ()

    # grpc.aio hands handlers a tuple of (key, value) pairs, as here; its
    # stubs say Metadata.
    def invocation_metadata(self) -> tuple[_metadata.Metadatum, ...]:  # type: ignore[override]
        return self._stream.metadata

    # --- status -----------------------------------------------------------

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Any = (),
    ) -> NoReturn:
        self._abort(code, details, trailing_metadata)

    def _abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> NoReturn:
        if self._aborted:
            raise grpc.aio.UsageError("abort() was called already")
        self._aborted = True
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN  # as grpc does: abort must not end with OK
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = trailing_metadata
        raise grpc.aio.AbortError(f"aborted with {code.name}")

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self._abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code if self._code is not None else grpc.StatusCode.OK

    def details(self) -> str:
        return self._details or ""

    def final_status(self) -> tuple[status_pb2.Status, list[tuple[str, list[bytes]]]]:
        """The StreamClose status and trailers for a handler that returned.

        A "grpc-status-details-bin" trailer (what grpcio-status's to_status
        puts there) becomes the status's details, carried whole (10.1).
        """
        st = _status.new(self.code(), self.details())
        trailers: list[tuple[str, list[bytes]]] = []
        if self._trailing:
            rest = []
            try:
                for key, value in self._trailing:
                    if isinstance(key, str) and key.lower() == _DETAILS_KEY:
                        detailed = status_pb2.Status.FromString(
                            value if isinstance(value, bytes) else str(value).encode()
                        )
                        st.details.extend(detailed.details)
                    else:
                        rest.append((key, value))
                trailers = _metadata.encode(rest)
            except (ValueError, TypeError, DecodeError) as e:
                # A sender fails the call rather than send bad metadata (9.1).
                raise CallError(
                    _status.new(_status.INTERNAL, f"invalid response trailers: {e}")
                ) from e
        return st, trailers

    # --- the call ---------------------------------------------------------

    def time_remaining(self) -> float | None:  # type: ignore[override]
        d = self._stream.deadline
        if d is None:
            return None
        return max(d - self._stream.tunnel.loop.time(), 0.0)

    def cancelled(self) -> bool:
        return self._stream.cancel_status is not None

    def done(self) -> bool:
        return self._done or self._stream.cancel_status is not None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self.done():
            self._stream.tunnel.loop.call_soon(callback, self)
            return
        self._stream.add_done_callback(lambda: callback(self))

    def mark_done(self) -> None:
        self._done = True

    def peer(self) -> str:
        return self._stream.tunnel.address.grpc_target

    def peer_identities(self) -> Iterable[bytes] | None:
        return None

    def peer_identity_key(self) -> str | None:
        return None

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return {}

    def set_compression(self, compression: grpc.Compression) -> None:
        """The tunnel carries messages uncompressed (spec 7.1): no effect."""

    def disable_next_message_compression(self) -> None:
        """The tunnel carries messages uncompressed (spec 7.1): no effect."""

    @property
    def method(self) -> str:
        """The full method name of the call, "/package.Service/Method"."""
        return self._stream.method


class SyncContext(grpc.ServicerContext):
    """What a plain ``def`` handler gets: grpc.ServicerContext over Context.

    Its methods may be called from the handler's thread; those that touch
    the tunnel run on the event loop.
    """

    def __init__(self, ctx: Context, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def invocation_metadata(self) -> tuple[_metadata.Metadatum, ...]:
        return self._ctx.invocation_metadata()

    def peer(self) -> str:
        return self._ctx.peer()

    def peer_identities(self) -> Iterable[bytes] | None:
        return None

    def peer_identity_key(self) -> str | None:
        return None

    def auth_context(self) -> Mapping[str, bytes]:
        return {}

    def set_compression(self, compression: grpc.Compression) -> None:
        """No effect: the tunnel does not compress."""

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._on_loop(self._ctx.send_initial_metadata(initial_metadata))

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._ctx.set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._ctx.trailing_metadata()

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self._ctx._abort(code, details, ())

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self._ctx._abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._ctx.set_code(code)

    def set_details(self, details: str) -> None:
        self._ctx.set_details(details)

    def code(self) -> grpc.StatusCode:
        return self._ctx.code()

    def details(self) -> str:
        return self._ctx.details()

    def disable_next_message_compression(self) -> None:
        """No effect: the tunnel does not compress."""

    def is_active(self) -> bool:
        return not self._ctx.done()

    # None without a deadline, as grpc's; its stubs say float.
    def time_remaining(self) -> float | None:  # type: ignore[override]
        return self._ctx.time_remaining()

    def cancel(self) -> bool:
        """Ends the call with CANCELLED, as a grpc server's cancel does."""
        s = self._ctx._stream

        def do() -> None:
            s.abort(_status.new(_status.CANCELLED, "cancelled by the handler"))

        self._loop.call_soon_threadsafe(do)
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._ctx.done():
            return False
        self._loop.call_soon_threadsafe(self._ctx.add_done_callback, lambda _ctx: callback())
        return True

    def cancelled(self) -> bool:
        return self._ctx.cancelled()
