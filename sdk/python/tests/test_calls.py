"""Calls through the real Go server: every RPC kind, metadata, statuses,
deadlines, cancellation, and the context handlers see."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import opf
from conformance.v1 import conformance_pb2 as cpb
from conformance.v1 import conformance_pb2_grpc as cgrpc
from conformance_plugin import Conformance, payload
from harness import Operator, serving

pytestmark = pytest.mark.timeout(30)


def pattern(n: int) -> bytes:
    return bytes(i % 256 for i in range(n))


async def test_unary_echo_and_generated(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        r = await stub.Unary(cpb.UnaryRequest(payload=b"hello"), timeout=5)
        assert r.payload == b"hello"
        r = await stub.Unary(cpb.UnaryRequest(action=cpb.Action(response_size=1000)), timeout=5)
        assert r.payload == pattern(1000)
        r = await stub.Unary(cpb.UnaryRequest(), timeout=5)
        assert r.payload == b""


async def test_every_rpc_kind(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        got = [
            m
            async for m in stub.ServerStream(
                cpb.ServerStreamRequest(action=cpb.Action(response_count=3, response_size=10)),
                timeout=5,
            )
        ]
        assert [m.index for m in got] == [0, 1, 2]
        assert all(m.payload == pattern(10) for m in got)

        async def requests() -> AsyncIterator[cpb.ClientStreamRequest]:
            for i in range(3):
                yield cpb.ClientStreamRequest(payload=b"x" * (i + 1))

        r = await stub.ClientStream(requests(), timeout=5)
        assert (r.request_count, r.request_bytes, r.payload) == (3, 6, b"xxx")

        async def bidi() -> AsyncIterator[cpb.BidiStreamRequest]:
            for p in (b"a", b"b"):
                yield cpb.BidiStreamRequest(payload=p, action=cpb.Action(response_count=2))

        out = [(m.index, m.payload) async for m in stub.BidiStream(bidi(), timeout=5)]
        assert out == [(0, b"a"), (1, b"a"), (2, b"b"), (3, b"b")]

        # Zero messages each way.
        assert [m async for m in stub.ServerStream(cpb.ServerStreamRequest(), timeout=5)] == []

        async def none() -> AsyncIterator[cpb.BidiStreamRequest]:
            return
            yield

        assert [m async for m in stub.BidiStream(none(), timeout=5)] == []


async def test_large_messages_each_way(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        big = payload(3 << 20, 7, 0)
        r = await stub.Unary(
            cpb.UnaryRequest(payload=big, action=cpb.Action(observe=True)), timeout=10
        )
        assert r.payload == big
        assert r.observation.request_bytes == len(big)


async def test_request_metadata_with_binary_values(operator: Operator) -> None:
    async with serving(operator.target):
        md = (
            ("x-text", "one"),
            ("x-text", "two"),
            ("x-raw-bin", b"\x00\xff\x80\n"),
            ("grpc-trace-bin", b"\x00\x01"),
        )
        r = await operator.stub().Unary(
            cpb.UnaryRequest(action=cpb.Action(observe=True)), metadata=md, timeout=5
        )
        seen = {e.key: list(e.values) for e in r.observation.metadata}
        assert seen["x-text"] == [b"one", b"two"]
        assert seen["x-raw-bin"] == [b"\x00\xff\x80\n"]
        assert seen["grpc-trace-bin"] == [b"\x00\x01"]
        # Reserved keys never cross the tunnel (spec 9.1).
        assert not {"user-agent", "content-type", ":authority", "grpc-timeout"} & set(seen)
        assert "x-opf-plugin" not in seen  # the proxy's own


async def test_headers_and_trailers_with_binary_values(operator: Operator) -> None:
    async with serving(operator.target):
        action = cpb.Action(
            response_count=1,
            headers=[
                cpb.MetadataEntry(key="x-h", values=[b"v"]),
                cpb.MetadataEntry(key="x-h-bin", values=[b"\x00\x01\xfe"]),
            ],
            trailers=[
                cpb.MetadataEntry(key="x-t-bin", values=[b"\xff\x00"]),
                cpb.MetadataEntry(key="x-t", values=[b"a", b"b"]),
            ],
        )
        for method in ("Unary", "ServerStream"):
            if method == "Unary":
                call: Any = operator.stub().Unary(cpb.UnaryRequest(action=action), timeout=5)
                await call
            else:
                call = operator.stub().ServerStream(
                    cpb.ServerStreamRequest(action=action), timeout=5
                )
                assert len([m async for m in call]) == 1
            headers = list(await call.initial_metadata())
            trailers = list(await call.trailing_metadata())
            assert ("x-h", "v") in headers and ("x-h-bin", b"\x00\x01\xfe") in headers, method
            assert ("x-t-bin", b"\xff\x00") in trailers, method
            assert [v for k, v in trailers if k == "x-t"] == ["a", "b"], method


def _bad_request() -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="name", description="required")
            ]
        )
    )
    return status_pb2.Status(code=3, message="name is required", details=[detail])


async def test_status_with_details(operator: Operator) -> None:
    async with serving(operator.target):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await operator.stub().Unary(cpb.UnaryRequest(action=cpb.Action(fail=_bad_request())))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == "name is required"
        st = rpc_status.from_call(exc.value)
        assert st is not None
        br = error_details_pb2.BadRequest()
        assert st.details[0].Unpack(br)
        assert br.field_violations[0].field == "name"


class AbortWithStatus(Conformance):
    """Unary ends with abort_with_status(rpc_status.to_status(...)), as a
    grpcio-status user writes it."""

    async def Unary(self, request: cpb.UnaryRequest, context: Any) -> cpb.UnaryResponse:
        await context.abort_with_status(rpc_status.to_status(_bad_request()))
        raise AssertionError("abort returned")


async def test_abort_with_status(operator: Operator) -> None:
    async with serving(operator.target, servicer=AbortWithStatus()):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await operator.stub().Unary(cpb.UnaryRequest(), timeout=5)
        st = rpc_status.from_call(exc.value)
        assert st is not None and st.code == 3 and len(st.details) == 1


async def test_every_status_code(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        for code in grpc.StatusCode:
            if code == grpc.StatusCode.OK:
                continue
            fail = status_pb2.Status(code=code.value[0], message=f"failed with {code.name}")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Unary(cpb.UnaryRequest(action=cpb.Action(fail=fail)), timeout=5)
            assert exc.value.code() == code
            assert exc.value.details() == f"failed with {code.name}"


async def test_handler_exception_is_unknown_and_plugin_survives(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Unary(cpb.UnaryRequest(action=cpb.Action(panic=True)), timeout=5)
        # As a grpc.aio server answers an uncaught exception (spec 10.2).
        assert exc.value.code() == grpc.StatusCode.UNKNOWN
        assert "Unexpected <class 'RuntimeError'>:" in (exc.value.details() or "")
        # A streaming handler keeps what it sent before raising.
        call = stub.ServerStream(
            cpb.ServerStreamRequest(action=cpb.Action(response_count=2, panic=True)), timeout=5
        )
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for m in call:
                got.append(m)
        assert len(got) == 2 and exc.value.code() == grpc.StatusCode.UNKNOWN
        assert (await stub.Unary(cpb.UnaryRequest(payload=b"alive"), timeout=5)).payload == b"alive"


async def test_unknown_method(operator: Operator) -> None:
    async with serving(operator.target):
        missing: Any = operator.channel().unary_unary("/conformance.v1.ConformanceService/Missing")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await missing(b"", timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "unknown method Missing" in (exc.value.details() or "")


async def test_deadline_reaches_the_handler_and_is_enforced(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        r = await stub.Unary(cpb.UnaryRequest(action=cpb.Action(observe=True)), timeout=5)
        left = r.observation.deadline_left.ToTimedelta().total_seconds()
        assert 3 < left <= 5.1  # the client rounds grpc-timeout up
        r = await stub.Unary(cpb.UnaryRequest(action=cpb.Action(observe=True)))
        assert not r.observation.HasField("deadline_left")

        start = time.monotonic()
        sleep = cpb.Action(record_key="slow")
        sleep.sleep.FromSeconds(10)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Unary(cpb.UnaryRequest(action=sleep), timeout=0.3)
        # The proxy's gRPC server enforces the same deadline: when its timer
        # fires first it resets the stream, which the client reports as
        # CANCELLED (a race in front of the tunnel, seen under load).
        assert exc.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        assert time.monotonic() - start < 1.5
        req = cpb.GetObservationRequest(key="slow")
        req.wait.FromSeconds(3)
        obs = (await stub.GetObservation(req, timeout=5)).observation
        assert obs.cancelled


async def test_cancellation_reaches_the_handler(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        call = stub.Unary(
            cpb.UnaryRequest(action=cpb.Action(wait_for_cancel=True, record_key="c")), timeout=10
        )
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        req = cpb.GetObservationRequest(key="c")
        req.wait.FromSeconds(3)
        obs = (await stub.GetObservation(req, timeout=5)).observation
        assert obs.cancelled


class Probe(Conformance):
    """Records what the context says, for the test to check."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}
        self.done = asyncio.Event()

    async def Unary(self, request: cpb.UnaryRequest, context: Any) -> cpb.UnaryResponse:
        self.seen.update(
            is_aio_context=isinstance(context, grpc.aio.ServicerContext),
            peer=context.peer(),
            remaining=context.time_remaining(),
            cancelled_before=context.cancelled(),
            metadata=context.invocation_metadata(),
        )
        context.add_done_callback(self._done)
        if request.payload == b"wait":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.seen["task_cancelled"] = True
                raise
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        context.set_details("set by set_code")
        return cpb.UnaryResponse()

    def _done(self, ctx: Any) -> None:
        self.seen["cancelled_after"] = ctx.cancelled()
        self.seen["done"] = ctx.done()
        self.done.set()


async def test_context_behaves_as_grpc_aio(operator: Operator) -> None:
    probe = Probe()
    async with serving(operator.target, servicer=probe):
        stub = operator.stub()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Unary(cpb.UnaryRequest(), timeout=5, metadata=(("x-k", "v"),))
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert exc.value.details() == "set by set_code"
        await asyncio.wait_for(probe.done.wait(), 5)
        assert probe.seen["is_aio_context"]
        assert probe.seen["peer"].startswith("unix:")
        assert 4 < probe.seen["remaining"] <= 5.1  # the client rounds grpc-timeout up
        assert not probe.seen["cancelled_before"] and not probe.seen["cancelled_after"]
        assert ("x-k", "v") in probe.seen["metadata"]
        assert probe.seen["metadata"][0].key == "x-k"  # pairs with .key and .value

        probe.done.clear()
        call = stub.Unary(cpb.UnaryRequest(payload=b"wait"), timeout=10)
        await asyncio.sleep(0.3)
        call.cancel()
        await asyncio.wait_for(probe.done.wait(), 5)
        assert probe.seen["cancelled_after"] and probe.seen["done"]
        for _ in range(50):
            if probe.seen.get("task_cancelled"):
                break
            await asyncio.sleep(0.02)
        assert probe.seen.get("task_cancelled"), "the caller's cancel cancels the handler's task"


class SyncService(cgrpc.ConformanceServiceServicer):
    """Plain def handlers of every kind, run in the executor."""

    def Unary(self, request: cpb.UnaryRequest, context: grpc.ServicerContext) -> cpb.UnaryResponse:
        context.send_initial_metadata((("x-sync", "yes"),))
        context.set_trailing_metadata((("x-thread", "worker"),))
        if request.payload == b"abort":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "sync abort")
        return cpb.UnaryResponse(payload=request.payload[::-1])

    def ServerStream(
        self, request: cpb.ServerStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[cpb.ServerStreamResponse]:
        for i in range(request.action.response_count):
            yield cpb.ServerStreamResponse(index=i, payload=request.payload)

    def ClientStream(
        self, request_iterator: Iterator[cpb.ClientStreamRequest], context: grpc.ServicerContext
    ) -> cpb.ClientStreamResponse:
        n = 0
        for r in request_iterator:
            n += len(r.payload)
        return cpb.ClientStreamResponse(request_bytes=n)

    def BidiStream(
        self, request_iterator: Iterator[cpb.BidiStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[cpb.BidiStreamResponse]:
        for i, r in enumerate(request_iterator):
            yield cpb.BidiStreamResponse(index=i, payload=r.payload.upper())


async def test_sync_handlers_of_every_kind(operator: Operator) -> None:
    async with serving(operator.target, servicer=SyncService()):
        stub = operator.stub()
        call = stub.Unary(cpb.UnaryRequest(payload=b"abc"), timeout=5)
        assert (await call).payload == b"cba"
        assert ("x-sync", "yes") in list(await call.initial_metadata())
        assert ("x-thread", "worker") in list(await call.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Unary(cpb.UnaryRequest(payload=b"abort"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        got = [
            m.index
            async for m in stub.ServerStream(
                cpb.ServerStreamRequest(action=cpb.Action(response_count=4)), timeout=5
            )
        ]
        assert got == [0, 1, 2, 3]

        async def cs() -> AsyncIterator[cpb.ClientStreamRequest]:
            for _ in range(5):
                yield cpb.ClientStreamRequest(payload=b"12345")

        assert (await stub.ClientStream(cs(), timeout=5)).request_bytes == 25

        async def bd() -> AsyncIterator[cpb.BidiStreamRequest]:
            for p in (b"a", b"b", b"c"):
                yield cpb.BidiStreamRequest(payload=p)

        out = [m.payload async for m in stub.BidiStream(bd(), timeout=5)]
        assert out == [b"A", b"B", b"C"]


async def test_many_concurrent_calls(operator: Operator) -> None:
    async with serving(operator.target):
        stub = operator.stub()
        sleep = cpb.Action()
        sleep.sleep.FromMilliseconds(200)

        async def one(i: int) -> bytes:
            r = await stub.Unary(
                cpb.UnaryRequest(payload=str(i).encode(), action=sleep), timeout=10
            )
            return bytes(r.payload)

        start = time.monotonic()
        got = await asyncio.gather(*(one(i) for i in range(100)))
        assert got == [str(i).encode() for i in range(100)]
        assert time.monotonic() - start < 5  # concurrent, not one after another


async def test_message_over_the_limit_fails_only_its_call(operator: Operator) -> None:
    async with serving(operator.target, max_message_size=1 << 20):
        stub = operator.stub()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Unary(cpb.UnaryRequest(payload=b"x" * (2 << 20)), timeout=5)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        r = await stub.Unary(cpb.UnaryRequest(payload=b"fine"), timeout=5)
        assert r.payload == b"fine"


async def test_a_stalled_consumer_does_not_block_other_calls(operator: Operator) -> None:
    """A server stream nobody reads holds its own window only (spec 3.4)."""
    async with serving(operator.target):
        stub = operator.stub()
        stalled = stub.ServerStream(
            cpb.ServerStreamRequest(action=cpb.Action(response_count=50, response_size=1 << 20)),
            timeout=20,
        )
        await stalled.read()  # started; then nobody reads
        for i in range(20):
            r = await stub.Unary(cpb.UnaryRequest(payload=b"%d" % i), timeout=3)
            assert r.payload == b"%d" % i
        stalled.cancel()


def test_the_package_exports() -> None:
    assert set(opf.__all__) >= {"Plugin", "Backoff", "TLS", "service_account_token", "token_file"}


class Recorder(grpc.aio.ServerInterceptor):
    """Records every method, and refuses GetObservation."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.methods.append(details.method)
        if details.method.endswith("/GetObservation"):

            async def deny(request: bytes, context: Any) -> None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")

            return grpc.unary_unary_rpc_method_handler(deny)
        return await continuation(details)


async def test_server_interceptors(operator: Operator) -> None:
    rec = Recorder()
    async with serving(operator.target, interceptors=[rec]):
        stub = operator.stub()
        assert (await stub.Unary(cpb.UnaryRequest(payload=b"i"), timeout=5)).payload == b"i"
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.GetObservation(cpb.GetObservationRequest(key="k"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rec.methods == [
            "/conformance.v1.ConformanceService/Unary",
            "/conformance.v1.ConformanceService/GetObservation",
        ]


class SlowSync(cgrpc.ConformanceServiceServicer):
    """A plain def handler that polls is_active(), as sync servicers do."""

    def __init__(self) -> None:
        self.saw_inactive = threading.Event()
        self.remaining: float | None = None

    def Unary(self, request: cpb.UnaryRequest, context: grpc.ServicerContext) -> cpb.UnaryResponse:
        if request.payload == b"quick":
            return cpb.UnaryResponse(payload=b"quick")
        self.remaining = context.time_remaining()
        for _ in range(250):
            if not context.is_active():
                self.saw_inactive.set()
                break
            time.sleep(0.02)
        return cpb.UnaryResponse()


async def test_a_sync_handler_sees_its_call_end(operator: Operator) -> None:
    svc = SlowSync()
    async with serving(operator.target, servicer=svc):
        with pytest.raises(grpc.aio.AioRpcError):
            await operator.stub().Unary(cpb.UnaryRequest(), timeout=0.4)
        assert await asyncio.get_running_loop().run_in_executor(None, svc.saw_inactive.wait, 3)
        assert svc.remaining is not None and 0 < svc.remaining <= 0.5
        # The plugin serves on once the thread has returned.
        r = await operator.stub().Unary(cpb.UnaryRequest(payload=b"quick"), timeout=10)
        assert r.payload == b"quick"
