"""The plugin's life against the real Go server: restarts, drains, a killed
plugin, several operators, registration, tokens and TLS."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

import opf
from conformance.v1 import conformance_pb2 as cpb
from conformance.v1 import conformance_pb2_grpc as cgrpc
from conformance_plugin import Conformance
from harness import SDK, Operator, free_port, serving, start_plugin_process

pytestmark = pytest.mark.timeout(40)


def sleeping(seconds: float, payload: bytes = b"") -> cpb.UnaryRequest:
    a = cpb.Action()
    a.sleep.FromMilliseconds(int(seconds * 1000))
    return cpb.UnaryRequest(payload=payload, action=a)


async def test_reconnects_after_the_operator_restarts(operator: Operator) -> None:
    async with serving(operator.target) as plugin:
        first = set(plugin.instance_ids)
        await operator.kill()  # every connection cut, as in a crash
        await asyncio.sleep(0.3)
        await operator.start()
        await operator.registered(1, timeout=10)
        r = await operator.stub().Unary(cpb.UnaryRequest(payload=b"back"), timeout=5)
        assert r.payload == b"back"
        assert set(plugin.instance_ids) == operator.instances()
        assert first  # registered before, again after


async def test_operator_drain_lets_the_call_finish(operator: Operator) -> None:
    async with serving(operator.target):
        call = operator.stub().Unary(sleeping(0.7, b"finished"), timeout=10)
        await asyncio.sleep(0.2)
        rc = await operator.stop()  # GoAway, then the server waits for the call
        assert rc == 0
        assert (await call).payload == b"finished"
        await operator.start()
        await operator.registered(1, timeout=10)
        r = await operator.stub().Unary(cpb.UnaryRequest(payload=b"again"), timeout=5)
        assert r.payload == b"again"


async def test_sigterm_drains_the_plugin_process(operator: Operator, workdir: Path) -> None:
    proc = await start_plugin_process(operator.target, workdir / "plugin.log")
    try:
        await operator.registered(1)
        stub = operator.stub()
        in_flight = asyncio.ensure_future(stub.Unary(sleeping(1.0, b"finished"), timeout=10))
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Unary(cpb.UnaryRequest(payload=b"too late"), timeout=0.5)
        assert exc.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,  # the proxy waits for an instance
            grpc.StatusCode.CANCELLED,  # ... and its server resets the stream at the deadline first
        )
        assert (await in_flight).payload == b"finished"
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        await operator.registered(0, timeout=5)
    except BaseException:
        print((workdir / "plugin.log").read_text(errors="replace"))
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_plugin_killed_mid_call(operator: Operator, workdir: Path) -> None:
    proc = await start_plugin_process(operator.target, workdir / "plugin.log")
    try:
        await operator.registered(1)
        stub = operator.stub()
        call = asyncio.ensure_future(stub.Unary(sleeping(10), timeout=20))
        await asyncio.sleep(0.3)
        start = time.monotonic()
        proc.kill()
        await proc.wait()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 3
        await operator.registered(0, timeout=5)
    except BaseException:
        print((workdir / "plugin.log").read_text(errors="replace"))
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # A new instance takes over.
    proc = await start_plugin_process(operator.target, workdir / "plugin2.log")
    try:
        await operator.registered(1)
        r = await operator.stub().Unary(cpb.UnaryRequest(payload=b"new"), timeout=5)
        assert r.payload == b"new"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0


async def test_registration_carries_name_version_services_labels(operator: Operator) -> None:
    async with serving(operator.target, labels={"pod": "p-1", "zone": "a"}):
        await operator.registered(1)
        ev = next(e for e in operator.events if e["event"] == "registered")
        assert ev["plugin"] == "conformance"
        assert ev["version"] == "v1.2.3"
        assert ev["services"] == ["conformance.v1.ConformanceService"]
        assert ev["labels"] == {"pod": "p-1", "zone": "a"}


async def test_heartbeats_keep_the_tunnel(testoperator: str, workdir: Path) -> None:
    op = Operator(testoperator, workdir, args=("-heartbeat", "200ms"))
    await op.start()
    try:
        async with serving(op.target) as plugin:
            ids = plugin.instance_ids
            await asyncio.sleep(1.5)  # 7 intervals: a missed pong would show
            assert plugin.instance_ids == ids
            assert op.instances() == set(ids)
            assert len([e for e in op.events if e["event"] == "registered"]) == 1
    finally:
        await op.kill()


async def test_unreachable_operator_then_reachable(testoperator: str, workdir: Path) -> None:
    op = Operator(testoperator, workdir)
    async with serving(op.target, wait=False) as plugin:
        with pytest.raises(opf.NotRegisteredError) as exc:
            await plugin.wait_registered(0.5)
        assert exc.value.last_error is not None
        await op.start()  # the plugin keeps trying with backoff
        try:
            await plugin.wait_registered(5)
            await op.registered(1)
        finally:
            await op.kill()


async def test_token_is_sent_and_checked(testoperator: str, workdir: Path) -> None:
    op = Operator(testoperator, workdir, args=("-token", "s3cret"))
    await op.start()
    try:
        token = workdir / "token"
        token.write_text("s3cret\n")
        async with serving(op.target, token=opf.token_file(token), plaintext_token=True):
            await op.registered(1)
        await op.registered(0)
        token.write_text("wrong")
        async with serving(
            op.target, token=opf.token_file(token), plaintext_token=True, wait=False
        ) as plugin:
            with pytest.raises(opf.NotRegisteredError) as exc:
                await plugin.wait_registered(1)
            assert "UNAUTHENTICATED" in str(exc.value.last_error)
            # The file is read again at every connection.
            token.write_text("s3cret")
            await plugin.wait_registered(5)
    finally:
        await op.kill()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_and_a_ca_read_at_every_connection(testoperator: str, workdir: Path) -> None:
    _make_ca(workdir, "ca")
    _make_ca(workdir, "other")
    (workdir / "ext").write_text("subjectAltName=DNS:operator.test\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=operator.test",
        cwd=workdir,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext",
        cwd=workdir,
    )  # fmt: skip
    trusted = workdir / "trusted.pem"
    shutil.copy(workdir / "ca.pem", trusted)
    op = Operator(
        testoperator,
        workdir,
        args=("-tls-cert", str(workdir / "server.pem"), "-tls-key", str(workdir / "server.key")),
    )
    await op.start()
    try:
        tls = opf.TLS(trusted, server_name="operator.test")
        async with serving(op.target, tls=tls, token=opf.static_token("t")) as plugin:
            await op.registered(1)
            # Trust another CA: the next connection fails verification...
            shutil.copy(workdir / "other.pem", trusted)
            await op.kill()
            await op.start()
            with pytest.raises(opf.NotRegisteredError):
                await plugin.wait_registered(1.5)
            # ...and the right one again: it reconnects.
            shutil.copy(workdir / "ca.pem", trusted)
            await plugin.wait_registered(5)
            await op.registered(1)
    finally:
        await op.kill()


async def test_two_operators_one_tunnel_each(testoperator: str, workdir: Path) -> None:
    p1, p2 = free_port(), free_port()
    a = Operator(testoperator, workdir, name="a", listen=f"127.0.0.1:{p1}")
    b = Operator(testoperator, workdir, name="b", listen=f"127.0.0.1:{p2}")
    await a.start()
    await b.start()
    try:
        target = f"ipv4:127.0.0.1:{p1},127.0.0.1:{p2}"
        async with serving(target) as plugin:
            await a.registered(1)
            await b.registered(1)
            for op in (a, b):
                r = await op.stub().Unary(cpb.UnaryRequest(payload=op.name.encode()), timeout=5)
                assert r.payload == op.name.encode()
            assert len(plugin.instance_ids) == 2
            # One replica going away leaves the other's tunnel alone.
            b_instances = b.instances()
            await a.kill()
            await asyncio.sleep(0.5)
            assert b.instances() == b_instances
            assert len([e for e in b.events if e["event"] == "registered"]) == 1
            r = await b.stub().Unary(cpb.UnaryRequest(payload=b"still"), timeout=5)
            assert r.payload == b"still"
    finally:
        await a.kill()
        await b.kill()


async def _both_loopbacks(host: str) -> list[str]:
    assert host == "operator.test"
    return ["127.0.0.2", "127.0.0.1", "127.0.0.2"]


@pytest.mark.parametrize("form", ["ipv4", "dns"])
async def test_a_duplicate_tunnel_to_one_replica_is_closed(
    testoperator: str, workdir: Path, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """Two addresses that reach one operator process: one tunnel registers,
    the other sees the same replica id in the operator's Hello and leaves."""
    port = free_port()
    op = Operator(testoperator, workdir, listen=f":{port}")
    await op.start()
    try:
        if form == "ipv4":
            target, extra = f"ipv4:127.0.0.1:{port},127.0.0.2:{port}", dict[str, Any]()
        else:  # a DNS name resolving to both, through lookup_host
            target, extra = f"operator.test:{port}", {"lookup_host": _both_loopbacks}
        async with serving(target, **extra) as plugin:
            await asyncio.sleep(1.5)  # several retries of the duplicate slot
            assert len(op.instances()) == 1
            assert len([e for e in op.events if e["event"] == "registered"]) == 1
            assert len(plugin.instance_ids) == 1
            assert "duplicate tunnel to replica" in caplog.text
    finally:
        await op.kill()


async def test_new_replicas_are_found_by_resolving_again(testoperator: str, workdir: Path) -> None:
    """The target is resolved again every resolve_interval: a replica that
    appears gets a tunnel of its own (a slot), the first one keeps its."""
    port = free_port()
    a = Operator(testoperator, workdir, name="a", listen=f"127.0.0.1:{port}")
    b = Operator(testoperator, workdir, name="b", listen=f"127.0.0.2:{port}")
    await a.start()
    await b.start()
    answer = ["127.0.0.1"]

    async def lookup(host: str) -> list[str]:
        return list(answer)

    try:
        async with serving(f"operator.test:{port}", lookup_host=lookup, resolve_interval=0.2):
            await a.registered(1)
            await asyncio.sleep(0.5)
            assert b.instances() == set()
            answer.append("127.0.0.2")
            await b.registered(1, timeout=5)
            assert len([e for e in a.events if e["event"] == "registered"]) == 1
    finally:
        await a.kill()
        await b.kill()


SYNC_PROGRAM = """
import sys
sys.path[:0] = [{src!r}, {sdk!r}]
import opf
from conformance.v1 import conformance_pb2_grpc as cgrpc
from conformance_plugin import Conformance

plugin = opf.Plugin("conformance", target={target!r})
cgrpc.add_ConformanceServiceServicer_to_server(Conformance(), plugin)
plugin.serve_forever()
print("returned", flush=True)
"""


async def test_serve_forever_for_programs_without_asyncio(
    operator: Operator, workdir: Path
) -> None:
    script = workdir / "sync_plugin.py"
    script.write_text(
        SYNC_PROGRAM.format(src=str(SDK / "src"), sdk=str(SDK), target=operator.target)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await operator.registered(1)
        r = await operator.stub().Unary(cpb.UnaryRequest(payload=b"sync"), timeout=5)
        assert r.payload == b"sync"
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 5)
        assert proc.returncode == 0, err.decode()
        assert out == b"returned\n"
        await operator.registered(0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_refused_registration_reaches_the_user(
    operator: Operator, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's RegisterReject status comes back as RegistrationRejected
    (and a warning). The SDK refuses such a name itself, so the test changes
    it behind the checks to make the real server refuse it."""
    plugin = opf.Plugin("conformance", target=operator.target, backoff=opf.Backoff(base=0.05))
    cgrpc.add_ConformanceServiceServicer_to_server(Conformance(), plugin)  # type: ignore[no-untyped-call]
    plugin._name = "n" * 254  # longer than the operator accepts (spec 4.4)
    async with plugin:
        with pytest.raises(opf.NotRegisteredError) as exc:
            await plugin.wait_registered(1.5)
    err = exc.value.last_error
    assert isinstance(err, opf.RegistrationRejected)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "plugin name is longer than 253" in err.details
    assert "registration refused" in caplog.text
    assert operator.instances() == set()
