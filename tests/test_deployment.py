"""The deployment acceptance test: real processes on loopback, following docs/deploy.md.

One SuperLink (``fedrec server init`` / ``start``: TLS, SuperNode authentication,
persistent state), three enrolled and registered devices each running its own
SuperNode (``fedrec device enroll`` / ``import`` / ``start``), a fourth device that is
enrolled but never registered, and real runs submitted with ``flwr run . <connection>
--stream``. Every command is the documented one, run as a subprocess with
``FLWR_HOME`` in a temporary directory; every background process gets its own
process group and is killed, with its children, at the end.

What it checks (the issue's acceptance criteria):

* an unregistered device is refused (Flower exits with 305, "Failed to activate SuperNode");
* an asynchronous DP run completes with the server reading no device data
  (``deploy-devices``/``deploy-items``), changes the global model, advances every
  device's signed ledger (verifiable with its key), and ``fedrec audit`` passes;
* a device killed mid-run and restarted with the same command lets the run finish,
  and its ledger continues the same chain with a cumulative epsilon that never drops;
* nothing a device sends (captured by the ``client.wire_log`` mod, enabled with
  ``FEDREC_WIRE_LOG`` on each SuperNode) carries its raw interactions, an item id list
  or its personal embedding;
* the device store on disk holds no imported item id in the clear, and a wrong key
  fails clearly and leaves the file byte-identical;
* a buffered asynchronous run through fedrec's secure noisy sum, one of the four devices
  killed after it sent its key shares (mid-buffer): the sum completes from the three
  survivors (at least ``secure-sum-min-contributors``), the killed device's update is not in
  it, every survivor's signed ledger holds the Skellam release, and ``fedrec audit`` passes;
* a synchronous Flower SecAgg+ run (``secure-aggregation-protocol = "flower-secagg+"``) completes, and the aggregate
  it applied equals the plain weighted mean ``sum n_i d_i / sum n_i`` of the devices'
  updates within the quantization error bound (``server.secagg.quantization_error_bound``):
  the updates and ``n_i`` are read from the contribution receipts each device keeps in its
  own encrypted store, the aggregate from the run's global model.

Slow (a few minutes: each message to an idle SuperNode costs a poll interval and a
fresh ``flwr-clientapp`` process). Deselect with ``--deselect tests/test_deployment.py`` or
``-k "not deployment"``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.wire_log import read_wire_log

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_DEVICES = 4  # registered devices 0, 1, 2, 3
UNREGISTERED = 4  # enrolled, never registered
# The MovieLens-100K user (dense id) whose history each device holds: users with many
# rare items (dense id >= 1000), whose decimal text cannot turn up in the file by chance.
DEVICE_USERS = {0: 584, 1: 205, 2: 166, 3: 751, 4: 858}
ML100K_ITEMS = 1682
CONNECTION = "fedrec"

pytestmark = pytest.mark.skipif(
    not all((BIN / name).is_file() for name in ("fedrec", "flwr", "flower-superlink", "flower-supernode")),
    reason="needs fedrec and Flower's executables beside the test interpreter",
)

# The asynchronous DP run: small, but enough versions that a device restart falls inside it.
ASYNC_CONFIG: dict[str, Any] = {
    "deploy-devices": NUM_DEVICES,
    "deploy-items": ML100K_ITEMS,
    "mode": "async",
    "num-versions": 4,
    "concurrency": NUM_DEVICES,  # every device trains (and its wire log is checked)
    "buffer-size": 2,
    "local-steps": 2,
    "batch-size": 8,
    "embedding-dim": 16,
    "mlp-layers": "16",
    "eval-every": 2,
    "eval-devices": 3,
    "export-top-k": "none",
    "wall-timeout": 60.0,
    "max-device-failures": 50,  # the crashed device's tasks fail until it is back: do not retire it
    "device-keys": "registered",  # only the ledger keys `fedrec server register-device` stored
    # Real devices: no simulated unavailability or drop-out on top of the real ones.
    "availability-mean": 1.0,
    "dropout-rate": 0.0,
    "dp": True,
}
SECAGG_CONFIG: dict[str, Any] = {
    **ASYNC_CONFIG,
    "mode": "sync",
    "secure-aggregation": True,
    "secure-aggregation-protocol": "flower-secagg+",
    "num-versions": 1,
    "concurrency": 3,
    "eval-every": 1,
    # Plain FedAvg step (new = old + aggregate) from the seeded initial model, so the saved
    # global model minus the initial one is exactly the SecAgg+ aggregate (up to float32).
    "server-optimizer": "sgd",
    "server-learning-rate": 1.0,
    "server-momentum": 0.0,
    "secagg-clipping-range": 8.0,
}
# fedrec's own secure noisy sum, buffered asynchronous: one cohort of all four devices whose
# sum closes when all four have trained; one device is killed mid-buffer. Complete graph of
# 4, threshold 2 of 3 holders, at least 3 contributors: the survivors can unmask their sum.
SECURE_CONFIG: dict[str, Any] = {
    **ASYNC_CONFIG,
    "secure-aggregation": True,
    "secure-aggregation-protocol": "fedrec",
    "num-versions": 1,
    "concurrency": NUM_DEVICES,
    "buffer-size": NUM_DEVICES,
    "secure-sum-cohort-size": NUM_DEVICES,
    "secure-sum-min-contributors": NUM_DEVICES - 1,
    "eval-every": 1,
    "wall-timeout": 40.0,  # how long the server waits for the killed device in each round
}
RUN_TIMEOUT = 600.0  # seconds for one `flwr run`


# ------------------------------------------------------------------ processes


def _env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.pop(  # a stray variable from the caller's shell must not change the processes' behaviour
        "FEDREC_WIRE_LOG", None
    )
    env.update(extra)
    return env


def _run(argv: list[str], env: dict[str, str], *, cwd: Path = REPO, timeout: float = 180.0) -> str:
    """Run a documented command to completion; fail the test with its output if it fails."""
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done.stdout


def _spawn(argv: list[str], env: dict[str, str], log: Path, *, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    """Start a background process in its own process group, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - fixed executables
            argv,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (they may sit in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_group(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0, *, group: bool = True
) -> None:
    """Stop ``proc``, its process group and every descendant it started (SIGKILL after ``timeout``)."""
    family = _descendants(proc.pid)  # before they are orphaned and lose the link
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in family):
        time.sleep(0.3)  # let them shut down cleanly
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in [proc.pid, *family]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited {proc.returncode} before port {port} opened:\n{log.read_text()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"port {port} did not open within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _run_config(cfg: dict[str, Any]) -> str:
    """``--run-config`` text: TOML values, space separated."""
    parts = []
    for key, value in cfg.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f"'{value}'"
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


# ---------------------------------------------------------------------- fleet


@dataclass
class Device:
    index: int
    root: Path
    ledger_key: str = ""
    auth_pub: Path = Path()
    auth_key: Path = Path()
    port: int = 0
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    csv_rows: list[str] = field(default_factory=list)
    imported_bytes: bytes = b""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def store(self) -> Path:
        return self.root / "store.db"

    @property
    def key_file(self) -> Path:
        return self.root / "store.key"

    @property
    def wire_log(self) -> Path:
        return self.root / "wire.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "supernode.log"

    def env(self) -> dict[str, str]:
        # Each device is its own host: its own Flower home (installed FABs) and wire log.
        return _env(self.root / "flwr-home", FEDREC_WIRE_LOG=str(self.wire_log))

    def start_argv(self, superlink_port: int, ca_cert: Path) -> list[str]:
        return [
            str(BIN / "fedrec"), "device", "start",
            "--store", str(self.store), "--key-file", str(self.key_file),
            "--superlink", f"127.0.0.1:{superlink_port}", "--root-cert", str(ca_cert),
            "--auth-key", str(self.auth_key), "--port", str(self.port),
        ]  # fmt: skip


@dataclass
class Fleet:
    root: Path
    server_dir: Path
    server_home: Path
    port: int
    devices: list[Device]
    spare: Device
    server_proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_cert(self) -> Path:
        return self.server_dir / "pki" / "ca.crt"

    def server_env(self) -> dict[str, str]:
        return _env(self.server_home)

    def start_device(self, device: Device) -> None:
        device.proc = _spawn(device.start_argv(self.port, self.ca_cert), device.env(), device.log)


def _history_csv(user: int, path: Path) -> tuple[np.ndarray, list[str]]:
    """Write MovieLens-100K user ``user``'s history (dense catalogue ids) as an owner's CSV."""
    from shared.data.bundled import load_bundled_ml100k, resolve_cache_dir

    log = load_bundled_ml100k(resolve_cache_dir(""))
    assert log.num_items == ML100K_ITEMS
    rows = np.flatnonzero(log.user_ids == user)
    items, times = log.item_ids[rows], log.timestamps[rows]
    lines = [f"{int(i)},{int(t)}" for i, t in zip(items, times, strict=True)]
    path.write_text("\n".join(["item_id,timestamp", *lines]) + "\n", encoding="utf-8")
    return items.astype(np.int64), lines


def _enroll(device: Device, env: dict[str, str]) -> None:
    out = _run(
        [str(BIN / "fedrec"), "device", "enroll", "--store", str(device.store),
         "--device-id", str(device.index), "--key-file", str(device.key_file)],
        env,
    )  # fmt: skip
    device.ledger_key = re.search(r"ledger public key:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    device.auth_pub = Path(re.search(r"register on server:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    device.auth_key = Path(re.search(r"SuperNode auth key:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    assert device.auth_pub.is_file() and device.auth_key.is_file()
    assert device.auth_key.stat().st_mode & 0o077 == 0
    csv = device.root / "history.csv"
    device.history, device.csv_rows = _history_csv(DEVICE_USERS[device.index], csv)
    out = _run(
        [str(BIN / "fedrec"), "device", "import", "--store", str(device.store),
         "--key-file", str(device.key_file), str(csv)],
        env,
    )  # fmt: skip
    assert f"imported {len(device.history)} interactions" in out
    device.imported_bytes = device.store.read_bytes()  # the file before the device ever runs


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("deploy")
    server_dir = root / "server"
    fleet = Fleet(
        root=root,
        server_dir=server_dir,
        server_home=root / "server-flwr-home",
        port=_free_port(),
        devices=[Device(i, root / f"device-{i}") for i in range(NUM_DEVICES)],
        spare=Device(UNREGISTERED, root / f"device-{UNREGISTERED}"),
    )
    try:
        # 1. The server: CA and TLS certificate, then the SuperLink (TLS + SuperNode auth).
        env = fleet.server_env()
        out = _run([str(BIN / "fedrec"), "server", "init", "--dir", str(server_dir), "--host", "127.0.0.1"], env)
        assert "CA fingerprint" in out and fleet.ca_cert.is_file()
        server_log = root / "server-start.log"
        fleet.server_proc = _spawn(
            [str(BIN / "fedrec"), "server", "start", "--dir", str(server_dir),
             "--host", "127.0.0.1", "--port", str(fleet.port)],
            env, server_log,
        )  # fmt: skip
        _wait_port(fleet.port, fleet.server_proc, server_log)
        deadline = time.monotonic() + 30
        while "flwr connection" not in server_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "SuperLink running" in server_log.read_text(), server_log.read_text()
        config = (fleet.server_home / "config.toml").read_text()
        assert f"[superlink.{CONNECTION}]" in config

        # 2. Devices: enrol, import the owner's history, register both keys, start the SuperNode.
        for device in [*fleet.devices, fleet.spare]:
            device.root.mkdir(parents=True)
            device.port = _free_port()
            _enroll(device, device.env())
        for device in fleet.devices:
            out = _run(
                [str(BIN / "fedrec"), "server", "register-device", "--dir", str(server_dir),
                 "--device-id", str(device.index), "--auth-key", str(device.auth_pub),
                 f"--ledger-key={device.ledger_key}"],
                env,
            )  # fmt: skip
            assert f"device {device.index} registered" in out
        for device in fleet.devices:
            fleet.start_device(device)
        yield fleet
    finally:
        for device in [*fleet.devices, fleet.spare]:
            if device.proc is not None:
                _kill_group(device.proc)
        if fleet.server_proc is not None:
            # SIGTERM: `fedrec server start` stops its SuperLink (which stops its SuperExec);
            # whatever is left of its descendants is killed by pid.
            _kill_group(fleet.server_proc, signal.SIGTERM, timeout=20.0, group=False)


# ------------------------------------------------------------------- ledgers


def _ledger(device: Device) -> list[Any]:
    from shared.privacy.ledger_store import DeviceLedgerStore

    with DeviceLedgerStore(device.store, device_id=device.index) as store:
        return store.entries()


def _ledger_count(device: Device) -> int:
    """Entries in a device's ledger, read without opening a write transaction."""
    try:
        with closing(sqlite3.connect(f"file:{device.store}?mode=ro", uri=True, timeout=5)) as conn:
            return int(conn.execute("select count(*) from ledger_entries").fetchone()[0])
    except sqlite3.Error:  # not created yet, or busy
        return 0


def _assert_audit_passes(fleet: Fleet, out: Path) -> None:
    """``fedrec audit`` on a run directory, as the server operator runs it: exit 0."""
    done = subprocess.run(
        [str(BIN / "fedrec"), "audit", str(out)],
        env=fleet.server_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------- runs


@dataclass
class RunResult:
    output_dir: Path
    returncode: int
    log: str
    seconds: float
    killed: int | None = None
    entries_before_kill: list[Any] = field(default_factory=list)
    restarted_at: float = 0.0
    restart_attempts: int = 0


def _flwr_run(
    fleet: Fleet,
    cfg: dict[str, Any],
    output_dir: Path,
    *,
    restart: Device | None = None,
    kill_after: tuple[Device, str] | None = None,
) -> RunResult:
    """Submit a run with the documented command; optionally kill and restart a device mid-run.

    ``kill_after = (device, message_type)``: SIGKILL the device (for good) as soon as its wire
    log shows its reply to a ``message_type`` message of this run.
    """
    logged_before = len(read_wire_log(kill_after[0].wire_log)) if kill_after is not None else 0
    cfg = {**cfg, "output-dir": str(output_dir), "key-registry": str(fleet.server_dir / "fedrec.db")}
    argv = [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", _run_config(cfg)]
    log = output_dir.parent / f"{output_dir.name}.flwr-run.log"
    start = time.monotonic()
    proc = _spawn(argv, fleet.server_env(), log, cwd=REPO)
    result = RunResult(output_dir, -1, "", 0.0)
    try:
        if restart is not None:
            # Wait for the device's first signed release (it has trained on a version), then kill it.
            deadline = time.monotonic() + RUN_TIMEOUT
            while _ledger_count(restart) == 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"device {restart.index} never trained:\n{log.read_text()[-6000:]}")
                time.sleep(0.5)
            assert restart.proc is not None
            _kill_group(restart.proc, signal.SIGKILL)
            result.killed = restart.proc.returncode
            result.entries_before_kill = _ledger(restart)
            result.restarted_at = time.time()
            result.restart_attempts = _restart(fleet, restart, deadline)
        if kill_after is not None:
            victim, kind = kill_after
            deadline = time.monotonic() + RUN_TIMEOUT
            while not any(r.message_type == kind for r in read_wire_log(victim.wire_log)[logged_before:]):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"device {victim.index} never answered {kind}:\n{log.read_text()[-6000:]}")
                time.sleep(0.2)
            assert victim.proc is not None
            _kill_group(victim.proc, signal.SIGKILL)
            result.killed = victim.proc.returncode
        proc.wait(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    result.returncode = proc.returncode
    result.log = log.read_text(errors="replace")
    result.seconds = time.monotonic() - start
    return result


def _restart(fleet: Fleet, device: Device, deadline: float) -> int:
    """Start a crashed device again with the same command until its SuperNode is admitted.

    After a crash (SIGKILL) the SuperLink counts the node online until two missed
    heartbeats (about 60 s); an activation inside that window is refused with 305, so a
    supervisor retries, as docs/deploy.md says. Returns the number of attempts.
    """
    attempts = 0
    while True:
        attempts += 1
        offset = device.log.stat().st_size
        fleet.start_device(device)
        assert device.proc is not None
        while device.proc.poll() is None:
            with device.log.open("rb") as log:
                log.seek(offset)
                if b"SuperNode ID:" in log.read():
                    return attempts
            time.sleep(0.5)
        _kill_group(device.proc)  # refused: whatever it started goes too
        if time.monotonic() > deadline:
            pytest.fail(f"device {device.index} was not readmitted:\n{device.log.read_text()[-4000:]}")
        time.sleep(5.0)


@pytest.fixture(scope="module")
def async_run(fleet: Fleet) -> RunResult:
    result = _flwr_run(fleet, ASYNC_CONFIG, fleet.root / "run-async", restart=fleet.devices[0])
    assert result.returncode == 0, result.log[-8000:]
    assert (result.output_dir / "summary.json").is_file(), result.log[-8000:]
    return result


# --------------------------------------------------------------------- tests


def test_unregistered_device_is_refused(fleet: Fleet) -> None:
    """A device whose auth key the server never registered cannot join (Flower: 305)."""
    spare = fleet.spare
    log = spare.root / "refused.log"
    proc = _spawn(spare.start_argv(fleet.port, fleet.ca_cert), spare.env(), log)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered device kept running:\n{log.read_text()[-4000:]}")
    finally:
        _kill_group(proc)  # anything it left behind
    output = log.read_text(errors="replace")
    assert code != 0, output
    # flower-supernode reports exit code 305 (its process exits 1 after printing it).
    assert code == 305 or "Failed to activate SuperNode" in output, output


def test_async_dp_run_trains_and_audits(fleet: Fleet, async_run: RunResult) -> None:
    import torch

    from shared.config import parse_config
    from shared.models.factory import build_model
    from shared.privacy.ledger import verify_chain

    out = async_run.output_dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == NUM_DEVICES
    assert summary["dataset"] == f"{NUM_DEVICES} deployed devices"  # the server read no device data
    assert summary["aggregation"]["versions"] >= ASYNC_CONFIG["num-versions"]
    assert summary["aggregation"]["updates-rejected-ledger"] == 0
    assert summary["privacy"]["devices-with-spending"] == NUM_DEVICES
    saved = torch.load(out / "global_model.pt", map_location="cpu", weights_only=True)
    assert saved["version"] >= ASYNC_CONFIG["num-versions"]
    cfg = parse_config({**ASYNC_CONFIG, "output-dir": str(out), "key-registry": str(fleet.server_dir / "fedrec.db")})
    fresh = build_model(cfg.model, ML100K_ITEMS, 1, seed=cfg.seed).global_state()
    assert set(saved["params"]) == set(fresh)
    change = sum(float((saved["params"][k].float() - fresh[k].float()).abs().sum()) for k in fresh)
    assert change > 0.0, "the global model did not change"

    # Every device's signed ledger advanced and verifies against the key it registered.
    for device in fleet.devices:
        entries = _ledger(device)
        assert entries, f"device {device.index} has no ledger entries"
        assert verify_chain(entries, device.ledger_key, device_id=device.index) == []
        assert all(e.unit == "record" and e.noise_multiplier > 0 for e in entries)

    # The keys the run accepted are exactly the ones the server operator registered.
    from server.privacy_store import PrivacyStore

    with PrivacyStore(f"sqlite:///{out / 'fedrec.db'}") as run_keys, \
            PrivacyStore(f"sqlite:///{fleet.server_dir / 'fedrec.db'}") as registry:  # fmt: skip
        for device in fleet.devices:
            assert registry.public_key(device.index) == device.ledger_key
            assert run_keys.public_key(device.index) == device.ledger_key

    _assert_audit_passes(fleet, out)


def test_restarted_device_continues_its_ledger(fleet: Fleet, async_run: RunResult) -> None:
    """Killed mid-run and restarted with the same command: same chain, epsilon never drops."""
    from shared.privacy.ledger import verify_chain

    device = fleet.devices[0]
    before = async_run.entries_before_kill
    assert before, "the device was killed before its first release"
    after = _ledger(device)
    assert [e.entry_hash for e in after[: len(before)]] == [e.entry_hash for e in before]
    assert len(after) > len(before), "the restarted device never trained again"
    resumed = after[len(before)]
    assert resumed.seq == before[-1].seq + 1
    assert resumed.prev_hash == before[-1].entry_hash
    assert resumed.timestamp >= async_run.restarted_at
    assert verify_chain(after, device.ledger_key, device_id=device.index) == []
    epsilons = [e.epsilon for e in after if e.unit == "record"]
    assert all(b >= a for a, b in zip(epsilons, epsilons[1:], strict=False)), epsilons
    assert epsilons[len(before)] > epsilons[len(before) - 1], "the accountant restarted from zero"


def _int_lists(content: Any) -> list[list[int]]:
    """Every list of integers in a RecordDict's config and metric records."""
    found = []
    for records in (content.config_records, content.metric_records):
        for record in records.values():
            for value in record.values():
                if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                    found.append([int(v) for v in value])
    return found


def test_messages_carry_no_personal_data(fleet: Fleet, async_run: RunResult) -> None:
    from client.device_store import DeviceDataStore
    from client.store_keys import key_from_file
    from shared.config import parse_config
    from shared.privacy.ledger import entry_from_json
    from shared.training import opacus_sample_rate

    for device in fleet.devices:
        replies = read_wire_log(device.wire_log)
        types = {r.message_type.split(".")[0] for r in replies}
        assert {"query", "train", "evaluate"} <= types, types
        with DeviceDataStore(device.store, device.index, key_from_file(device.key_file)) as store:
            personal = store.load_personal()
        assert personal, f"device {device.index} kept no personal state"
        secrets = [v.detach().cpu().numpy().ravel() for v in personal.values()]
        assert all(np.abs(v).sum() > 0 for v in secrets), "the personal embedding never trained"
        history = set(int(i) for i in device.history)
        pairs = [device.history[j : j + 2] for j in range(len(device.history) - 1)]
        public_rate = opacus_sample_rate(parse_config({**ASYNC_CONFIG, "device-keys": "first-use"}).train)
        for reply in replies:
            content = reply.content
            assert content is not None, reply.error
            raw = reply.raw
            # Private mode: no record count, no rate derived from it, no exact metric, no item list.
            for record in content.metric_records.values():
                assert not {"num-examples", "sample-rate", "hit", "ndcg", "sampled-hit", "sampled-ndcg"} & set(record)
            assert "top-k" not in content.config_records
            if reply.message_type.startswith("evaluate"):
                assert content.config_records["status"]["status"] in ("private", "declined"), reply.message_type
            if "ledger" in content.config_records:
                for text in content.config_records["ledger"]["entries"]:
                    entry = entry_from_json(str(text))
                    assert entry.sample_rate in (public_rate, 1.0), entry
            # No personal parameters by name, and no run of the embedding's values in any encoding.
            for record in content.array_records.values():
                for name in record:
                    assert name not in personal, f"{reply.message_type} carries personal parameter {name}"
            for vec in secrets:
                for dtype in (np.float32, np.float64):
                    probe = np.asarray(vec[:4], dtype=dtype).tobytes()
                    assert probe not in raw, f"{reply.message_type} carries the user embedding"
            # No item id list: no integer list overlapping the history, no packed pair of consecutive ids.
            for values in _int_lists(content):
                overlap = history & set(values)
                assert len(overlap) <= 1, f"{reply.message_type} carries history item ids {sorted(overlap)[:10]}"
            for pair in pairs:
                for int_dtype in (np.int32, np.int64):
                    assert np.asarray(pair, dtype=int_dtype).tobytes() not in raw
            for records in (content.config_records,):
                for config in records.values():
                    for value in config.values():
                        texts = value if isinstance(value, list) else [value]
                        for text in texts:
                            if isinstance(text, str) and text.startswith("{"):
                                assert "item" not in json.loads(text), "a ledger entry names items"


def _pair_hits(data: bytes, items: np.ndarray) -> list[str]:
    """Consecutive history ids packed as int32/int64 (what an unencrypted id array would hold)."""
    hits = []
    for j in range(len(items) - 1):
        for dtype in (np.int32, np.int64):
            if np.asarray(items[j : j + 2], dtype=dtype).tobytes() in data:
                hits.append(f"{np.dtype(dtype).name} pair {items[j]}, {items[j + 1]}")
    return hits


def _text_hits(data: bytes, items: np.ndarray, rows: list[str]) -> list[str]:
    """Rare ids (>= 1000) as decimal text, and the history file's own lines."""
    hits = [f"csv line {row!r}" for row in rows if row.encode() in data]
    for item in sorted({int(i) for i in items if i >= 1000}):
        if re.search(rb"(?<![0-9])" + str(item).encode() + rb"(?![0-9])", data):
            hits.append(f"decimal {item}")
    return hits


def test_device_store_is_encrypted_at_rest(fleet: Fleet) -> None:
    from client.device_store import DeviceDataStore, WrongKeyError
    from client.store_keys import key_from_file

    for device in [*fleet.devices, fleet.spare]:
        assert sum(int(i) >= 1000 for i in device.history) >= 5
        # Right after import: no id as text, no CSV line, no packed ids.
        assert _text_hits(device.imported_bytes, device.history, device.csv_rows) == []
        assert _pair_hits(device.imported_bytes, device.history) == []
        # Now (after any training): still no packed ids. (Decimal text is not re-checked:
        # the signed ledger holds hex hashes in the clear, where 4-digit runs occur by chance.)
        assert _pair_hits(device.store.read_bytes(), device.history) == []
        assert device.store.stat().st_mode & 0o077 == 0

    # A wrong key: a clear error, and the file is left byte-identical (the spare never runs).
    spare = fleet.spare
    before = spare.store.read_bytes()
    wrong = spare.root / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    with pytest.raises(WrongKeyError, match="wrong key"):
        DeviceDataStore(spare.store, spare.index, key_from_file(wrong))
    done = subprocess.run(
        [str(BIN / "fedrec"), "device", "import", "--store", str(spare.store), "--key-file", str(wrong),
         str(spare.root / "history.csv")],
        env=spare.env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "wrong key" in done.stderr
    assert spare.store.read_bytes() == before
    with DeviceDataStore(spare.store, spare.index, key_from_file(spare.key_file)) as store:
        assert len(store.interactions()) == len(spare.history)


def test_secure_aggregation_run(fleet: Fleet, async_run: RunResult) -> None:
    """Synchronous SecAgg+ cohort over the same deployment (after the async run)."""
    for device in fleet.devices:
        assert device.proc is not None and device.proc.poll() is None, f"device {device.index} is down"
    before = {d.index: len(_ledger(d)) for d in fleet.devices}
    result = _flwr_run(fleet, SECAGG_CONFIG, fleet.root / "run-secagg")
    assert result.returncode == 0, result.log[-8000:]
    summary_path = result.output_dir / "summary.json"
    assert summary_path.is_file(), result.log[-8000:]
    import torch

    summary = json.loads(summary_path.read_text())
    assert summary["aggregation"]["mode"] == "sync"
    assert summary["aggregation"]["versions"] >= SECAGG_CONFIG["num-versions"]
    assert summary["aggregation"]["updates-applied"] >= 2
    saved = torch.load(result.output_dir / "global_model.pt", map_location="cpu", weights_only=True)
    assert saved["version"] >= 1
    for device in fleet.devices:
        assert len(_ledger(device)) > before[device.index], f"device {device.index} did not release"
    _check_secagg_aggregate(fleet, result)


def _check_secagg_aggregate(fleet: Fleet, result: RunResult) -> None:
    """The aggregate the SecAgg+ run applied equals the plain weighted mean of what the devices fed in.

    Aggregate: the run's saved global model (one version, plain SGD step with learning
    rate 1) minus the seeded initial model the ServerApp starts from. Plain mean: from the
    contribution receipts each contributor kept in its own encrypted store (its plain
    delta and ``num_examples``, as it went into the masking). Contributors: the run's
    tasks accepted into version 1.
    """
    import torch

    from client.device_store import DeviceDataStore
    from client.store_keys import key_from_file
    from server.run_store import RunStore
    from server.secagg import quantization_error_bound
    from shared.config import parse_config
    from shared.models.factory import build_model
    from shared.protocol import PUBLIC_WEIGHT

    out = result.output_dir
    saved = torch.load(out / "global_model.pt", map_location="cpu", weights_only=True)
    assert saved["version"] == 1, "expected exactly one aggregate applied"
    with RunStore(f"sqlite:///{out / 'fedrec.db'}") as runs:
        (run_id,) = runs.run_ids()
        tasks = [t for t in runs.tasks(run_id) if t.status == "accepted" and t.applied_version == 1]
    assert len(tasks) >= 2, tasks
    devices = {d.index: d for d in fleet.devices}

    receipts = []
    for task in tasks:
        device = devices[task.device_id]
        with DeviceDataStore(device.store, device.index, key_from_file(device.key_file)) as store:
            kept = store.contribution_receipts()
        mine = [r for r in kept if r.task_id == task.task_id and r.run.startswith(f"{out.name}#")]
        assert len(mine) == 1, f"device {device.index}: receipts {[(r.run, r.task_id) for r in kept]}"
        receipt = mine[0]
        assert receipt.version == 0 and receipt.num_examples == PUBLIC_WEIGHT  # never the record count
        # The receipt names this run: the device's signed ledger has the same run and task.
        assert any(e.run == receipt.run and e.task_id == task.task_id for e in _ledger(device))
        receipts.append(receipt)
    assert len({r.run for r in receipts}) == 1
    settings = {(r.clipping_range, r.quantization_range, r.modulus_range, r.max_weight) for r in receipts}
    assert len(settings) == 1, settings
    ((clip, qrange, modulus, max_weight),) = settings
    assert clip == SECAGG_CONFIG["secagg-clipping-range"] and max_weight == float(PUBLIC_WEIGHT)
    assert clip is not None and qrange is not None and modulus is not None and max_weight is not None
    assert len(receipts) * qrange < modulus

    cfg = parse_config({**SECAGG_CONFIG, "output-dir": str(out), "key-registry": str(fleet.server_dir / "fedrec.db")})
    initial = build_model(cfg.model, ML100K_ITEMS, 1, seed=cfg.seed).global_state()
    assert set(saved["params"]) == set(initial) and all(set(r.delta) == set(initial) for r in receipts)
    counts = [r.num_examples for r in receipts]
    total = sum(counts)
    applied, plain = {}, {}
    for k in initial:
        applied[k] = saved["params"][k].double() - initial[k].double()
        plain[k] = torch.stack([r.num_examples * r.delta[k].double() for r in receipts]).sum(0) / total
        assert applied[k].shape == plain[k].shape and plain[k].numel() > 0
    peak = max(float(r.delta[k].abs().max()) for r in receipts for k in initial)
    # Nothing was clipped (the bound assumes it): n_i / max_weight * |d_i| <= clipping range.
    assert all(r.clipped is False for r in receipts)
    assert max(counts) / max_weight * peak <= clip
    bound = quantization_error_bound(
        counts, peak, clipping_range=clip, quantization_range=qrange, max_weight=max_weight
    )
    # Storing old + aggregate as float32 rounds it by at most half an ulp of the result.
    rounding = torch.finfo(torch.float32).eps * max(float(v.abs().max()) for v in saved["params"].values())
    error = max(float((applied[k] - plain[k]).abs().max()) for k in initial)
    size = max(float(v.abs().max()) for v in plain.values())
    figures = (
        f"SecAgg+ deployment run: {len(receipts)} contributors, n = {counts}; max|secagg - plain| = {error:.3g}, "
        f"bound = {bound:.3g} (+ float32 storage {rounding:.2g}); max|plain mean| = {size:.3g}"
    )
    print(figures)
    assert error <= bound + rounding, figures
    assert size > 10 * (bound + rounding), f"the aggregate is too small to tell from quantization error: {figures}"


def test_secure_async_buffer_survives_a_device_killed_mid_buffer(fleet: Fleet, async_run: RunResult) -> None:
    """fedrec's secure noisy sum over the real SuperLink: one of four devices dies mid-buffer.

    Runs last: the killed device stays down. The device is killed once it has sent its
    encrypted key shares (round 2), so the server must recover its pairwise masks from the
    survivors' shares; the sum is unmasked over the three survivors, never fewer.
    """
    from server.run_store import RunStore
    from shared.privacy.ledger import SKELLAM_MECHANISM, verify_chain

    for device in fleet.devices:
        assert device.proc is not None and device.proc.poll() is None, f"device {device.index} is down"
    victim = fleet.devices[-1]
    survivors = [d for d in fleet.devices if d is not victim]
    before = {d.index: len(_ledger(d)) for d in fleet.devices}
    out = fleet.root / "run-secure"
    result = _flwr_run(fleet, SECURE_CONFIG, out, kill_after=(victim, "train.secure_shares"))
    assert result.killed is not None, "the device was not killed"
    assert result.returncode == 0, result.log[-8000:]
    summary_path = out / "summary.json"
    assert summary_path.is_file(), result.log[-8000:]
    summary = json.loads(summary_path.read_text())
    assert summary["aggregation"]["mode"] == "async"

    with RunStore(f"sqlite:///{out / 'fedrec.db'}") as runs:
        (run_id,) = runs.run_ids()
        tasks = runs.tasks(run_id)
    status = {t.device_id: t.status for t in tasks}
    accepted = sorted(t.device_id for t in tasks if t.status == "accepted" and t.applied_version == 1)
    figures = f"secure deployment run: statuses {status}, accepted into version 1: {accepted}"
    print(figures)
    # The survivors' sum was unmasked and applied: all three, at least the minimum, never the dead.
    assert accepted == sorted(d.index for d in survivors), figures
    assert len(accepted) >= SECURE_CONFIG["secure-sum-min-contributors"]
    assert status[victim.index] != "accepted", figures
    assert summary["aggregation"]["versions"] == 1 and summary["aggregation"]["updates-applied"] == len(accepted)
    assert summary["aggregation"]["updates-withheld"] == 0

    # Each survivor signed one Skellam release into its ledger, which still verifies.
    for device in survivors:
        entries = _ledger(device)
        new = entries[before[device.index] :]
        assert [e.mechanism for e in new if e.run.startswith(f"{out.name}#")].count(SKELLAM_MECHANISM) == 1, new
        assert verify_chain(entries, device.ledger_key, device_id=device.index) == []

    _assert_audit_passes(fleet, out)
