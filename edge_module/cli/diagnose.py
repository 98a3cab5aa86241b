"""``edge-module diagnose``: every check between the module and its billing endpoint."""

from __future__ import annotations

import argparse

from edge_module import logs
from edge_module.cli.common import tool_settings
from edge_module.exceptions import ConfigError


def diagnose_command(args: argparse.Namespace) -> int:
    settings = tool_settings(args)
    if settings.billing.url is None:
        raise ConfigError("Billing", "is required to diagnose; fix: pass Billing=<url>")
    logs.register_secrets(settings.secrets())
    logs.configure("warning", "console")  # warnings to stderr; the report owns stdout
    from edge_module.diagnose import Diagnosis, report

    return report(Diagnosis(settings, timeout=args.timeout).run(), args.json)
