"""``python -m edge_module.trust.release KEYFILE...``: make this package a release build.

Run once at image build (Dockerfile.amd64, from the ``VENDOR_KEYS`` build
argument): writes ``build.json`` beside this file with the vendor's public
keys. Each argument is a public key (base64 of the raw 32 bytes, or PEM) or a
key set (``{"keys": [{"publicKey", "notBefore", "notAfter"}]}``, times in epoch
milliseconds) for rotation windows. Only public keys: the private half stays
in the vendor's billing service.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from edge_module.exceptions import ConfigError
from edge_module.trust.keys import RELEASE, load_key_file
from edge_module.trust.signing import raw_public


def release_info(paths: list[Path]) -> dict[str, object]:
    entries: list[dict[str, object]] = []
    for path in paths:
        for key in load_key_file(path):
            entry: dict[str, object] = {
                "keyId": key.key_id,
                "publicKey": base64.b64encode(raw_public(key.public)).decode()}
            if key.not_before_ms is not None:
                entry["notBefore"] = key.not_before_ms
            if key.not_after_ms is not None:
                entry["notAfter"] = key.not_after_ms
            entries.append(entry)
    if not entries:
        raise ConfigError("VENDOR_KEYS", "no vendor key given; fix: pass the vendor's public "
                          "key file")
    return {"build": RELEASE, "keys": entries}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(__file__).with_name("build.json")
    try:
        info = release_info([Path(a) for a in args])
    except ConfigError as exc:
        print(f"edge_module.trust.release: {exc}", file=sys.stderr)
        return 2
    target.write_text(json.dumps(info, indent=1) + "\n")
    print(f"release build: {len(info['keys'])} vendor key(s) in {target}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
