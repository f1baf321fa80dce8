"""The demo's Python plugin (examples/validator.py), and several services in
one plugin, through the real Go server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import opf
from conformance.v1 import conformance_pb2 as cpb
from conformance.v1 import conformance_pb2_grpc as cgrpc
from conformance_plugin import Conformance
from demo.v1 import demo_pb2, demo_pb2_grpc
from harness import SDK, Operator, serving
from validator import Validator

pytestmark = pytest.mark.timeout(30)


def both(plugin: opf.Plugin) -> None:
    cgrpc.add_ConformanceServiceServicer_to_server(Conformance(), plugin)  # type: ignore[no-untyped-call]
    demo_pb2_grpc.add_ValidatorServiceServicer_to_server(Validator(), plugin)  # type: ignore[no-untyped-call]


async def test_two_services_in_one_plugin(operator: Operator) -> None:
    async with serving(operator.target, register=both) as plugin:
        assert plugin.services == ["conformance.v1.ConformanceService", "demo.v1.ValidatorService"]
        ev = next(e for e in operator.events if e["event"] == "registered")
        assert sorted(ev["services"]) == plugin.services
        r = await operator.stub().Unary(cpb.UnaryRequest(payload=b"one"), timeout=5)
        assert r.payload == b"one"
        v = demo_pb2_grpc.ValidatorServiceStub(operator.channel())  # type: ignore[no-untyped-call]
        good = demo_pb2.Resource(
            kind="ConfigMap", namespace="shop", name="cart", labels={"team": "a"}
        )
        call = v.Validate(demo_pb2.ValidateRequest(resource=good), timeout=5,
                          metadata=(("x-request-id", "r-1"),))  # fmt: skip
        resp = await call
        assert resp.verdict.allowed and resp.verdict.resource == "shop/cart"
        headers = dict(await call.initial_metadata())
        assert headers["x-request-id"] == "r-1" and headers["x-deadline-left"].endswith("ms")
        assert dict(await call.trailing_metadata())["x-rules-evaluated"] == "3"

        rules = [m.rule.name async for m in v.ListRules(demo_pb2.ListRulesRequest(), timeout=5)]
        assert rules == ["team-label", "no-default-namespace", "dns-label-name"]

        bad = demo_pb2.Resource(kind="Pod", namespace="default", name="Bad_Name")

        async def batch() -> AsyncIterator[demo_pb2.ValidateBatchRequest]:
            for r in (good, bad):
                yield demo_pb2.ValidateBatchRequest(resource=r)

        b = await v.ValidateBatch(batch(), timeout=5)
        assert b.checked == 2 and [d.resource for d in b.denied] == ["default/Bad_Name"]
        assert {x.rule for x in b.denied[0].violations} == {
            "team-label", "no-default-namespace", "dns-label-name"
        }  # fmt: skip

        async def review() -> AsyncIterator[demo_pb2.ReviewRequest]:
            for r in (good, bad, demo_pb2.Resource(kind="Pod")):
                yield demo_pb2.ReviewRequest(resource=r)

        verdicts = []
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for m in v.Review(review(), timeout=5):
                verdicts.append(m.verdict.allowed)
        assert verdicts == [True, False]
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        st = rpc_status.from_call(exc.value)
        br = error_details_pb2.BadRequest()
        assert st is not None and st.details[0].Unpack(br)
        assert br.field_violations[0].field == "resource.name"


async def test_the_demo_plugin_program(testoperator: str, workdir: Path) -> None:
    """examples/validator.py as the demo starts it: OPF_DEMO_TARGET, then
    SIGTERM; it also stops when its piped standard input closes."""
    op = Operator(testoperator, workdir)
    await op.start()
    try:
        for stop in ("sigterm", "stdin"):
            log = (workdir / f"validator-{stop}.log").open("wb")
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SDK / "examples" / "validator.py"),
                env={**os.environ, "OPF_DEMO_TARGET": op.target},
                stdin=asyncio.subprocess.PIPE,
                stdout=log,
                stderr=log,
            )
            try:
                await op.registered(1)
            except AssertionError:
                log.close()
                print((workdir / f"validator-{stop}.log").read_text(errors="replace"))
                raise
            ev = [e for e in op.events if e["event"] == "registered"][-1]
            assert ev["plugin"] == "validator-python"
            assert ev["services"] == ["demo.v1.ValidatorService"]
            v = demo_pb2_grpc.ValidatorServiceStub(op.channel())  # type: ignore[no-untyped-call]
            r = await v.Validate(
                demo_pb2.ValidateRequest(resource=demo_pb2.Resource(name="x", namespace="n")),
                metadata=(("x-opf-plugin", "validator-python"),),
                timeout=5,
            )
            assert not r.verdict.allowed  # no "team" label
            if stop == "sigterm":
                proc.send_signal(signal.SIGTERM)
            else:
                assert proc.stdin is not None
                proc.stdin.close()
            rc = await asyncio.wait_for(proc.wait(), 5)
            log.close()
            assert rc == 0, (workdir / f"validator-{stop}.log").read_text()
            await op.registered(0)
    finally:
        await op.kill()
