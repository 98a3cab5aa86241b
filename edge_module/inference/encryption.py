"""Licence-protected models: ONNX files encrypted with AES-256-GCM.

File format: ``EMENC1`` + 12-byte nonce + ciphertext with its 16-byte tag.
The model's name is the associated data, so a key granted for one model
cannot open another. The key (32 bytes, base64) reaches the module only in
``modelKeys`` of a signed licence file or lease; the plaintext exists only in
memory (onnxruntime loads the session from bytes). ``edge-module model
encrypt`` is the vendor's tool.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_module.exceptions import ModelError

MAGIC = b"EMENC1"
NONCE_BYTES = 12


def is_encrypted(data: bytes) -> bool:
    return data.startswith(MAGIC)


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def encrypt_model(data: bytes, key: bytes, name: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def decrypt_model(data: bytes, key_b64: str | None, name: str) -> bytes:
    if key_b64 is None:
        raise ModelError(f"model {name} is encrypted and no valid licence or lease grants "
                         "its key; fix: run with a licence (Mounts:License) or a billing "
                         "endpoint whose lease carries the key for this model")
    try:
        key = base64.b64decode(key_b64, validate=True)
        nonce = data[len(MAGIC):len(MAGIC) + NONCE_BYTES]
        return AESGCM(key).decrypt(nonce, data[len(MAGIC) + NONCE_BYTES:], name.encode())
    except (InvalidTag, binascii.Error, ValueError) as exc:
        raise ModelError(f"model {name} cannot be decrypted with the key the licence grants "
                         "(wrong key, or the file was altered); fix: get the licence issued "
                         "for this model, or a fresh copy of the model file") from exc
