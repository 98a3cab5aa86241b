"""``python -m edge_module`` is the same as the ``edge-module`` command."""

from edge_module.cli import main

raise SystemExit(main())
