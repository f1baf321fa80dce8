"""The repository README's Python snippets are code of sdk/python, as the
Go ones are code of examples/ (examples/readme_test.go)."""

from __future__ import annotations

from harness import REPO, SDK


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def test_readme_python_snippets_are_real_code() -> None:
    readme = (REPO / "README.md").read_text()
    snippets = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    assert snippets, "no Python snippet in README.md"
    sources = [
        _lines(p.read_text())
        for p in SDK.rglob("*.py")
        if "_proto" not in p.parts and ".cache" not in p.parts
    ]
    for snippet in snippets:
        want = _lines(snippet)
        found = any(
            src[i : i + len(want)] == want
            for src in sources
            for i in range(len(src) - len(want) + 1)
        )
        assert found, f"README.md shows Python code found in no file of sdk/python:\n{snippet}"
