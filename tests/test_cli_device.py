"""``fedrec device``: argument parsing, enroll -> import -> recommend for real on MovieLens-100K, and rekey."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.config import parse_config_args
from sqlalchemy import Engine, create_engine

from client import cli_device, device_store, store_keys, supernode
from client.cli_device import auth_key_paths, register
from client.device_store import DeviceDataStore, key_from_passphrase
from client.store_keys import key_from_file
from client.supernode import node_config_value
from shared.config import parse_config
from shared.data.bundled import load_bundled_ml100k, resolve_cache_dir
from shared.data.types import DataError, InteractionLog
from shared.entrypoint import main
from shared.models.factory import build_model
from shared.privacy.ledger_store import DeviceLedgerStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_every_command_parses() -> None:
    p = _parser()
    a = p.parse_args(["device", "enroll", "--store", "s.db", "--device-id", "7", "--key-file", "k"])
    assert (a.device_command, a.device_id, a.key_file, a.passphrase_env) == ("enroll", 7, Path("k"), None)
    a = p.parse_args(["device", "import", "--store", "s.db", "--passphrase-env", "PW", "h.csv"])
    assert (a.device_command, a.passphrase_env, a.file) == ("import", "PW", Path("h.csv"))
    a = p.parse_args(["device", "recommend", "--store", "s.db", "--key-file", "k", "--model", "m.pt", "-k", "5"])
    assert (a.device_command, a.model, a.k) == ("recommend", Path("m.pt"), 5)
    a = p.parse_args(
        [
            "device",
            "start",
            "--store",
            "s.db",
            "--key-file",
            "k",
            "--superlink",
            "h:9093",
            "--root-cert",
            "ca.crt",
            "--auth-key",
            "a",
        ]
    )
    assert (a.device_command, a.superlink, a.port) == ("start", "h:9093", 9094)
    with pytest.raises(SystemExit):  # a key source is required, and only one
        p.parse_args(["device", "import", "--store", "s.db", "h.csv"])
    with pytest.raises(SystemExit):
        p.parse_args(["device", "import", "--store", "s.db", "--key-file", "k", "--passphrase-env", "PW", "h.csv"])


@pytest.fixture(scope="module")
def movielens() -> InteractionLog:
    try:
        return load_bundled_ml100k(resolve_cache_dir(""))
    except DataError as exc:  # no cache and no network
        pytest.skip(f"MovieLens-100K unavailable: {exc}")


def _user_history(log: InteractionLog, user: int, path: Path) -> Path:
    mine = log.user_ids == user
    lines = ["item_id,timestamp"] + [
        f"{i},{int(t)}" for i, t in zip(log.item_ids[mine], log.timestamps[mine], strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _global_model(path: Path, num_items: int) -> Path:
    model = build_model(parse_config({}).model, num_items, 1, seed=11)
    torch.save({"version": 4, "params": model.global_state()}, path)
    return path


def test_enroll_import_recommend_for_real(
    tmp_path: Path, movielens: InteractionLog, capsys: pytest.CaptureFixture[str]
) -> None:
    store, key = tmp_path / "dev" / "device.db", tmp_path / "dev" / "device.key"
    common = ["--store", str(store), "--key-file", str(key)]
    assert main(["device", "enroll", "--device-id", "5", *common]) == 0
    out = capsys.readouterr().out
    with DeviceLedgerStore(store) as ledger:
        assert ledger.device_id == 5 and ledger.identity().public_key in out
        # The printed server command carries the key in "=" form (a key may start with "-").
        assert f"--device-id 5 --auth-key device-supernode-auth.pub --ledger-key={ledger.identity().public_key}" in out
    private, public = auth_key_paths(store.resolve())
    assert str(public) in out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert main(["device", "enroll", "--device-id", "5", *common]) == 0  # idempotent: keeps every key
    assert "already enrolled" in capsys.readouterr().out and private.read_bytes()

    history = _user_history(movielens, 5, tmp_path / "history.csv")
    assert main(["device", "import", *common, str(history)]) == 0
    count = int((movielens.user_ids == 5).sum())
    assert f"imported {count} interactions" in capsys.readouterr().out

    model = _global_model(tmp_path / "global_model.pt", movielens.num_items)
    assert main(["device", "recommend", *common, "--model", str(model), "-k", "10", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    seen = set(movielens.item_ids[movielens.user_ids == 5].tolist())
    assert len(recs) == 10 and not {r["item_id"] for r in recs} & seen
    assert all(r["because"][0]["item_id"] in seen for r in recs)
    assert movielens.item_titles is not None
    assert recs[0]["title"] == movielens.item_titles[recs[0]["item_id"]]
    assert recs[0]["explanation"].startswith("because you watched ")
    assert main(["device", "recommend", *common, "--model", str(model), "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "global model v4" in text and "  1. " in text and "because you watched" in text


def test_passphrase_flow_and_wrong_key(
    tmp_path: Path, movielens: InteractionLog, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "device.db"
    monkeypatch.setenv("FEDREC_PW", "a long passphrase")
    common = ["--store", str(store), "--passphrase-env", "FEDREC_PW"]
    assert main(["device", "enroll", "--device-id", "9", *common]) == 0
    history = _user_history(movielens, 9, tmp_path / "history.csv")
    assert main(["device", "import", *common, str(history)]) == 0
    capsys.readouterr()
    before = store.read_bytes()
    monkeypatch.setenv("FEDREC_PW", "another passphrase")
    assert main(["device", "import", *common, str(history)]) == 2
    assert "wrong key or passphrase" in capsys.readouterr().err
    assert store.read_bytes() == before
    monkeypatch.delenv("FEDREC_PW")
    assert main(["device", "import", *common, str(history)]) == 2
    assert "FEDREC_PW" in capsys.readouterr().err


def test_invalid_history_imports_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, key = tmp_path / "device.db", tmp_path / "device.key"
    common = ["--store", str(store), "--key-file", str(key)]
    assert main(["device", "enroll", "--device-id", "1", "--num-items", "50", *common]) == 0
    bad = tmp_path / "history.csv"
    bad.write_text("item_id,timestamp\n1,10\n2,20\n77,30\n")
    assert main(["device", "import", *common, str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 4: item_id 77 is not in the catalogue" in err
    with DeviceDataStore(store, 1, key_from_file(key)) as data_store:
        assert data_store.interactions() == []
    assert main(["device", "import", "--store", str(tmp_path / "other.db"), "--key-file", str(key), str(bad)]) == 2
    assert "run `fedrec device enroll` first" in capsys.readouterr().err


def test_recommend_rejects_a_model_for_another_catalogue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, key = tmp_path / "device.db", tmp_path / "device.key"
    common = ["--store", str(store), "--key-file", str(key)]
    assert main(["device", "enroll", "--device-id", "1", "--num-items", "50", *common]) == 0
    history = tmp_path / "h.csv"
    history.write_text("item_id,timestamp\n1,10\n2,20\n3,30\n")
    assert main(["device", "import", *common, str(history)]) == 0
    model = _global_model(tmp_path / "m.pt", 60)
    assert main(["device", "recommend", *common, "--model", str(model)]) == 2
    assert "60 items but this device was enrolled for 50" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    assert main(["device", "recommend", *common, "--model", str(junk)]) == 2
    assert "not a fedrec global model" in capsys.readouterr().err
    assert (
        main(["device", "recommend", *common, "--model", str(_global_model(tmp_path / "ok.pt", 50)), "--no-titles"])
        == 0
    )
    assert "item " in capsys.readouterr().out


def test_start_execs_flower_supernode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, key = tmp_path / "my device" / "device.db", tmp_path / "my device" / "device.key"
    assert main(["device", "enroll", "--device-id", "3", "--store", str(store), "--key-file", str(key)]) == 0
    capsys.readouterr()
    ca = tmp_path / "ca.crt"
    ca.write_text("cert")
    private, _ = auth_key_paths(store.resolve())
    captured: list[list[str]] = []

    def fake_exec(path: str, argv: list[str]) -> None:
        captured.append(argv)

    monkeypatch.setattr(cli_device.os, "execv", fake_exec)
    args = [
        "device",
        "start",
        "--store",
        str(store),
        "--key-file",
        str(key),
        "--superlink",
        "10.0.0.1:9093",
        "--root-cert",
        str(ca),
        "--auth-key",
        str(private),
        "--port",
        "9200",
    ]
    main(args)
    (argv,) = captured
    assert Path(argv[0]).name == "flower-supernode"
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert flags["--superlink"] == "10.0.0.1:9093" and flags["--port"] == "9200"
    assert flags["--root-certificates"] == str(ca.resolve())
    assert flags["--auth-supernode-private-key"] == str(private)
    node = parse_config_args([flags["--node-config"]])  # exactly how flower-supernode reads it
    assert node == {"store": str(store.resolve()), "key-file": str(key.resolve()), "device-id": 3}

    ca.unlink()
    assert main(args) == 2
    assert "--root-cert" in capsys.readouterr().err


def test_node_config_quoting_round_trips() -> None:
    for value in ("/a b/c.db", "/it's/here", '/say "hi"/x', "C:\\keys\\k"):
        assert parse_config_args([f"k={node_config_value(value)}"]) == {"k": value}
    with pytest.raises(ValueError, match="both"):
        node_config_value('/it\'s "both"')


def test_enroll_refuses_a_lost_key_for_an_existing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "device.db"
    assert (
        main(["device", "enroll", "--device-id", "2", "--store", str(store), "--key-file", str(tmp_path / "a.key")])
        == 0
    )
    assert (
        main(["device", "enroll", "--device-id", "2", "--store", str(store), "--key-file", str(tmp_path / "b.key")])
        == 2
    )
    assert "already encrypted under another key" in capsys.readouterr().err
    assert not (tmp_path / "b.key").exists()
    assert (
        main(["device", "enroll", "--device-id", "4", "--store", str(store), "--key-file", str(tmp_path / "a.key")])
        == 2
    )
    assert "already enrolled as device 2" in capsys.readouterr().err
    assert np.array_equal(
        np.frombuffer(store.read_bytes()[:16], np.uint8), np.frombuffer(b"SQLite format 3\x00", np.uint8)
    )


# ------------------------------------------------------------------ rekey


def test_rekey_parses() -> None:
    p = _parser()
    a = p.parse_args(["device", "rekey", "--store", "s.db", "--key-file", "k", "--new-passphrase-env", "NEW"])
    assert (a.device_command, a.key_file, a.new_passphrase_env, a.new_key_file) == ("rekey", Path("k"), "NEW", None)
    a = p.parse_args(["device", "rekey", "--store", "s.db", "--passphrase-env", "PW", "--new-key-file", "n"])
    assert (a.passphrase_env, a.new_key_file) == ("PW", Path("n"))
    for bad in (
        ["--key-file", "k"],  # a new key is required
        ["--new-key-file", "n"],  # and the current one
        ["--key-file", "k", "--new-key-file", "n", "--new-passphrase-env", "NEW"],
    ):  # only one new key
        with pytest.raises(SystemExit):
            p.parse_args(["device", "rekey", "--store", "s.db", *bad])


def _enrolled_device(tmp_path: Path, key_args: list[str], device_id: int = 6) -> Path:
    """An enrolled store with history, personal state, a receipt and three ledger entries."""
    store = tmp_path / "device.db"
    assert main(["device", "enroll", "--device-id", str(device_id), "--num-items", "50", "--store", str(store),
                 *key_args]) == 0  # fmt: skip
    history = tmp_path / "h.csv"
    history.write_text("item_id,timestamp,rating\n1,10,4\n2,20,5\n3,30,3\n")
    assert main(["device", "import", "--store", str(store), *key_args, str(history)]) == 0
    with DeviceDataStore(store, device_id, _current_key(store, key_args)) as data_store:
        data_store.save_personal({"user_embedding.weight": torch.arange(4.0).reshape(1, 4)})
        data_store.add_contribution_receipt(run="r", version=1, task_id=2, num_examples=3,
                                            delta={"w": torch.ones(3)})  # fmt: skip
    with DeviceLedgerStore(store) as ledger:
        for k in range(3):
            ledger.append(run="r", version=k, task_id=k, unit="record", mechanism="subsampled-gaussian",
                          noise_multiplier=1.0, sample_rate=0.1, steps=5, clip_norm=1.0, accountant="rdp",
                          epsilon=0.25 * (k + 1), delta=1e-5)  # fmt: skip
    return store


def _current_key(store: Path, key_args: list[str]) -> bytes:
    option, value = key_args
    if option == "--key-file":
        return key_from_file(value)
    return key_from_passphrase(store, os.environ[value])


def _contents(store: Path, device_id: int, key: bytes) -> dict[str, object]:
    with DeviceDataStore(store, device_id, key) as data_store:
        data: dict[str, object] = {
            "interactions": data_store.interactions(),
            "num_items": data_store.num_items,
            "personal": {k: v.tolist() for k, v in data_store.load_personal().items()},
            "receipts": [
                (r.seq, r.run, r.version, r.created_at, {k: v.tolist() for k, v in r.delta.items()})
                for r in data_store.contribution_receipts()
            ],  # fmt: skip
        }
    with DeviceLedgerStore(store) as ledger:
        data |= {"public_key": ledger.identity().public_key, "entries": ledger.entries(),
                 "history": ledger.history(), "device_id": ledger.device_id}  # fmt: skip
    return data


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rekey_key_file_to_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old_key_file = tmp_path / "old.key"
    store = _enrolled_device(tmp_path, ["--key-file", str(old_key_file)])
    before = _contents(store, 6, key_from_file(old_key_file))
    capsys.readouterr()
    monkeypatch.setenv("FEDREC_NEW_PW", "a brand new passphrase")
    rekey = ["device", "rekey", "--store", str(store)]

    # A wrong current key (or an unset new passphrase) fails clearly and changes nothing.
    digest = _digest(store)
    store_keys.create_key_file(tmp_path / "other.key")
    assert main([*rekey, "--key-file", str(tmp_path / "other.key"), "--new-passphrase-env", "FEDREC_NEW_PW"]) == 2
    assert "wrong key or passphrase" in capsys.readouterr().err
    never = tmp_path / "never.key"
    assert main([*rekey, "--key-file", str(tmp_path / "other.key"), "--new-key-file", str(never)]) == 2
    assert "wrong key or passphrase" in capsys.readouterr().err and not never.exists()
    assert main([*rekey, "--key-file", str(old_key_file), "--new-passphrase-env", "FEDREC_UNSET_PW"]) == 2
    err = capsys.readouterr().err
    assert "--new-passphrase-env" in err and "'FEDREC_UNSET_PW' is unset or empty" in err
    assert _digest(store) == digest

    assert main([*rekey, "--key-file", str(old_key_file), "--new-passphrase-env", "FEDREC_NEW_PW"]) == 0
    out = capsys.readouterr().out
    assert "store re-encrypted" in out and "ledger of 3 entries" in out and "epsilon 0.75" in out
    assert str(before["public_key"]) in out
    assert f"shred -u {old_key_file.resolve()}" in out and "NOT deleted" in out
    assert old_key_file.exists()  # the command does not delete it: the operator shreds it

    history = tmp_path / "h.csv"
    assert main(["device", "import", "--store", str(store), "--key-file", str(old_key_file), str(history)]) == 2
    assert "wrong key or passphrase" in capsys.readouterr().err
    assert main(["device", "import", "--store", str(store), "--passphrase-env", "FEDREC_NEW_PW", str(history)]) == 0
    assert "imported 0 interactions" in capsys.readouterr().out
    assert _contents(store, 6, key_from_passphrase(store, "a brand new passphrase")) == before


def test_rekey_passphrase_to_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDREC_PW", "the first passphrase")
    store = _enrolled_device(tmp_path, ["--passphrase-env", "FEDREC_PW"], device_id=4)
    before = _contents(store, 4, key_from_passphrase(store, "the first passphrase"))
    capsys.readouterr()
    rekey = ["device", "rekey", "--store", str(store)]

    # An existing file that is not a usable key is refused, never overwritten.
    digest = _digest(store)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    for path, message in ((junk, "not a key file"), (loose, "chmod 600"), (store, "the store itself")):
        content = path.read_bytes()
        assert main([*rekey, "--passphrase-env", "FEDREC_PW", "--new-key-file", str(path)]) == 2
        assert message in capsys.readouterr().err
        assert path.read_bytes() == content
    assert _digest(store) == digest

    new_key_file = tmp_path / "keys" / "new.key"
    assert main([*rekey, "--passphrase-env", "FEDREC_PW", "--new-key-file", str(new_key_file)]) == 0
    out = capsys.readouterr().out
    assert "store re-encrypted" in out and f"new key file {new_key_file.resolve()}" in out
    assert "old passphrase" in out
    assert stat.S_IMODE(new_key_file.stat().st_mode) == 0o600
    history = tmp_path / "h.csv"
    assert main(["device", "import", "--store", str(store), "--passphrase-env", "FEDREC_PW", str(history)]) == 2
    assert "created with a key file" in capsys.readouterr().err  # the old passphrase (and its salt) are gone
    assert main(["device", "import", "--store", str(store), "--key-file", str(new_key_file), str(history)]) == 0
    assert _contents(store, 4, key_from_file(new_key_file)) == before

    # Key file -> an existing valid key file: used as it is; the current file itself is refused.
    assert main([*rekey, "--key-file", str(new_key_file), "--new-key-file", str(new_key_file)]) == 2
    assert "is the current key file" in capsys.readouterr().err
    third = tmp_path / "third.key"
    third_key = store_keys.create_key_file(third)
    assert main([*rekey, "--key-file", str(new_key_file), "--new-key-file", str(third)]) == 0
    assert f"key file {third.resolve()}" in capsys.readouterr().out and third.read_bytes() == third_key
    assert _contents(store, 4, third_key) == before


def test_rekey_of_a_busy_store_changes_nothing_and_keeps_no_new_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old_key_file = tmp_path / "old.key"
    store = _enrolled_device(tmp_path, ["--key-file", str(old_key_file)])
    capsys.readouterr()

    def impatient_engine(path: Path) -> Engine:
        return create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})

    monkeypatch.setattr(device_store, "_engine", impatient_engine)
    digest = _digest(store)
    new_key_file = tmp_path / "new.key"
    with closing(sqlite3.connect(store)) as other:
        other.execute("BEGIN IMMEDIATE")  # e.g. the SuperNode's ClientApp writing a receipt
        assert main(["device", "rekey", "--store", str(store), "--key-file", str(old_key_file),
                     "--new-key-file", str(new_key_file)]) == 2  # fmt: skip
        other.rollback()
    assert "another process" in capsys.readouterr().err
    assert _digest(store) == digest
    assert not new_key_file.exists()  # created for the attempt, removed since the old key still opens the store
    with DeviceDataStore(store, 6, key_from_file(old_key_file)) as data_store:
        assert len(data_store.interactions()) == 3


def test_rekey_refuses_while_a_training_task_of_the_device_runs_and_waits_for_one_ending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading
    import time

    from client import cli_device
    from client.task_lock import exclusive_task

    monkeypatch.setattr(cli_device, "REKEY_WAIT_S", 0.3)
    old_key_file = tmp_path / "old.key"
    store = _enrolled_device(tmp_path, ["--key-file", str(old_key_file)])
    capsys.readouterr()
    digest = _digest(store)
    new_key_file = tmp_path / "new.key"
    rekey = ["device", "rekey", "--store", str(store), "--key-file", str(old_key_file),
             "--new-key-file", str(new_key_file)]  # fmt: skip
    with exclusive_task(store):  # a ClientApp task of this device holds it while it trains
        assert main(rekey) == 2
    assert "training task of this device is running" in capsys.readouterr().err
    assert _digest(store) == digest
    assert not new_key_file.exists()

    # A task that ends within the wait: rekey goes ahead after it.
    monkeypatch.setattr(cli_device, "REKEY_WAIT_S", 10.0)
    holding = threading.Event()

    def short_task() -> None:
        with exclusive_task(store):
            holding.set()
            time.sleep(0.3)

    task = threading.Thread(target=short_task)
    task.start()
    holding.wait(5)
    assert main(rekey) == 0
    task.join()
    with DeviceDataStore(store, 6, key_from_file(new_key_file)) as data_store:
        assert len(data_store.interactions()) == 3


def _start_args(tmp_path: Path, superlink: str = "127.0.0.1:9") -> list[str]:
    """``fedrec device start`` arguments for a freshly enrolled device (a stand-in CA file)."""
    store, key = tmp_path / "device.db", tmp_path / "device.key"
    assert main(["device", "enroll", "--device-id", "4", "--store", str(store), "--key-file", str(key)]) == 0
    ca = tmp_path / "ca.crt"
    ca.write_text("cert")
    private, _ = auth_key_paths(store.resolve())
    return ["device", "start", "--store", str(store), "--key-file", str(key), "--superlink", superlink,
            "--root-cert", str(ca), "--auth-key", str(private)]  # fmt: skip


def test_start_passes_the_devices_own_policy_and_refuses_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.policy import DevicePolicy

    base = _start_args(tmp_path, "10.0.0.1:9093")
    captured: list[list[str]] = []
    monkeypatch.setattr(cli_device.os, "execv", lambda path, argv: captured.append(argv))
    main([*base, "--policy", "max-epsilon=4", "--policy", "max-evaluations-per-day=6"])
    (argv,) = captured
    node = parse_config_args([dict(zip(argv[1::2], argv[2::2], strict=True))["--node-config"]])
    policy = DevicePolicy.from_node_config(node)
    assert policy is not None
    assert (policy.max_epsilon, policy.max_evaluations_per_day) == (4.0, 6)
    capsys.readouterr()
    for bad, why in (
        ("max-epsilion=4", "unknown key"),
        ("max-evaluations-per-day=-2", ">= 0"),
        ("max-epsilon", "--policy expects KEY=VALUE"),
    ):
        assert main([*base, "--policy", bad]) == 2
        assert why in capsys.readouterr().err
    assert len(captured) == 1  # nothing started for the bad ones


def _fake_supernode(tmp_path: Path, fail_times: int, code: int = 1) -> tuple[Path, Path]:
    """An executable standing in for flower-supernode: fails ``fail_times`` times, then exits 0."""
    import stat
    import sys

    counter = tmp_path / "attempts"
    script = tmp_path / "flower-supernode"
    script.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        f"sys.exit({code} if n <= {fail_times} else 0)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, counter


@pytest.mark.parametrize(("fail_times", "retry_for", "expected_code", "expected_attempts"),
                         [(2, 30.0, 0, 3), (100, 0.5, 3, None)])  # fmt: skip
def test_start_retries_a_refused_supernode_within_the_window(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fail_times: int,
    retry_for: float,
    expected_code: int,
    expected_attempts: int | None,
) -> None:
    args = _start_args(tmp_path)
    script, counter = _fake_supernode(tmp_path, fail_times, code=3)
    monkeypatch.setattr(cli_device, "find_supernode", lambda: str(script))
    monkeypatch.setattr(supernode, "RETRY_DELAY_S", 0.05)
    code = main([*args, "--retry-for", str(retry_for)])
    assert code == expected_code
    attempts = int(counter.read_text())
    if expected_attempts is not None:
        assert attempts == expected_attempts
    else:
        assert 2 <= attempts < 100  # retried, then gave up when the window closed
        assert "giving up" in capsys.readouterr().err


def test_start_refuses_a_negative_retry_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_start_args(tmp_path), "--retry-for", "-5"]) == 2
    assert "--retry-for" in capsys.readouterr().err
