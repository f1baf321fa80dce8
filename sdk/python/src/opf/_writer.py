"""The one task that writes batches to the Connect call (spec 3.4).

Everything else queues encoded frames here and never waits on the
transport. Control frames leave first (with at most one pending Pong, so a
ping flood cannot grow the queue), then the streams with queued frames take
turns, one frame each, so that one large message does not hold back the
others. Frames queued together leave in one batch, up to the peer's batch
limit and 4,096 frames.

grpc.aio lets one write be in flight, and completes it once grpcio's
transport has passed the whole batch through HTTP/2 flow control. With the
Go operator's 256 KiB batches a 1 MiB message is five writes, each waiting
for that: the sender idles between them. So the writer builds the next batch
before it writes the current one, and when there is a next batch it writes
the current one with grpcio's buffer hint (GRPC_WRITE_BUFFER_HINT), which
completes the write as soon as the transport holds it, up to the channel's
grpc.http2.write_buffer_size (_slots sets WRITE_BUFFER_SIZE). The batch after
it always follows at once, without the hint when it is the last, and that
write starts the transport. grpc.aio has no write flags: the hint goes
through grpcio's Cython layer, which this module checks for at start, using
plain writes when it is not as expected.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from opf import _wire
from opf._defaults import (
    BATCH_RESERVE,
    CONTROL_QUEUE_LIMIT,
    MAX_FRAMES_PER_BATCH,
    UNREGISTERED_BATCH_LIMIT,
)

if TYPE_CHECKING:
    from opf._wire import Encoded

log = logging.getLogger(__name__)


class Call(Protocol):
    """The half of grpc.aio's StreamStreamCall the writer uses."""

    def write(self, request: Any) -> Awaitable[None]: ...

    def done_writing(self) -> Awaitable[None]: ...


class Queued:
    """What the writer keeps per stream; _stream.HandlerStream inherits it."""

    __slots__ = ("aborted", "out", "queued")

    def __init__(self) -> None:
        self.out: deque[Encoded] = deque()
        self.queued = False  # in the writer's turn order
        self.aborted = False  # nothing more leaves on this stream


class ControlQueueFull(Exception):
    pass


HintedSend: TypeAlias = Callable[[bytes, bool], Awaitable[None]]

# The parameters of grpcio's cygrpc._send_message, which grpc.aio's
# send_serialized_message calls with a write flag of 0 (grpcio 1.85).
_SEND_MESSAGE_PARAMS = (
    "grpc_call_wrapper",
    "message",
    "send_initial_metadata_op",
    "write_flag",
    "loop",
)


def hinted_send(call: Any) -> HintedSend | None:
    """A function that writes a batch to call, with the buffer hint when
    asked; None when grpcio's internals are not those this SDK knows (then
    every write is a plain call.write)."""
    try:
        cygrpc = importlib.import_module("grpc._cython.cygrpc")
        send = cygrpc._send_message
        flag = int(cygrpc.WriteFlag.buffer_hint)
        params = tuple(inspect.signature(send).parameters)
        cython_call = call._cython_call
    except Exception:
        return None
    if params != _SEND_MESSAGE_PARAMS:
        return None
    loop = asyncio.get_running_loop()

    def write(batch: bytes, hint: bool) -> Awaitable[None]:
        result: Awaitable[None] = send(cython_call, batch, None, flag if hint else 0, loop)
        return result

    return write


class Writer:
    def __init__(self, call: Call, on_error: Callable[[BaseException], None]) -> None:
        self._call = call
        self._on_error = on_error
        self._ctrl: deque[Encoded] = deque()
        self._pong: bytes | None = None
        self._ready: deque[Queued] = deque()
        self._limit = UNREGISTERED_BATCH_LIMIT - BATCH_RESERVE
        self._wake = asyncio.Event()
        self._flush = False
        self.flushed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.batches = 0  # sent, for the debug log
        self.bytes = 0

    def set_peer_limit(self, max_batch_size: int) -> None:
        """Once registered, batches may grow to the peer's max_batch_size."""
        self._limit = max_batch_size - BATCH_RESERVE

    def control(self, frame: Encoded) -> None:
        """Queues a frame ahead of stream data; raises ControlQueueFull."""
        if len(self._ctrl) >= CONTROL_QUEUE_LIMIT:
            raise ControlQueueFull
        self._ctrl.append(frame)
        self._wake.set()

    def pong(self, nonce: int) -> None:
        self._pong = _wire.pong(nonce)  # only the latest answer is kept (11)
        self._wake.set()

    def enqueue(self, s: Queued, frame: Encoded) -> None:
        """Appends to a stream's ordered queue. Data frames carry credit the
        stream has taken already, which bounds the queue."""
        if s.aborted:
            return
        s.out.append(frame)
        if not s.queued:
            s.queued = True
            self._ready.append(s)
        self._wake.set()

    def discard(self, s: Queued, *, abort: bool) -> None:
        """Drops what a stream has queued; with abort, anything it queues later."""
        s.out.clear()
        if abort:
            s.aborted = True

    def flush(self) -> None:
        """Sends what is queued, then half-closes the Connect call."""
        self._flush = True
        self._wake.set()

    def _collect(self) -> list[_wire.Data]:
        parts: list[_wire.Data] = []
        size = 0
        n = 0
        limit = self._limit
        ctrl = self._ctrl
        while ctrl and n < MAX_FRAMES_PER_BATCH:
            f = ctrl[0]
            fs = _wire.encoded_size(f)
            if n and size + fs > limit:
                return parts
            ctrl.popleft()
            if isinstance(f, bytes):
                parts.append(f)
            else:
                parts += f
            size += fs
            n += 1
        pong = self._pong
        if pong is not None and n < MAX_FRAMES_PER_BATCH and (not n or size + len(pong) <= limit):
            parts.append(pong)
            size += len(pong)
            n += 1
            self._pong = None
        ready = self._ready
        while ready and n < MAX_FRAMES_PER_BATCH:
            s = ready[0]
            if not s.out:  # discarded
                ready.popleft()
                s.queued = False
                continue
            f = s.out[0]
            fs = _wire.encoded_size(f)
            if n and size + fs > limit:
                break
            s.out.popleft()
            if isinstance(f, bytes):
                parts.append(f)
            else:
                parts += f
            size += fs
            n += 1
            ready.popleft()
            if s.out:
                ready.append(s)
            else:
                s.queued = False
        return parts

    def _batch(self) -> bytes | None:
        parts = self._collect()
        if not parts:
            return None
        batch = parts[0] if len(parts) == 1 else b"".join(parts)
        self.batches += 1
        self.bytes += len(batch)
        return batch  # type: ignore[return-value] # a lone part is bytes: memoryviews come after a head

    async def run(self) -> None:
        call = self._call
        # The first write goes through grpc.aio, which sends the call's
        # headers first; the hinted ones follow it.
        hinted: HintedSend | None = None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch = self._batch()
                while batch is not None:
                    following = self._batch()
                    if hinted is None:
                        await call.write(batch)
                        hinted = hinted_send(call) or _plain(call)
                    else:
                        await hinted(batch, following is not None)
                    batch = following
                if self._flush and not self._ctrl and not self._ready and self._pong is None:
                    await call.done_writing()
                    if not self.flushed.done():
                        self.flushed.set_result(None)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the call ended under us
            log.debug("tunnel write failed: %r", e)
            if not self.flushed.done():
                self.flushed.set_result(None)
            self._on_error(e)


def _plain(call: Call) -> HintedSend:
    def write(batch: bytes, hint: bool) -> Awaitable[None]:
        return call.write(batch)

    return write
