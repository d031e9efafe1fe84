"""The secure sum's cryptography, each piece from a reviewed library.

* Key agreement: X25519 (``cryptography``); keys derived with HKDF-SHA256, salted with the
  session digest and bound to the pair of devices and the key's purpose.
* Mask generator: the ChaCha20 keystream under a 256-bit key (``cryptography``), read as
  little-endian words reduced to ``bits`` bits. :data:`MASK_KEY_BYTES` is checked on every
  call: no mask derives from fewer than 256 secret bits.
* Share encryption: ChaCha20-Poly1305 (``cryptography``), a fresh random nonce per message
  and the session digest, sender and recipient as associated data, so a share cannot be
  replayed into another session or redirected to another device.
* Secret sharing: Shamir over GF(2^128) from pycryptodome (``Crypto.Protocol.SecretSharing``).
  Each shared secret is a 16-byte (128-bit) seed, so one recovery is one interpolation; the
  32-byte keys are derived from it with HKDF (the self-mask key, and the X25519 mask key,
  whose own security level is 128 bits).

Every secret comes from the OS CSPRNG (``os.urandom`` through ``cryptography``'s key
generation and :func:`secrets.token_bytes`).
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

MASK_KEY_BYTES = 32
SEED_BYTES = 16
X25519_BYTES = 32
AEAD_NONCE_BYTES = 12
# A Shamir share of a 16-byte seed: a 1-byte index then 16 bytes.
SHARE_BYTES = 1 + SEED_BYTES
MAX_SHARES = 255
_DOMAIN = b"fedrec/secure-sum/v1/"
# The purposes of the two pair keys (`agree`): the device and the server must derive the same.
SHARE_KEY_PURPOSE = b"share-encryption"
PAIR_MASK_PURPOSE = b"pair-mask"
# The keystream starts at block 0 under a key used for one vector only, so a fixed nonce is safe.
_CHACHA_NONCE = bytes(16)

UIntArray = NDArray[np.uint64]


class SecureSumCryptoError(ValueError):
    """A key, share or ciphertext is malformed or fails authentication."""


def random_seed() -> bytes:
    """Return 16 fresh bytes from the OS CSPRNG (a seed that is Shamir-shared)."""
    return secrets.token_bytes(SEED_BYTES)


def new_x25519() -> X25519PrivateKey:
    """Return a fresh X25519 key (OpenSSL draws it from the OS CSPRNG)."""
    return X25519PrivateKey.generate()


def _check_seed(seed: bytes) -> None:
    if len(seed) != SEED_BYTES:
        raise SecureSumCryptoError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")


def mask_agreement_key(seed: bytes, session_digest: bytes) -> X25519PrivateKey:
    """Derive a device's X25519 mask-agreement key from its 16-byte seed.

    Sharing the seed rather than the 32-byte key halves the server's recovery work for a
    device that drops out; the derived key keeps X25519's 128-bit security level.
    """
    _check_seed(seed)
    raw = HKDF(
        algorithm=hashes.SHA256(), length=X25519_BYTES, salt=session_digest, info=_DOMAIN + b"mask-agreement-key"
    ).derive(seed)
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    """Return the 32 raw bytes of ``key``'s public half."""
    return key.public_key().public_bytes_raw()


def _public(raw: bytes) -> X25519PublicKey:
    if len(raw) != X25519_BYTES:
        raise SecureSumCryptoError(f"an X25519 public key is {X25519_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(bytes(raw))


def _pair_info(purpose: bytes, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    return _DOMAIN + purpose + b"/" + low.to_bytes(8, "big") + high.to_bytes(8, "big")


def agree(own: X25519PrivateKey, peer_public: bytes, purpose: bytes, session_digest: bytes, a: int, b: int) -> bytes:
    """Derive a 32-byte key shared by devices ``a`` and ``b`` for one purpose in one session.

    HKDF-SHA256 over the X25519 shared secret, salted with the session digest and bound to
    the purpose and the unordered pair of device ids, so that the same key pair never yields
    the same key twice across purposes, pairs or sessions.

    Raises
    ------
    SecureSumCryptoError
        If ``peer_public`` is not a 32-byte key, or the exchange yields the all-zero secret
        (a low-order point: a peer trying to force a known key).
    """
    try:
        shared = own.exchange(_public(peer_public))
    except ValueError as error:  # OpenSSL refuses low-order points
        raise SecureSumCryptoError(f"key agreement failed: {error}") from error
    if shared == bytes(X25519_BYTES):
        raise SecureSumCryptoError("key agreement produced the all-zero secret")
    return HKDF(
        algorithm=hashes.SHA256(), length=MASK_KEY_BYTES, salt=session_digest, info=_pair_info(purpose, a, b)
    ).derive(shared)


def self_mask_key(seed: bytes, session_digest: bytes) -> bytes:
    """Derive the 32-byte key of a device's self mask from its 16-byte seed."""
    _check_seed(seed)
    return HKDF(
        algorithm=hashes.SHA256(), length=MASK_KEY_BYTES, salt=session_digest, info=_DOMAIN + b"self-mask"
    ).derive(seed)


def commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed: lets the server check a reconstructed seed."""
    return hashlib.sha256(_DOMAIN + b"seed-commitment" + seed).digest()


def mask_vector(key: bytes, length: int, bits: int) -> UIntArray:
    """Expand a 32-byte key into ``length`` uniform words modulo ``2**bits`` (ChaCha20 keystream).

    Raises
    ------
    SecureSumCryptoError
        If ``key`` is not exactly :data:`MASK_KEY_BYTES` bytes.
    """
    if len(key) != MASK_KEY_BYTES:
        raise SecureSumCryptoError(f"a mask key is {MASK_KEY_BYTES} bytes, got {len(key)}")
    if not 1 <= bits <= 64:
        raise SecureSumCryptoError(f"bits must be in 1..64, got {bits}")
    word = 4 if bits <= 32 else 8
    encryptor = Cipher(algorithms.ChaCha20(bytes(key), _CHACHA_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(word * length))
    words = np.frombuffer(stream, dtype="<u4" if word == 4 else "<u8").astype(np.uint64)
    if bits < 64:
        # 2**bits divides 2**32 (or 2**64), so the low bits of a uniform word are uniform.
        words &= np.uint64((1 << bits) - 1)
    return words


def encrypt_share(key: bytes, plaintext: bytes, associated: bytes) -> tuple[bytes, bytes]:
    """Encrypt a share with ChaCha20-Poly1305 under a fresh random nonce; return (nonce, ciphertext)."""
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce, ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt_share(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Decrypt and authenticate a share.

    Raises
    ------
    SecureSumCryptoError
        If the nonce is malformed or authentication fails (tampered, replayed from another
        session, or addressed to another device).
    """
    if len(nonce) != AEAD_NONCE_BYTES:
        raise SecureSumCryptoError(f"a share nonce is {AEAD_NONCE_BYTES} bytes, got {len(nonce)}")
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(nonce), bytes(ciphertext), associated)
    except InvalidTag as error:
        raise SecureSumCryptoError("a share failed authentication (tampered, replayed or misaddressed)") from error


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir-share a 16-byte seed into ``count`` shares, any ``threshold`` of which recover it.

    Share ``i`` (0-based) carries the Shamir index ``i + 1``. Pycryptodome draws the
    polynomial coefficients from its OS-backed ``get_random_bytes``.
    """
    _check_seed(secret)
    # A threshold of one would hand the whole secret to every holder.
    if not 2 <= threshold <= count <= MAX_SHARES:
        raise SecureSumCryptoError(f"need 2 <= threshold <= count <= {MAX_SHARES}, got {threshold} of {count}")
    return [bytes([index]) + share for index, share in Shamir.split(threshold, count, secret, ssss=False)]


def share_index(share: bytes) -> int:
    """The Shamir index (1..255) a share carries."""
    if len(share) != SHARE_BYTES or share[0] == 0:
        raise SecureSumCryptoError(f"a share is {SHARE_BYTES} bytes with a non-zero index")
    return share[0]


def combine_shares(shares: list[bytes], threshold: int) -> bytes:
    """Recover a 16-byte seed from at least ``threshold`` shares with distinct indices.

    Raises
    ------
    SecureSumCryptoError
        If there are fewer than ``threshold`` distinct shares or one is malformed.
    """
    distinct: dict[int, bytes] = {}
    for share in shares:
        distinct.setdefault(share_index(share), share)
    if len(distinct) < threshold:
        raise SecureSumCryptoError(f"{len(distinct)} distinct shares, {threshold} needed")
    if threshold < 2:
        raise SecureSumCryptoError(f"a threshold is at least 2, got {threshold}")
    chosen = [distinct[i] for i in sorted(distinct)[:threshold]]
    return bytes(Shamir.combine([(s[0], s[1:]) for s in chosen], ssss=False))
