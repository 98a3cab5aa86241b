"""Ed25519 signatures over canonical JSON: leases, status answers, receipts, licence files.

Canonical JSON: keys sorted, separators ``,`` and ``:``, no whitespace, UTF-8,
computed over the object without its ``signature`` field. ``keyId`` is the
first 16 hex digits of the SHA-256 of the raw public key. Which keys are
trusted is decided in ``edge_module.trust.keys``; this module only does maths.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_module.exceptions import ConfigError


def canonical(obj: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in obj.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def sign(obj: dict[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """``obj`` plus ``keyId`` and ``signature``."""
    body = {**obj, "keyId": key_id(private.public_key())}
    signature = private.sign(canonical(body))
    return {**body, "signature": base64.b64encode(signature).decode()}


def verify(obj: Any, public: Ed25519PublicKey) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("signature"), str):
        return False
    try:
        signature = base64.b64decode(obj["signature"], validate=True)
        public.verify(signature, canonical(obj))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def load_public_key(value: str, setting: str = "Billing:PublicKey") -> Ed25519PublicKey:
    """A public key: base64 of the raw 32 bytes, or PEM text or a PEM file path.

    ``setting`` names where the value came from, for the error message.
    """
    text = value.strip()
    if text.startswith("-----BEGIN") or Path(text).is_file():
        pem = text.encode() if text.startswith("-----BEGIN") else Path(text).read_bytes()
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise ConfigError(setting, f"not a PEM public key ({exc}); fix: "
                              "use the vendor's Ed25519 public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(setting, "the PEM key is not Ed25519; fix: use the "
                              "vendor's Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(setting, "neither base64 nor an existing PEM file; fix: "
                          "pass the base64 of the raw 32-byte key or a PEM path") from exc
    if len(raw) != 32:
        raise ConfigError(setting, f"decodes to {len(raw)} bytes, not 32; fix: pass "
                          "the base64 of the raw 32-byte Ed25519 key")
    return Ed25519PublicKey.from_public_bytes(raw)
