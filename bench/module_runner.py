"""The module with metering OFF, for the benchmark's overhead figure only.

Not a user-facing switch: the module itself always meters. This runner builds
the same App with a meter that records nothing, so `make bench` can report
the cost of metering (ON versus OFF) on the same machine and payloads.
"""

from __future__ import annotations

import sys

from edge_module import logs
from edge_module.app import App
from edge_module.config import load_settings
from edge_module.pipeline import NoMeter


def main() -> int:
    settings = load_settings(sys.argv[1:])
    logs.register_secrets(settings.secrets())
    logs.configure(settings.log.level, settings.log.format)
    return App(settings, meter=NoMeter()).run()


if __name__ == "__main__":
    raise SystemExit(main())
