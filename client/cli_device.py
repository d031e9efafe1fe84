"""``fedrec device``: enrol an edge device, import its owner's history, recommend, join a federation.

The commands, in the order a device owner runs them::

    fedrec device enroll --store ~/.fedrec/device.db --device-id 7 --key-file ~/.fedrec/device.key
    fedrec device import --store ~/.fedrec/device.db --key-file ~/.fedrec/device.key history.csv
    fedrec device start --store ~/.fedrec/device.db --key-file ~/.fedrec/device.key \\
        --superlink fl.example.org:9093 --root-cert ca.crt --auth-key ~/.fedrec/device-supernode-auth
    fedrec device recommend --store ~/.fedrec/device.db --key-file ~/.fedrec/device.key --model global_model.pt

and, to rotate the store key in place (keeping the ledger, its identity and the spent epsilon)::

    fedrec device rekey --store ~/.fedrec/device.db --key-file ~/.fedrec/device.key \\
        --new-key-file ~/.fedrec/device-2.key

``--passphrase-env VAR`` may replace ``--key-file`` everywhere (and ``--new-passphrase-env
VAR`` ``--new-key-file``): the store key is then derived (scrypt) from the passphrase in
the environment variable ``VAR`` (never from a command-line argument, which other local
users can read in the process list).

One job: the ``fedrec device`` command group (arguments, checks, what each command
prints). The store is :mod:`client.device_store`, its keys :mod:`client.store_keys`, and
running the SuperNode :mod:`client.supernode`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from client.device_store import (
    ConcurrentWriteError,
    DeviceDataStore,
    is_enrolled,
    key_from_passphrase,
    stored_device_id,
)
from client.store_keys import KeyFileError, create_key_file, key_from_file, passphrase_from_env
from client.supernode import RETRY_DELAY_S, find_supernode, run_supernode, supernode_argv
from shared.config import parse_set_pairs

__all__ = ["ML100K_ITEMS", "auth_key_paths", "register"]

# The bundled MovieLens-100K catalogue (fedrec's default data set): enrol's default catalogue size.
ML100K_ITEMS: Final = 1682
AUTH_KEY_SUFFIX: Final = "-supernode-auth"


# ---------------------------------------------------------------- helpers


def _key_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--key-file", type=Path, help="the store key file (32 random bytes, mode 0600)")
    group.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="derive the store key from the passphrase in environment variable VAR (scrypt)",
    )


def _new_key_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--new-key-file",
        type=Path,
        metavar="PATH",
        help="the new store key file: used if it holds a valid key (mode 0600), "
        "else created (32 random bytes, mode 0600); any other existing file is refused",
    )
    group.add_argument(
        "--new-passphrase-env",
        metavar="VAR",
        help="derive the new store key from the passphrase in environment variable VAR (scrypt, new salt)",
    )


def _store_path(args: argparse.Namespace) -> Path:
    return Path(args.store).expanduser().resolve()


def _existing_store(args: argparse.Namespace) -> tuple[Path, int]:
    """The enrolled store named by ``--store`` and its device id."""
    path = _store_path(args)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no device store here; run `fedrec device enroll` first")
    device_id = stored_device_id(path)
    if device_id is None:
        raise ValueError(f"{path}: not an enrolled device store; run `fedrec device enroll` first")
    return path, device_id


def _key(args: argparse.Namespace, store: Path) -> bytes:
    if args.key_file is not None:
        return key_from_file(args.key_file)
    return key_from_passphrase(store, passphrase_from_env(args.passphrase_env, "--passphrase-env"))


def auth_key_paths(store: Path) -> tuple[Path, Path]:
    """Where enrol puts the SuperNode auth key pair: next to the store, ``<stem>-supernode-auth[.pub]``."""
    private = store.with_name(store.stem + AUTH_KEY_SUFFIX)
    return private, private.with_name(private.name + ".pub")


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with mode 0o600 from the start, then write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _ensure_auth_key(store: Path) -> tuple[Path, Path, bool]:
    """The device's ECDSA P-384 SuperNode auth key pair (OpenSSH format); created if missing.

    Returns ``(private, public, created)``. An existing private key is kept (its public
    key is re-derived if the ``.pub`` file was lost), so enrolling twice never changes
    the key the server registered.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = auth_key_paths(store)
    created = not private.exists()
    if created:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            private,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
    else:
        loaded = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp384r1":
            raise ValueError(f"{private}: exists but is not an ECDSA P-384 key; move it away and enrol again")
        key = loaded
    if created or not public.exists():
        text = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public.write_bytes(text + f" fedrec-{store.stem}\n".encode())
        public.chmod(0o644)
    return private, public, created


# --------------------------------------------------------------- commands


def _cmd_enroll(args: argparse.Namespace) -> int:
    from shared.privacy.ledger_store import DeviceLedgerStore

    store = _store_path(args)
    if args.num_items is not None and args.num_items < 2:
        raise ValueError(f"--num-items: must be at least 2, got {args.num_items}")
    enrolled = is_enrolled(store)
    if enrolled:
        recorded = stored_device_id(store)
        if recorded != args.device_id:
            raise ValueError(f"{store} is already enrolled as device {recorded}, not {args.device_id}")
    # The key first: a store that exists is opened (and its key checked) before anything is created.
    if args.key_file is not None:
        key_path = Path(args.key_file).expanduser().resolve()
        if key_path.exists():
            key = key_from_file(key_path)
            key_note = f"key file {key_path}"
        elif enrolled:
            raise KeyFileError(
                f"{key_path}: not found, and {store} is already encrypted under another key; "
                "give the key file it was enrolled with"
            )
        else:
            key = create_key_file(key_path)
            key_note = f"new key file {key_path} (back it up: without it the data cannot be read)"
    else:
        key = key_from_passphrase(store, passphrase_from_env(args.passphrase_env, "--passphrase-env"))
        key_note = f"passphrase from ${args.passphrase_env} (scrypt)"
    with DeviceDataStore(store, args.device_id, key) as data_store:
        recorded_items = data_store.num_items
        if recorded_items is None:
            data_store.set_num_items(args.num_items or ML100K_ITEMS)
        elif args.num_items is not None and args.num_items != recorded_items:
            raise ValueError(
                f"{store}: already enrolled with a catalogue of {recorded_items} items, not {args.num_items}"
            )
        num_items = data_store.num_items
        count = len(data_store.interactions())
    with DeviceLedgerStore(store, device_id=args.device_id) as ledger:
        public_key = ledger.identity().public_key
    private, public, created = _ensure_auth_key(store)
    print(f"device {args.device_id} {'enrolled' if not enrolled else 'already enrolled'}")
    print(f"  store:               {store} ({count} interactions, catalogue of {num_items} items)")
    print(f"  store key:           {key_note}")
    print(f"  ledger public key:   {public_key}")
    print("                       register it with the server (privacy key for device-keys = registered)")
    print(f"  SuperNode auth key:  {private} ({'created' if created else 'kept'}, mode 0600: stays here)")
    print(f"  register on server:  {public}")
    # "=" form: one ledger key in 64 starts with "-", which a shell-copied space form splits badly.
    print(
        f"                       fedrec server register-device --dir <server dir> --device-id {args.device_id} "
        f"--auth-key {public.name} --ledger-key={public_key}"
    )
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from client.history_import import parse_history

    store, device_id = _existing_store(args)
    key = _key(args, store)
    with DeviceDataStore(store, device_id, key) as data_store:
        num_items = data_store.num_items
        if num_items is None:
            raise ValueError(f"{store}: no catalogue size recorded; enrol again with --num-items")
        records = parse_history(args.file, num_items)  # all validated before anything is written
        result = data_store.import_interactions(records)
    print(
        f"imported {result.added} interactions from {args.file} "
        f"({result.skipped} already present); {result.total} in the store"
    )
    return 0


def _opens_with(store: Path, device_id: int, key: bytes) -> bool:
    """Whether ``key`` opens the store (read-only check: opening an enrolled store writes nothing).

    Any failure counts as "no": callers only use a yes to delete something.
    """
    try:
        with DeviceDataStore(store, device_id, key):
            return True
    except Exception:
        return False


def _rekey(data_store: DeviceDataStore, new_key: bytes | None = None, new_passphrase: str | None = None) -> int:
    """:meth:`DeviceDataStore.rekey`, a busy store reported as the CLI's clean error (exit 2)."""
    try:
        return data_store.rekey(new_key, new_passphrase=new_passphrase)
    except ConcurrentWriteError as exc:
        raise ValueError(str(exc)) from None


#: How long ``rekey`` waits for a running training task of the device to finish.
REKEY_WAIT_S = 10.0


@contextmanager
def _no_task_running(store: Path) -> Iterator[None]:
    """Hold the device's task lock; a task in progress is reported as the CLI's clean error."""
    from client.task_lock import DeviceBusy, exclusive_task

    try:
        with exclusive_task(store, timeout_s=REKEY_WAIT_S):
            yield
    except DeviceBusy:
        raise ValueError(
            f"{store}: a training task of this device is running; stop the device (its SuperNode) first; "
            "nothing changed"
        ) from None


def _cmd_rekey(args: argparse.Namespace) -> int:
    """Re-encrypt the store under a new key in place (one transaction); ledger, identity and epsilon are kept."""
    from shared.privacy.ledger_store import DeviceLedgerStore

    store, device_id = _existing_store(args)
    key = _key(args, store)
    old_key_file = None if args.key_file is None else Path(args.key_file).expanduser().resolve()
    new_passphrase = None
    if args.new_passphrase_env is not None:
        new_passphrase = passphrase_from_env(args.new_passphrase_env, "--new-passphrase-env")
    # Not while a training task of this device runs (client/task_lock.py): it would read or seal
    # records under the old key halfway through.
    with _no_task_running(store), DeviceDataStore(store, device_id, key) as data_store:  # a wrong key fails here
        if new_passphrase is not None:
            count = _rekey(data_store, new_passphrase=new_passphrase)
            key_note = f"passphrase from ${args.new_passphrase_env} (scrypt, new salt)"
        else:
            new_path = Path(args.new_key_file).expanduser().resolve()
            if new_path == old_key_file:
                raise ValueError(f"--new-key-file: {new_path} is the current key file; give a new path")
            if new_path == store:
                raise ValueError(f"--new-key-file: {new_path} is the store itself")
            created = not new_path.exists()
            # An existing file is only ever read (and refused unless it is a valid key): never overwritten.
            new_key = create_key_file(new_path) if created else key_from_file(new_path)
            try:
                count = _rekey(data_store, new_key)
            except BaseException:
                # The key file made for this attempt protects nothing: remove it, but only once the
                # store is confirmed to be still under the current key.
                if created and _opens_with(store, device_id, key):
                    new_path.unlink(missing_ok=True)
                raise
            key_note = (
                f"new key file {new_path} (back it up: without it the data cannot be read)"
                if created
                else f"key file {new_path}"
            )
    with DeviceLedgerStore(store, device_id=device_id) as ledger:
        public_key = ledger.identity().public_key
        entries = ledger.entries()
    spent = (
        f"latest cumulative epsilon {entries[-1].epsilon:.4g} ({entries[-1].unit}-level)"
        if entries
        else "no privacy spent yet"
    )
    print(f"device {device_id}: store re-encrypted under the new key ({count} encrypted records)")
    print(f"  store:               {store}")
    print(f"  new store key:       {key_note}")
    print(f"  kept:                ledger of {len(entries)} entries, {spent}")
    print(f"  ledger public key:   {public_key} (unchanged: no re-registration needed)")
    if old_key_file is not None:
        print(f"  old key file:        {old_key_file} no longer opens the store and was NOT deleted:")
        print(f"                       shred it (e.g. shred -u {old_key_file}) once the new key is backed up")
    else:
        print(f"  old passphrase:      ${args.passphrase_env}'s passphrase no longer opens the store")
    print("  from now on pass the new key to every `fedrec device` command (start, import, recommend)")
    return 0


def _load_global_model(path: Path) -> tuple[int | None, dict[str, Any]]:
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path}: global model file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds: the file is not a saved model
        raise ValueError(f"{path}: not a fedrec global model ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
        raise ValueError(f"{path}: not a fedrec global model (expected {{'version': int, 'params': state_dict}})")
    params = saved["params"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in params.items()):
        raise ValueError(f"{path}: 'params' must map parameter names to tensors")
    version = saved.get("version")
    return (int(version) if isinstance(version, int) else None), params


def _titles(args: argparse.Namespace, num_items: int) -> dict[int, str] | None:
    if args.titles is not None:
        raw = json.loads(Path(args.titles).read_text(encoding="utf-8"))
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise ValueError(f"{args.titles}: expected a JSON list of titles by item id")
        return dict(enumerate(raw))
    if args.no_titles:
        return None
    from client.recommend import load_titles

    titles = load_titles()
    # The bundled titles describe the MovieLens-100K catalogue only; another catalogue gets ids.
    return titles if titles is not None and len(titles) == num_items else None


def _cmd_recommend(args: argparse.Namespace) -> int:
    from client.recommend import catalogue_size, recommend
    from shared.config import parse_config

    if args.k < 1:
        raise ValueError(f"-k: must be at least 1, got {args.k}")
    store, device_id = _existing_store(args)
    key = _key(args, store)
    version, params = _load_global_model(Path(args.model).expanduser())
    cfg = parse_config(parse_set_pairs(args.set))
    num_items = catalogue_size(cfg.model, params)
    with DeviceDataStore(store, device_id, key) as data_store:
        recorded = data_store.num_items
        if recorded is not None and recorded != num_items:
            raise ValueError(
                f"{args.model}: the model's catalogue has {num_items} items but this device was enrolled for {recorded}"
            )
        data = data_store.device_data(num_items)
        personal = data_store.load_personal()
    recs = recommend(cfg, params, data, personal, k=args.k, titles=_titles(args, num_items), explain=args.explain)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "rank": r.rank,
                        "item_id": r.item_id,
                        "title": r.title,
                        "score": r.score,
                        "because": [
                            {"item_id": b.item_id, "title": b.title, "similarity": b.similarity} for b in r.because
                        ],
                        "explanation": r.explanation,
                    }
                    for r in recs
                ],
                indent=2,
            )
        )
        return 0
    personal_note = "your personal state" if personal else "no personal state yet (join a federation to train one)"
    print(
        f"top {len(recs)} for device {device_id} (global model v{version if version is not None else '?'}, "
        f"{personal_note}):"
    )
    for r in recs:
        name = r.title or f"item {r.item_id}"
        print(f"{r.rank:3d}. {name} [item {r.item_id}, score {r.score:.3f}] - {r.explanation}")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    store, device_id = _existing_store(args)
    with DeviceDataStore(store, device_id, _key(args, store)):
        pass  # a wrong key fails here, not in the SuperNode's first task
    key_file = None if args.key_file is None else Path(args.key_file).expanduser().resolve()
    root_cert = Path(args.root_cert).expanduser().resolve()
    auth_key = Path(args.auth_key).expanduser().resolve()
    for label, path in (("--root-cert", root_cert), ("--auth-key", auth_key)):
        if not path.is_file():
            raise FileNotFoundError(f"{label}: {path} not found")
    if auth_key.stat().st_mode & 0o077:
        raise ValueError(f"--auth-key: {auth_key} is readable by group/others; `chmod 600 {auth_key}`")
    if args.passphrase_env is not None:
        # The ClientApp reads it from the SuperNode's environment: fail here, not in its first task.
        passphrase_from_env(args.passphrase_env, "--passphrase-env")
    argv = supernode_argv(
        "flower-supernode" if args.dry_run else find_supernode(),
        store=store,
        device_id=device_id,
        superlink=args.superlink,
        root_cert=root_cert,
        auth_key=auth_key,
        port=args.port,
        key_file=key_file,
        passphrase_env=args.passphrase_env,
        policy=parse_set_pairs(args.policy, "--policy"),
    )
    if args.dry_run:
        import shlex

        print(shlex.join(argv))
        return 0
    if args.retry_for < 0:
        raise ValueError(f"--retry-for must be >= 0 seconds, got {args.retry_for:g}")
    return run_supernode(argv, args.retry_for)


# ----------------------------------------------------------------- parser


def register(subparsers: Any) -> None:
    """Add the ``device`` command group to ``fedrec``'s subparsers (``parser.add_subparsers()``)."""
    device = subparsers.add_parser(
        "device",
        help="run fedrec on an edge device: enroll, import, recommend, start, rekey",
        description="Commands for the device owner: "
        "enroll -> import -> start (join the federation) -> recommend; "
        "rekey rotates the store key.",
    )
    sub = device.add_subparsers(dest="device_command", required=True)

    enroll = sub.add_parser("enroll", help="create the encrypted device store, its ledger identity and auth key")
    enroll.add_argument("--store", required=True, help="the device's store file (SQLite, created mode 0600)")
    enroll.add_argument("--device-id", type=int, required=True, help="this device's id in the federation")
    _key_options(enroll)
    enroll.add_argument("--num-items", type=int, help=f"catalogue size (default: MovieLens-100K's {ML100K_ITEMS})")
    enroll.set_defaults(func=_cmd_enroll)

    imp = sub.add_parser("import", help="import your history (CSV item_id,timestamp[,rating] or JSON)")
    imp.add_argument("--store", required=True)
    _key_options(imp)
    imp.add_argument("file", type=Path, help="history file; all of it is validated before anything is stored")
    imp.set_defaults(func=_cmd_import)

    rec = sub.add_parser("recommend", help="recommend from the global model and your own data, on this device")
    rec.add_argument("--store", required=True)
    _key_options(rec)
    rec.add_argument("--model", required=True, type=Path, help="global_model.pt written by the server")
    rec.add_argument("-k", type=int, default=10, help="how many recommendations (default 10)")
    rec.add_argument("--explain", type=int, default=1, help="history items cited per recommendation (default 1)")
    rec.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="config override matching the server's model (e.g. model=sasrec, embedding-dim=32)",
    )
    titles = rec.add_mutually_exclusive_group()
    titles.add_argument("--titles", type=Path, help="JSON list of item titles by item id")
    titles.add_argument("--no-titles", action="store_true", help="show item ids only")
    rec.add_argument("--json", action="store_true", help="print JSON")
    rec.set_defaults(func=_cmd_recommend)

    start = sub.add_parser("start", help="join the federation: exec flower-supernode for this device")
    start.add_argument("--store", required=True)
    _key_options(start)
    start.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    start.add_argument("--root-cert", required=True, type=Path, help="the federation's CA certificate (ca.crt)")
    start.add_argument("--auth-key", required=True, type=Path, help="the SuperNode auth private key from enroll")
    start.add_argument("--port", type=int, default=9094, help="the SuperNode's local port (default 9094)")
    start.add_argument(
        "--policy",
        action="append",
        metavar="KEY=VALUE",
        help="the device's own privacy limit, e.g. max-epsilon=4 or max-evaluations-per-day=6 "
        "(repeatable; keys in docs/deploy.md)",
    )
    start.add_argument(
        "--retry-for",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if flower-supernode exits with an error (e.g. refused for a minute after a crash), "
        f"start it again every {RETRY_DELAY_S:g} s for up to SECONDS (default 0: run it once)",
    )
    start.add_argument("--dry-run", action="store_true", help="print the flower-supernode command instead")
    start.set_defaults(func=_cmd_start)

    rekey = sub.add_parser(
        "rekey",
        help="re-encrypt the store under a new key, in place (ledger, identity and spent epsilon kept)",
        description="Re-encrypt every encrypted record of the device store under a new key in one transaction: "
        "afterwards only the new key opens it; on any error nothing changed. Stop `fedrec device "
        "start` first. The old key file is not deleted: shred it.",
    )
    rekey.add_argument("--store", required=True)
    _key_options(rekey)
    _new_key_options(rekey)
    rekey.set_defaults(func=_cmd_rekey)
