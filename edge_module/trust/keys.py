"""The keys this build trusts, and where they come from (no thread of its own).

A key is trusted with a validity window (``notBefore``/``notAfter``, epoch
milliseconds, either may be open), so the vendor can rotate keys: a new key is
built in before it signs anything, an old one is retired by ending its window.
A signed object counts only when its ``keyId`` names a trusted key, its
signature verifies, and both its own ``issuedAt`` and the module's trusted time
lie inside that key's window.

Where keys come from:

* ``build.json`` in this package. A source checkout carries
  ``{"build": "development", "keys": []}``; the image build overwrites it
  (``python -m edge_module.trust.release``, from the ``VENDOR_KEYS`` build
  argument) with ``{"build": "release", "keys": [...]}``.
* In a development build only: ``Development:TrustedKeyFile`` (the billing
  simulator's public key, or a key set in the ``build.json`` format) and the
  old ``Billing:PublicKey``. Both are logged as a warning at every start. A
  release build refuses both (``ConfigError``: exit code 2), so no setting,
  environment variable or file under ``Data:Path`` can add a key to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_module.exceptions import ConfigError
from edge_module.logs import get_logger
from edge_module.trust.signing import key_id, load_public_key, verify

if TYPE_CHECKING:
    from edge_module.config import Settings

log = get_logger("trust")

RELEASE = "release"
DEVELOPMENT = "development"
DEV_SWITCH = "Development:TrustedKeyFile"
LEGACY_KEY = "Billing:PublicKey"
_warned: set[str] = set()  # each development switch is logged once per process start


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public: Ed25519PublicKey
    not_before_ms: int | None = None
    not_after_ms: int | None = None

    def valid_at(self, ms: int) -> bool:
        return (self.not_before_ms is None or ms >= self.not_before_ms) and \
            (self.not_after_ms is None or ms <= self.not_after_ms)

    @classmethod
    def of(cls, public: Ed25519PublicKey, not_before_ms: int | None = None,
           not_after_ms: int | None = None) -> TrustedKey:
        return cls(key_id(public), public, not_before_ms, not_after_ms)


class TrustedKeys:
    """A set of trusted keys; ``check`` says why an object does not verify, or None."""

    def __init__(self, keys: Iterable[TrustedKey] = (), build: str = DEVELOPMENT) -> None:
        self.keys: dict[str, TrustedKey] = {k.key_id: k for k in keys}
        self.build = build

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def release(self) -> bool:
        return self.build == RELEASE

    def check(self, obj: Any, now_ms: int | None = None) -> str | None:
        """None when ``obj`` is signed by a key trusted at its issue time and at ``now_ms``."""
        if not isinstance(obj, dict):
            return "it is not a JSON object"
        if not isinstance(obj.get("signature"), str):
            return "it is not signed"
        if not self.keys:
            return "this build trusts no key (development build without " \
                f"{DEV_SWITCH}); fix: set {DEV_SWITCH} to the simulator's public key, or run " \
                "a release image"
        key = self.keys.get(str(obj.get("keyId")))
        if key is None:
            return f"it is signed by key {str(obj.get('keyId'))[:32]!r}, which this build " \
                "does not trust"
        if not verify(obj, key.public):
            return "its signature does not verify"
        issued = obj.get("issuedAt")
        if not isinstance(issued, int) or isinstance(issued, bool):
            return "it has no integer issuedAt"
        if not key.valid_at(issued):
            return f"key {key.key_id} was not valid when it claims to have signed (issuedAt)"
        if now_ms is not None and not key.valid_at(now_ms):
            return f"key {key.key_id} is outside its validity window now (retired or not " \
                "yet active)"
        return None

    def valid(self, obj: Any, now_ms: int | None = None) -> bool:
        return self.check(obj, now_ms) is None


def parse_key_set(obj: Any, where: str) -> list[TrustedKey]:
    """``{"keys": [{"publicKey", "notBefore"?, "notAfter"?}]}`` → keys."""
    items = obj.get("keys") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise ConfigError(where, 'is not a key set {"keys": [...]}; fix: rebuild it with '
                          "`python -m edge_module.trust.release`")
    keys = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("publicKey"), str):
            raise ConfigError(where, "a key entry has no publicKey; fix: rebuild the key set")
        public = load_public_key(item["publicKey"], where)
        before, after = item.get("notBefore"), item.get("notAfter")
        keys.append(TrustedKey.of(public, int(before) if before is not None else None,
                                  int(after) if after is not None else None))
    return keys


def build_info() -> dict[str, Any]:
    """The ``build.json`` of this package (development when it is missing)."""
    try:
        text = resources.files("edge_module.trust").joinpath("build.json").read_text()
        obj = json.loads(text)
    except (OSError, ValueError):
        return {"build": DEVELOPMENT, "keys": []}
    return obj if isinstance(obj, dict) else {"build": DEVELOPMENT, "keys": []}


def load_key_file(path: Path) -> list[TrustedKey]:
    """A development key file: one public key (base64 or PEM) or a key set (JSON)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(DEV_SWITCH, f"cannot read {path}: {exc.strerror}; fix: point it at "
                          "the simulator's billing-public-key.b64") from exc
    if text.lstrip().startswith("{"):
        try:
            return parse_key_set(json.loads(text), DEV_SWITCH)
        except ValueError as exc:
            raise ConfigError(DEV_SWITCH, f"{path} is not valid JSON; fix: use a key set or "
                              "a single base64 key") from exc
    return [TrustedKey.of(load_public_key(text, DEV_SWITCH))]


def trusted_keys(dev_key_file: Path | None, legacy_key: str | None,
                 info: dict[str, Any] | None = None) -> TrustedKeys:
    """The keys of this build; raises ConfigError for a development switch in a release."""
    info = build_info() if info is None else info
    build = str(info.get("build"))
    if build == RELEASE:
        for name, value in ((DEV_SWITCH, dev_key_file), (LEGACY_KEY, legacy_key)):
            if value is not None:
                raise ConfigError(name, "this is a release build, which trusts only the "
                                  "vendor keys built into it and refuses development "
                                  f"switches; fix: remove {name} (nothing to configure)")
        keys = parse_key_set(info, "build.json")
        if not keys:
            raise ConfigError("build.json", "this release build carries no vendor key; fix: "
                              "rebuild the image with VENDOR_KEYS (deployment/build-image.sh "
                              "--vendor-keys FILE)")
        return TrustedKeys(keys, RELEASE)
    keys = parse_key_set(info, "build.json") if info.get("keys") else []
    if dev_key_file is not None:
        keys += load_key_file(dev_key_file)
        if DEV_SWITCH not in _warned:
            _warned.add(DEV_SWITCH)
            log.warning("development_trust_key", setting=DEV_SWITCH, path=str(dev_key_file),
                            effect="this development build trusts a key from a setting: "
                            "anyone holding its private half can grant licences",
                            fix="never ship this; customers run release images, which "
                            "refuse it")
    if legacy_key is not None:
        keys.append(TrustedKey.of(load_public_key(legacy_key, LEGACY_KEY)))
        if LEGACY_KEY not in _warned:
            _warned.add(LEGACY_KEY)
            log.warning("development_trust_key", setting=LEGACY_KEY,
                            effect="this development build trusts a key from a setting",
                            fix=f"use {DEV_SWITCH} in development; release images refuse "
                            "both")
    return TrustedKeys(keys, DEVELOPMENT)


def keys_for(settings: Settings) -> TrustedKeys:
    """The trusted keys for these settings (see ``trusted_keys``)."""
    return trusted_keys(settings.development.trusted_key_file, settings.billing.public_key)
