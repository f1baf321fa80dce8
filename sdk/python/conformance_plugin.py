"""The Python SDK's plugin under test (docs/conformance.md).

It serves conformance.v1.ConformanceService through opf.Plugin, with the
settings the conformance runner hands it in OPF_CONFORMANCE_* variables, and
drains on SIGTERM. With OPF_CONFORMANCE_DIRECT_LISTEN it serves the same
servicer on a plain grpc.aio server instead, for the benchmarks.

The SDK is imported from the tree (src/), not installed.
"""

from __future__ import annotations

import signal

# A SIGTERM that comes while the imports below run (seconds on a loaded
# machine) must still end the program with status 0: remember it.
_stop_before_serving = False


def _early_sigterm(signum: int, frame: object) -> None:
    global _stop_before_serving
    _stop_before_serving = True


signal.signal(signal.SIGTERM, _early_sigterm)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import faulthandler  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Callable, Iterable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))
sys.path.insert(0, str(HERE))

import grpc  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402

import opf  # noqa: E402
from conformance.v1 import conformance_pb2 as cpb  # noqa: E402
from conformance.v1 import conformance_pb2_grpc as cgrpc  # noqa: E402

log = logging.getLogger("conformance")

_DETAILS_KEY = "grpc-status-details-bin"


def payload(size: int, seed: int, k: int) -> bytes:
    """Generated payload bytes: message k of a call (conformance.proto)."""
    if seed == 0:
        whole, rest = divmod(size, 256)
        return bytes(range(256)) * whole + bytes(range(rest))
    out = bytearray()
    prefix = struct.pack(">QI", seed, k)
    j = 0
    while len(out) < size:
        out += hashlib.sha256(prefix + struct.pack(">I", j)).digest()
        j += 1
    return bytes(out[:size])


def to_metadata(entries: Iterable[cpb.MetadataEntry]) -> list[tuple[str, str | bytes]]:
    md: list[tuple[str, str | bytes]] = []
    for e in entries:
        for v in e.values:
            md.append((e.key, v if e.key.endswith("-bin") else v.decode("ascii")))
    return md


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


class Call:
    """What one handler observed of its call."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        self.context = context
        self.obs = cpb.Observation(method=method, process_id=os.getpid())
        left = context.time_remaining()
        if left is not None:
            self.obs.deadline_left.CopyFrom(duration(left))
        grouped: dict[str, list[bytes]] = {}
        for key, value in context.invocation_metadata() or ():
            grouped.setdefault(key, []).append(
                value if isinstance(value, bytes) else value.encode()
            )
        for key in sorted(grouped):
            self.obs.metadata.add(key=key, values=grouped[key])
        self._digest = hashlib.sha256()
        self.obs.request_digest = self._digest.digest()  # of no request yet
        # Response headers gather until the first response or the end of
        # the call, as grpc-go's SetHeader does (conformance.proto, Action).
        self.headers: list[tuple[str, str | bytes]] = []
        self.headers_sent = False

    async def flush_headers(self) -> None:
        if not self.headers_sent:
            self.headers_sent = True
            if self.headers:
                await self.context.send_initial_metadata(self.headers)

    def received(self, data: bytes) -> None:
        self.obs.request_count += 1
        self.obs.request_bytes += len(data)
        self._digest.update(struct.pack(">I", len(data)) + data)
        self.obs.request_digest = self._digest.digest()


class Conformance(cgrpc.ConformanceServiceServicer):
    """ConformanceService exactly as conformance.proto documents it."""

    def __init__(self) -> None:
        self._records: dict[str, cpb.Observation] = {}
        self._recorded = asyncio.Condition()

    def _finally_record(self, call: Call, keys: Sequence[str]) -> None:
        # Runs while the task may be cancelled: record without awaiting.
        call.obs.cancelled = call.context.cancelled()
        added = False
        for k in keys:
            if k:
                self._records[k] = call.obs
                added = True
        if added:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._recorded:
            self._recorded.notify_all()

    async def _before(self, call: Call, a: cpb.Action) -> None:
        if a.headers and not call.headers_sent:
            call.headers.extend(to_metadata(a.headers))
        if a.HasField("sleep"):
            # A cancel or the deadline cancels this task: the SDK (or grpc.aio)
            # ends the call with the context's status.
            await asyncio.sleep(a.sleep.ToTimedelta().total_seconds())
        if a.wait_for_cancel:
            await asyncio.Event().wait()

    async def _after(
        self, call: Call, a: cpb.Action, trailers: list[tuple[str, str | bytes]]
    ) -> None:
        context = call.context
        if a.panic:
            await call.flush_headers()
            raise RuntimeError("conformance: the action asked for a panic")
        if a.trailers:
            trailers.extend(to_metadata(a.trailers))
            context.set_trailing_metadata(trailers)
        if a.HasField("fail") and a.fail.code != 0:
            code = {c.value[0]: c for c in grpc.StatusCode}.get(
                a.fail.code, grpc.StatusCode.UNKNOWN
            )
            md = [*trailers]
            if a.fail.details:
                md.append((_DETAILS_KEY, a.fail.SerializeToString()))
            await call.flush_headers()
            await context.abort(code, a.fail.message, md)

    @staticmethod
    def _sizes(a: cpb.Action) -> list[int] | None:
        if a.response_sizes:
            return list(a.response_sizes)
        return None

    async def _send_all(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
        a: cpb.Action,
        echo: bytes,
        index: list[int],
        make: Callable[[bytes, int, cpb.Observation | None], Any],
    ) -> AsyncIterator[Any]:
        sizes = self._sizes(a)
        count = len(sizes) if sizes is not None else a.response_count
        for i in range(count):
            if i > 0 and a.HasField("message_interval"):
                await asyncio.sleep(a.message_interval.ToTimedelta().total_seconds())
            if sizes is not None:
                data = payload(sizes[i], a.seed, index[0])
            elif a.response_size:
                data = payload(a.response_size, a.seed, index[0])
            else:
                data = echo
            obs = call.obs if i == 0 and a.observe else None
            yield make(data, index[0], obs)
            index[0] += 1

    async def Unary(
        self, request: cpb.UnaryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cpb.UnaryResponse:
        call = Call(context, "/conformance.v1.ConformanceService/Unary")
        call.received(request.payload)
        a = request.action
        try:
            await self._before(call, a)
            sizes = self._sizes(a)
            if sizes is not None:
                data = payload(sizes[0], a.seed, 0)
            elif a.response_size:
                data = payload(a.response_size, a.seed, 0)
            else:
                data = request.payload
            resp = cpb.UnaryResponse(payload=data)
            if a.observe:
                resp.observation.CopyFrom(call.obs)
            await self._after(call, a, [])
            await call.flush_headers()
            return resp
        finally:
            self._finally_record(call, [a.record_key])

    async def ServerStream(
        self, request: cpb.ServerStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[cpb.ServerStreamResponse]:
        call = Call(context, "/conformance.v1.ConformanceService/ServerStream")
        call.received(request.payload)
        a = request.action
        try:
            await self._before(call, a)
            index = [0]

            def make(data: bytes, i: int, obs: cpb.Observation | None) -> cpb.ServerStreamResponse:
                r = cpb.ServerStreamResponse(payload=data, index=i)
                if obs is not None:
                    r.observation.CopyFrom(obs)
                return r

            async for r in self._send_all(context, call, a, request.payload, index, make):
                await call.flush_headers()
                yield r
            await self._after(call, a, [])
            await call.flush_headers()
        finally:
            self._finally_record(call, [a.record_key])

    async def ClientStream(
        self,
        request_iterator: AsyncIterator[cpb.ClientStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cpb.ClientStreamResponse:
        call = Call(context, "/conformance.v1.ConformanceService/ClientStream")
        first: cpb.Action | None = None
        last = b""
        keys: list[str] = []
        trailers: list[tuple[str, str | bytes]] = []
        try:
            async for req in request_iterator:
                call.received(req.payload)
                last = req.payload
                a = req.action
                if first is None:
                    first = a
                keys.append(a.record_key)
                await self._before(call, a)
                await self._after(call, a, trailers)
            first = first or cpb.Action()
            sizes = self._sizes(first)
            if sizes is not None:
                data = payload(sizes[0], first.seed, 0)
            elif first.response_size:
                data = payload(first.response_size, first.seed, 0)
            else:
                data = last
            resp = cpb.ClientStreamResponse(
                payload=data,
                request_count=call.obs.request_count,
                request_bytes=call.obs.request_bytes,
                request_digest=call.obs.request_digest,
            )
            if first.observe:
                resp.observation.CopyFrom(call.obs)
            await call.flush_headers()
            return resp
        finally:
            self._finally_record(call, keys)

    async def BidiStream(
        self,
        request_iterator: AsyncIterator[cpb.BidiStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[cpb.BidiStreamResponse]:
        call = Call(context, "/conformance.v1.ConformanceService/BidiStream")
        keys: list[str] = []
        trailers: list[tuple[str, str | bytes]] = []
        index = [0]

        def make(data: bytes, i: int, obs: cpb.Observation | None) -> cpb.BidiStreamResponse:
            r = cpb.BidiStreamResponse(payload=data, index=i)
            if obs is not None:
                r.observation.CopyFrom(obs)
            return r

        try:
            async for req in request_iterator:
                call.received(req.payload)
                a = req.action
                keys.append(a.record_key)
                await self._before(call, a)
                async for r in self._send_all(context, call, a, req.payload, index, make):
                    await call.flush_headers()
                    yield r
                await self._after(call, a, trailers)
            await call.flush_headers()
        finally:
            self._finally_record(call, keys)

    async def GetObservation(
        self, request: cpb.GetObservationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cpb.GetObservationResponse:
        deadline = time.monotonic() + (
            request.wait.ToTimedelta().total_seconds() if request.HasField("wait") else 0
        )
        async with self._recorded:
            while request.key not in self._records:
                left = deadline - time.monotonic()
                if left <= 0:
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f'no observation recorded under "{request.key}"',
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._recorded.wait(), left)
        return cpb.GetObservationResponse(observation=self._records[request.key])


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


async def serve_direct(address: str) -> None:
    """The same servicer on a plain grpc.aio server (benchmarks)."""
    limit = _int_env("OPF_CONFORMANCE_MAX_MESSAGE_SIZE") or 4 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ]
    )
    cgrpc.add_ConformanceServiceServicer_to_server(Conformance(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(address)
    await server.start()
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _stop_before_serving:
        stop.set()
    await stop.wait()
    await server.stop(grace=2)


def _print_where(loop: asyncio.AbstractEventLoop) -> None:
    """On SIGQUIT (the runner's, before SIGKILL, to a plugin that does not
    exit in time) while the loop runs: where every asyncio task and thread
    is. Before and after the loop, faulthandler prints the threads."""
    print("--- SIGQUIT: asyncio tasks", file=sys.stderr)
    for task in asyncio.all_tasks(loop):
        task.print_stack(file=sys.stderr)
    print("--- threads", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()


async def serve_tunnel() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGQUIT, _print_where, loop)
    target = os.environ.get("OPF_CONFORMANCE_TARGET", "")
    name = os.environ.get("OPF_CONFORMANCE_PLUGIN_NAME", "")
    if not target or not name:
        raise SystemExit("OPF_CONFORMANCE_TARGET and OPF_CONFORMANCE_PLUGIN_NAME must be set")
    options: dict[str, Any] = {}
    if (n := _int_env("OPF_CONFORMANCE_MAX_MESSAGE_SIZE")) is not None:
        options["max_message_size"] = n
    if (n := _int_env("OPF_CONFORMANCE_DRAIN_TIMEOUT_MS")) is not None:
        options["drain_timeout"] = n / 1000
    if ca := os.environ.get("OPF_CONFORMANCE_TLS_CA"):
        options["tls"] = opf.TLS(ca, os.environ.get("OPF_CONFORMANCE_TLS_SERVER_NAME") or None)
    if token := os.environ.get("OPF_CONFORMANCE_TOKEN"):
        # The runner asks for the token over its plaintext unix socket too.
        options["token"] = opf.static_token(token)
        options["plaintext_token"] = True
    plugin = opf.Plugin(
        name, os.environ.get("OPF_CONFORMANCE_PLUGIN_VERSION", ""), target=target, **options
    )
    cgrpc.add_ConformanceServiceServicer_to_server(Conformance(), plugin)  # type: ignore[no-untyped-call]
    if _stop_before_serving:
        plugin.stop_nowait()  # serve() then registers nothing and returns
    await plugin.serve()


def main() -> None:
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("OPF_CONFORMANCE_DEBUG") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    direct = os.environ.get("OPF_CONFORMANCE_DIRECT_LISTEN")
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    asyncio.run(serve_direct(direct) if direct else serve_tunnel())
    faulthandler.register(signal.SIGQUIT, all_threads=True)  # the loop put back the default


if __name__ == "__main__":
    main()
