"""Command line: ``edge-module run Key=Value ...`` and the tools beside it.

This file builds the parser and dispatches; each command lives in its own module
(``run``, ``ledger``, ``usage_log``, ``model``, ``diagnose``), imported only when
used so that ``--help`` and the tools start without onnxruntime or OpenCV.
Shared helpers are in ``cli/common.py``. Runs on the main thread.

Exit codes: 0 done, 1 runtime failure, 2 bad configuration (one line on stderr
naming the setting and the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_module import __version__
from edge_module.cli.common import EXIT_CONFIG, Parser, fail, settings_arguments
from edge_module.config import reference_markdown
from edge_module.exceptions import ConfigError

__all__ = ["main"]

RUN_DESCRIPTION = """\
Serve the model: take input from MQTT (or edgeHub), answer it, meter every answer
and upload the metering records to the billing endpoint.

Required settings:
  Eula=accept        you accept the licence terms
  Billing=<url>      base URL of the billing endpoint (https://...)
  ApiKey=<key>       the key for the billing endpoint (at least 16 characters)
                     (without Billing and ApiKey: Mounts:License=<folder> runs
                     disconnected under a licence file)

Often set too:
  Mqtt:Host=<host> Mqtt:Port=<port>   the broker (default 127.0.0.1:1883)
  Model:Name=<name> | Model:Path=<file.onnx>
  Data:Path=<folder>                  where the metering ledger lives
  Http:Port=<port>                    /health, /ready, /status, /metrics
"""

RUN_EPILOG = """\
Settings are Key=Value on the command line, Section__Key=value in the environment
(Mqtt__Port=1883) or a JSON/TOML file given with --config; names are
case-insensitive. Every setting, its default and meaning:
  edge-module config-reference   (also docs/configuration.md)
A bad or missing setting stops the module with one line naming it and the fix,
exit code 2.
"""


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="edge-module",
        description="Run ONNX models at the edge, metered like Azure AI containers.",
    )
    parser.add_argument("--version", action="version", version=f"edge-module {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    run = sub.add_parser(
        "run", help="run the module: edge-module run Eula=accept "
        "Billing=<url> ApiKey=<key> [Key=Value ...]",
        description=RUN_DESCRIPTION, epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    settings_arguments(run)
    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    ledger = sub.add_parser(
        "ledger", help="show the metering backlog, or upload it now: edge-module ledger "
        "Data:Path=<dir> [--drain Billing=<url> ApiKey=<key>]")
    settings_arguments(ledger)
    ledger.add_argument("--drain", action="store_true", help="upload pending records now")
    ledger.add_argument("--json", action="store_true", help="machine-readable output")
    ledger.add_argument("--salvage", type=Path, metavar="FILE",
                        help="copy the pending records of a moved-aside (corrupt) ledger "
                        "into the current one; resends are answered Duplicate")
    ledger.add_argument("--quarantined", action="store_true",
                        help="list records the billing endpoint rejected for good")
    usage = sub.add_parser(
        "usage-log", help="verify a disconnected module's signed usage log: edge-module "
        "usage-log verify <Mounts:Output folder> [--license FILE | --public-key B64]")
    usage.add_argument("action", choices=["verify"])
    usage.add_argument("folder", type=Path)
    usage.add_argument("--license", type=Path,
                       help="the licence file: its certified module key verifies the log")
    usage.add_argument("--public-key", help="the module's public key (base64 raw)")
    usage.add_argument("--json", action="store_true")
    reconcile = sub.add_parser(
        "reconcile", help="upload a disconnected module's signed usage log once a link "
        "exists: edge-module reconcile Mounts:Output=<dir> Billing=<url> ApiKey=<key>")
    settings_arguments(reconcile)
    model = sub.add_parser(
        "model", help="vendor tool: edge-module model encrypt <model.onnx> writes "
        "<model.onnx.enc> and prints the key to put in licences")
    model.add_argument("action", choices=["encrypt"])
    model.add_argument("path", type=Path, help="the .onnx file (its .json descriptor beside)")
    model.add_argument("--key", help="base64 AES-256 key to use (default: a new random key)")
    diagnose = sub.add_parser(
        "diagnose", help="check DNS, TCP, TLS, HTTP, proxy, key, lease, clock skew and "
        "Retry-After against the billing endpoint: edge-module diagnose Billing=<url> "
        "ApiKey=<key>")
    settings_arguments(diagnose)
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
    try:
        return _dispatch(args)
    except ConfigError as exc:  # one translation, at the boundary: one line, exit 2
        fail(f"configuration error: {exc}")
        return EXIT_CONFIG


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config-reference":
        sys.stdout.write(reference_markdown())
        return 0
    if args.command == "diagnose":
        from edge_module.cli.diagnose import diagnose_command

        return diagnose_command(args)
    if args.command == "model":
        from edge_module.cli.model import encrypt_command

        return encrypt_command(args)
    if args.command in ("usage-log", "reconcile"):
        from edge_module.cli.usage_log import reconcile_command, verify_command

        return verify_command(args) if args.command == "usage-log" else reconcile_command(args)
    if args.command == "ledger":
        from edge_module.cli.ledger import ledger_command

        return ledger_command(args)
    if args.command != "run":
        _parser().print_help()
        return EXIT_CONFIG
    from edge_module.cli.run import run_command

    return run_command(args.settings, args.config)


