"""The server's ledger intake prices a device's lifetime ledger by what each entry names.

A new run starts with an empty server database, so a device uploads every entry it ever
signed, including entries of earlier runs with other settings. Those must not be re-priced
with this run's accountant or user-level filter (an honest device would be rejected on
every reply and retired). And a deployed device whose own policy caps its user-level
budget below the run's must still sign the ε the server recomputes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from server.ledger_intake import LedgerIntake
from server.privacy_store import PrivacyStore
from shared.config import parse_config
from shared.data.partition import prepare_partitions
from shared.models.factory import build_model
from shared.privacy.accounting import DeviceAccountant
from shared.privacy.ledger import entry_to_json
from shared.privacy.ledger_store import DeviceLedgerStore
from shared.privacy.user_level import RenyiFilter
from shared.protocol import TRAIN_TASK, TrainTask, TrainUpdate, build_train_task, parse_ledger, parse_train_reply
from shared.training import opacus_sample_rate


def _reply(store: DeviceLedgerStore) -> list[str]:
    """Every entry of the device's ledger, as a reply carries them (JSON texts)."""
    return [entry_to_json(e) for e in store.entries()]


def _intake(overrides: dict[str, Any], device: DeviceLedgerStore, device_id: int) -> LedgerIntake:
    intake = LedgerIntake(parse_config(overrides), PrivacyStore("sqlite://"))
    intake.run_label = "this-run"
    intake.store.register_key(device_id, device.identity().public_key)
    return intake


def test_an_earlier_prv_entry_is_not_repriced_with_this_runs_rdp(tmp_path: Path) -> None:
    cfg = parse_config({})
    p = cfg.privacy
    q = opacus_sample_rate(cfg.train)
    accountant = DeviceAccountant("prv", p.delta, 8.0, [(p.noise_multiplier, q, cfg.train.local_steps)])
    device = DeviceLedgerStore(tmp_path / "dev.db", device_id=0)
    device.append(
        run="earlier-run",
        version=0,
        task_id=1,
        unit="record",
        mechanism="subsampled-gaussian",
        noise_multiplier=p.noise_multiplier,
        sample_rate=q,
        steps=cfg.train.local_steps,
        clip_norm=p.clip_norm,
        accountant="prv",
        epsilon=accountant.epsilon(),
        delta=p.delta,
    )
    result = _intake({}, device, 0).check(0, None, _reply(device))
    assert result.accepted, result.problems
    # A wrong RDP claim is still caught: the entry's own accountant decides what is checked.
    bad = DeviceLedgerStore(tmp_path / "bad.db", device_id=0)
    bad.append(
        run="this-run",
        version=0,
        task_id=1,
        unit="record",
        mechanism="subsampled-gaussian",
        noise_multiplier=p.noise_multiplier,
        sample_rate=q,
        steps=cfg.train.local_steps,
        clip_norm=p.clip_norm,
        accountant="rdp",
        epsilon=accountant.epsilon(),
        delta=p.delta,
    )
    rejected = _intake({}, bad, 0).check(0, None, _reply(bad))
    assert not rejected.accepted and "claims epsilon" in "; ".join(rejected.problems)


def test_an_earlier_runs_user_entry_is_not_priced_with_this_runs_filter(tmp_path: Path) -> None:
    old = RenyiFilter(3.0, 1e-5, 8.0)
    old.charge(0, 1.0)
    device = DeviceLedgerStore(tmp_path / "dev.db", device_id=2)
    device.append(
        run="earlier-run",
        version=0,
        task_id=7,
        unit="user",
        mechanism="gaussian-server-noise",
        noise_multiplier=3.0,
        sample_rate=1.0,
        steps=1,
        clip_norm=1.0,
        accountant="rdp-filter",
        epsilon=old.epsilon(0),
        delta=1e-5,
    )
    result = _intake({}, device, 2).check(2, None, _reply(device))  # a record-level-only run
    assert result.accepted, result.problems


def test_a_device_capping_its_user_budget_signs_the_epsilon_the_server_recomputes(tmp_path: Path) -> None:
    overrides: dict[str, Any] = {
        "dataset": "synthetic",
        "synthetic-users": 4,
        "synthetic-items": 40,
        "synthetic-interactions": 20,
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "out"),
        "embedding-dim": 4,
        "mlp-layers": "4",
        "num-negatives": 2,
        "local-steps": 2,
        "batch-size": 4,
        "user-dp": True,
        "user-noise-multiplier": 3.0,
        "user-epsilon-budget": 8.0,
    }
    # Its filter order differs from the run's at this cap (3.7 at budget 8, 4.0 at 6 for z = 3).
    assert RenyiFilter(3.0, 1e-5, 6.0).order != RenyiFilter(3.0, 1e-5, 8.0).order
    store = tmp_path / "dev.db"
    node = {"store": str(store), "partition-id": 1, "max-user-epsilon": "6"}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = parse_config(overrides)
    model = build_model(cfg.model, prepare_partitions(cfg.data).num_items, 1, seed=3)
    app = build_client_app(overrides)
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    intake = _intake(overrides, DeviceLedgerStore(store, device_id=1), 1)
    for task in range(2):
        train = TrainTask(ArrayRecord(model.global_state()), 0, task, run="this-run", ledger_head=intake.head_seq(1))
        msg = Message(build_train_task(train), dst_node_id=5, message_type=TRAIN_TASK.message_type)
        reply = app(msg, context)
        update = parse_train_reply(reply)
        assert isinstance(update, TrainUpdate)
        result = intake.check(1, task, parse_ledger(reply).entries)
        assert result.accepted, result.problems
        assert [e.unit for e in result.entries] == ["record", "user"]


def test_a_ledger_that_cannot_be_read_is_a_recorded_rejection(tmp_path: Path) -> None:
    device = DeviceLedgerStore(tmp_path / "dev.db", device_id=0)
    intake = _intake({}, device, 0)
    garbled = intake.check(0, 3, ["{not json"])
    missing = intake.unreadable(0, 4, "train-update message, key 'ledger': missing config record")
    for result in (garbled, missing):
        assert not result.accepted and result.problems[0].startswith("unreadable ledger: ")
    assert [r.task_id for r in intake.store.rejections(0)] == [3, 4]


def _secure_entry(device: DeviceLedgerStore, release: Any, epsilon: float, **change: Any) -> None:
    from shared.privacy.ledger import SKELLAM_MECHANISM

    fields: dict[str, Any] = dict(
        run="this-run",
        version=0,
        task_id=1,
        unit="record",
        mechanism=SKELLAM_MECHANISM,
        noise_multiplier=release.noise_multiplier,
        sample_rate=release.sample_rate,
        steps=release.steps,
        clip_norm=release.l2_sensitivity,
        accountant="rdp",
        epsilon=epsilon,
        delta=1e-5,
    )
    fields.update(change)
    device.append(**fields)


def test_a_secure_sum_entry_is_held_to_the_runs_plan_and_priced_by_skellam_rdp(tmp_path: Path) -> None:
    from shared.privacy.accounting import SkellamRelease, record_epsilon
    from shared.secure_sum.release import plan_secure_release

    overrides = {"secure-aggregation": True}
    cfg = parse_config(overrides)
    plan = plan_secure_release(cfg.aggregation, cfg.privacy, cfg.train, 117_715)
    truth = record_epsilon([], [plan.release.entry()], 1e-5)
    honest = DeviceLedgerStore(tmp_path / "honest.db", device_id=0)
    _secure_entry(honest, plan.release, truth)
    intake = _intake(overrides, honest, 0)
    intake.secure_release = plan.release
    result = intake.check(0, 1, _reply(honest))
    assert result.accepted, result.problems
    # Less noise than the plan (a device claiming a weaker mechanism than it was asked for) is refused.
    weaker = SkellamRelease(plan.release.noise_multiplier / 2, 0.125, 10, plan.release.l2_sensitivity)
    device = DeviceLedgerStore(tmp_path / "weak.db", device_id=0)
    _secure_entry(device, weaker, record_epsilon([], [weaker.entry()], 1e-5))
    intake = _intake(overrides, device, 0)
    intake.secure_release = plan.release
    refused = intake.check(0, 1, _reply(device))
    assert not refused.accepted and any("noise_multiplier" in p for p in refused.problems)
    # A claim below what the entry's own mechanism gives is refused too.
    low = DeviceLedgerStore(tmp_path / "low.db", device_id=0)
    _secure_entry(low, plan.release, truth * 0.8)
    intake = _intake(overrides, low, 0)
    intake.secure_release = plan.release
    refused = intake.check(0, 1, _reply(low))
    assert not refused.accepted and any("claims epsilon" in p for p in refused.problems)
    # In a run without secure aggregation such an entry of this run is out of place.
    intake = _intake({}, honest, 0)
    assert not intake.check(0, 1, _reply(honest)).accepted
