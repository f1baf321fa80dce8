"""Plugin: what a plugin author creates, hands to generated code, and serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import grpc

from opf import _status
from opf._core import Core, Settings
from opf._defaults import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_RESOLVE_INTERVAL,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    MAX_SERVICE_NAME,
    MAX_SERVICES,
    MAX_SETTING,
    MAX_VERSION,
    MIN_HEARTBEAT_INTERVAL,
    MIN_MAX_BATCH_SIZE,
    MIN_WINDOW,
)
from opf._handlers import Handlers
from opf._options import TLS, Backoff, TokenSource
from opf._slots import ConnectOptions, Connector
from opf._target import LookupHost, parse

log = logging.getLogger(__name__)


class ConfigurationError(ValueError):
    """A plugin set up in a way that cannot work; the message says why."""


class NotRegisteredError(RuntimeError):
    """wait_registered() gave up; last_error is the latest failed attempt."""

    def __init__(self, message: str, last_error: BaseException | None) -> None:
        super().__init__(message)
        self.last_error = last_error


class RegistrationRejected(Exception):
    """The operator refused the registration (its RegisterReject status)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"registration refused by the operator: {code.name}: {details}")
        self.code = code
        self.details = details


def _quote(s: str) -> str:
    return '"' + s.encode()[:64].decode(errors="ignore") + '"'


def check_service_name(name: str) -> None:
    b = name.encode()
    if not b or len(b) > MAX_SERVICE_NAME or "/" in name or " " in name:
        raise ConfigurationError(f"invalid service name {_quote(name)} (spec 4.4)")


def _check_size(what: str, value: int, low: int, *, zero_ok: bool = True) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(f"{what} must be an integer, not {value!r}")
    if value == 0 and zero_ok:
        return value
    if not low <= value <= MAX_SETTING:
        raise ConfigurationError(f"{what} {value} is out of range [{low}, {MAX_SETTING}]")
    return value


class Plugin:
    """A plugin: gRPC services served to an operator through the tunnel.

    Hand it to generated code as a server (``add_XServicer_to_server(
    servicer, plugin)``), then ``await plugin.serve()``. Every option has the
    Go client's meaning and default; README.md lists them.
    """

    def __init__(
        self,
        name: str,
        version: str = "",
        *,
        target: str,
        labels: Mapping[str, str] | None = None,
        services: Iterable[str] = (),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW_SIZE,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        heartbeat_interval: float | None = None,
        max_heartbeat_interval: float | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        backoff: Backoff | None = None,
        tls: TLS | None = None,
        token: TokenSource | None = None,
        plaintext_token: bool = False,
        resolve_interval: float = DEFAULT_RESOLVE_INTERVAL,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        executor: Executor | None = None,
        lookup_host: LookupHost | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError("plugin name is empty")
        if len(name.encode()) > MAX_NAME:
            raise ConfigurationError(f"plugin name is longer than {MAX_NAME} characters")
        if len(version.encode()) > MAX_VERSION:
            raise ConfigurationError(f"plugin version is longer than {MAX_VERSION} bytes")
        labels = dict(labels or {})
        if len(labels) > MAX_LABELS:
            raise ConfigurationError(f"more than {MAX_LABELS} labels")
        for k, v in labels.items():
            if not k or len(k.encode()) > MAX_LABEL_KEY or len(str(v).encode()) > MAX_LABEL_VALUE:
                raise ConfigurationError(f"invalid label {_quote(k)} (spec 4.4)")
        try:
            self._target = parse(target)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        settings = Settings(
            max_message_size=_check_size("max_message_size", max_message_size, 0),
            initial_window_size=_check_size("initial_window_size", initial_window_size, MIN_WINDOW),
            max_concurrent_streams=_check_size("max_concurrent_streams", max_concurrent_streams, 0),
            max_batch_size=_check_size("max_batch_size", max_batch_size, MIN_MAX_BATCH_SIZE),
        )
        settings = Settings(
            max_message_size=settings.max_message_size or DEFAULT_MAX_MESSAGE_SIZE,
            initial_window_size=settings.initial_window_size or DEFAULT_INITIAL_WINDOW_SIZE,
            max_concurrent_streams=settings.max_concurrent_streams
            or DEFAULT_MAX_CONCURRENT_STREAMS,
            max_batch_size=settings.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        )
        for what, d in (
            ("heartbeat_interval", heartbeat_interval),
            ("max_heartbeat_interval", max_heartbeat_interval),
        ):
            if d is not None and not MIN_HEARTBEAT_INTERVAL <= d <= 315_576_000_000:
                raise ConfigurationError(f"{what} {d} is out of range (at least 0.1 s)")
        for what, d in (
            ("drain_timeout", drain_timeout),
            ("handshake_timeout", handshake_timeout),
            ("resolve_interval", resolve_interval),
        ):
            if not d > 0:
                raise ConfigurationError(f"{what} must be positive, not {d!r}")
        if token is not None:
            if not isinstance(token, TokenSource):
                raise ConfigurationError(
                    "token must come from opf.token_file, opf.service_account_token "
                    "or opf.static_token"
                )
            if token.path is not None and not token.path.exists():
                raise ConfigurationError(f"token file {os.fspath(token.path)} does not exist")
            if tls is None:
                if not plaintext_token:
                    raise ConfigurationError(
                        "refusing to send a token without TLS: pass tls=opf.TLS(...), or "
                        "plaintext_token=True for a unix socket or loopback target"
                    )
                if not self._target.local:
                    raise ConfigurationError(
                        f"refusing to send a token over plaintext to {target!r}: "
                        "plaintext_token=True allows only a unix socket or a loopback address"
                    )
        if tls is not None and tls.ca_file is not None:
            try:
                tls.read_ca()
            except (OSError, ValueError) as e:
                raise ConfigurationError(f"TLS: {e}") from None
        self._name = name
        self._version = version
        self._labels = labels
        self._handlers = Handlers()
        self._handlers.interceptors = list(interceptors)
        for s in services:
            check_service_name(s)
            self._handlers.add_service_name(s)
        self._executor = executor
        self._own_executor: ThreadPoolExecutor | None = None
        self._core = Core(
            settings=settings,
            heartbeat_interval=heartbeat_interval,
            max_heartbeat_interval=max_heartbeat_interval,
            handlers=self._handlers,
        )
        self._connect = ConnectOptions(
            backoff=backoff or Backoff(),
            handshake_timeout=handshake_timeout,
            drain_timeout=drain_timeout,
            resolve_interval=resolve_interval,
            tls=tls,
            token=token,
            channel_options=tuple(channel_options),
            lookup_host=lookup_host,
        )
        self._connector: Connector | None = None
        self._serving: asyncio.Task[None] | None = None  # serve() under async with
        self._served: asyncio.Future[None] | None = None  # done when serve() returns
        self._stop_requested = False
        self._started = threading.Event()

    # --- what generated code calls -----------------------------------------

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        """Serves these handlers, as grpc.aio.Server does.

        Handlers that are grpc.ServiceRpcHandler (as generated code makes)
        name their service; name any other's with Plugin(services=...).
        """
        for h in generic_rpc_handlers:
            if isinstance(h, grpc.ServiceRpcHandler):
                name = h.service_name()
                check_service_name(name)
                self._add_service(name)
                if any(m.startswith(f"/{name}/") for m in self._handlers.methods):
                    continue  # add_registered_method_handlers covers it
            self._handlers.generic.append(h)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Serves one service's methods, as grpc.aio.Server does."""
        check_service_name(service_name)
        self._add_service(service_name)
        for method, handler in method_handlers.items():
            self._handlers.methods[f"/{service_name}/{method}"] = handler
        # A generic handler for the same service is now redundant.
        self._handlers.generic = [
            g
            for g in self._handlers.generic
            if not (isinstance(g, grpc.ServiceRpcHandler) and g.service_name() == service_name)
        ]

    def _add_service(self, name: str) -> None:
        if self._connector is not None:
            raise ConfigurationError("services must be added before serve()")
        if name not in self._handlers.services and len(self._handlers.services) >= MAX_SERVICES:
            raise ConfigurationError(f"more than {MAX_SERVICES} services")
        self._handlers.add_service_name(name)

    @property
    def name(self) -> str:
        """The name the plugin registers under."""
        return self._name

    @property
    def version(self) -> str:
        """The version it registers."""
        return self._version

    @property
    def services(self) -> list[str]:
        """The fully qualified names of the services the plugin registers."""
        return list(self._handlers.services)

    # --- serving -------------------------------------------------------------

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Connects, registers and serves until stopped, then drains.

        It reconnects on its own (with backoff, at once after a GoAway) and
        registers again. SIGTERM and SIGINT drain it when handle_signals is
        true and the loop runs in the main thread: the operator gets GoAway,
        calls in flight get drain_timeout to finish. Returns once drained.
        """
        if self._connector is not None:
            raise RuntimeError("serve() was called already")
        if not self._handlers.services:
            raise ConfigurationError(
                "no service added: call add_XServicer_to_server(servicer, plugin) before serve()"
            )
        self._core.set_registration(self.name, self.version, self._labels)
        if self._executor is None:
            self._own_executor = ThreadPoolExecutor(
                max_workers=self._core.settings.max_concurrent_streams,
                thread_name_prefix="opf-handler",
            )
        self._handlers.executor = self._executor or self._own_executor
        loop = asyncio.get_running_loop()
        self._served = loop.create_future()
        connector = self._connector = Connector(self._core, self._target, self._connect)
        if self._stop_requested:
            connector.stop()
        installed: dict[signal.Signals, Any] = {}  # and the handler it replaced
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(signum)
                try:
                    loop.add_signal_handler(signum, self._on_signal, signum)
                    installed[signum] = previous
                except (NotImplementedError, RuntimeError):
                    pass
        self._started.set()
        log.info(
            "plugin %s %s serving %s through %s",
            self.name,
            self.version or "(no version)",
            ", ".join(self._handlers.services),
            self._target.text,
        )
        try:
            await connector.run()
        finally:
            for signum, previous in installed.items():
                loop.remove_signal_handler(signum)
                if previous is not None:
                    signal.signal(signum, previous)
            if self._own_executor is not None:
                self._own_executor.shutdown(wait=False)
            if not self._served.done():
                self._served.set_result(None)
            log.info("plugin %s stopped", self.name)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s: draining", signal.Signals(sig).name)
        self.stop_nowait()

    def stop_nowait(self) -> None:
        """Asks serve() to drain and return; it is idempotent."""
        self._stop_requested = True
        if self._connector is not None:
            self._connector.stop()

    async def stop(self) -> None:
        """Drains (GoAway, calls finish within drain_timeout) and waits for
        serve() to return. Idempotent."""
        self.stop_nowait()
        if self._served is not None:
            await asyncio.shield(self._served)
        if self._serving is not None and self._serving.done():
            self._serving.result()  # serve()'s error, if it failed

    async def wait_registered(self, timeout: float | None = None) -> list[str]:
        """Waits until at least one tunnel is registered; returns the
        instance ids. Raises NotRegisteredError (with the last failure) on
        timeout, or if the plugin stops first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            c = self._connector
            if c is not None and c.registered:
                return sorted(c.registered.values())
            if self._stop_requested:
                raise NotRegisteredError(f"plugin {self.name!r} stopped", self._last_error())
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                err = self._last_error()
                raise NotRegisteredError(
                    f"plugin {self.name!r} not registered after {timeout}s"
                    + (f" (last error: {err})" if err else ""),
                    err,
                )
            # Until serve() has started there is nothing to wait on: poll.
            step = 0.05 if remaining is None else min(remaining, 0.05)
            with contextlib.suppress(asyncio.TimeoutError):
                if c is None:
                    await asyncio.sleep(step)
                else:
                    await asyncio.wait_for(c.registered_changed.wait(), remaining)

    def _last_error(self) -> BaseException | None:
        c = self._connector
        if c is None or c.last_error is None:
            return None
        e = c.last_error
        if e.rejected:
            return RegistrationRejected(_status.code_of(e.status.code), e.status.message)
        return e

    @property
    def instance_ids(self) -> list[str]:
        """Ids the operator gave the tunnels registered now (one per replica)."""
        c = self._connector
        return sorted(c.registered.values()) if c is not None else []

    async def __aenter__(self) -> Plugin:
        """Starts serve() in the background (without signal handlers)."""
        self._serving = asyncio.get_running_loop().create_task(self.serve(handle_signals=False))
        await asyncio.sleep(0)
        if self._serving.done():
            self._serving.result()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def serve_forever(self) -> None:
        """Serves until SIGTERM or SIGINT, for programs that do not use asyncio."""
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self.serve())
