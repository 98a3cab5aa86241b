"""``python -m simulator.billing --port 8600 --db billing.db --key demo-key``."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from simulator.billing.server import BillingSimulator, KeyInfo


def parse_key(text: str) -> tuple[str, KeyInfo]:
    """``KEY[:CONTAINER_TYPE[:QUOTA]]``."""
    parts = text.split(":")
    info = KeyInfo()
    if len(parts) > 1 and parts[1]:
        info.container_type = parts[1]
    if len(parts) > 2 and parts[2]:
        info.quota = int(parts[2])
    return parts[0], info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Billing API v1 simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--db", type=Path, default=Path("billing-simulator.db"))
    parser.add_argument("--key", action="append", default=[],
                        help="KEY[:CONTAINER_TYPE[:QUOTA]] (repeatable; default demo-key)")
    parser.add_argument("--revoked-key", action="append", default=[])
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--grace-seconds", type=float, default=86400.0,
                        help="offline grace granted by each lease")
    args = parser.parse_args(argv)
    keys = dict(parse_key(k) for k in (args.key or ["demo-key"]))
    for revoked in args.revoked_key:
        keys[revoked] = KeyInfo(revoked=True)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert and args.tls_key else None
    sim = BillingSimulator(args.db, args.host, args.port, keys, tls=tls).start()
    parser_grace = args.grace_seconds
    sim.state.lease.grace_seconds = parser_grace
    print(f"billing simulator on {sim.url} (admin API under {sim.url}/admin/)", flush=True)
    print(f"signing public key (development builds: Development:TrustedKeyFile="
          f"{sim.public_key_path}): {sim.public_key_b64}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
