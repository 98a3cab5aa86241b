"""``edge-module ledger``: the metering backlog for operators, and an upload on demand.

Runs on the main thread; the upload uses the same ``Drainer`` as the module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from edge_module import logs
from edge_module.billing_api import BillingClient
from edge_module.cli.common import EXIT_CONFIG, fail, tool_settings
from edge_module.config import Settings
from edge_module.identity import installation_identity
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import Ledger, MeteringError
from edge_module.trust.keys import keys_for

PLACEHOLDERS = ("Eula=accept", "Billing=http://billing.invalid/", "ApiKey=unused-placeholder-key")


def _settings(args: argparse.Namespace) -> Settings:
    if not args.drain:  # reading the ledger needs no endpoint and no licence acceptance
        return tool_settings(args, PLACEHOLDERS)
    return tool_settings(args, ())


def ledger_command(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = settings.data.path / "ledger.db"
    if not path.exists():
        fail(f"no ledger at {path}; fix: point Data:Path at the module's data folder")
        return EXIT_CONFIG
    logs.register_secrets(settings.secrets())
    logs.configure("warning", "console")
    identity = installation_identity(settings.data.path)
    ledger = Ledger(path, identity, settings.metering)
    try:
        if args.salvage is not None:
            try:
                copied, unreadable = ledger.salvage(args.salvage)
            except MeteringError as exc:
                fail(f"salvage failed: {exc}")
                return 1
            _print(args, {"salvaged": copied, "unreadable": unreadable,
                          "pending": ledger.pending})
            return 0
        if args.quarantined:
            _print(args, {"quarantined": ledger.quarantined()})
            return 0
        if args.drain:
            return _drain(args, settings, ledger)
        _print(args, ledger.stats().as_dict())
        return 0
    finally:
        ledger.close()


def _drain(args: argparse.Namespace, settings: Settings, ledger: Ledger) -> int:
    client = BillingClient.from_settings(settings, timeout=settings.metering.timeout_seconds)
    drainer = Drainer(ledger, client, settings.metering, keys=keys_for(settings))
    started = time.monotonic()
    bar = ProgressBar(sys.stderr)
    outcome = drainer.drain_all(deadline=time.monotonic() + 24 * 3600, progress=bar.update)
    bar.finish()
    client.close()
    elapsed = time.monotonic() - started
    answer = outcome.answer
    result: dict[str, Any] = {
        "uploaded": outcome.delivered, "duplicates": outcome.duplicates,
        "quarantined": outcome.quarantined, "seconds": round(elapsed, 2),
        "status": str(answer.status) if answer else None,
        "remaining": ledger.pending,
    }
    if answer is not None and not answer.ok:
        result["error"] = answer.error
        if answer.retry_after is not None:
            result["retryAfter"] = answer.retry_after
    _print(args, result)
    return 0 if ledger.pending == 0 else 1


def _print(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "lastSuccessfulDrain":
            continue  # epoch milliseconds: people read lastSuccessfulDrainAt (ISO 8601)
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("at"), int):
                    item = {**item, "at": _iso(item["at"])}  # epoch ms: people read ISO
                print("  " + json.dumps(item))
        else:
            print(f"{key:>24}: {'-' if value is None else value}")


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat()


class ProgressBar:
    """A one-line bar on a terminal; a line every 10% otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last_decile = -1
        self.started = time.monotonic()
        self.shown = False

    def update(self, done: int, total: int) -> None:
        if total <= 0:
            return
        fraction = min(1.0, done / total)
        rate = done / max(1e-6, time.monotonic() - self.started)
        if self.tty:
            filled = int(30 * fraction)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} "
                              f"records ({rate:.0f}/s)")
            self.stream.flush()
            self.shown = True
        elif int(fraction * 10) > self.last_decile:
            self.last_decile = int(fraction * 10)
            self.stream.write(f"uploaded {done}/{total} records ({rate:.0f}/s)\n")

    def finish(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
