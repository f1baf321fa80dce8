"""Method handlers, as generated code registers them, and their invocation.

``add_XServicer_to_server(servicer, plugin)`` hands the plugin
grpc.RpcMethodHandler objects; each call the operator opens runs one, with
the handler's own request_deserializer and response_serializer, as grpc.aio
would: ``async def`` handlers and async generators on the event loop,
plain ``def`` handlers and generators in the executor.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.rpc import status_pb2

from opf import _status, _wire
from opf._context import Context, SyncContext
from opf._status import CallError
from opf._stream import CLOSED

if TYPE_CHECKING:
    from opf._metadata import Metadatum
    from opf._stream import HandlerStream
    from opf._tunnel import Tunnel

log = logging.getLogger(__name__)


class _CallDetails(NamedTuple):
    """grpc.HandlerCallDetails for generic handlers."""

    method: str
    invocation_metadata: tuple[Metadatum, ...]


def is_async(fn: Any) -> bool:
    """Whether a behaviour must be awaited (or iterated) on the event loop."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = inspect.unwrap(fn)
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects
    return (
        call is not None
        and not inspect.isfunction(fn)
        and not inspect.ismethod(fn)
        and (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))
    )


def _panic(e: BaseException) -> status_pb2.Status:
    # spec 10.2: as a grpc.aio server answers a servicer's uncaught exception.
    return _status.new(_status.UNKNOWN, f"Unexpected {type(e)}: {e}")


_END = object()


class Handlers:
    """The services a plugin serves, and the calls that run them."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []
        self.services: list[str] = []
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        self.executor: Executor | None = None

    def add_service_name(self, name: str) -> None:
        if name not in self.services:
            self.services.append(name)

    def lookup(
        self, method: str, md: tuple[Metadatum, ...]
    ) -> grpc.RpcMethodHandler[Any, Any] | status_pb2.Status:
        h = self.methods.get(method)
        if h is not None:
            return h
        if self.generic:
            details = _CallDetails(method, md)
            for g in self.generic:
                try:
                    found = g.service(details)  # type: ignore[arg-type]
                except Exception as e:
                    log.exception("generic handler %r failed on %s", g, method)
                    return _panic(e)
                if found is not None:
                    return found
        service, _, name = method[1:].rpartition("/")
        if service in self.services:
            return _status.new(
                _status.UNIMPLEMENTED, f"unknown method {name} for service {service}"
            )
        return _status.new(_status.UNIMPLEMENTED, f"unknown service {service}")

    def start(self, tunnel: Tunnel, s: HandlerStream) -> None:
        """Starts the handler of a stream just opened."""
        if self.interceptors:
            task = tunnel.loop.create_task(self._intercepted(tunnel, s))
        else:
            h = self.lookup(s.method, s.metadata)
            if isinstance(h, status_pb2.Status):
                s.finish([_wire.close(s.id, h)])
                return
            task = tunnel.loop.create_task(self._run(tunnel, s, h))
        tunnel.tasks.add(task)
        task.add_done_callback(tunnel.tasks.discard)

    async def _intercepted(self, tunnel: Tunnel, s: HandlerStream) -> None:
        """Looks the handler up through the interceptors, as grpc.aio does:
        each gets a continuation to the next, the last one the lookup."""
        missing: list[status_pb2.Status] = []

        async def lookup(details: Any) -> grpc.RpcMethodHandler[Any, Any] | None:
            h = self.lookup(details.method, s.metadata)
            if isinstance(h, status_pb2.Status):
                missing.append(h)
                return None
            return h

        continuation: Callable[[Any], Any] = lookup
        for icpt in reversed(self.interceptors):
            continuation = functools.partial(icpt.intercept_service, continuation)
        try:
            h = await continuation(_CallDetails(s.method, s.metadata))
        except Exception as e:
            log.exception("server interceptor failed on %s", s.method)
            s.finish([_wire.close(s.id, _panic(e))])
            return
        if h is None:
            st = missing[0] if missing else _status.new(_status.UNIMPLEMENTED, "")
            s.finish([_wire.close(s.id, st)])
            return
        await self._run(tunnel, s, h)

    async def _run(
        self, tunnel: Tunnel, s: HandlerStream, h: grpc.RpcMethodHandler[Any, Any]
    ) -> None:
        ctx = Context(
            s,
            request_streaming=h.request_streaming,
            response_streaming=h.response_streaming,
            deserializer=h.request_deserializer,
            serializer=h.response_serializer,
        )
        if h.request_streaming:
            fn = h.stream_stream if h.response_streaming else h.stream_unary
        else:
            fn = h.unary_stream if h.response_streaming else h.unary_unary
        run_async = is_async(fn)
        if run_async:
            task = asyncio.current_task()
            if task is not None:
                s.on_cancel_context = task.cancel
        st: status_pb2.Status
        trailers: list[tuple[str, list[bytes]]] = []
        response: bytes | None = None
        try:
            if fn is None:
                raise CallError(_status.new(_status.UNIMPLEMENTED, f"no behaviour for {s.method}"))
            if h.request_streaming:
                request: Any = None
            else:
                data = await s.recv()
                if data is None:
                    raise CallError(
                        _status.new(_status.INTERNAL, "unary call without a request message")
                    )
                request = ctx.deserialize(data)
            if not h.response_streaming:
                result = await (
                    self._call_async(fn, request, ctx)
                    if run_async
                    else self._call_sync(tunnel, fn, request, ctx)
                )
                st, trailers = ctx.final_status()
                if st.code == _status.OK:
                    response = ctx.serialize(result)
            else:
                if run_async:
                    await self._stream_async(fn, request, ctx)
                else:
                    await self._stream_sync(tunnel, fn, request, ctx)
                st, trailers = ctx.final_status()
        except grpc.aio.AbortError:
            try:
                st, trailers = ctx.final_status()
            except CallError as e:
                st = e.status
        except CallError as e:
            st = e.status
        except asyncio.CancelledError:
            if s.cancel_status is None:
                ctx.mark_done()
                raise  # not ours: the loop is shutting down
            st = s.cancel_status
        except Exception as e:
            if s.cancel_status is not None:
                st = s.cancel_status
            else:
                log.exception("handler of %s raised", s.method)
                st = _panic(e)
        ctx.mark_done()
        if s.state == CLOSED:  # aborted, or the tunnel closed
            return
        try:
            if response is not None:
                await s.send_message(response, ctx.take_pending_headers())
            await s.flush()  # the close follows every message (3.2)
            frames: list[_wire.Encoded] = []
            h_frame = ctx.take_pending_headers()
            if h_frame is not None:
                frames.append(h_frame)
            close = _wire.close(s.id, st, trailers)
            if len(close) > tunnel.peer_max_batch:
                close = _wire.close(
                    s.id, _status.new(_status.RESOURCE_EXHAUSTED, "trailers too large for a batch")
                )
            frames.append(close)
        except CallError as e:
            frames = [_wire.close(s.id, e.status)]
        except asyncio.CancelledError:
            if s.cancel_status is None:
                raise
            frames = [_wire.close(s.id, s.cancel_status)]
        s.finish(frames)

    # --- kinds ------------------------------------------------------------

    async def _call_async(self, fn: Callable[..., Any], request: Any, ctx: Context) -> Any:
        if request is None:
            return await fn(_Requests(ctx), ctx)
        return await fn(request, ctx)

    def _in_executor(
        self, tunnel: Tunnel, fn: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        cv = contextvars.copy_context()
        return tunnel.loop.run_in_executor(self.executor, functools.partial(cv.run, fn, *args))

    async def _call_sync(
        self, tunnel: Tunnel, fn: Callable[..., Any], request: Any, ctx: Context
    ) -> Any:
        sctx = SyncContext(ctx, tunnel.loop)
        arg = _SyncRequests(ctx, tunnel.loop) if request is None else request
        return await self._in_executor(tunnel, fn, arg, sctx)

    async def _stream_async(self, fn: Callable[..., Any], request: Any, ctx: Context) -> None:
        arg = _Requests(ctx) if request is None else request
        result = fn(arg, ctx)
        if inspect.isasyncgen(result):
            agen: AsyncIterator[Any] = result
            try:
                async for r in agen:
                    await ctx.send(ctx.serialize(r))
            finally:
                await result.aclose()
            return
        if inspect.isawaitable(result):
            result = await result
        if result is not None and hasattr(result, "__aiter__"):
            async for r in result:
                await ctx.send(ctx.serialize(r))

    async def _stream_sync(
        self, tunnel: Tunnel, fn: Callable[..., Any], request: Any, ctx: Context
    ) -> None:
        sctx = SyncContext(ctx, tunnel.loop)
        arg = _SyncRequests(ctx, tunnel.loop) if request is None else request
        it: Iterator[Any] | None = await self._in_executor(tunnel, fn, arg, sctx)
        if it is None:
            return
        it = iter(it)
        try:
            while True:
                r = await self._in_executor(tunnel, next, it, _END)
                if r is _END:
                    return
                await ctx.send(ctx.serialize(r))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                await self._in_executor(tunnel, close)


class _Requests:
    """The request iterator of a client-streaming ``async def`` handler."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        data = await self._ctx._stream.recv()
        if data is None:
            raise StopAsyncIteration
        return self._ctx.deserialize(data)


class _SyncRequests:
    """The request iterator of a client-streaming ``def`` handler: each
    next() waits, in the handler's thread, for the event loop's answer."""

    def __init__(self, ctx: Context, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop

    def __iter__(self) -> _SyncRequests:
        return self

    def __next__(self) -> Any:
        data = asyncio.run_coroutine_threadsafe(self._ctx._stream.recv(), self._loop).result()
        if data is None:
            raise StopIteration
        return self._ctx.deserialize(data)
