"""`fedrec server` and the modules behind it: a real SuperLink on loopback (TLS, SuperNode auth, database)."""

from __future__ import annotations

import argparse
import json
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import cli_deploy, device_registry, flwr_cli, pki, superlink
from server.privacy_store import PrivacyStore
from shared.privacy.identity import DeviceIdentity

CONNECTION = "fedrec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec")
    cli_deploy.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run_cli(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return int(args.func(args))


@dataclass(frozen=True)
class Server:
    paths: superlink.DeployPaths
    port: int
    flwr_home: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``fedrec server init`` for real, then a real SuperLink; always stopped afterwards."""
    root = tmp_path_factory.mktemp("server")
    home = tmp_path_factory.mktemp("flwr-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", str(home))  # never the user's ~/.flwr
        assert _run_cli("server", "init", "--dir", str(root), "--host", "localhost") == 0
        paths = superlink.DeployPaths(root)
        port = _free_port()
        flwr_cli.write_connection_config(CONNECTION, f"127.0.0.1:{port}", paths.ca_cert, flwr_home=home)
        proc = superlink.start_superlink(paths, "127.0.0.1", port, timeout=45)
        try:
            yield Server(paths, port, home)
        finally:
            superlink.stop_superlink(proc)


@pytest.fixture(scope="module")
def auth_keys(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("keys")
    return [pki.create_device_auth_key(out / f"device{i}")[1] for i in range(2)]


# ---------------------------------------------------------------- real SuperLink


def test_register_list_revoke(server: Server, auth_keys: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    ledger_key = DeviceIdentity.generate().public_key
    node_id = device_registry.register_device(
        server.paths, CONNECTION, 3, auth_keys[0], ledger_key, flwr_home=server.flwr_home
    )
    assert node_id.isdigit()
    with PrivacyStore(server.paths.fedrec_db_url) as store:
        assert store.keys() == {3: ledger_key}

    [record] = device_registry.list_devices(server.paths, CONNECTION, flwr_home=server.flwr_home)
    assert record == device_registry.DeviceRecord(3, node_id, "registered", ledger_key, True)

    # Already registered: refused before Flower is asked.
    with pytest.raises(ValueError, match="already registered"):
        device_registry.register_device(
            server.paths, CONNECTION, 3, auth_keys[1], ledger_key, flwr_home=server.flwr_home
        )

    # The same SuperNode key for another device: Flower refuses, fedrec stores nothing.
    other = DeviceIdentity.generate().public_key
    with pytest.raises(flwr_cli.FlowerCommandError, match="already in use"):
        device_registry.register_device(server.paths, CONNECTION, 4, auth_keys[0], other, flwr_home=server.flwr_home)
    with PrivacyStore(server.paths.fedrec_db_url) as store:
        assert store.public_key(4) is None

    # The CLI sees the same (FLWR_HOME from the environment).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", str(server.flwr_home))
        assert _run_cli("server", "list-devices", "--dir", str(server.paths.root), "--federation", CONNECTION,
                        "--json") == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)[0]["node_id"] == node_id

    device_registry.revoke_device(server.paths, CONNECTION, 3, flwr_home=server.flwr_home)
    [record] = device_registry.list_devices(server.paths, CONNECTION, flwr_home=server.flwr_home)
    assert (record.device_id, record.node_id, record.status) == (3, node_id, "unregistered")
    assert not record.ledger_key_active
    with PrivacyStore(server.paths.fedrec_db_url) as store:
        assert store.keys() == {}
    with pytest.raises(KeyError, match="device 3"):
        device_registry.revoke_device(server.paths, CONNECTION, 3, flwr_home=server.flwr_home)


def test_auth_key_rotation_keeps_the_ledger_key(server: Server, tmp_path: Path) -> None:
    """docs/deploy.md's auth-key rotation: revoke --auth-only, a new auth key, the same ledger key."""
    old_auth = pki.create_device_auth_key(tmp_path / "old")[1]
    new_auth = pki.create_device_auth_key(tmp_path / "new")[1]
    ledger_key = DeviceIdentity.generate().public_key
    first = device_registry.register_device(
        server.paths, CONNECTION, 5, old_auth, ledger_key, flwr_home=server.flwr_home
    )
    device_registry.revoke_device(server.paths, CONNECTION, 5, auth_only=True, flwr_home=server.flwr_home)
    with PrivacyStore(server.paths.fedrec_db_url) as store:
        assert store.public_key(5) == ledger_key  # still trusted
    second = device_registry.register_device(
        server.paths, CONNECTION, 5, new_auth, ledger_key, flwr_home=server.flwr_home
    )
    assert second != first
    status = {
        r.node_id: r.status for r in device_registry.list_devices(server.paths, CONNECTION, flwr_home=server.flwr_home)
    }
    assert status[first] == "unregistered" and status[second] == "registered"
    with pytest.raises(KeyError, match="no registered SuperNode"):
        device_registry.revoke_device(server.paths, CONNECTION, 6, auth_only=True, flwr_home=server.flwr_home)
    device_registry.revoke_device(server.paths, CONNECTION, 5, flwr_home=server.flwr_home)


def test_revoking_a_device_whose_node_flower_no_longer_knows(server: Server, tmp_path: Path) -> None:
    """A node unregistered behind fedrec's back: revocation still completes, ledger key first."""
    auth = pki.create_device_auth_key(tmp_path / "gone")[1]
    ledger_key = DeviceIdentity.generate().public_key
    node = device_registry.register_device(server.paths, CONNECTION, 8, auth, ledger_key, flwr_home=server.flwr_home)
    flwr_cli.run_flwr(["supernode", "unregister", node, CONNECTION], flwr_home=server.flwr_home, cwd=server.paths.root)
    with pytest.warns(UserWarning, match="already unknown"):
        device_registry.revoke_device(server.paths, CONNECTION, 8, flwr_home=server.flwr_home)
    with PrivacyStore(server.paths.fedrec_db_url) as store:
        assert store.public_key(8) is None
    # The device id can be admitted again with a new identity.
    fresh = pki.create_device_auth_key(tmp_path / "fresh")[1]
    new_ledger = DeviceIdentity.generate().public_key
    device_registry.register_device(
        server.paths, CONNECTION, 8, fresh, new_ledger, replace_ledger_key=True, flwr_home=server.flwr_home
    )
    device_registry.revoke_device(server.paths, CONNECTION, 8, flwr_home=server.flwr_home)


def test_only_a_loopback_bind_is_private() -> None:
    assert superlink.is_loopback("127.0.0.1") and superlink.is_loopback("::1") and superlink.is_loopback("localhost")
    assert not superlink.is_loopback("0.0.0.0") and not superlink.is_loopback("fl.example.org")
    assert not superlink.is_loopback("192.168.1.5") and superlink.is_loopback("[::1]")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.2"])
def test_start_refuses_a_public_bind_unless_told(tmp_path: Path, host: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before anything is read or started: not even a server directory is needed.
    assert _run_cli("server", "start", "--dir", str(tmp_path / "none"), "--host", host) == 1
    err = capsys.readouterr().err
    assert "unauthenticated Control" in err and "--expose-control-api" in err
    assert not (tmp_path / "none").exists()
    # Told explicitly, it goes on (and here stops at the missing TLS files, naming them).
    with pytest.raises(FileNotFoundError, match="server init"):
        _run_cli("server", "start", "--dir", str(tmp_path / "none"), "--host", host, "--expose-control-api")


def test_start_refuses_a_port_in_use(server: Server) -> None:
    with pytest.raises(RuntimeError, match="already in use"):
        superlink.start_superlink(server.paths, "127.0.0.1", server.port)


def test_unreachable_superlink_is_a_clear_error(server: Server, auth_keys: list[Path], tmp_path: Path) -> None:
    flwr_cli.write_connection_config("nowhere", f"127.0.0.1:{_free_port()}", server.paths.ca_cert, flwr_home=tmp_path)
    with pytest.raises(flwr_cli.FlowerCommandError, match="unavailable"):
        device_registry.list_devices(server.paths, "nowhere", flwr_home=tmp_path)


def test_start_reports_early_exit_with_log_tail(tmp_path: Path) -> None:
    paths = superlink.DeployPaths(tmp_path)
    pki.create_ca(paths.pki_dir)
    pki.issue_server_certificate(paths.pki_dir, paths.pki_dir, ["127.0.0.1"])
    paths.server_key.write_text("not a key")  # the SuperLink cannot start its TLS listener
    with pytest.raises(RuntimeError, match="exited with code") as info:
        superlink.start_superlink(paths, "127.0.0.1", _free_port(), timeout=45)
    assert "last lines of" in str(info.value)
    assert paths.log_file.exists()


# ------------------------------------------------------------- no SuperLink needed


def test_superlink_command_argv(tmp_path: Path) -> None:
    paths = superlink.DeployPaths(tmp_path)
    argv = superlink.superlink_command(paths, "0.0.0.0", 9093)
    assert Path(argv[0]).name == "flower-superlink"
    assert argv[1:] == [
        "--ssl-ca-certfile", str(tmp_path.resolve() / "pki" / "ca.crt"),
        "--ssl-certfile", str(tmp_path.resolve() / "pki" / "server.pem"),
        "--ssl-keyfile", str(tmp_path.resolve() / "pki" / "server.key"),
        "--enable-supernode-auth",
        "--database", str(tmp_path.resolve() / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", "0.0.0.0",
        "--port", "9093",
    ]  # fmt: skip
    assert paths.fedrec_db == tmp_path.resolve() / "fedrec.db"
    assert paths.log_file == tmp_path.resolve() / "superlink.log"


@pytest.mark.parametrize(("host", "port"), [("0.0.0.0", 0), ("0.0.0.0", 70000), ("", 9093), ("a b", 9093)])
def test_superlink_command_rejects_bad_address(tmp_path: Path, host: str, port: int) -> None:
    with pytest.raises(ValueError, match="host|port"):
        superlink.superlink_command(superlink.DeployPaths(tmp_path), host, port)


def test_start_without_init_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedrec server init"):
        superlink.start_superlink(superlink.DeployPaths(tmp_path), "127.0.0.1", _free_port())


def test_register_rejects_bad_keys_before_asking_flower(tmp_path: Path) -> None:
    paths = superlink.DeployPaths(tmp_path)
    private, public = pki.create_device_auth_key(tmp_path / "dev")
    ledger = DeviceIdentity.generate().public_key
    with pytest.raises(ValueError, match="OpenSSH public key"):
        device_registry.register_device(paths, CONNECTION, 0, private, ledger, flwr_home=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        device_registry.register_device(paths, CONNECTION, 0, tmp_path / "missing.pub", ledger, flwr_home=tmp_path)
    ed = tmp_path / "ed.pub"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ed.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="NIST curve"):
        device_registry.register_device(paths, CONNECTION, 0, ed, ledger, flwr_home=tmp_path)
    with pytest.raises(ValueError, match="public key"):
        device_registry.register_device(paths, CONNECTION, 0, public, "not-a-key", flwr_home=tmp_path)
    with pytest.raises(ValueError, match="device_id"):
        device_registry.register_device(paths, CONNECTION, -1, public, ledger, flwr_home=tmp_path)
    with pytest.raises(ValueError, match="connection name"):
        device_registry.register_device(paths, "../x", 0, public, ledger, flwr_home=tmp_path)


def test_connection_config_keeps_unrelated_content(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    # A missing file starts from Flower's defaults.
    path = flwr_cli.write_connection_config("prod", "fl.example.org:9093", ca, flwr_home=tmp_path / "fresh")
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["prod"] == {"address": "fl.example.org:9093", "root-certificates": str(ca.resolve())}

    existing = tmp_path / "config.toml"
    existing.write_text(
        '# mine\n[superlink]\ndefault = "other"\n\n[superlink.other]\naddress = "h:1"\ninsecure = true\n'
    )
    flwr_cli.write_connection_config("prod", "127.0.0.1:9093", ca, flwr_home=tmp_path)
    text = existing.read_text()
    assert text.startswith("# mine\n")  # appended, not rewritten
    config = tomllib.loads(text)
    assert config["superlink"]["other"] == {"address": "h:1", "insecure": True}
    assert config["superlink"]["default"] == "other"
    assert config["superlink"]["prod"]["address"] == "127.0.0.1:9093"

    flwr_cli.write_connection_config("prod", "127.0.0.1:9193", ca, flwr_home=tmp_path)
    config = tomllib.loads(existing.read_text())
    assert config["superlink"]["prod"]["address"] == "127.0.0.1:9193"
    assert config["superlink"]["other"] == {"address": "h:1", "insecure": True}


@pytest.mark.parametrize(
    ("name", "address", "match"),
    [("default", "h:1", "connection name"), ("a.b", "h:1", "connection name"), ("ok", "h", "host:port"),
     ("ok", "h:0", "port"), ("ok", ":9093", "host:port")],
)  # fmt: skip
def test_connection_config_rejects_bad_input(tmp_path: Path, name: str, address: str, match: str) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(ValueError, match=match):
        flwr_cli.write_connection_config(name, address, ca, flwr_home=tmp_path)
    with pytest.raises(FileNotFoundError):
        flwr_cli.write_connection_config("ok", "h:1", tmp_path / "none.crt", flwr_home=tmp_path)


# ---------------------------------------------------------------------------- CLI


def test_cli_parses_every_command(tmp_path: Path) -> None:
    parser = _parser()
    d = str(tmp_path)
    args = parser.parse_args(["server", "init", "--dir", d, "--host", "fl.example.org", "--host", "10.0.0.2"])
    assert (args.host, args.days, args.force, args.reissue) == (["fl.example.org", "10.0.0.2"], 825, False, False)
    args = parser.parse_args(["server", "start", "--dir", d])
    assert (args.host, args.port, args.federation, args.expose_control_api) == ("127.0.0.1", 9093, "fedrec", False)
    args = parser.parse_args(["server", "start", "--dir", d, "--host", "10.0.0.2", "--port", "9200"])
    assert (args.host, args.port) == ("10.0.0.2", 9200)
    args = parser.parse_args(
        ["server", "register-device", "--dir", d, "--device-id", "7", "--auth-key", "k.pub", "--ledger-key", "K",
         "--federation", "prod"]
    )  # fmt: skip
    assert (args.device_id, args.auth_key, args.ledger_key, args.federation) == (7, Path("k.pub"), "K", "prod")
    args = parser.parse_args(["server", "list-devices", "--dir", d])
    assert args.federation == "fedrec" and not args.json
    args = parser.parse_args(["server", "revoke-device", "--dir", d, "--device-id", "7"])
    assert args.device_id == 7
    for argv in (["server"], ["server", "init", "--dir", d], ["server", "revoke-device", "--dir", d]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert all(callable(parser.parse_args(argv).func) for argv in (
        ["server", "init", "--dir", d, "--host", "h"],
        ["server", "start", "--dir", d],
        ["server", "list-devices", "--dir", d],
    ))  # fmt: skip


def test_cli_init_for_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509

    d = str(tmp_path / "srv")
    assert _run_cli("server", "init", "--dir", d, "--host", "fl.example.org") == 0
    out = capsys.readouterr().out
    paths = superlink.DeployPaths(Path(d))
    assert pki.certificate_fingerprint(paths.ca_cert) in out
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v.value) for v in sans] == ["fl.example.org", "127.0.0.1"]
    assert paths.ca_key.stat().st_mode & 0o777 == 0o600

    ca_before = paths.ca_cert.read_bytes()
    assert _run_cli("server", "init", "--dir", d, "--host", "fl.example.org") == 1
    assert "already exists" in capsys.readouterr().err
    assert _run_cli("server", "init", "--dir", d, "--host", "fl2.example.org", "--reissue") == 0
    assert paths.ca_cert.read_bytes() == ca_before
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl2.example.org"]
    with pytest.raises(ValueError, match="host"):
        _run_cli("server", "init", "--dir", str(tmp_path / "bad"), "--host", "bad_host")
    assert not (tmp_path / "bad" / "pki").exists()
    # --reissue keeps the devices' CA: it never creates one (a mistyped --dir).
    assert _run_cli("server", "init", "--dir", str(tmp_path / "typo"), "--host", "fl.example.org", "--reissue") == 1
    assert "no CA" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "pki" / "ca.crt").exists()
