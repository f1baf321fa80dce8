"""Encoding of the frames this side sends.

Outgoing batches are built by hand rather than through the protobuf runtime:
a batch is a ``ConnectRequest``, that is the concatenation of its frames, each
as field 1 (tag ``0x0a``), its length and the encoded ``Frame``. Encoding a
frame once, as bytes, lets the writer measure batches exactly and join them
with one copy of the message data. The bytes are standard protobuf (spec
3.1); incoming batches are decoded with the generated ``tunnel_pb2``.

An encoded frame is either ``bytes`` or, for a message chunk, a pair
``(head, data)``: the frame's encoding up to its data, and the data, which
the writer joins without copying it first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

from google.rpc import status_pb2

Data: TypeAlias = bytes | memoryview
Encoded: TypeAlias = bytes | tuple[bytes, Data]

_SMALL = [bytes([i]) for i in range(0x80)]


def varint(n: int) -> bytes:
    """The protobuf base-128 encoding of n >= 0."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encoded_size(e: Encoded) -> int:
    if isinstance(e, bytes):
        return len(e)
    return len(e[0]) + len(e[1])


# Tags of the Frame oneof fields (field number << 3 | wire type 2).
_HELLO = b"\x12"
_REGISTER = b"\x1a"
_PING = b"\x32"
_PONG = b"\x3a"
_GO_AWAY = b"\x42"
_HEADERS = b"\x5a"
_MESSAGE = b"\x62"
_CANCEL = b"\x72"
_CLOSE = b"\x7a"
_WINDOW_UPDATE = b"\x82\x01"


def _frame(stream_id: int, tag: bytes, payload: bytes) -> bytes:
    if stream_id:
        body = b"\x08" + varint(stream_id) + tag + varint(len(payload)) + payload
    else:
        body = tag + varint(len(payload)) + payload
    return b"\x0a" + varint(len(body)) + body


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def hello(payload: bytes) -> bytes:
    """A Hello frame; payload is an encoded tunnel_pb2.Hello."""
    return _frame(0, _HELLO, payload)


def register(payload: bytes) -> bytes:
    return _frame(0, _REGISTER, payload)


def ping(nonce: int) -> bytes:
    return _frame(0, _PING, b"\x08" + varint(nonce) if nonce else b"")


def pong(nonce: int) -> bytes:
    return _frame(0, _PONG, b"\x08" + varint(nonce) if nonce else b"")


def go_away(status: status_pb2.Status, last_stream_id: int) -> bytes:
    """GoAway{reason, last_stream_id}: the highest stream id the operator
    opened that this side received (12.1), sent even when 0."""
    payload = _field(b"\x0a", status.SerializeToString()) + b"\x10" + varint(last_stream_id)
    return _frame(0, _GO_AWAY, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    return _frame(stream_id, _WINDOW_UPDATE, b"\x08" + varint(increment))


def cancel(stream_id: int, status: status_pb2.Status) -> bytes:
    return _frame(stream_id, _CANCEL, _field(b"\x0a", status.SerializeToString()))


def metadata_entries(md: Iterable[tuple[str, Sequence[bytes]]]) -> bytes:
    """Repeated MetadataEntry{key, values}, each as field 1 of its parent."""
    out = []
    for key, values in md:
        entry = _field(b"\x0a", key.encode("ascii"))
        entry += b"".join(_field(b"\x12", v) for v in values)
        out.append(_field(b"\x0a", entry))
    return b"".join(out)


def headers(stream_id: int, md: Iterable[tuple[str, Sequence[bytes]]]) -> bytes:
    return _frame(stream_id, _HEADERS, metadata_entries(md))


# StreamClose{status: {}}: OK is sent as an empty status rather than unset
# (both mean OK, spec 10.1), as the Go implementation does.
_OK_CLOSE_PAYLOAD = b"\x0a\x00"


def close(
    stream_id: int,
    status: status_pb2.Status | None,
    trailers: Iterable[tuple[str, Sequence[bytes]]] = (),
) -> bytes:
    """A StreamClose with status (None: OK) and trailers."""
    payload = _OK_CLOSE_PAYLOAD
    if status is not None and (status.code or status.message or status.details):
        payload = _field(b"\x0a", status.SerializeToString())
    # Trailers are field 2 of StreamClose: re-tag the entries.
    for key, values in trailers:
        entry = _field(b"\x0a", key.encode("ascii"))
        entry += b"".join(_field(b"\x12", v) for v in values)
        payload += _field(b"\x12", entry)
    return _frame(stream_id, _CLOSE, payload)


def message(stream_id: int, size: int, data: Data) -> Encoded:
    """One StreamMessage chunk: size on the first chunk of a message (else 0)."""
    n = len(data)
    inner = (b"\x08" + varint(size) if size else b"") + (b"\x12" + varint(n) if n else b"")
    body = b"\x08" + varint(stream_id) + _MESSAGE + varint(len(inner) + n) + inner
    head = b"\x0a" + varint(len(body) + n) + body
    if n == 0:
        return head
    if n <= 512:
        return head + bytes(data)  # small: one object is cheaper to batch
    return (head, data)
