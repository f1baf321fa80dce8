"""Runs the framework's real Go server for the tests.

conformance/cmd/testoperator is the Go server (go/server) plus a proxy that
forwards ordinary gRPC calls to a plugin through the tunnel: tests call
their plugin with generated stubs at Operator.proxy and see what an
operator sees. Nothing here imitates the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

import opf
from conformance.v1 import conformance_pb2_grpc as cgrpc
from conformance_plugin import Conformance

SDK = Path(__file__).resolve().parent.parent
REPO = SDK.parent.parent
PLUGIN_NAME = "conformance"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Operator:
    """One testoperator process: a Go plugin server and its proxy."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        name: str = "op",
        listen: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.name = name
        self.listen = listen or f"unix://{workdir}/{name}.sock"
        self.proxy = f"unix://{workdir}/{name}-proxy.sock"
        self.args = args
        self.events: list[dict[str, Any]] = []
        self.log = workdir / f"{name}.log"
        self._proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def target(self) -> str:
        """What a plugin dials: the -listen address in a form it accepts."""
        if self.listen.startswith(":"):
            return f"127.0.0.1{self.listen}"
        return self.listen

    async def start(self) -> None:
        self.events.clear()
        with self.log.open("ab") as err:
            self._proc = await asyncio.create_subprocess_exec(
                self.binary,
                "-listen",
                self.listen,
                "-proxy",
                self.proxy,
                "-plugin",
                PLUGIN_NAME,
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        self._reader = asyncio.get_running_loop().create_task(self._read(self._proc))
        await self.wait(lambda evs: any(e["event"] == "ready" for e in evs), 15, "ready")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            async with self._changed:
                self.events.append(ev)
                self._changed.notify_all()

    async def wait(
        self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str
    ) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: pred(self.events))

        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"operator {self.name}: no {what} within {timeout}s; events {self.events}"
            ) from None

    def instances(self) -> set[str]:
        """Instances registered now."""
        live: set[str] = set()
        for e in self.events:
            if e["event"] == "registered":
                live.add(e["instance"])
            elif e["event"] == "unregistered":
                live.discard(e["instance"])
        return live

    async def registered(self, count: int = 1, timeout: float = 10) -> set[str]:
        await self.wait(lambda _: len(self.instances()) == count, timeout, f"{count} instances")
        return self.instances()

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.proxy,
                options=[
                    ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20),
                ],
            )
        return self._channel

    def stub(self) -> cgrpc.ConformanceServiceStub:
        return cgrpc.ConformanceServiceStub(self.channel())  # type: ignore[no-untyped-call]

    async def _end(self, sig: int, timeout: float) -> int | None:
        proc, self._proc = self._proc, None
        rc = proc.returncode if proc else None
        if proc is not None and rc is None:
            proc.send_signal(sig)
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                proc.kill()
                rc = await proc.wait()
            if self._reader is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._reader, 5)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        return rc

    async def stop(self) -> int | None:
        """SIGTERM: the server drains (plugins get GoAway)."""
        return await self._end(signal.SIGTERM, 20)

    async def kill(self) -> None:
        """SIGKILL: every connection is cut, as in a crash."""
        await self._end(signal.SIGKILL, 5)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.asynccontextmanager
async def serving(
    target: str,
    *,
    servicer: Any = None,
    register: Callable[[opf.Plugin], None] | None = None,
    wait: bool = True,
    **options: Any,
) -> AsyncIterator[opf.Plugin]:
    """A plugin in this process serving the conformance service (or what
    register adds), registered before the body runs."""
    options.setdefault("backoff", opf.Backoff(base=0.05, max=0.5))
    plugin = opf.Plugin(PLUGIN_NAME, "v1.2.3", target=target, **options)
    if register is not None:
        register(plugin)
    else:
        cgrpc.add_ConformanceServiceServicer_to_server(servicer or Conformance(), plugin)  # type: ignore[no-untyped-call]
    async with plugin:
        if wait:
            await plugin.wait_registered(10)
        yield plugin


async def start_plugin_process(target: str, log: Path, **env: str) -> asyncio.subprocess.Process:
    """conformance_plugin.py in its own process, as the runner starts it."""
    full = dict(os.environ)
    full.update(
        OPF_CONFORMANCE_TARGET=target,
        OPF_CONFORMANCE_PLUGIN_NAME=PLUGIN_NAME,
        OPF_CONFORMANCE_PLUGIN_VERSION="v0.0.0-test",
        OPF_CONFORMANCE_DRAIN_TIMEOUT_MS="3000",
    )
    full.update(env)
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            str(SDK / "conformance_plugin.py"),
            env=full,
            stdout=out,
            stderr=out,
        )
