"""``make docs``: regenerate the reference pages made from the code.

* docs/configuration.md from the settings declarations;
* the error table of docs/mqtt-topics.md from edge_module/errors.py.

Tests compare both with the code, so a change that forgets ``make docs`` fails.
"""

from __future__ import annotations

from pathlib import Path

from edge_module.config import reference_markdown as config_reference
from edge_module.errors import DOCS_END, DOCS_START
from edge_module.errors import reference_markdown as error_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def with_error_table(page: str) -> str:
    """``page`` with the text between the error-codes markers replaced by the table."""
    head, start, rest = page.partition(DOCS_START)
    _, end, tail = rest.partition(DOCS_END)
    if not start or not end:
        raise SystemExit(f"docs/mqtt-topics.md lacks the markers {DOCS_START} ... {DOCS_END}")
    return f"{head}{DOCS_START}\n{error_table()}{DOCS_END}{tail}"


def main() -> None:
    (DOCS / "configuration.md").write_text(config_reference())
    topics = DOCS / "mqtt-topics.md"
    topics.write_text(with_error_table(topics.read_text()))


if __name__ == "__main__":
    main()
