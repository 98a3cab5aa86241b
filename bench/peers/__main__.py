"""``python -m bench.peers [--quick]``: see bench/peers/run.py."""

from bench.peers.run import main

raise SystemExit(main())
