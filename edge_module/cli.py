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
from edge_module.config import Settings, load_settings, reference_markdown
from edge_module.exceptions import ConfigError, ModelError

EXIT_CONFIG = 2

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


SECRET_ASSIGNMENT = re.compile(r"(?i)\b((?:\w+[:_]{1,2})*(?:apikey|password|secret)\w*)=\S+")


class Parser(argparse.ArgumentParser):
    """argparse, except that its error messages never echo a secret setting's value."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {redact_assignments(message)}\n")


def redact_assignments(text: str) -> str:
    """``ApiKey=abc`` -> ``ApiKey=***`` (and the same for passwords and secrets)."""
    return SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}=***", text)


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="*", metavar="Key=Value")
    parser.add_argument("--config", type=Path, help="JSON or TOML settings file")


def tool_settings(args: argparse.Namespace, defaults: tuple[str, ...] = ("Eula=accept",)
                  ) -> Settings:
    """Settings for a tool command: ``defaults`` fill in keys the user did not give
    (a tool that serves nothing needs no licence acceptance, for instance)."""
    given = {a.partition("=")[0].lower() for a in args.settings}
    extra = [d for d in defaults if d.partition("=")[0].lower() not in given]
    return load_settings([*extra, *args.settings], config_file=args.config)


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
    _settings_arguments(run)
    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    ledger = sub.add_parser(
        "ledger", help="show the metering backlog, or upload it now: edge-module ledger "
        "Data:Path=<dir> [--drain Billing=<url> ApiKey=<key>]")
    _settings_arguments(ledger)
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
    _settings_arguments(reconcile)
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
    _settings_arguments(diagnose)
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
        return _diagnose(args)
    if args.command == "model":
        return _encrypt_model(args)
    if args.command in ("usage-log", "reconcile"):
        from edge_module.usage_cli import reconcile_command, verify_command

        return verify_command(args) if args.command == "usage-log" else reconcile_command(args)
    if args.command == "ledger":
        from edge_module.ledger_cli import ledger_command

        return ledger_command(args)
    if args.command != "run":
        _parser().print_help()
        return EXIT_CONFIG
    return _run(args.settings, args.config)


def _run(assignments: list[str], config_file: Path | None) -> int:
    settings = load_settings(assignments, config_file=config_file)
    logs.register_secrets(settings.secrets())
    logs.configure(settings.log.level, settings.log.format)
    from edge_module.app import App  # heavy imports (onnxruntime, cv2) after validation
    from edge_module.licensing.license_file import LicenseError

    if settings.download_license:
        return _download_license(settings)
    if settings.replicas > 1:
        from edge_module.replicas import supervise

        return supervise(settings, assignments, config_file)
    try:
        app = App(settings)
    except LicenseError as exc:
        fail(f"licence error: {exc}")
        return EXIT_CONFIG
    except ModelError as exc:
        text = str(exc)
        fail(f"model error: {text}" if "fix:" in text else
             f"model error: {text}; fix: check Model:Name / Model:Path")
        return EXIT_CONFIG
    return app.run()


def _download_license(settings: Settings) -> int:
    """DownloadLicense=True: fetch the signed licence into Mounts:License and exit."""
    import base64

    from edge_module import CONTAINER_TYPE
    from edge_module.billing_api import BillingClient
    from edge_module.licensing.license_file import LicenseError, download_license
    from edge_module.licensing.signing import raw_public
    from edge_module.metering.records import Identity
    from edge_module.state import ensure_data_dir, installation_id, module_signing_key

    data = ensure_data_dir(settings.data.path)
    identity = Identity(CONTAINER_TYPE, __version__, installation_id(data))
    module_key = base64.b64encode(raw_public(module_signing_key(data).public_key())).decode()
    ca = str(settings.billing.ca_file) if settings.billing.ca_file else None
    client = BillingClient(settings.billing_url, settings.key, timeout=30, ca_file=ca)
    assert settings.mounts.license is not None
    try:
        path = download_license(client, identity, module_key, settings.mounts.license)
    except LicenseError as exc:
        fail(f"licence error: {exc}")
        return 1
    print(f"licence written to {path}; run disconnected with Mounts:License="
          f"{settings.mounts.license} Mounts:Output=<folder> and the same Data:Path")
    return 0


def _encrypt_model(args: argparse.Namespace) -> int:
    import base64
    import json

    from edge_module.config import descriptor_path
    from edge_module.inference.encryption import encrypt_model, new_key

    source: Path = args.path
    descriptor = descriptor_path(source)
    try:
        name = str(json.loads(descriptor.read_text())["name"])
        data = source.read_bytes()
    except (OSError, ValueError, KeyError) as exc:
        fail(f"cannot read {source} and its descriptor {descriptor}: {exc}")
        return EXIT_CONFIG
    key = base64.b64decode(args.key) if args.key else new_key()
    target = source.with_name(source.name + ".enc")
    target.write_bytes(encrypt_model(data, key, name))
    print(json.dumps({"model": name, "encrypted": str(target),
                      "key": base64.b64encode(key).decode(),
                      "next": "put the key in modelKeys of the licences and leases your "
                              "billing service issues; ship the .enc file, not the .onnx"},
                     indent=2))
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    settings = tool_settings(args)
    if settings.billing.url is None:
        raise ConfigError("Billing", "is required to diagnose; fix: pass Billing=<url>")
    logs.register_secrets(settings.secrets())
    from edge_module.diagnose import Diagnosis, report

    return report(Diagnosis(settings, timeout=args.timeout).run(), args.json)


def fail(message: str) -> None:
    sys.stderr.write(logs.scrub(message) + "\n")
