"""A private certificate authority for a fedrec deployment, with ``cryptography`` only.

Three kinds of key material are made here:

* a CA (:func:`create_ca`): ``ca.crt`` is what every device and every ``flwr`` command
  trusts (``--root-certificates``); ``ca.key`` never leaves the server host;
* the SuperLink's TLS certificate (:func:`issue_server_certificate`): ``server.pem`` /
  ``server.key``, signed by the CA, valid for exactly the host names and IP addresses
  devices dial (TLS checks the dialled address against the subjectAltNames);
* a device's SuperNode authentication key (:func:`create_device_auth_key`): an ECDSA
  NIST P-384 key pair in OpenSSH format, the only format Flower 1.42 loads
  (``flower-supernode --auth-supernode-private-key`` uses ``load_ssh_private_key``;
  ``flwr supernode register`` uses ``load_ssh_public_key`` and requires a NIST curve).

Private keys are written with file mode ``0o600`` from the moment they exist (the file
is created with that mode, not chmod-ed afterwards), and unencrypted: the SuperLink and
SuperNode read them without a passphrase.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "certificate_fingerprint",
    "create_ca",
    "create_device_auth_key",
    "issue_server_certificate",
    "parse_host",
]

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.pem"
SERVER_KEY: Final = "server.key"

# Certificates start a little in the past so a device whose clock lags the server's by
# a few minutes does not reject a freshly issued certificate as "not yet valid".
_CLOCK_SKEW: Final = timedelta(minutes=5)
# RFC 1035 / 1123 label: letters, digits, hyphens; not starting or ending with a hyphen.
_LABEL: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# ---------------------------------------------------------------------------- helpers


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only.

    The file is opened with mode 0o600 so the key is never world-readable, not even
    briefly; ``fchmod`` also tightens a pre-existing file that is being replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fd = -1  # owned by fh now
            fh.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_host(host: str) -> x509.IPAddress | x509.DNSName:
    """Return the subjectAltName entry for ``host``, validating it.

    IP addresses (v4 or v6) become ``IPAddress`` entries, host names ``DNSName``
    entries (lower-cased; DNS is case-insensitive).

    Raises
    ------
    ValueError
        If ``host`` is neither an IP address nor a well-formed DNS name, or is a
        wildcard bind address (``0.0.0.0``, ``::``), which no client can dial.
    """
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    if host != host.strip():
        raise ValueError(f"host {host!r} has leading or trailing whitespace")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        if ip.is_unspecified:
            raise ValueError(
                f"host {host!r} is a bind-all address, not one a device can dial; give the server's "
                "real IP address or DNS name (and 127.0.0.1 for the SuperLink's own processes)"
            )
        return x509.IPAddress(ip)
    if not host.isascii():
        raise ValueError(f"host {host!r} is not ASCII; give an internationalised name in its punycode (xn--) form")
    name = host[:-1] if host.endswith(".") else host  # a fully qualified trailing dot
    if len(name) > 253:
        raise ValueError(f"host name {host!r} is longer than 253 characters")
    labels = name.split(".")
    bad = [label for label in labels if not _LABEL.match(label)]
    if bad:
        raise ValueError(
            f"host {host!r} is not a valid IP address or DNS name: label {bad[0]!r} must be 1-63 letters, "
            "digits or hyphens, not starting or ending with a hyphen"
        )
    if labels[-1].isdigit():
        # "10.0.0" or "300.1.1.1": meant as an IP address, but not a valid one.
        raise ValueError(f"host {host!r} is neither a valid IP address nor a DNS name (numeric top-level label)")
    return x509.DNSName(name.lower())


def certificate_fingerprint(cert_path: Path) -> str:
    """Return the SHA-256 fingerprint of a PEM certificate as colon-separated hex.

    Devices can compare it, out of band, with ``openssl x509 -noout -fingerprint
    -sha256 -in ca.crt`` before trusting a copied ``ca.crt``.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# ------------------------------------------------------------------------------- CA


def create_ca(
    out_dir: Path, common_name: str = "fedrec CA", days: int = 3650, *, force: bool = False
) -> tuple[Path, Path]:
    """Create a self-signed certificate authority in ``out_dir``.

    Parameters
    ----------
    out_dir
        Directory for ``ca.crt`` (PEM certificate) and ``ca.key`` (PEM PKCS#8 private
        key, mode 0o600); created if missing.
    common_name
        The CA's subject common name.
    days
        Validity in days from now.
    force
        Replace an existing CA. Every certificate issued by the old CA, and every
        device's copy of the old ``ca.crt``, stops working.

    Returns
    -------
    tuple[Path, Path]
        ``(ca.crt, ca.key)``.

    Raises
    ------
    FileExistsError
        If ``ca.crt`` or ``ca.key`` already exists and ``force`` is False.
    ValueError
        If ``days`` is not positive or ``common_name`` is empty or over 64 characters.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    if not common_name or len(common_name) > 64:
        raise ValueError(f"common_name must be 1-64 characters, got {common_name!r}")
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"a CA already exists ({', '.join(map(str, existing))}); replacing it invalidates every certificate "
            "it issued and every device's ca.crt, so pass force=True (--force) if that is intended"
        )

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    # Key first: a crash in between leaves no certificate without its key.
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    missing = [str(p) for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no CA in {ca_dir}: missing {', '.join(missing)} (create one with create_ca)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    cert_key = cert.public_key()
    if (
        not isinstance(cert_key, ec.EllipticCurvePublicKey)
        or key.public_key().public_numbers() != cert_key.public_numbers()
    ):
        raise ValueError(f"{key_path} does not belong to {cert_path}")
    return cert, key


# --------------------------------------------------------------------------- server


def issue_server_certificate(ca_dir: Path, out_dir: Path, hosts: Sequence[str], days: int = 825) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate, signed by the CA in ``ca_dir``.

    Re-issuing (for instance to add a host) replaces ``server.pem`` / ``server.key``;
    devices keep working because they trust the CA, not the server certificate.

    Parameters
    ----------
    ca_dir
        Directory holding ``ca.crt`` and ``ca.key`` (see :func:`create_ca`).
    out_dir
        Directory for ``server.pem`` (PEM certificate) and ``server.key`` (PEM PKCS#8,
        mode 0o600).
    hosts
        Every address clients dial: IP addresses become IPAddress SANs, names DNSName
        SANs. Duplicates are dropped. Include ``127.0.0.1`` when the SuperLink binds
        ``0.0.0.0``: its own ``flower-superexec`` dials that address over TLS.
    days
        Validity in days (825 is the longest that Apple platforms accept); capped at
        the CA's own expiry.

    Returns
    -------
    tuple[Path, Path]
        ``(server.pem, server.key)``.

    Raises
    ------
    ValueError
        If ``hosts`` is empty or a host is malformed (see :func:`parse_host`), or
        ``days`` is not positive.
    FileNotFoundError
        If ``ca_dir`` holds no CA.
    """
    if isinstance(hosts, str):
        raise ValueError(f"hosts must be a sequence of host names, not the single string {hosts!r}")
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        san = parse_host(host)
        if san not in sans:
            sans.append(san)
    if not sans:
        raise ValueError("hosts is empty: give at least one IP address or DNS name clients dial")
    ca_cert, ca_key = _load_ca(ca_dir)

    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"the CA in {ca_dir} has expired ({ca_cert.not_valid_after_utc:%Y-%m-%d}); create a new one")
    first = sans[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first)[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# --------------------------------------------------------------------------- device


def create_device_auth_key(out_prefix: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Create a device's SuperNode authentication key pair (ECDSA NIST P-384, OpenSSH format).

    The same format ``ssh-keygen -t ecdsa -b 384 -N ""`` produces: the private key
    goes to the device (``flower-supernode --auth-supernode-private-key``), the public
    key to the server (``fedrec server register-device --auth-key``).

    Parameters
    ----------
    out_prefix
        ``<out_prefix>`` gets the private key (mode 0o600), ``<out_prefix>.pub`` the
        public key.
    force
        Replace an existing key pair (the old public key must then be unregistered).

    Returns
    -------
    tuple[Path, Path]
        ``(private key, public key)``.

    Raises
    ------
    FileExistsError
        If either file exists and ``force`` is False.
    """
    private_path = Path(out_prefix)
    public_path = private_path.with_name(private_path.name + ".pub")
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"key file already exists: {', '.join(map(str, existing))} (pass force=True to replace)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(private_path, private)
    _write_public(public_path, public + f" fedrec-{private_path.name}\n".encode())
    return private_path, public_path
