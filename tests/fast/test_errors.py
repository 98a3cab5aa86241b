"""Error codes have one home: edge_module/errors.py. Docs come from it; code uses it."""

from __future__ import annotations

import ast
from pathlib import Path

from edge_module.errors import CATALOGUE, DOCS_END, DOCS_START, ErrorCode, reference_markdown
from tools.docs import with_error_table

ROOT = Path(__file__).resolve().parents[2]


def test_every_code_has_a_cause_a_fix_and_an_http_status() -> None:
    assert set(CATALOGUE) == set(ErrorCode)
    for code, item in CATALOGUE.items():
        assert item.cause and item.fix, code
        assert 400 <= item.http_status < 600, code


def test_the_docs_table_is_the_generated_one() -> None:
    page = (ROOT / "docs" / "mqtt-topics.md").read_text()
    assert DOCS_START in page and DOCS_END in page
    assert with_error_table(page) == page, "docs/mqtt-topics.md is stale: run `make docs`"
    for code in ErrorCode:
        assert f"| `{code.value}` |" in reference_markdown()


def test_no_module_spells_an_error_code_itself() -> None:
    """A code written as a string literal elsewhere is a code that escaped the enum."""
    values = {code.value for code in ErrorCode}
    offenders = []
    for path in sorted((ROOT / "edge_module").rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in values:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_every_refusal_and_payload_error_takes_an_error_code() -> None:
    from edge_module.exceptions import PayloadError, Refusal

    assert PayloadError.__init__.__annotations__["code"] in ("ErrorCode", ErrorCode)
    assert Refusal.__init__.__annotations__["code"] in ("ErrorCode", ErrorCode)
