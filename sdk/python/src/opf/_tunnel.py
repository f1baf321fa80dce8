"""One tunnel: a Connect call, its handshake, reader, writer and heartbeats.

The read task decodes each batch and acts on its frames at once, never
waiting on the application (spec 3.4): stream data goes to the stream's
buffer, answers to the writer, and each call the operator opens starts a
handler task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from opf import _metadata, _status, _wire
from opf._defaults import (
    CHUNK_COST,
    CLOSE_WAIT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    HEARTBEAT_TIMEOUT_FACTOR,
    LIVENESS_CHECKS_PER_INTERVAL,
    MAX_CHUNK,
    MAX_DURATION_SECONDS,
    MAX_FRAMES_PER_BATCH,
    MAX_REPLICA_ID,
    MAX_SETTING,
    MIN_HEARTBEAT_INTERVAL,
    MIN_MAX_BATCH_SIZE,
    MIN_WINDOW,
    PROTOCOL_VERSION,
)
from opf._proto.pluginframework.v1 import tunnel_pb2 as pb
from opf._stream import CANCELLING, HandlerStream
from opf._writer import ControlQueueFull, Writer

if TYPE_CHECKING:
    from opf._core import Core
    from opf._target import Address

log = logging.getLogger(__name__)

_TUNNEL_KINDS = frozenset(
    {"hello", "register", "register_ack", "register_reject", "ping", "pong", "go_away"}
)


class AttemptFailed(Exception):
    """A connection attempt that did not register; status says why."""

    def __init__(self, status: status_pb2.Status, *, rejected: bool = False) -> None:
        super().__init__(_status.describe(status))
        self.status = status
        self.rejected = rejected


def _valid_duration(d: Any) -> bool:
    s, n = d.seconds, d.nanos
    if abs(n) >= 1_000_000_000 or abs(s) > MAX_DURATION_SECONDS:
        return False
    return not ((s > 0 and n < 0) or (s < 0 and n > 0))


def _settings_error(s: Any) -> str | None:
    if s.max_message_size > MAX_SETTING:
        return f"max_message_size {s.max_message_size} out of range"
    w = s.initial_window_size
    if w and not MIN_WINDOW <= w <= MAX_SETTING:
        return f"initial_window_size {w} out of range [{MIN_WINDOW}, {MAX_SETTING}]"
    if s.max_concurrent_streams > MAX_SETTING:
        return f"max_concurrent_streams {s.max_concurrent_streams} out of range"
    if s.HasField("heartbeat_interval"):
        d = s.heartbeat_interval
        if not _valid_duration(d):
            return "heartbeat_interval is not a valid duration"
        if d.seconds < 0 or d.nanos < 0:
            return "heartbeat_interval is negative"
    b = s.max_batch_size
    if b and not MIN_MAX_BATCH_SIZE <= b <= MAX_SETTING:
        return f"max_batch_size {b} out of range [{MIN_MAX_BATCH_SIZE}, {MAX_SETTING}]"
    return None


def _well_formed_method(m: str) -> bool:
    if len(m) < 4 or m[0] != "/":
        return False
    i = m.rfind("/")
    return i not in (0, 1, len(m) - 1)


class Tunnel:
    """One Connect call. Created by a slot; see _slots.Slot for its life."""

    def __init__(
        self,
        core: Core,
        call: Any,
        address: Address,
        on_hello: Callable[[Tunnel], str | None],
    ) -> None:
        self.core = core
        self.call = call
        self.address = address
        self._on_hello = on_hello
        self.loop = asyncio.get_running_loop()
        self.writer = Writer(call, self._write_failed)
        self.streams: dict[int, HandlerStream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_peer_id = 0
        s = core.settings
        self.local_window = s.initial_window_size
        self.local_max_message = s.max_message_size
        self.local_max_streams = s.max_concurrent_streams
        # The operator's settings, once its Hello is in.
        self.peer_window = DEFAULT_INITIAL_WINDOW_SIZE
        self.peer_max_message = DEFAULT_MAX_MESSAGE_SIZE
        self.peer_max_batch = DEFAULT_MAX_BATCH_SIZE
        self.max_chunk = MAX_CHUNK
        self.heartbeat_interval = 0.0
        self.hello_received = False
        self.replica_id = ""
        self.replica_count = 0
        self.registered = False
        self.answered = False
        self.instance_id = ""
        self.goaway_sent = False
        self.goaway_received: status_pb2.Status | None = None
        self.failure: status_pb2.Status | None = None
        self.closed: status_pb2.Status | None = None
        self.last_recv = self.loop.time()
        self.batches_in = 0  # for the debug log
        self.bytes_in = 0
        self.answer: asyncio.Future[str] = self.loop.create_future()
        self.ended: asyncio.Future[status_pb2.Status] = self.loop.create_future()
        self.goaway: asyncio.Future[status_pb2.Status] = self.loop.create_future()
        self._draining = False  # our own drain: its end is no news
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._call_status: grpc.aio.AioRpcError | None = None
        self._call_status_set = asyncio.Event()
        call.add_done_callback(self._on_call_done)

    # --- life -------------------------------------------------------------

    def start(self) -> None:
        self.writer.control(self.core.hello_frame)
        self._tasks = [
            self.loop.create_task(self._read_loop(), name="opf-tunnel-reader"),
            self.loop.create_task(self.writer.run(), name="opf-tunnel-writer"),
        ]

    def describe(self) -> str:
        return self.instance_id or self.address.grpc_target

    def control(self, frame: _wire.Encoded) -> None:
        """Queues a control frame; a full queue ends the tunnel (3.4)."""
        if self.closed is not None:
            return
        try:
            self.writer.control(frame)
        except ControlQueueFull:
            self.close(
                _status.new(
                    _status.RESOURCE_EXHAUSTED, "tunnel control queue full: the peer is not reading"
                )
            )

    def fail(self, st: status_pb2.Status) -> None:
        """A tunnel error (10.4): GoAway with it, flush, close."""
        if self.failure is not None or self.closed is not None:
            return
        self.failure = st
        self.goaway_sent = True
        log.warning("tunnel %s: protocol error: %s", self.describe(), _status.describe(st))
        self.control(_wire.go_away(st, self.max_peer_id))
        self.writer.flush()
        self.loop.call_later(CLOSE_WAIT, self.close, st)
        self._fail_attempt(st)

    def close(self, st: status_pb2.Status) -> None:
        """Ends the tunnel at once (12.4): streams end, nothing more is sent."""
        if self.closed is not None:
            return
        reason = self.failure or st
        self.closed = reason
        call_status = _status.new(
            _status.UNAVAILABLE,
            "plugin tunnel closed"
            if reason.code == _status.OK
            else f"plugin tunnel closed: {reason.message}",
        )
        streams = list(self.streams.values())
        self.streams.clear()
        for s in streams:
            s.tunnel_closed(call_status)
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        self.call.cancel()
        self._fail_attempt(reason)
        if not self.ended.done():
            self.ended.set_result(reason)
        self._idle.set()
        log.debug(
            "tunnel %s: %d batches (%d bytes) received, %d batches (%d bytes) sent",
            self.describe(),
            self.batches_in,
            self.bytes_in,
            self.writer.batches,
            self.writer.bytes,
        )
        if not self._draining and (
            reason.code not in (_status.OK, _status.UNAVAILABLE) or self.registered
        ):
            log.info("tunnel %s closed: %s", self.describe(), _status.describe(reason))

    def _fail_attempt(self, st: status_pb2.Status) -> None:
        if not self.answer.done():
            self.answer.set_exception(AttemptFailed(st))
            self.answer.exception()  # retrieved: the slot may be gone

    def _write_failed(self, e: BaseException) -> None:
        if self.closed is None:
            self._tasks.append(self.loop.create_task(self._close_with_final_status(e)))

    async def _close_with_final_status(self, e: BaseException) -> None:
        """Closes with the status the operator sent, not grpcio's placeholder.

        A write that fails because the operator already ended the call (a
        refused token, say) makes grpcio replace the call's status with
        INTERNAL "Internal error from Core", before or after the operator's
        status arrives; _on_call_done keeps the first real one. A hinted
        write (_writer) fails with grpcio's own exception, not a status: the
        same wait gives the call's.
        """
        if _is_core_placeholder(e) or not isinstance(e, grpc.aio.AioRpcError):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._call_status_set.wait(), FINAL_STATUS_GRACE)
            if self._call_status is not None:
                e = self._call_status
        self.close(_transport_status(e))

    def _on_call_done(self, call: Any) -> None:
        """grpcio calls this each time it sets the call's status."""
        if self._call_status is not None:
            return
        code, details = _now(call.code()), _now(call.details())
        if code is None or (code == grpc.StatusCode.INTERNAL and details == _CORE_PLACEHOLDER):
            return
        empty = grpc.aio.Metadata()
        self._call_status = grpc.aio.AioRpcError(code, empty, empty, details)
        self._call_status_set.set()

    async def drain(self, timeout: float) -> None:
        """Plugin shutdown (12.4): GoAway, let calls finish, half-close."""
        if self.closed is not None:
            return
        self._draining = True
        if not self.registered:
            self.close(_status.new(_status.UNAVAILABLE, "plugin shutting down"))
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self.control(
                _wire.go_away(
                    _status.new(_status.UNAVAILABLE, "plugin shutting down"), self.max_peer_id
                )
            )
        deadline = self.loop.time() + timeout
        try:
            while self.streams and self.closed is None:
                self._idle.clear()
                await asyncio.wait_for(self._idle.wait(), max(deadline - self.loop.time(), 0))
        except asyncio.TimeoutError:
            log.warning(
                "tunnel %s: drain timeout with %d calls in flight",
                self.describe(),
                len(self.streams),
            )
            self.close(_status.new(_status.UNAVAILABLE, "drain timeout: plugin shutting down"))
            return
        if self.is_closed():
            return
        self.writer.flush()
        try:
            await asyncio.wait_for(
                asyncio.shield(self.writer.flushed), max(deadline - self.loop.time(), 0.05)
            )
            await asyncio.wait_for(asyncio.shield(self.ended), CLOSE_WAIT)
        except asyncio.TimeoutError:
            pass
        self.close(_status.new(_status.OK, "drained"))

    def is_closed(self) -> bool:
        return self.closed is not None

    def forget(self, s: HandlerStream) -> None:
        """A stream finished: its concurrency slot is free (6.7)."""
        if self.streams.pop(s.id, None) is not None and not self.streams:
            self._idle.set()

    # --- reading ----------------------------------------------------------

    async def _read_loop(self) -> None:
        call = self.call
        decode = pb.ConnectResponse.FromString
        try:
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    self.close(_status.new(_status.UNAVAILABLE, "peer closed the tunnel"))
                    return
                self.last_recv = self.loop.time()
                self.batches_in += 1
                self.bytes_in += len(data)
                try:
                    frames = decode(data).frames
                except DecodeError as e:
                    # The operator's gRPC layer would have reported INTERNAL.
                    self.close(_status.new(_status.INTERNAL, f"malformed batch: {e}"))
                    return
                if len(frames) > MAX_FRAMES_PER_BATCH:
                    self.fail(
                        _status.new(_status.RESOURCE_EXHAUSTED, "batch of more than 4096 frames")
                    )
                    continue
                for f in frames:
                    self._on_frame(f)
                    if self.closed is not None:
                        return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._close_with_final_status(e)

    def _on_frame(self, f: Any) -> None:
        kind = f.WhichOneof("kind")
        if kind is None:
            return  # a kind from a later revision: ignored (15)
        sid = f.stream_id
        if sid == 0:
            if kind == "ping":
                self.writer.pong(f.ping.nonce)
            elif kind == "pong":
                pass
            elif kind == "go_away":
                self._on_go_away(f.go_away)
            elif kind == "hello":
                self._on_hello_frame(f.hello)
            elif kind in ("register_ack", "register_reject"):
                self._on_answer(f)
            elif kind == "register":
                self.fail(_status.new(_status.INTERNAL, "register sent to a plugin"))
            else:
                self.fail(_status.new(_status.INTERNAL, f"stream frame {kind} on stream 0"))
            return
        if kind in _TUNNEL_KINDS:
            self.fail(_status.new(_status.INTERNAL, f"tunnel frame {kind} on stream {sid}"))
            return
        if not self.registered:
            self.fail(_status.new(_status.INTERNAL, f"stream frame {kind} before registration"))
            return
        if kind == "open":
            self._on_open(sid, f.open)
            return
        s = self.streams.get(sid)
        if s is None:
            self._orphan(sid, kind)
            return
        if kind == "message":
            st = s.on_message(f.message)
        elif kind == "half_close":
            st = s.on_half_close()
        elif kind == "window_update":
            st = s.on_window_update(f.window_update.increment)
        elif kind == "cancel":
            c = f.cancel
            s.on_cancel(c.status if c.HasField("status") else None)
            st = None
        elif s.state >= CANCELLING:
            st = None
        elif kind == "headers":
            try:
                _metadata.decode(f.headers.metadata)
                st = _status.new(_status.INTERNAL, "headers sent by the caller")
            except _metadata.MetadataError as e:
                st = _status.new(_status.INTERNAL, f"malformed headers: {e}")
        else:  # close
            st = _status.new(_status.INTERNAL, "close sent by the caller")
        if st is not None:
            log.debug("stream %d (%s): protocol error: %s", sid, s.method, st.message)
            s.abort(st)

    def _orphan(self, sid: int, kind: str) -> None:
        """A frame for a stream that is not open here (6.3)."""
        if kind in ("cancel", "close"):
            return
        if sid % 2 == 1 and sid <= self.max_peer_id:
            return  # ended here; the operator had not heard yet
        st = _status.new(_status.INTERNAL, f"frame for unknown stream {sid}")
        self.control(_wire.cancel(sid, st) if sid % 2 == 0 else _wire.close(sid, st))

    def _on_hello_frame(self, h: Any) -> None:
        if self.hello_received:
            self.fail(_status.new(_status.INTERNAL, "second hello"))
            return
        self.hello_received = True
        v = min(h.max_version, PROTOCOL_VERSION)
        if v < max(h.min_version, PROTOCOL_VERSION):
            self.fail(
                _status.new(
                    _status.FAILED_PRECONDITION,
                    f"no common protocol version: peer speaks {h.min_version}-{h.max_version}, "
                    f"this side {PROTOCOL_VERSION}-{PROTOCOL_VERSION}",
                )
            )
            return
        s = h.settings
        detail = _settings_error(s)
        if detail is not None:
            self.fail(_status.new(_status.INVALID_ARGUMENT, f"bad settings: {detail}"))
            return
        if len(h.replica_id.encode()) > MAX_REPLICA_ID:
            self.fail(
                _status.new(_status.INVALID_ARGUMENT, "bad hello: replica id longer than 253 bytes")
            )
            return
        self.peer_window = s.initial_window_size or DEFAULT_INITIAL_WINDOW_SIZE
        self.peer_max_message = s.max_message_size or DEFAULT_MAX_MESSAGE_SIZE
        self.peer_max_batch = s.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        self.max_chunk = min(MAX_CHUNK, self.peer_max_batch - CHUNK_COST)
        # The operator's max_concurrent_streams is moot: a plugin opens no
        # streams in version 2.
        peer_pref = 0.0
        if s.HasField("heartbeat_interval"):
            peer_pref = s.heartbeat_interval.seconds + s.heartbeat_interval.nanos / 1e9
        prefs = [p for p in (self.core.heartbeat_interval, peer_pref) if p]
        interval = max(prefs) if prefs else DEFAULT_HEARTBEAT_INTERVAL
        interval = max(interval, MIN_HEARTBEAT_INTERVAL)
        if self.core.max_heartbeat_interval:
            interval = min(interval, self.core.max_heartbeat_interval)
        self.heartbeat_interval = interval
        self._tasks.append(self.loop.create_task(self._heartbeat(interval), name="opf-heartbeat"))
        self.replica_id = h.replica_id
        self.replica_count = h.replica_count
        duplicate = self._on_hello(self)
        if duplicate is not None:
            st = _status.new(_status.UNAVAILABLE, f"duplicate tunnel to replica {duplicate}")
            self.goaway_sent = True
            self.failure = st
            self.control(_wire.go_away(st, self.max_peer_id))
            self.writer.flush()
            self._fail_attempt(st)
            self.loop.call_later(CLOSE_WAIT, self.close, st)
            return
        self.control(self.core.register_frame)

    def _on_answer(self, f: Any) -> None:
        if not self.hello_received or self.answered:
            self.fail(_status.new(_status.INTERNAL, "registration answer out of order"))
            return
        self.answered = True
        if f.WhichOneof("kind") == "register_ack":
            self.registered = True
            self.instance_id = f.register_ack.instance_id
            self.writer.set_peer_limit(self.peer_max_batch)
            if not self.answer.done():
                self.answer.set_result(self.instance_id)
            return
        r = f.register_reject
        st = _status.received(r.status if r.HasField("status") else None, _status.PERMISSION_DENIED)
        if st.code == _status.OK:
            st = _status.new(_status.PERMISSION_DENIED, st.message)
        if not self.answer.done():
            self.answer.set_exception(AttemptFailed(st, rejected=True))
        self.close(st)

    def _on_go_away(self, g: Any) -> None:
        st = _status.received(g.reason if g.HasField("reason") else None, _status.UNAVAILABLE)
        first = self.goaway_received is None
        self.goaway_received = st
        if first:
            if self.registered:
                log.info(
                    "tunnel %s: operator sent GoAway: %s", self.describe(), _status.describe(st)
                )
            if not self.goaway.done():
                self.goaway.set_result(st)
        if not self.registered:
            self._fail_attempt(
                _status.new(
                    _status.UNAVAILABLE,
                    f"operator sent GoAway before answering the registration: {st.message}",
                )
            )
            self.close(st)

    def _on_open(self, sid: int, o: Any) -> None:
        if sid % 2 == 0:
            self.fail(
                _status.new(_status.INTERNAL, f"peer opened stream {sid} with this side's parity")
            )
            return
        if sid <= self.max_peer_id:
            st = _status.new(_status.INTERNAL, f"stream id {sid} reused")
            live = self.streams.get(sid)
            if live is None:
                self.control(_wire.close(sid, st))
            elif live.state < CANCELLING:
                live.abort(st)
            return
        self.max_peer_id = sid
        method: str = o.method
        refuse: status_pb2.Status | None = None
        md: tuple[_metadata.Metadatum, ...] = ()
        deadline: float | None = None
        if self.goaway_sent:
            refuse = _status.new(_status.UNAVAILABLE, "tunnel is draining")
        elif len(self.streams) >= self.local_max_streams:
            refuse = _status.new(
                _status.RESOURCE_EXHAUSTED, f"more than {self.local_max_streams} concurrent streams"
            )
        elif not _well_formed_method(method):
            refuse = _status.new(_status.INTERNAL, f'malformed method name "{method}"')
        else:
            try:
                md = _metadata.decode(o.metadata)
            except _metadata.MetadataError as e:
                refuse = _status.new(_status.INTERNAL, f"malformed metadata: {e}")
            else:
                if o.HasField("timeout"):
                    t = o.timeout
                    if not _valid_duration(t) or t.seconds < 0 or (t.seconds == 0 and t.nanos <= 0):
                        refuse = _status.new(_status.INTERNAL, "malformed timeout")
                    else:
                        deadline = self.loop.time() + t.seconds + t.nanos / 1e9
        if refuse is not None:
            self.control(_wire.close(sid, refuse))
            return
        s = HandlerStream(self, sid, method, md, deadline)
        self.streams[sid] = s
        self._idle.clear()
        self.core.handlers.start(self, s)

    # --- heartbeats -------------------------------------------------------

    async def _heartbeat(self, interval: float) -> None:
        loop = self.loop
        check = interval / LIVENESS_CHECKS_PER_INTERVAL
        timeout = interval * HEARTBEAT_TIMEOUT_FACTOR
        next_ping = loop.time() + interval
        next_check = loop.time() + check
        nonce = 0
        while self.closed is None:
            await asyncio.sleep(max(min(next_ping, next_check) - loop.time(), 0))
            now = loop.time()
            late = now - next_check > check  # this process was not running
            if now >= next_ping:
                nonce += 1
                self.control(_wire.ping(nonce))
                next_ping += interval
                if next_ping < now:
                    next_ping = now + interval
            if now >= next_check:
                next_check = now + check
                silent = now - self.last_recv
                # After a stall of this process, batches that arrived meanwhile
                # may still wait to be read: look again one check later, as
                # long as that stays within the 2-interval bound (11).
                if late and silent + check < 2 * interval:
                    continue
                if silent > timeout:
                    self.close(
                        _status.new(
                            _status.UNAVAILABLE,
                            f"heartbeat timeout: nothing received from the peer for {silent:.3f}s",
                        )
                    )
                    return


_CORE_PLACEHOLDER = "Internal error from Core"
# How long a failed read or write waits for the operator's status (above).
FINAL_STATUS_GRACE = 0.5


def _now(coro: Any) -> Any:
    """The result of a grpc.aio coroutine that is ready, such as a finished
    call's code(), without awaiting it (inside a done callback); None if it
    would wait."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    return None


def _is_core_placeholder(e: BaseException) -> bool:
    return (
        isinstance(e, grpc.aio.AioRpcError)
        and e.code() == grpc.StatusCode.INTERNAL
        and e.details() == _CORE_PLACEHOLDER
    )


def _transport_status(e: BaseException) -> status_pb2.Status:
    """How the Connect call ended, as the tunnel's close reason."""
    if isinstance(e, grpc.aio.AioRpcError):
        code = _status.number_of(e.code())
        if code in (_status.OK, _status.CANCELLED):
            return _status.new(_status.UNAVAILABLE, "peer closed the tunnel")
        return _status.new(code, e.details() or "")
    return _status.new(_status.UNAVAILABLE, f"transport: {e!r}")
