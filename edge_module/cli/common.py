"""What every command of the CLI shares: exit codes, the parser class, settings, failure lines.

Command modules (``cli/run.py``, ``cli/ledger.py``, ...) import this module and
nothing else of ``cli``; ``cli/__init__.py`` builds the parser and dispatches.
Runs on the main thread only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from edge_module import logs
from edge_module.config import Settings, load_settings

EXIT_CONFIG = 2

SECRET_ASSIGNMENT = re.compile(r"(?i)\b((?:\w+[:_]{1,2})*(?:apikey|password|secret)\w*)=\S+")


class Parser(argparse.ArgumentParser):
    """argparse, except that its error messages never echo a secret setting's value."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {redact_assignments(message)}\n")


def redact_assignments(text: str) -> str:
    """``ApiKey=abc`` -> ``ApiKey=***`` (and the same for passwords and secrets)."""
    return SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}=***", text)


def settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="*", metavar="Key=Value")
    parser.add_argument("--config", type=Path, help="JSON or TOML settings file")


def tool_settings(args: argparse.Namespace, defaults: tuple[str, ...] = ("Eula=accept",)
                  ) -> Settings:
    """Settings for a tool command: ``defaults`` fill in keys the user did not give
    (a tool that serves nothing needs no licence acceptance, for instance)."""
    given = {a.partition("=")[0].lower() for a in args.settings}
    extra = [d for d in defaults if d.partition("=")[0].lower() not in given]
    return load_settings([*extra, *args.settings], config_file=args.config)


def fail(message: str) -> None:
    """One line on stderr, with every registered secret scrubbed."""
    sys.stderr.write(logs.scrub(message) + "\n")
