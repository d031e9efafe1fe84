"""A device's Ed25519 signing identity, for a privacy ledger nobody else can write.

A device signs every entry of its privacy ledger with a private key that never leaves
it; the server keeps only the public key. Anyone who alters a stored entry afterwards
(the server's operator included) cannot produce a valid signature for the altered
entry, so the alteration is detectable.

Encodings
---------
Keys and signatures travel as text so they fit in Flower's ``ConfigRecord`` and in
SQL ``VARCHAR`` columns: the raw 32-byte public key and the raw 64-byte signature, each
as URL-safe base64 with padding (44 and 88 characters).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["KEY_BYTES", "SIGNATURE_BYTES", "DeviceIdentity", "decode_public_key", "fingerprint", "verify_signature"]

KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode(text: str, size: int, what: str) -> bytes:
    """Strictly decode URL-safe base64 of exactly ``size`` bytes, or raise ValueError.

    ``urlsafe_b64decode`` silently drops characters outside the alphabet, so two
    different strings could decode to the same key; ``validate=True`` refuses them.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be base64 text, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not valid URL-safe base64: {exc}") from exc
    if len(raw) != size:
        raise ValueError(f"{what} must encode {size} bytes, got {len(raw)}")
    return raw


def decode_public_key(public_key: str) -> Ed25519PublicKey:
    """Parse a public key as produced by :attr:`DeviceIdentity.public_key`.

    Raises
    ------
    ValueError
        If ``public_key`` is not URL-safe base64 of a 32-byte Ed25519 key.
    """
    return Ed25519PublicKey.from_public_bytes(_decode(public_key, KEY_BYTES, "public key"))


class DeviceIdentity:
    """An Ed25519 key pair that signs one device's ledger entries.

    Create one with :meth:`generate` (fresh randomness from the OS) or restore it with
    :meth:`from_private_bytes`; persisting :meth:`private_bytes` is the caller's job
    (see ``shared.privacy.ledger_store``).
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = _encode(private_key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> Self:
        """Return a new identity with a freshly generated key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Self:
        """Restore an identity from the 32 raw bytes returned by :meth:`private_bytes`.

        Raises
        ------
        ValueError
            If ``raw`` is not 32 bytes.
        """
        if len(raw) != KEY_BYTES:
            raise ValueError(f"an Ed25519 private key is {KEY_BYTES} raw bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """Return the raw 32-byte private key (secret: store it with restricted access)."""
        return self._private_key.private_bytes_raw()

    @property
    def public_key(self) -> str:
        """The raw 32-byte public key as URL-safe base64 text."""
        return self._public_key

    @property
    def fingerprint(self) -> str:
        """Short display form of the public key (see :func:`fingerprint`)."""
        return fingerprint(self._public_key)

    def sign(self, data: bytes) -> str:
        """Sign ``data`` and return the 64-byte signature as URL-safe base64 text."""
        return _encode(self._private_key.sign(data))

    def __repr__(self) -> str:
        # Never show the private key, e.g. in logs or a failing test's output.
        return f"DeviceIdentity(fingerprint={self.fingerprint!r})"


def verify_signature(public_key: str, data: bytes, signature: str) -> bool:
    """Return whether ``signature`` is ``public_key``'s valid signature of ``data``.

    Malformed keys or signatures (wrong type, bad base64, wrong length) yield False
    rather than an exception: to a verifier, a garbled signature is simply not a valid
    one, and ledger verification must report it, not crash.
    """
    try:
        key = decode_public_key(public_key)
        key.verify(_decode(signature, SIGNATURE_BYTES, "signature"), bytes(data))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def fingerprint(public_key: str) -> str:
    """Return the first 16 hex characters of the SHA-256 of the raw public key.

    For display only (logs, reports): 64 bits are too few to rely on for security.

    Raises
    ------
    ValueError
        If ``public_key`` is not URL-safe base64 of 32 bytes.
    """
    return hashlib.sha256(_decode(public_key, KEY_BYTES, "public key")).hexdigest()[:16]
