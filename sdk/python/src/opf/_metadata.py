"""Metadata rules of spec 9.1: keys, reserved keys, binary values.

On the wire a value is raw bytes (no base64, even for "-bin" keys). Handlers
see grpc.aio's shape: a tuple of (key, value) pairs, str values for text keys
and bytes for "-bin" keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

_KEY_BYTES = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyz-_.")
_PRINTABLE = frozenset(range(0x20, 0x7F))
_RESERVED = frozenset({"content-type", "te", "user-agent", "connection"})


class Metadatum(NamedTuple):
    """One metadata pair, as grpc.aio hands them to handlers."""

    key: str
    value: str | bytes


class MetadataError(ValueError):
    """Invalid metadata; the text is the spec's detail."""


def reserved(key: str) -> bool:
    """Keys that belong to the transport and never cross the tunnel."""
    if key.startswith(":"):
        return True
    if key.startswith("grpc-"):
        return key != "grpc-trace-bin"
    return key in _RESERVED


def _check_key(key: str) -> None:
    raw = key.encode("utf-8", "surrogateescape")
    if not raw or not all(b in _KEY_BYTES or (i == 0 and b == 0x3A) for i, b in enumerate(raw)):
        raise MetadataError(f'invalid metadata key "{key}"')


def decode(entries: Iterable[Any]) -> tuple[Metadatum, ...]:
    """Received MetadataEntry messages as handler metadata (9.1).

    Raises MetadataError with the spec's detail when they are invalid.
    Reserved keys are dropped after the key check; entries without values
    are ignored; repeated entries are appended in order.
    """
    out: list[Metadatum] = []
    for e in entries:
        key: str = e.key
        if key.isascii() and key.islower() and key.replace("-", "").isalnum():
            pass  # the common case: lower-case letters, digits and dashes
        else:
            _check_key(key)
        values = e.values
        if not values or reserved(key):
            continue
        if key.endswith("-bin"):
            out.extend(Metadatum(key, bytes(v)) for v in values)
            continue
        for v in values:
            if not _PRINTABLE.issuperset(v):
                raise MetadataError(f'metadata key "{key}" has a non-printable value')
            out.append(Metadatum(key, v.decode("ascii")))
    return tuple(out)


def encode(md: Any) -> list[tuple[str, list[bytes]]]:
    """Handler metadata to send, grouped by key in first-seen order.

    Accepts what grpc.aio accepts: a sequence of (key, value) pairs or a
    grpc.aio.Metadata. Keys are lower-cased; reserved keys are dropped, as
    a gRPC server drops them. Raises MetadataError for metadata that must
    not be sent (the call then fails with INTERNAL).
    """
    grouped: dict[str, list[bytes]] = {}
    for item in md or ():
        key, value = item
        if not isinstance(key, str):
            raise MetadataError(f"metadata key {key!r} is not a string")
        key = key.lower()
        _check_key(key)
        if reserved(key):
            continue
        if isinstance(value, str):
            try:
                raw = value.encode("utf-8" if key.endswith("-bin") else "ascii")
            except UnicodeEncodeError:
                raise MetadataError(f'metadata key "{key}" has a non-printable value') from None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
        else:
            raise MetadataError(f'metadata key "{key}" has a value of type {type(value).__name__}')
        if not key.endswith("-bin") and not _PRINTABLE.issuperset(raw):
            raise MetadataError(f'metadata key "{key}" has a non-printable value')
        grouped.setdefault(key, []).append(raw)
    return list(grouped.items())


def pairs(grouped: Sequence[tuple[str, Sequence[bytes]]]) -> tuple[Metadatum, ...]:
    """Grouped wire metadata back as handler-style pairs."""
    out = []
    for key, values in grouped:
        for v in values:
            out.append(Metadatum(key, v if key.endswith("-bin") else v.decode("ascii")))
    return tuple(out)
