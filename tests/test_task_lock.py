"""One task at a time per device: two concurrent tasks cannot both spend the last of a budget."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from client.task_lock import DeviceBusy, exclusive_task, lock_path
from shared.config import parse_config
from shared.data.partition import prepare_partitions
from shared.models.factory import build_model
from shared.privacy.accounting import DeviceAccountant, Release
from shared.privacy.ledger_store import DeviceLedgerStore
from shared.training import plan_release


def test_a_second_holder_waits_until_the_first_releases(tmp_path: Path) -> None:
    store = tmp_path / "device.db"
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with exclusive_task(store):
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with exclusive_task(store):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert lock_path(store).exists()


def test_the_lock_holds_across_processes_and_times_out_with_a_clear_error(tmp_path: Path) -> None:
    store = tmp_path / "device.db"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from client.task_lock import exclusive_task\n"
            f"with exclusive_task({str(store)!r}):\n"
            f"    pathlib.Path({str(ready)!r}).touch()\n"
            "    time.sleep(30)\n",
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the holder process did not start"
        ran = []
        with pytest.raises(DeviceBusy, match="spent nothing"), exclusive_task(store, timeout_s=0.5):
            ran.append(True)
        assert ran == []
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone, so its lock went with it.
    with exclusive_task(store, timeout_s=5):
        pass


def test_two_concurrent_tasks_cannot_both_spend_the_last_of_the_budget(tmp_path: Path) -> None:
    overrides: dict[str, object] = {
        "dataset": "synthetic",
        "synthetic-users": 6,
        "synthetic-items": 60,
        "synthetic-interactions": 30,
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "out"),
        "embedding-dim": 8,
        "mlp-layers": "8",
        "num-negatives": 4,
        "local-steps": 40,
        "batch-size": 8,
        "noise-multiplier": 1.0,
    }
    cfg = parse_config(overrides)
    info = prepare_partitions(cfg.data)
    release = plan_release(cfg.train, cfg.privacy)
    acc = DeviceAccountant("rdp", cfg.privacy.delta, 1e9)
    one, two = (
        acc.epsilon_if(Release(release.noise_multiplier, release.sample_rate, n * release.steps)) for n in (1, 2)
    )
    overrides["epsilon-budget"] = (one + two) / 2  # room for exactly one task
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    app = build_client_app(overrides)
    model = build_model(cfg.model, info.num_items, 1, seed=5)
    barrier = threading.Barrier(2)
    replies: list[Message] = []

    def task(seed: int) -> None:
        # Each task gets its own Context, as separate ClientApp processes of one SuperNode would.
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
        msg = Message(
            RecordDict(
                {"global": ArrayRecord(model.global_state()), "config": ConfigRecord({"version": 0, "task-seed": seed})}
            ),
            dst_node_id=7,
            message_type=MessageType.TRAIN,
        )
        barrier.wait()
        replies.append(app(msg, context))

    threads = [threading.Thread(target=task, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(str(r.content.config_records["status"]["status"]) for r in replies)
    assert statuses == ["ok", "refused"]
    ledger = DeviceLedgerStore(tmp_path / "out" / "devices" / "device-1.db")
    try:
        entries = ledger.entries()
    finally:
        ledger.close()
    assert len(entries) == 1
    assert entries[0].epsilon <= overrides["epsilon-budget"]
