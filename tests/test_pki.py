"""server.pki: the CA, the SuperLink certificate and device auth keys, down to a real TLS handshake."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from server import pki

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ca")
    pki.create_ca(out)
    pki.issue_server_certificate(out, out, ["127.0.0.1", "fl.example.org", "::1"])
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(ca_dir: Path, server_dir: Path, name: x509.GeneralName) -> None:
    store = Store([_cert(ca_dir / pki.CA_CERT)])
    builder = PolicyBuilder().store(store)
    if isinstance(name, x509.IPAddress):
        subject: x509.verification.Subject = x509.IPAddress(name.value)
    else:
        subject = x509.DNSName(name.value)
    builder.build_server_verifier(subject).verify(_cert(server_dir / pki.SERVER_CERT), [])


def test_server_certificate_verifies_against_ca(ca: Path) -> None:
    for name in (
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("fl.example.org"),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        _verify(ca, ca, name)
    with pytest.raises(VerificationError):
        _verify(ca, ca, x509.DNSName("other.example.org"))


def test_server_certificate_rejected_by_another_ca(ca: Path, tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    with pytest.raises(VerificationError):
        _verify(tmp_path, ca, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def test_sans_are_exactly_the_hosts_and_eku_is_server_auth(ca: Path) -> None:
    cert = _cert(ca / pki.SERVER_CERT)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert len(list(sans)) == 3
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca_cert = _cert(ca / pki.CA_CERT)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.issuer == ca_cert.subject


def test_duplicate_hosts_are_dropped_and_names_lowercased(ca: Path, tmp_path: Path) -> None:
    pki.issue_server_certificate(ca, tmp_path, ["FL.Example.org", "fl.example.org", "10.0.0.1", "10.0.0.1"])
    sans = _cert(tmp_path / pki.SERVER_CERT).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v.value) for v in sans] == ["fl.example.org", "10.0.0.1"]


def test_private_keys_are_owner_only(ca: Path, tmp_path: Path) -> None:
    assert (ca / pki.CA_KEY).stat().st_mode & 0o777 == 0o600
    assert (ca / pki.SERVER_KEY).stat().st_mode & 0o777 == 0o600
    private, public = pki.create_device_auth_key(tmp_path / "keys" / "device0")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public == tmp_path / "keys" / "device0.pub"


def test_device_auth_key_is_openssh_p384(tmp_path: Path) -> None:
    private, public = pki.create_device_auth_key(tmp_path / "dev")
    # The loaders flower-supernode and `flwr supernode register` use.
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert isinstance(pub.curve, ec.SECP384R1)  # a NIST curve, as `flwr supernode register` requires
    with pytest.raises(FileExistsError):
        pki.create_device_auth_key(tmp_path / "dev")
    pki.create_device_auth_key(tmp_path / "dev", force=True)
    assert serialization.load_ssh_private_key(private.read_bytes(), None).public_key() != key.public_key()


def test_overwriting_ca_is_refused(tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    before = (tmp_path / pki.CA_CERT).read_bytes()
    with pytest.raises(FileExistsError, match="force=True"):
        pki.create_ca(tmp_path)
    assert (tmp_path / pki.CA_CERT).read_bytes() == before
    pki.create_ca(tmp_path, force=True)
    assert (tmp_path / pki.CA_CERT).read_bytes() != before


@pytest.mark.parametrize(
    "host",
    [
        "",
        " fl.example.org",
        "bad_host.example",
        "-lead.example.org",
        "a..b",
        "300.1.1.1",
        "10.0.0",
        "0.0.0.0",
        "::",
        "x" * 64 + ".org",
        "bücher.example",
        "host name",
    ],
)
def test_bad_host_rejected(ca: Path, tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        pki.issue_server_certificate(ca, tmp_path, [host])
    assert not (tmp_path / pki.SERVER_CERT).exists()


def test_bad_arguments(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        pki.issue_server_certificate(ca, tmp_path, [])
    with pytest.raises(ValueError, match="single string"):
        pki.issue_server_certificate(ca, tmp_path, "127.0.0.1")
    with pytest.raises(ValueError, match="days"):
        pki.create_ca(tmp_path / "x", days=0)
    with pytest.raises(FileNotFoundError, match="no CA"):
        pki.issue_server_certificate(tmp_path / "none", tmp_path, ["127.0.0.1"])


def test_fingerprint_format(ca: Path) -> None:
    fp = pki.certificate_fingerprint(ca / pki.CA_CERT)
    assert len(fp.split(":")) == 32 and fp == fp.upper()


# ------------------------------------------------------------------ real SuperLink


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def superlink(ca: Path, tmp_path: Path) -> Iterator[int]:
    """A real flower-superlink serving the issued certificate on a free loopback port."""
    port = _free_port()
    argv = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(ca / pki.CA_CERT),
        "--ssl-certfile", str(ca / pki.SERVER_CERT),
        "--ssl-keyfile", str(ca / pki.SERVER_KEY),
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(tmp_path / "state.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    # flower-superlink spawns flower-superexec by bare name.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip
    log = (tmp_path / "superlink.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 40
        while True:
            assert proc.poll() is None, (tmp_path / "superlink.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "SuperLink did not listen in time"
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _handshake(port: int, cafile: Path) -> str:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


def test_real_superlink_accepts_tls_with_our_ca_only(ca: Path, superlink: int, tmp_path: Path) -> None:
    assert _handshake(superlink, ca / pki.CA_CERT).startswith("TLS")
    other = tmp_path / "other-ca"
    pki.create_ca(other)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(superlink, other / pki.CA_CERT)
