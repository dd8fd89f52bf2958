"""Ed25519 keys and detached signatures for model bundles (the `cryptography` library does the math).

Private keys are PKCS#8 PEM files (mode 0600), public keys SubjectPublicKeyInfo PEM files
beside them (`KEY.pub`). A key is named by its key id: the first 16 hex digits of the sha256
of its raw public bytes, so a signature says which trusted key must check it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"


class SignatureError(Exception):
    """A signature is missing, malformed, made by an untrusted key, or does not match."""


class KeyFileError(Exception):
    """A key file is missing or is not an Ed25519 key in PEM form."""


def public_key_path(private_key_path: Path) -> Path:
    """Where generate_key_pair puts the public half of private_key_path."""
    return private_key_path.with_suffix(".pub")


def generate_key_pair(private_key_path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 private key (0600) and its public key; return both paths."""
    public_path = public_key_path(private_key_path)
    if not overwrite and (private_key_path.exists() or public_path.exists()):
        msg = f"{private_key_path} or {public_path} already exists; choose another path or delete the old key first"
        raise KeyFileError(msg)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_key_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_key_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key written by generate_key_pair."""
    key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{path} is not an Ed25519 private key; make one with `lineguard-train keygen`"
        raise KeyFileError(msg)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key."""
    key = serialization.load_pem_public_key(_read_key_file(path))
    if not isinstance(key, Ed25519PublicKey):
        msg = f"{path} is not an Ed25519 public key; use the .pub file written by `lineguard-train keygen`"
        raise KeyFileError(msg)
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        msg = f"cannot read key file {path}: {error.strerror}"
        raise KeyFileError(msg) from error
    if b"-----BEGIN" not in data:
        msg = f"{path} is not a PEM key file"
        raise KeyFileError(msg)
    return data


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(data: bytes, private_key: Ed25519PrivateKey) -> dict[str, str]:
    """A detached signature record: {"algorithm", "key_id", "signature" (base64)}."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }


def verify(data: bytes, signature: dict[str, str], trusted_keys: Iterable[Ed25519PublicKey]) -> str:
    """Check a signature record against the trusted keys; return the signing key's id."""
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        msg = f"signature algorithm must be {ALGORITHM!r}, got {signature.get('algorithm') if isinstance(signature, dict) else signature!r}"
        raise SignatureError(msg)
    wanted = signature.get("key_id", "")
    by_id = {key_id(key): key for key in trusted_keys}
    if wanted not in by_id:
        msg = (
            f"bundle is signed by key {wanted!r}, which is not trusted here "
            f"(trusted: {', '.join(sorted(by_id)) or 'none'}); add its public key to the trusted keys"
        )
        raise SignatureError(msg)
    try:
        raw_signature = base64.b64decode(signature.get("signature", ""), validate=True)
        by_id[wanted].verify(raw_signature, data)
    except (InvalidSignature, binascii.Error, ValueError) as error:
        msg = f"signature by key {wanted} does not match the manifest: the bundle was altered after signing"
        raise SignatureError(msg) from error
    return wanted


def load_trusted_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    """Read every trusted public key; a bad file is an error, not a silently smaller trust set."""
    return [load_public_key(path) for path in paths]
