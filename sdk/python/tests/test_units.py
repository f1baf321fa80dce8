"""Pieces that need no server: targets, frame encoding, metadata, backoff,
flow-control bookkeeping, and the checks Plugin makes when it is created."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from google.rpc import status_pb2

import opf
from conformance.v1 import conformance_pb2_grpc as cgrpc
from conformance_plugin import Conformance, payload
from opf import _metadata, _target, _wire
from opf._defaults import CHUNK_COST
from opf._proto.pluginframework.v1 import tunnel_pb2 as pb
from opf._stream import HandlerStream
from opf._writer import Writer

# --- targets (spec 14.1) ----------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind", "detail"),
    [
        ("unix:///run/opf/op.sock", "unix", "unix:/run/opf/op.sock"),
        ("unix:/run/opf/op.sock", "unix", "unix:/run/opf/op.sock"),
        ("dns:///operator.ns.svc:7443", "dns", "operator.ns.svc:7443"),
        ("operator:7443", "dns", "operator:7443"),
        ("tcp://10.0.0.1:7443", "dns", "10.0.0.1:7443"),
        ("[::1]:7443", "dns", "::1:7443"),
        ("ipv4:10.0.0.2:1,10.0.0.1:2", "ip", "ipv4:10.0.0.1:2 ipv4:10.0.0.2:1"),
        ("ipv6:[::1]:80,[fe80::1]:81", "ip", "ipv6:[::1]:80 ipv6:[fe80::1]:81"),
    ],
)
def test_accepted_targets(target: str, kind: str, detail: str) -> None:
    t = _target.parse(target)
    assert t.kind == kind
    got = " ".join(a.grpc_target for a in t.addresses) if t.kind != "dns" else f"{t.host}:{t.port}"
    assert got == detail


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("", "empty"),
        ("unix://run/x.sock", "unix:///run/x.sock"),
        ("unix:relative.sock", "absolute"),
        ("unix:///" + "x" * 120, "more than the limit of 107"),
        ("dns://8.8.8.8/operator:7443", "no DNS authority"),
        ("http://operator:80", "scheme"),
        ("https://operator:443", "scheme"),
        ("passthrough:///x:1", "scheme"),
        ("operator", "port is missing"),
        ("operator:0", "from 1 to 65535"),
        ("operator:65536", "from 1 to 65535"),
        (":7443", "host is empty"),
        ("::1:7443", "brackets"),
        ("ipv4:[::1]:1", "not an IPv4 address"),
        ("ipv6:127.0.0.1:1", "IPv6"),
        ("ipv4:1.2.3.4:1,", "empty"),
        ("operator :1", "white space"),
    ],
)
def test_refused_targets_name_the_forms(target: str, why: str) -> None:
    with pytest.raises(opf.ConfigurationError) as exc:
        opf.Plugin("p", target=target)
    assert why in str(exc.value)
    assert repr(target) in str(exc.value)
    assert "unix:///ABSOLUTE/PATH" in str(exc.value) and "ipv6:[ADDR]:PORT" in str(exc.value)


async def test_resolution_is_deduplicated_and_sorted() -> None:
    t = _target.parse("ipv4:127.0.0.2:5,127.0.0.1:5,127.0.0.2:5")
    assert [a.grpc_target for a in await _target.resolve(t)] == [
        "ipv4:127.0.0.1:5",
        "ipv4:127.0.0.2:5",
    ]
    got = await _target.resolve(_target.parse("localhost:5"))  # /etc/hosts, no DNS
    assert got and all(a.loopback for a in got)

    async def lookup(host: str) -> list[str]:
        return {"two.test": ["10.0.0.2", "10.0.0.1", "10.0.0.2"], "none.test": []}[host]

    got = await _target.resolve(_target.parse("two.test:5"), lookup)
    assert [a.grpc_target for a in got] == ["ipv4:10.0.0.1:5", "ipv4:10.0.0.2:5"]
    with pytest.raises(OSError):
        await _target.resolve(_target.parse("none.test:5"), lookup)


# --- frames -------------------------------------------------------------


def decode(*encoded: _wire.Encoded) -> list[Any]:
    raw = b"".join(e if isinstance(e, bytes) else e[0] + bytes(e[1]) for e in encoded)
    return list(pb.ConnectRequest.FromString(raw).frames)


def test_frames_decode_as_the_schema_says() -> None:
    st = status_pb2.Status(code=5, message="gone")
    data = bytes(range(256)) * 10
    frames = decode(
        _wire.ping(7),
        _wire.pong(0),
        _wire.window_update(3, 1 << 20),
        _wire.message(5, len(data), data),
        _wire.message(5, 0, b"tail"),
        _wire.message(7, 0, b""),
        _wire.close(9, None),
        _wire.close(11, st, [("x-t-bin", [b"\x00\xff"]), ("x-t", [b"a", b"b"])]),
        _wire.headers(13, [("x-h", [b"v"])]),
        _wire.go_away(status_pb2.Status(code=14, message="bye"), 0),
        _wire.cancel(2, status_pb2.Status(code=13)),
    )
    kinds = [(f.stream_id, f.WhichOneof("kind")) for f in frames]
    assert kinds == [
        (0, "ping"), (0, "pong"), (3, "window_update"), (5, "message"), (5, "message"),
        (7, "message"), (9, "close"), (11, "close"), (13, "headers"), (0, "go_away"),
        (2, "cancel"),
    ]  # fmt: skip
    assert frames[0].ping.nonce == 7 and frames[2].window_update.increment == 1 << 20
    assert (frames[3].message.size, frames[3].message.data) == (len(data), data)
    assert (frames[4].message.size, frames[4].message.data) == (0, b"tail")
    assert frames[5].message.data == b""
    assert frames[6].close.HasField("status") and frames[6].close.status.code == 0
    assert frames[7].close.status == st
    assert [(e.key, list(e.values)) for e in frames[7].close.trailers] == [
        ("x-t-bin", [b"\x00\xff"]),
        ("x-t", [b"a", b"b"]),
    ]
    assert frames[8].headers.metadata[0].key == "x-h"
    assert frames[9].go_away.reason.message == "bye"
    assert frames[9].go_away.HasField("last_stream_id")  # set even when 0 (12.1)
    assert decode(_wire.go_away(status_pb2.Status(), 7))[0].go_away.last_stream_id == 7


def test_large_message_frames_keep_their_data_apart() -> None:
    data = payload(100_000, 3, 0)
    e = _wire.message(1, len(data), memoryview(data)[10:])
    assert isinstance(e, tuple) and _wire.encoded_size(e) == len(e[0]) + len(data) - 10
    assert decode(e)[0].message.data == data[10:]


# --- metadata (spec 9.1) --------------------------------------------------


def test_received_metadata() -> None:
    entries = [
        pb.MetadataEntry(key="x-a", values=[b"1"]),
        pb.MetadataEntry(key="x-empty", values=[]),
        pb.MetadataEntry(key="x-a", values=[b"2", b"3"]),
        pb.MetadataEntry(key="user-agent", values=[b"evil"]),
        pb.MetadataEntry(key="grpc-timeout", values=[b"1S"]),
        pb.MetadataEntry(key=":authority", values=[b"x"]),
        pb.MetadataEntry(key="grpc-trace-bin", values=[b"\x00\x01"]),
        pb.MetadataEntry(key="x.y_z", values=[b"ok"]),
        pb.MetadataEntry(key="x-raw-bin", values=[b"\xff\x00\n"]),
    ]
    md = _metadata.decode(entries)
    assert md == (
        ("x-a", "1"), ("x-a", "2"), ("x-a", "3"), ("grpc-trace-bin", b"\x00\x01"),
        ("x.y_z", "ok"), ("x-raw-bin", b"\xff\x00\n"),
    )  # fmt: skip
    with pytest.raises(_metadata.MetadataError, match='invalid metadata key "X-Upper"'):
        _metadata.decode([pb.MetadataEntry(key="X-Upper", values=[b"v"])])
    with pytest.raises(_metadata.MetadataError, match="non-printable"):
        _metadata.decode([pb.MetadataEntry(key="x-text", values=[b"\x00\x01"])])
    with pytest.raises(_metadata.MetadataError):
        _metadata.decode([pb.MetadataEntry(key="", values=[b"v"])])


def test_sent_metadata() -> None:
    got = _metadata.encode([("X-Mixed", "v"), ("x-b-bin", b"\x00"), ("x-mixed", "w"), ("te", "x")])
    assert got == [("x-mixed", [b"v", b"w"]), ("x-b-bin", [b"\x00"])]
    for bad in ([("x-k", "caf\u00e9")], [("x k", "v")], [("x-k", "line\n")], [("x-k", 3)]):
        with pytest.raises(_metadata.MetadataError):
            _metadata.encode(bad)


# --- backoff (spec 14.2) ------------------------------------------------------


def test_backoff_grows_caps_and_jitters() -> None:
    b = opf.Backoff()
    for n in range(30):
        d = b.delay(n)
        base = min(0.25 * 1.6**n, 30.0)
        assert base * 0.8 <= d <= base * 1.2
    assert {round(b.delay(0), 6) for _ in range(20)} != {0.25}  # jittered
    with pytest.raises(ValueError):
        opf.Backoff(factor=0.5)


# --- flow control (spec 8.1) ------------------------------------------------


class _Calls:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def write(self, request: Any) -> None:
        self.written.append(request)

    async def done_writing(self) -> None:
        pass


class _Tunnel:
    """The few fields a HandlerStream uses, for bookkeeping tests."""

    def __init__(self, window: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.local_window = window
        self.local_max_message = 1 << 20
        self.peer_window = window
        self.peer_max_message = 1 << 20
        self.max_chunk = 1 << 20
        self.peer_max_batch = 4 << 20
        self.control_frames: list[bytes] = []
        self.writer = Writer(_Calls(), lambda e: None)
        self.forgotten: list[int] = []

    def control(self, frame: bytes) -> None:
        self.control_frames.append(frame)

    def forget(self, s: HandlerStream) -> None:
        self.forgotten.append(s.id)


def why(st: status_pb2.Status | None) -> str:
    assert st is not None, "a violation was expected"
    return str(st.message)


def _msg(size: int, data: bytes) -> Any:
    return pb.StreamMessage(size=size, data=data)


async def test_credit_counts_64_per_chunk_and_returns_at_a_quarter() -> None:
    t = _Tunnel(window=4096)
    s = HandlerStream(t, 1, "/s.S/M", (), None)  # type: ignore[arg-type]
    # 4096 of credit: 40 empty messages cost 40 * 64 = 2560; fine.
    for _ in range(40):
        assert s.on_message(_msg(0, b"")) is None
    # 1536 left: a 1473-byte chunk costs 1537, one too many.
    assert why(s.on_message(_msg(1473, b"x" * 1473))) == "flow-control window exceeded"
    t2 = _Tunnel(window=4096)
    s2 = HandlerStream(t2, 1, "/s.S/M", (), None)  # type: ignore[arg-type]
    for _ in range(20):
        s2.on_message(_msg(0, b""))  # 20 * 64 = 1280 of credit used
    # The update leaves once a quarter (1024) is consumed: at the 16th message.
    for i in range(16):
        assert await s2.recv() == b""
        assert len(t2.control_frames) == (1 if i == 15 else 0)
    update = decode(t2.control_frames[0])[0]
    assert update.window_update.increment == 16 * CHUNK_COST


async def test_chunk_checks() -> None:
    t = _Tunnel(window=1 << 20)
    s = HandlerStream(t, 1, "/s.S/M", (), None)  # type: ignore[arg-type]
    assert why(s.on_message(_msg(2, b"too long"))) == (
        "message chunk longer than its declared size"
    )
    s = HandlerStream(t, 3, "/s.S/M", (), None)  # type: ignore[arg-type]
    assert s.on_message(_msg(10, b"abc")) is None
    assert why(s.on_message(_msg(0, b""))) == "empty continuation chunk"
    s = HandlerStream(t, 5, "/s.S/M", (), None)  # type: ignore[arg-type]
    assert s.on_message(_msg(6, b"abc")) is None
    assert why(s.on_half_close()) == "half-close in the middle of a message"
    assert s.on_message(_msg(0, b"def")) is None
    assert s.on_half_close() is None
    assert await s.recv() == b"abcdef"
    assert await s.recv() is None
    assert why(s.on_message(_msg(1, b"x"))) == "message after half-close"
    big = HandlerStream(t, 7, "/s.S/M", (), None)  # type: ignore[arg-type]
    st = big.on_message(_msg((1 << 20) + 1, b""))
    assert st is not None and st.code == 8  # RESOURCE_EXHAUSTED
    w = HandlerStream(t, 9, "/s.S/M", (), None)  # type: ignore[arg-type]
    assert why(w.on_window_update(0)) == "window update of zero"
    assert why(w.on_window_update(2**31 - 1)) == "window update overflows the window"


async def test_sends_wait_for_credit() -> None:
    """What credit does not cover waits; the handler goes on, but a second
    message waits until the first has left in full."""
    t = _Tunnel(window=1024)
    s = HandlerStream(t, 1, "/s.S/M", (), None)  # type: ignore[arg-type]

    def queued() -> int:
        return sum(len(bytes(p[1])) if isinstance(p, tuple) else 0 for p in s.out)

    await s.send_message(b"x" * 3000)  # returns with most of it waiting
    assert 0 < queued() <= 1024 - CHUNK_COST
    second = asyncio.ensure_future(s.send_message(b"y" * 10))
    flushed = asyncio.ensure_future(s.flush())
    await asyncio.sleep(0.01)
    assert not second.done() and not flushed.done()
    for _ in range(5):
        s.on_window_update(1024)  # the reader pushes the rest at once
    await asyncio.sleep(0.01)
    assert flushed.done() and second.done()
    assert s._send_credit >= 0
    frames = decode(*s.out)
    assert frames[0].message.size == 3000
    assert sum(len(f.message.data) for f in frames[:-1]) == 3000
    assert (frames[-1].message.size, frames[-1].message.data) == (10, b"y" * 10)
    # A cancelled stream drops what waits, and sends fail.
    c = HandlerStream(_Tunnel(window=1024), 3, "/s.S/M", (), None)  # type: ignore[arg-type]
    await c.send_message(b"z" * 3000)
    c.on_cancel(None)
    with pytest.raises(opf.CallError):
        await c.flush()


# --- what Plugin checks when it is created -----------------------------------


def test_registration_limits_are_checked_locally() -> None:
    target = "unix:///tmp/x.sock"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": ""}, "plugin name is empty"),
        ({"name": "n" * 254}, "longer than 253"),
        ({"name": "p", "version": "v" * 129}, "longer than 128 bytes"),
        ({"name": "p", "labels": {str(i): "" for i in range(33)}}, "more than 32 labels"),
        ({"name": "p", "labels": {"": "v"}}, 'invalid label ""'),
        ({"name": "p", "labels": {"k": "v" * 257}}, 'invalid label "k"'),
        ({"name": "p", "services": ["a/b"]}, "invalid service name"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(opf.ConfigurationError, match=reason):
            opf.Plugin(target=target, **kwargs)
    p = opf.Plugin("p", target=target, services=[f"s{i}.S" for i in range(64)])
    with pytest.raises(opf.ConfigurationError, match="more than 64 services"):
        cgrpc.add_ConformanceServiceServicer_to_server(Conformance(), p)  # type: ignore[no-untyped-call]


def test_settings_are_checked() -> None:
    target = "unix:///tmp/x.sock"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"initial_window_size": 1000}, "initial_window_size"),
        ({"max_batch_size": 1000}, "max_batch_size"),
        ({"max_message_size": 2**31}, "max_message_size"),
        ({"heartbeat_interval": 0.01}, "heartbeat_interval"),
        ({"drain_timeout": 0}, "drain_timeout"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(opf.ConfigurationError, match=reason):
            opf.Plugin("p", target=target, **kwargs)


def test_tokens_need_tls_or_a_local_plaintext_target(tmp_path: Path) -> None:
    token = opf.static_token("t")
    with pytest.raises(opf.ConfigurationError, match="without TLS"):
        opf.Plugin("p", target="unix:///tmp/x.sock", token=token)
    with pytest.raises(opf.ConfigurationError, match="only a unix socket or a loopback"):
        opf.Plugin("p", target="operator:7443", token=token, plaintext_token=True)
    for local in ("unix:///tmp/x.sock", "127.0.0.1:7443", "localhost:1", "[::1]:1"):
        opf.Plugin("p", target=local, token=token, plaintext_token=True)
    opf.Plugin("p", target="operator:7443", token=token, tls=opf.TLS())
    missing = tmp_path / "no-token"
    with pytest.raises(opf.ConfigurationError, match="does not exist"):
        opf.Plugin("p", target="operator:1", token=opf.token_file(missing), tls=opf.TLS())
    with pytest.raises(opf.ConfigurationError, match="TLS"):
        opf.Plugin("p", target="operator:1", tls=opf.TLS(ca_file=missing))


async def test_serving_without_a_service_is_an_error() -> None:
    p = opf.Plugin("p", target="unix:///tmp/x.sock")
    with pytest.raises(opf.ConfigurationError, match="no service added"):
        await p.serve()


async def test_the_buffer_hint_reaches_grpcio() -> None:
    # The writer's hinted writes go through grpcio's Cython layer, checked at
    # start and replaced by plain writes when it is not as expected: with the
    # grpcio this SDK pins, that check must pass, or streams lose the hint
    # (and a fifth of their throughput) without a word.
    import grpc.aio

    from opf._writer import hinted_send

    async with grpc.aio.insecure_channel("unix:///nonexistent/opf-hint.sock") as channel:
        call: grpc.aio.StreamStreamCall[Any, Any] = channel.stream_stream("/opf.test/Hint")()
        try:
            assert hinted_send(call) is not None, f"grpcio {grpc.__version__}: no buffer hint"
        finally:
            call.cancel()
