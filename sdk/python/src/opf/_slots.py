"""Connections (spec 14): slots, re-resolution, backoff, replica identity.

The plugin keeps S = max(addresses, replica_count, 1) slots (at most 64).
Each slot holds at most one registered tunnel (plus old ones draining after
a GoAway) and reconnects on its own: with backoff after a failure, at once
after a GoAway. A tunnel whose operator Hello names a replica that another
of our tunnels already holds is a duplicate, and its slot tries again later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from opf import _status
from opf._core import Core
from opf._defaults import CONNECT_METHOD, MAX_SLOTS, WRITE_BUFFER_SIZE
from opf._options import TLS, Backoff, TokenSource
from opf._target import Address, LookupHost, Target, resolve
from opf._tunnel import AttemptFailed, Tunnel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectOptions:
    backoff: Backoff
    handshake_timeout: float
    drain_timeout: float
    resolve_interval: float
    tls: TLS | None
    token: TokenSource | None
    channel_options: Sequence[tuple[str, Any]]
    lookup_host: LookupHost | None


class _Stopped(Exception):
    pass


class Connector:
    def __init__(self, core: Core, target: Target, opts: ConnectOptions) -> None:
        self.core = core
        self.target = target
        self.opts = opts
        self.loop = asyncio.get_running_loop()
        self.addresses: list[Address] = []
        self.stopping = asyncio.Event()
        self._resolve_now = asyncio.Event()
        self._slots: dict[int, asyncio.Task[None]] = {}
        self._count = 0
        self.tunnels: set[Tunnel] = set()  # every live tunnel, draining ones too
        self._holding: set[Tunnel] = set()  # registering or registered, no GoAway
        self.registered: dict[Tunnel, str] = {}
        self.ever_registered = asyncio.Event()
        self.registered_changed = asyncio.Event()
        self.last_error: AttemptFailed | None = None
        self._bg: set[asyncio.Task[Any]] = set()

    # --- the whole ----------------------------------------------------------

    async def run(self) -> None:
        resolver = self.loop.create_task(self._resolver(), name="opf-resolver")
        try:
            await self.stopping.wait()
            while self._slots:
                await asyncio.gather(*self._slots.values(), return_exceptions=True)
            if self.tunnels:
                await asyncio.gather(
                    *(t.drain(self.opts.drain_timeout) for t in list(self.tunnels)),
                    return_exceptions=True,
                )
        finally:
            resolver.cancel()
            for t in list(self.tunnels):
                t.close(_status.new(_status.UNAVAILABLE, "plugin shutting down"))
            for task in list(self._slots.values()):
                task.cancel()
            await asyncio.sleep(0)  # the tunnels' end callbacks close their channels
            if self._bg:
                await asyncio.gather(*self._bg, return_exceptions=True)

    def stop(self) -> None:
        self.stopping.set()
        self._signal_registered()  # wakes wait_registered()

    async def _resolver(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                found = await resolve(self.target, self.opts.lookup_host)
            except OSError as e:
                delay = self.opts.backoff.delay(attempt)
                attempt += 1
                log.warning(
                    "cannot resolve %s: %s; trying again in %.1fs", self.target.text, e, delay
                )
                self.last_error = AttemptFailed(_status.new(_status.UNAVAILABLE, f"resolve: {e}"))
                await self._sleep(delay, self._resolve_now)
                continue
            attempt = 0
            if found != self.addresses:
                log.debug("%s resolves to %s", self.target.text, [a.grpc_target for a in found])
                self.addresses = found
            self._resize()
            self._resolve_now.clear()
            await self._sleep(self.opts.resolve_interval, self._resolve_now)

    def _resize(self) -> None:
        replicas = max((t.replica_count for t in self.tunnels), default=0)
        count = min(max(len(self.addresses), replicas, 1), MAX_SLOTS)
        self._count = count
        if not self.addresses or self.stopping.is_set():
            return
        for i in range(count):
            if i not in self._slots:
                task = self.loop.create_task(self._slot(i), name=f"opf-slot-{i}")
                self._slots[i] = task

    async def _sleep(self, delay: float, *also: asyncio.Event) -> None:
        """Sleeps for delay, or until stopping (or one of also) is set."""
        waits = [self.loop.create_task(e.wait()) for e in (self.stopping, *also)]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # --- one slot -------------------------------------------------------

    async def _slot(self, index: int) -> None:
        attempt = 0
        failures = 0  # in a row: the first shows as a warning
        try:
            while not self.stopping.is_set() and index < self._count:
                address = self.addresses[index % len(self.addresses)]
                try:
                    t = await self._connect(address)
                except _Stopped:
                    return
                except AttemptFailed as e:
                    self.last_error = e
                    delay = self.opts.backoff.delay(attempt)
                    attempt += 1
                    failures += 1
                    # The first failure of a series shows with no logging set up.
                    level = logging.WARNING if e.rejected or failures == 1 else logging.INFO
                    what = "registration refused" if e.rejected else "connection attempt failed"
                    log.log(
                        level,
                        "slot %d: %s (%s): %s; trying again in %.2fs",
                        index,
                        what,
                        address.grpc_target,
                        _status.describe(e.status),
                        delay,
                    )
                    self._resolve_now.set()
                    await self._sleep(delay)
                    continue
                attempt = 0
                failures = 0
                self.last_error = None
                log.info(
                    "registered as %s with the operator at %s (replica %s)",
                    t.instance_id,
                    address.grpc_target,
                    t.replica_id or "unnamed",
                )
                self.registered[t] = t.instance_id
                self.ever_registered.set()
                self._signal_registered()
                stop = self.loop.create_task(self.stopping.wait())
                await asyncio.wait([t.ended, t.goaway, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if self.stopping.is_set() and not t.ended.done():
                    return  # run() drains every tunnel
                if t.ended.done():
                    self._resolve_now.set()
                    delay = self.opts.backoff.delay(attempt)
                    attempt += 1
                    log.info(
                        "slot %d: tunnel lost (%s); reconnecting in %.2fs",
                        index,
                        _status.describe(t.ended.result()),
                        delay,
                    )
                    await self._sleep(delay)
                else:
                    log.info("slot %d: reconnecting at once after the operator's GoAway", index)
        finally:
            if self._slots.get(index) is asyncio.current_task():
                del self._slots[index]

    def _signal_registered(self) -> None:
        self.registered_changed.set()
        self.registered_changed = asyncio.Event()

    async def _connect(self, address: Address) -> Tunnel:
        """One attempt: dial, Hello, Register; returns the registered tunnel."""
        opts = self.opts
        deadline = self.loop.time() + opts.handshake_timeout
        try:
            channel, metadata = self._channel(address)
        except (OSError, ValueError) as e:
            raise AttemptFailed(_status.new(_status.UNAUTHENTICATED, str(e))) from e
        call: Any = channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=None,
            response_deserializer=None,
        )(metadata=metadata)
        t = Tunnel(self.core, call, address, self._on_hello)
        self.tunnels.add(t)
        t.ended.add_done_callback(lambda _: self._ended(t, channel))
        t.goaway.add_done_callback(lambda _: self._holding.discard(t))
        t.start()
        stop = self.loop.create_task(self.stopping.wait())
        try:
            waits: list[asyncio.Future[Any]] = [t.answer, stop]
            await asyncio.wait(
                waits,
                timeout=max(deadline - self.loop.time(), 0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop.cancel()
        if t.answer.done():
            t.answer.result()  # raises AttemptFailed
            if not self.stopping.is_set():
                return t
        if self.stopping.is_set():
            t.close(_status.new(_status.UNAVAILABLE, "plugin shutting down"))
            raise _Stopped
        st = _status.new(
            _status.DEADLINE_EXCEEDED, "no answer to the registration before the handshake timeout"
        )
        t.close(st)
        raise AttemptFailed(st)

    def _channel(self, address: Address) -> tuple[grpc.aio.Channel, list[tuple[str, str]]]:
        opts = self.opts
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.core.settings.max_batch_size),
            ("grpc.max_send_message_length", -1),
            ("grpc.enable_retries", 0),
            # Each tunnel its own connection: a load balancer spreads them,
            # and a GoAway's new tunnel may reach another replica.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.http2.write_buffer_size", WRITE_BUFFER_SIZE),
        ]
        authority = self.target.authority
        if authority:
            options.append(("grpc.default_authority", authority))
        metadata: list[tuple[str, str]] = []
        if opts.token is not None:
            metadata.append(("authorization", f"Bearer {opts.token()}"))
        if opts.tls is None:
            options.extend(opts.channel_options)
            return grpc.aio.insecure_channel(address.grpc_target, options=options), metadata
        name = opts.tls.server_name or self.target.tls_host
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        options.extend(opts.channel_options)
        creds = grpc.ssl_channel_credentials(root_certificates=opts.tls.read_ca())
        return grpc.aio.secure_channel(address.grpc_target, creds, options=options), metadata

    def _on_hello(self, t: Tunnel) -> str | None:
        """The operator's Hello is in: a duplicate replica, or register (14.3)."""
        rid = t.replica_id
        if rid:
            for other in self._holding:
                if other is not t and other.replica_id == rid and other.closed is None:
                    return rid
        self._holding.add(t)
        if t.replica_count:
            self._resize()
        return None

    def _ended(self, t: Tunnel, channel: grpc.aio.Channel) -> None:
        self.tunnels.discard(t)
        self._holding.discard(t)
        if self.registered.pop(t, None) is not None:
            self._signal_registered()
        task = self.loop.create_task(channel.close())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        if t.replica_count:
            self._resize()
