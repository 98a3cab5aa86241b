"""``edge-module usage-log verify`` and ``edge-module reconcile``: disconnected usage logs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_module.billing_api import BillingClient
from edge_module.cli.common import EXIT_CONFIG, fail, tool_settings
from edge_module.exceptions import ConfigError
from edge_module.metering.usage_log import read_entries, verify_entries
from edge_module.trust.signing import load_public_key


def _module_key(args: argparse.Namespace) -> Ed25519PublicKey:
    if args.license is not None:
        lic = json.loads(args.license.read_text())
        return load_public_key(str(lic["modulePublicKey"]))
    if args.public_key:
        return load_public_key(args.public_key)
    return load_public_key((args.folder / "module-public-key.b64").read_text())


def verify_command(args: argparse.Namespace) -> int:
    files = sorted((args.folder / "usage-logs").glob("*.jsonl"))
    if not files:
        fail(f"no usage logs under {args.folder / 'usage-logs'}; fix: pass the Mounts:Output "
             "folder of the module")
        return EXIT_CONFIG
    try:
        key = _module_key(args)
    except (OSError, KeyError, ValueError, ConfigError) as exc:
        fail(f"cannot get the module's public key: {exc}; fix: pass --license <file>")
        return EXIT_CONFIG
    result = verify_entries(read_entries(files), key)
    report: dict[str, Any] = {"ok": result.ok, "entries": result.entries,
                              "quantity": result.quantity, "problems": result.problems}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'VALID' if result.ok else 'TAMPERED'}: {result.entries} entries, "
              f"quantity {result.quantity}")
        for problem in result.problems:
            print(f"  {problem}")
    return 0 if result.ok else 1


def reconcile_command(args: argparse.Namespace) -> int:
    settings = tool_settings(args)
    if settings.mounts.output is None or settings.billing.url is None:
        raise ConfigError("Mounts:Output" if settings.mounts.output is None else "Billing",
                          "is required to reconcile; fix: pass Mounts:Output=<folder> "
                          "Billing=<url> ApiKey=<key>")
    entries = read_entries(sorted((settings.mounts.output / "usage-logs").glob("*.jsonl")))
    if not entries:
        fail(f"no usage log entries under {settings.mounts.output}")
        return EXIT_CONFIG
    client = BillingClient.from_settings(settings, timeout=30)
    answer = client.post("/billing/v1/reconcile", {"entries": entries})
    client.close()
    print(json.dumps({"status": str(answer.status), "http": answer.http_status,
                      **answer.body}, indent=2))
    return 0 if answer.ok else 1
