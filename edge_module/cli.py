"""Command line: ``edge-module run Key=Value ...`` and the tools beside it.

Exit codes: 0 done, 1 runtime failure, 2 bad configuration (one line on stderr
naming the setting and the fix).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from edge_module import __version__, logs
from edge_module.config import load_settings, reference_markdown
from edge_module.exceptions import ConfigError, ModelError

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


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="edge-module",
        description="Run ONNX models at the edge, metered like Azure AI containers.",
    )
    parser.add_argument("--version", action="version", version=f"edge-module {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    run = sub.add_parser("run", help="run the module: edge-module run Eula=accept "
                         "Billing=<url> ApiKey=<key> [Key=Value ...]")
    run.add_argument("settings", nargs="*", metavar="Key=Value")
    run.add_argument("--config", type=Path, help="JSON or TOML settings file")
    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    ledger = sub.add_parser(
        "ledger", help="show the metering backlog, or upload it now: edge-module ledger "
        "Data:Path=<dir> [--drain Billing=<url> ApiKey=<key>]")
    ledger.add_argument("settings", nargs="*", metavar="Key=Value")
    ledger.add_argument("--config", type=Path, help="JSON or TOML settings file")
    ledger.add_argument("--drain", action="store_true", help="upload pending records now")
    ledger.add_argument("--json", action="store_true", help="machine-readable output")
    ledger.add_argument("--quarantined", action="store_true",
                        help="list records the billing endpoint rejected for good")
    diagnose = sub.add_parser(
        "diagnose", help="check DNS, TCP, TLS, HTTP, proxy, key, lease, clock skew and "
        "Retry-After against the billing endpoint: edge-module diagnose Billing=<url> "
        "ApiKey=<key>")
    diagnose.add_argument("settings", nargs="*", metavar="Key=Value")
    diagnose.add_argument("--config", type=Path, help="JSON or TOML settings file")
    diagnose.add_argument("--json", action="store_true", help="machine-readable output")
    diagnose.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and "=" in argv[0] and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `edge-module Eula=accept ...`, as with Azure AI containers
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if item.startswith("-") or "=" not in item]
    if unknown or (rest and not hasattr(args, "settings")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.settings.extend(rest)  # Key=Value given after an option
    if args.command == "config-reference":
        sys.stdout.write(reference_markdown())
        return 0
    if args.command == "diagnose":
        return _diagnose(args)
    if args.command == "ledger":
        from edge_module.ledger_cli import ledger_command

        return ledger_command(args)
    if args.command != "run":
        _parser().print_help()
        return EXIT_CONFIG
    return _run(args.settings, args.config)


def _run(assignments: list[str], config_file: Path | None) -> int:
    try:
        settings = load_settings(assignments, config_file=config_file)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
        return EXIT_CONFIG
    logs.register_secrets(settings.secrets())
    logs.configure(settings.log.level, settings.log.format)
    from edge_module.app import App  # heavy imports (onnxruntime, cv2) after validation

    try:
        app = App(settings)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
        return EXIT_CONFIG
    except ModelError as exc:
        fail(f"model error: {exc}; fix: check Model:Name / Model:Path")
        return EXIT_CONFIG
    return app.run()


def _diagnose(args: argparse.Namespace) -> int:
    given = {a.partition("=")[0].lower() for a in args.settings}
    extra = [] if "eula" in given else ["Eula=accept"]  # diagnosing accepts nothing
    try:
        settings = load_settings([*extra, *args.settings], config_file=args.config)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
        return EXIT_CONFIG
    if settings.billing.url is None:
        fail("configuration error: Billing: is required to diagnose; fix: pass Billing=<url>")
        return EXIT_CONFIG
    logs.register_secrets(settings.secrets())
    from edge_module.diagnose import Diagnosis, report

    return report(Diagnosis(settings, timeout=args.timeout).run(), args.json)


def fail(message: str) -> None:
    sys.stderr.write(logs.scrub(message) + "\n")
