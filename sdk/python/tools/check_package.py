"""Builds the wheel and sdist with hatchling and checks what they hold.

Run by `go run mage.go python:lint`: the wheel must carry the typing
marker and the generated tunnel code, and nothing of the tests.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SDK = Path(__file__).resolve().parent.parent
MUST = {
    "opf/__init__.py",
    "opf/py.typed",
    "opf/_proto/pluginframework/v1/tunnel_pb2.py",
    "opf/_proto/pluginframework/v1/tunnel_pb2.pyi",
}


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        built = subprocess.run(
            [sys.executable, "-m", "hatchling", "build", "-d", out],
            cwd=SDK,
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            print(built.stdout + built.stderr)
            return 1
        wheels = list(Path(out).glob("*.whl"))
        if len(wheels) != 1 or not list(Path(out).glob("*.tar.gz")):
            print(f"expected one wheel and one sdist, got {sorted(Path(out).iterdir())}")
            return 1
        names = set(zipfile.ZipFile(wheels[0]).namelist())
        missing = MUST - names
        stray = sorted(n for n in names if n.startswith(("tests/", "conformance/", "examples/")))
        if missing or stray:
            print(f"{wheels[0].name}: missing {sorted(missing)}, should not hold {stray}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
