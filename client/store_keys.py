"""Key material for the device's encrypted store: key files, passphrases and the scrypt derivation.

One job: turning what the device's owner holds (a key file, or a passphrase in an
environment variable) into the 32-byte AES-256 key that :mod:`client.device_store`
encrypts under. Nothing here opens a store.

Key files
---------
A key file (:func:`create_key_file`) holds 32 random bytes, mode 0o600. Reading one
(:func:`key_from_file`) accepts the raw bytes or 64 hex digits, and refuses a file that
group or others can access in any way: a key others can read protects nothing.

Passphrases
-----------
A passphrase is read from an environment variable (:func:`passphrase_from_env`), never
from a command-line argument, which other local users can read in the process list.
The key is derived from it with scrypt (:func:`derive_key`: n=2**15, r=8, p=1) under a
random 16-byte salt (:func:`new_salt`) that the store keeps in the clear
(:func:`client.device_store.key_from_passphrase` reads or creates it).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "KEY_BYTES",
    "KEY_FILE_MODE",
    "SALT_BYTES",
    "KeyFileError",
    "create_key_file",
    "derive_key",
    "key_from_file",
    "new_salt",
    "passphrase_from_env",
]

KEY_BYTES: Final = 32  # AES-256
SALT_BYTES: Final = 16
# scrypt cost: 32 MiB and ~0.1 s per derivation on a phone-class CPU, a wait an owner typing it accepts.
SCRYPT_N: Final = 2**15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
KEY_FILE_MODE: Final = 0o600


class KeyFileError(ValueError):
    """A key file is missing, malformed or readable by others."""


def create_key_file(path: Path | str) -> bytes:
    """Write 32 fresh random bytes to a new key file readable by its owner only (0o600).

    Parameters
    ----------
    path
        The key file to create (parent directories too).

    Returns
    -------
    bytes
        The new key.

    Raises
    ------
    KeyFileError
        If ``path`` already exists (an existing key is never overwritten: the data
        encrypted under it would be lost).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        raise KeyFileError(f"{path}: key file already exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, KEY_FILE_MODE)  # os.open applied the umask
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def key_from_file(path: Path | str) -> bytes:
    """Read a store key from a key file (32 raw bytes, or 64 hex digits).

    Parameters
    ----------
    path
        The key file.

    Returns
    -------
    bytes
        The 32-byte key.

    Raises
    ------
    KeyFileError
        If the file is missing, not a regular file, has any group/other permission
        bits (a key others can read protects nothing), or does not hold a 32-byte key.
    """
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: key file is not a regular file")
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if loose:
        raise KeyFileError(
            f"{path}: key file mode is {stat.S_IMODE(info.st_mode):04o}, which lets group/others access it; "
            f"refusing to use it. Restrict it with `chmod 600 {path}` (and consider the key exposed)"
        )
    raw = path.read_bytes()
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyFileError(
        f"{path}: not a key file (expected {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex digits, found {len(raw)} bytes)"
    )


def passphrase_from_env(var: str, source: str) -> str:
    """The passphrase held by environment variable ``var``.

    Parameters
    ----------
    var
        The environment variable's name.
    source
        Where ``var`` was named (e.g. ``--passphrase-env``), for the error message.

    Returns
    -------
    str
        The passphrase.

    Raises
    ------
    ValueError
        If the variable is unset or empty.
    """
    value = os.environ.get(var, "")
    if not value:
        raise ValueError(f"{source}: environment variable {var!r} is unset or empty")
    return value


def new_salt() -> bytes:
    """A fresh random scrypt salt (16 bytes)."""
    return secrets.token_bytes(SALT_BYTES)


def derive_key(passphrase: str, salt: bytes) -> bytes:
    """The scrypt (n=2**15, r=8, p=1) store key of ``passphrase`` under ``salt``.

    Parameters
    ----------
    passphrase
        The owner's passphrase (UTF-8 encoded before derivation).
    salt
        The store's salt (:func:`new_salt`).

    Returns
    -------
    bytes
        The 32-byte key.
    """
    kdf = Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(passphrase.encode("utf-8"))
