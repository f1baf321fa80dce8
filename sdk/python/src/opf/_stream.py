"""One call the operator opened: the handler side's stream (spec 6.5, 7, 8).

The read task calls the on_* methods, which never wait. The handler's task
reads with recv() and writes with send_message(), which wait for data and
for credit. Credit for received data is returned as the handler consumes
it, in WindowUpdates of at least a quarter window (8.1).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.rpc import status_pb2

from opf import _status, _wire
from opf._defaults import CHUNK_COST, MAX_SETTING
from opf._status import CallError
from opf._writer import Queued

if TYPE_CHECKING:
    from opf._metadata import Metadatum
    from opf._tunnel import Tunnel

# States (6.5).
OPEN = 0
HALF_CLOSED = 1  # HALF_CLOSED_REMOTE: the operator sent its last request
CANCELLING = 2  # the operator cancelled; our StreamClose is still owed
CLOSED = 3  # our StreamClose is queued (or the tunnel closed)


def _violation(message: str) -> status_pb2.Status:
    return _status.new(_status.INTERNAL, message)


class HandlerStream(Queued):
    __slots__ = (
        "_asm",
        "_asm_need",
        "_chunks",
        "_done_callbacks",
        "_pending",
        "_recv_credit",
        "_recv_waiter",
        "_send_credit",
        "_send_waiters",
        "_timer",
        "_unacked",
        "_unsent",
        "_unsent_size",
        "_update_at",
        "cancel_status",
        "deadline",
        "headers_sent",
        "id",
        "metadata",
        "method",
        "on_cancel_context",
        "state",
        "tunnel",
    )

    def __init__(
        self,
        tunnel: Tunnel,
        stream_id: int,
        method: str,
        metadata: tuple[Metadatum, ...],
        deadline: float | None,
    ) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.id = stream_id
        self.method = method
        self.metadata = metadata
        self.deadline = deadline  # loop time, or None
        self.state = OPEN
        # Received chunks not yet consumed: (size of the message on a first
        # chunk, else -1; data).
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._pending = 0  # bytes still due for the message being received
        self._recv_credit = tunnel.local_window  # what the operator may still send
        self._unacked = 0  # consumed credit not yet returned
        self._update_at = tunnel.local_window // 4
        self._asm: list[bytes] | None = None  # message being reassembled
        self._asm_need = 0
        self._recv_waiter: asyncio.Future[None] | None = None
        self._send_credit = tunnel.peer_window
        self._send_waiters: list[asyncio.Future[None]] = []
        # Why the handler's context was cancelled; reads and writes then
        # fail with it.
        self.cancel_status: status_pb2.Status | None = None
        self.on_cancel_context: Callable[[], object] | None = None
        self.headers_sent = False
        # The rest of a message waiting for credit, and its size while none
        # of it has left (0 after its first chunk).
        self._unsent: memoryview | None = None
        self._unsent_size = 0
        self._done_callbacks: list[Callable[[], None]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if deadline is not None:
            self._timer = tunnel.loop.call_at(deadline, self._expire)

    # --- the read task's side -------------------------------------------

    def on_message(self, m: Any) -> status_pb2.Status | None:
        """A StreamMessage chunk; returns a violation status, or None (7.2)."""
        state = self.state
        if state >= CANCELLING:
            return None
        if state == HALF_CLOSED:
            return _violation("message after half-close")
        data: bytes = m.data
        n = len(data)
        self._recv_credit -= n + CHUNK_COST
        if self._recv_credit < 0:
            return _violation("flow-control window exceeded")
        if self._pending == 0:
            size: int = m.size
            limit = self.tunnel.local_max_message
            if size > limit:
                return _status.new(
                    _status.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({size} vs. {limit})",
                )
            if n > size:
                return _violation("message chunk longer than its declared size")
            self._pending = size - n
            self._chunks.append((size, data))
        else:
            if n == 0:
                return _violation("empty continuation chunk")
            if n > self._pending:
                return _violation("message chunk longer than its declared size")
            self._pending -= n
            self._chunks.append((-1, data))
        w = self._recv_waiter
        if w is not None and not w.done():
            w.set_result(None)
        return None

    def on_half_close(self) -> status_pb2.Status | None:
        if self.state == OPEN:
            if self._pending:
                return _violation("half-close in the middle of a message")
            self.state = HALF_CLOSED
            self._wake()
            return None
        if self.state == HALF_CLOSED:
            return _violation("second half-close")
        return None

    def on_window_update(self, increment: int) -> status_pb2.Status | None:
        live = self.state < CANCELLING
        if increment == 0:
            return _violation("window update of zero") if live else None
        self._send_credit += increment
        if self._send_credit > MAX_SETTING and live:
            return _violation("window update overflows the window")
        if self._unsent is not None and live and self.cancel_status is None:
            self._push()
        return None

    def on_cancel(self, p: status_pb2.Status | None) -> None:
        """The operator cancelled the call (6.5)."""
        if self.state >= CANCELLING:
            return
        st = _status.received(p, _status.CANCELLED)
        if st.code == _status.OK:
            st = _status.new(_status.CANCELLED, st.message)
        self.state = CANCELLING
        self._chunks.clear()
        self._asm = None
        # Headers and messages not yet sent would be ignored; the StreamClose
        # the handler owes still leaves once it returns.
        self.tunnel.writer.discard(self, abort=False)
        self.cancel_context(st)

    # --- ending ---------------------------------------------------------

    def cancel_context(self, st: status_pb2.Status) -> None:
        """Cancels the handler's context: reads and writes fail with st."""
        if self.cancel_status is not None:
            return
        self.cancel_status = st
        self._unsent = None
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.on_cancel_context is not None:
            self.on_cancel_context()
        self._run_done_callbacks()

    def _expire(self) -> None:
        self._timer = None
        if self.state < CLOSED:
            self.cancel_context(_status.new(_status.DEADLINE_EXCEEDED, "deadline exceeded"))

    def abort(self, st: status_pb2.Status) -> None:
        """Ends the stream from this side with st (6.6): StreamClose now."""
        if self.state >= CANCELLING:
            return  # never aborted twice; a cancelled stream's close is owed anyway
        self.state = CLOSED
        t = self.tunnel
        t.writer.discard(self, abort=True)
        self._chunks.clear()
        self._asm = None
        t.forget(self)  # before the close: the operator may reuse the slot at once
        t.control(_wire.close(self.id, st))
        self.cancel_context(st)

    def finish(self, frames: list[_wire.Encoded]) -> None:
        """The handler returned: frames (ending with its StreamClose) leave
        after what it sent (6.7). Nothing leaves for a stream already closed."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        t = self.tunnel
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t.forget(self)
        w = t.writer
        for f in frames:
            w.enqueue(self, f)
        self._run_done_callbacks()

    def tunnel_closed(self, st: status_pb2.Status) -> None:
        """The tunnel is gone: nothing more is sent or received."""
        self.state = CLOSED
        self.aborted = True
        self._chunks.clear()
        self._asm = None
        self.cancel_context(st)

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        if self._done_callbacks is None:
            self._done_callbacks = []
        self._done_callbacks.append(cb)

    def _run_done_callbacks(self) -> None:
        cbs, self._done_callbacks = self._done_callbacks, None
        if cbs:
            for cb in cbs:
                self.tunnel.loop.call_soon(cb)

    def _wake(self) -> None:
        w = self._recv_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._wake_senders()

    def _wake_senders(self) -> None:
        waiters, self._send_waiters = self._send_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # --- the handler's side ---------------------------------------------

    def _consumed(self, n: int) -> None:
        if self.state >= CANCELLING:
            return
        self._unacked += n + CHUNK_COST
        if self._unacked >= self._update_at:
            inc, self._unacked = self._unacked, 0
            self._recv_credit += inc
            self.tunnel.control(_wire.window_update(self.id, inc))

    def _take(self) -> bytes | None:
        """Moves received chunks into the message being assembled; returns
        the message once whole."""
        chunks = self._chunks
        while chunks:
            size, data = chunks.popleft()
            self._consumed(len(data))
            if size >= 0:
                if size == len(data):
                    return data  # the common case: one chunk, no copy
                self._asm = [data]
                self._asm_need = size - len(data)
                continue
            asm = self._asm
            if asm is None:  # cannot happen: on_message checked the order
                continue
            asm.append(data)
            self._asm_need -= len(data)
            if self._asm_need == 0:
                self._asm = None
                return b"".join(asm)
        return None

    async def recv(self) -> bytes | None:
        """The next request message, or None after the last one."""
        while True:
            if self.cancel_status is not None:
                raise CallError(self.cancel_status)
            if self._chunks:
                msg = self._take()
                if msg is not None:
                    return msg
            if self.state == HALF_CLOSED and not self._chunks and self._asm is None:
                return None
            if self.state == CLOSED:
                raise CallError(_status.new(_status.CANCELLED, "the call has ended"))
            w = self._recv_waiter = self.tunnel.loop.create_future()
            try:
                await w
            finally:
                self._recv_waiter = None

    def check_send(self) -> None:
        if self.cancel_status is not None:
            raise CallError(self.cancel_status)
        if self.state >= CANCELLING:
            raise CallError(_status.new(_status.CANCELLED, "the call has ended"))

    async def send_message(self, data: bytes, prefix: _wire.Encoded | None = None) -> None:
        """Queues one message, chunked as credit allows (7.1, 8.1); prefix
        (the headers) goes first."""
        self.check_send()
        n = len(data)
        t = self.tunnel
        limit = t.peer_max_message
        if n > limit:
            raise CallError(
                _status.new(
                    _status.RESOURCE_EXHAUSTED,
                    f"trying to send message larger than max ({n} vs. {limit})",
                )
            )
        if self._unsent is not None:
            await self.flush()  # at most one message waits for credit
        w = t.writer
        if prefix is not None:
            w.enqueue(self, prefix)
        if n + CHUNK_COST <= self._send_credit and n <= t.max_chunk:
            self._send_credit -= n + CHUNK_COST
            w.enqueue(self, _wire.message(self.id, n, data))
            return
        # What the credit does not cover leaves from on_window_update, so
        # that the handler makes its next message meanwhile. It sends what
        # the credit allows rather than wait for whole chunks: with the
        # default 2 MiB window, two 1 MiB messages need 128 bytes more than
        # the window, so waiting would leave one message in flight.
        self._unsent = memoryview(data)
        self._unsent_size = n
        self._push()

    def _push(self) -> None:
        """Queues as much of the message waiting for credit as credit allows."""
        v = self._unsent
        if v is None:
            return
        t = self.tunnel
        while True:
            left = len(v)
            credit = self._send_credit
            if credit < CHUNK_COST + (1 if left else 0):
                self._unsent = v
                return
            k = min(left, credit - CHUNK_COST, t.max_chunk)
            self._send_credit -= k + CHUNK_COST
            t.writer.enqueue(self, _wire.message(self.id, self._unsent_size, v[:k]))
            self._unsent_size = 0  # the size goes on the first chunk only
            if k == left:
                break
            v = v[k:]
        self._unsent = None
        self._wake_senders()

    async def flush(self) -> None:
        """Waits until the message waiting for credit has left in full."""
        while self._unsent is not None:
            self.check_send()
            fut = self.tunnel.loop.create_future()
            self._send_waiters.append(fut)
            await fut
        self.check_send()
