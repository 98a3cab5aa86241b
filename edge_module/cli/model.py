"""``edge-module model encrypt``: the vendor's tool to ship a model encrypted."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_module.cli.common import EXIT_CONFIG, fail


def encrypt_command(args: argparse.Namespace) -> int:
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


