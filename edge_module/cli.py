"""Command line: ``edge-module run Key=Value ...`` and the tools beside it.

Exit codes: 0 done, 1 runtime failure, 2 bad configuration (one line on stderr
naming the setting and the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_module import __version__, logs
from edge_module.config import load_settings, reference_markdown
from edge_module.exceptions import ConfigError, ModelError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-module",
        description="Run ONNX models at the edge, metered like Azure AI containers.",
    )
    parser.add_argument("--version", action="version", version=f"edge-module {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the module: edge-module run Eula=accept "
                         "Billing=<url> ApiKey=<key> [Key=Value ...]")
    run.add_argument("settings", nargs="*", metavar="Key=Value")
    run.add_argument("--config", type=Path, help="JSON or TOML settings file")
    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and "=" in argv[0] and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `edge-module Eula=accept ...`, as with Azure AI containers
    args = _parser().parse_args(argv)
    if args.command == "config-reference":
        sys.stdout.write(reference_markdown())
        return 0
    if args.command != "run":
        _parser().print_help()
        return EXIT_CONFIG
    return _run(args.settings, args.config)


def _run(assignments: list[str], config_file: Path | None) -> int:
    try:
        settings = load_settings(assignments, config_file=config_file)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
        return EXIT_CONFIG
    logs.register_secrets(settings.secrets())
    logs.configure(settings.log.level, settings.log.format)
    from edge_module.app import App  # heavy imports (onnxruntime, cv2) after validation

    try:
        app = App(settings)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
        return EXIT_CONFIG
    except ModelError as exc:
        _fail(f"model error: {exc}; fix: check Model:Name / Model:Path")
        return EXIT_CONFIG
    return app.run()


def _fail(message: str) -> None:
    sys.stderr.write(logs.scrub(message) + "\n")
