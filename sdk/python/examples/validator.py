"""A Python plugin for the demo: demo.v1.ValidatorService through the tunnel.

The servicer is written as for any grpc.aio server; serving it through the
operator takes the last few lines of main(). The rules are the demo's own
(examples/validator in Go checks the same ones, with code of its own).

    OPF_DEMO_TARGET=unix:///tmp/demo/op.sock python examples/validator.py

It registers as "validator-python" (OPF_DEMO_PLUGIN_NAME to change it),
drains on SIGTERM or SIGINT, and also stops when its standard input is a
pipe that closes, so that it never outlives the demo that started it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # the SDK from the tree; pip users skip this

import grpc  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

import opf  # noqa: E402
from demo.v1 import demo_pb2, demo_pb2_grpc  # noqa: E402

log = logging.getLogger("validator")

REQUEST_ID_KEY = "x-request-id"  # echoed into the response headers
DEADLINE_LEFT_KEY = "x-deadline-left"  # response header: time left when the handler started
RULES_EVALUATED_KEY = "x-rules-evaluated"  # trailer: how many rules were checked

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _team_label(r: demo_pb2.Resource) -> str:
    return "" if r.labels.get("team") else 'no "team" label'


def _no_default_namespace(r: demo_pb2.Resource) -> str:
    return "in the default namespace" if r.namespace in ("", "default") else ""


def _dns_label_name(r: demo_pb2.Resource) -> str:
    if len(r.name) > 63 or not _DNS_LABEL.match(r.name):
        return f'name "{r.name}" is not a DNS label'
    return ""


RULES: list[tuple[str, str, Callable[[demo_pb2.Resource], str]]] = [
    ("team-label", 'every resource has a "team" label', _team_label),
    ("no-default-namespace", "nothing lives in the default namespace", _no_default_namespace),
    (
        "dns-label-name",
        "names are DNS labels: at most 63 lower-case letters, digits and '-'",
        _dns_label_name,
    ),
]


def check(r: demo_pb2.Resource) -> demo_pb2.Verdict:
    v = demo_pb2.Verdict(resource=f"{r.namespace}/{r.name}", allowed=True)
    for name, _, rule in RULES:
        if problem := rule(r):
            v.allowed = False
            v.violations.add(rule=name, message=problem)
    return v


async def refuse_unusable(
    request: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> demo_pb2.Resource:
    """The request's resource, or INVALID_ARGUMENT with a BadRequest detail."""
    field = ""
    if not request.HasField("resource"):
        field = "resource"
    elif not request.resource.name:
        field = "resource.name"
    if not field:
        return request.resource  # type: ignore[no-any-return]
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description="is required")
            ]
        )
    )
    st = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message=f"{field} is required",
        details=[detail],
    )
    await context.abort_with_status(rpc_status.to_status(st))
    raise AssertionError("unreachable")


class Validator(demo_pb2_grpc.ValidatorServiceServicer):
    """demo.v1.ValidatorService, as for any grpc.aio server."""

    async def Validate(
        self, request: demo_pb2.ValidateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> demo_pb2.ValidateResponse:
        left = context.time_remaining()
        headers: list[tuple[str, str]] = [
            (DEADLINE_LEFT_KEY, "none" if left is None else f"{left * 1000:.0f}ms")
        ]
        headers += [
            (k, str(v)) for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY
        ]
        await context.send_initial_metadata(headers)
        resource = await refuse_unusable(request, context)
        context.set_trailing_metadata(((RULES_EVALUATED_KEY, str(len(RULES))),))
        return demo_pb2.ValidateResponse(verdict=check(resource))

    async def ListRules(
        self, request: demo_pb2.ListRulesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[demo_pb2.ListRulesResponse]:
        for name, description, _ in RULES:
            yield demo_pb2.ListRulesResponse(rule=demo_pb2.Rule(name=name, description=description))

    async def ValidateBatch(
        self,
        request_iterator: AsyncIterator[demo_pb2.ValidateBatchRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> demo_pb2.ValidateBatchResponse:
        resp = demo_pb2.ValidateBatchResponse()
        async for req in request_iterator:
            resource = await refuse_unusable(req, context)
            resp.checked += 1
            verdict = check(resource)
            if not verdict.allowed:
                resp.denied.append(verdict)
        return resp

    async def Review(
        self,
        request_iterator: AsyncIterator[demo_pb2.ReviewRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[demo_pb2.ReviewResponse]:
        async for req in request_iterator:
            resource = await refuse_unusable(req, context)
            yield demo_pb2.ReviewResponse(verdict=check(resource))


def _stop_when_stdin_closes(plugin: opf.Plugin, loop: asyncio.AbstractEventLoop) -> None:
    """Drains the plugin once a piped standard input closes."""
    try:
        fd = sys.stdin.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return  # a terminal or /dev/null: signals stop the plugin
    except (OSError, ValueError):
        return

    def watch() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered
        # reader aborts the interpreter's shutdown.
        while os.read(fd, 4096):
            pass
        log.info("standard input closed: draining")
        loop.call_soon_threadsafe(plugin.stop_nowait)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


async def serve(target: str, name: str = "validator-python") -> None:
    plugin = opf.Plugin(name, version="v1.0.0", target=target, labels={"language": "python"})
    demo_pb2_grpc.add_ValidatorServiceServicer_to_server(Validator(), plugin)  # generated code
    _stop_when_stdin_closes(plugin, asyncio.get_running_loop())
    await plugin.serve()  # connects, registers, reconnects; drains on SIGTERM


async def main() -> None:
    target = os.environ.get("OPF_DEMO_TARGET", "")
    if not target:
        raise SystemExit("OPF_DEMO_TARGET must name the operator, e.g. unix:///tmp/demo/op.sock")
    await serve(target, os.environ.get("OPF_DEMO_PLUGIN_NAME", "validator-python"))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s python-plugin %(name)s: %(message)s"
    )
    asyncio.run(main())
