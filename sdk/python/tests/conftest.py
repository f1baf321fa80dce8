"""Fixtures: the real Go server (testoperator), a short work directory."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from harness import REPO, Operator


@pytest.fixture(scope="session")
def testoperator() -> str:
    """The testoperator binary: $OPF_TESTOPERATOR (mage builds it), or built here."""
    path = os.environ.get("OPF_TESTOPERATOR")
    if path:
        return path
    out = REPO / ".cache" / "python" / "testoperator"
    subprocess.run(
        ["go", "build", "-o", str(out), "./cmd/testoperator"], cwd=REPO / "conformance", check=True
    )
    return str(out)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="opft", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@pytest.fixture
async def operator(
    testoperator: str, workdir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Operator]:
    op = Operator(testoperator, workdir)
    await op.start()
    yield op
    await op.kill()  # the plugins are gone: a drain would only wait
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- operator log ({op.log}) ---\n{op.log_tail()}")


@pytest.fixture(autouse=True)
def _logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opf")
