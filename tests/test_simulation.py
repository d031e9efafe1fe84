"""End-to-end: real Flower simulations (Ray) of a few devices, in both modes, and what they record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from server.run_store import RunStore
from simulations.runner import simulate


def _overrides(tmp: Path, name: str, **extra: Any) -> dict[str, Any]:
    base = {
        "dataset": "synthetic",
        "synthetic-users": 8,
        "synthetic-items": 80,
        "synthetic-interactions": 30,
        "cache-dir": str(tmp / "cache"),
        "embedding-dim": 8,
        "mlp-layers": "8",
        "num-negatives": 4,
        "local-steps": 3,
        "batch-size": 4,
        "concurrency": 4,
        "buffer-size": 2,
        "num-versions": 4,
        "eval-every": 2,
        "eval-devices": 4,
        "output-dir": str(tmp / name),
        "epsilon-budget": 30.0,
    }
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return base


def _comparable(summary: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(summary))
    for key in ("time", "outputs"):
        out.pop(key, None)
    out["config"].pop("output-dir")
    return out


@pytest.fixture(scope="module")
def ray_async(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sim")
    return tmp, simulate(_overrides(tmp, "ray-async"), backend="ray")


def test_real_flower_simulation_async_completes_and_writes_outputs(ray_async) -> None:
    tmp, summary = ray_async
    out = tmp / "ray-async"
    assert summary["aggregation"]["versions"] == 4
    assert summary["aggregation"]["updates-applied"] >= 8
    assert summary["final"]["users"] == 8
    assert 0.0 < summary["privacy"]["epsilon-max"] <= 30.0
    assert json.loads((out / "summary.json").read_text())["seed"] == 42
    assert (out / "plots" / "accuracy_vs_time.png").stat().st_size > 1000
    assert (out / "plots" / "epsilon_distribution.png").stat().st_size > 1000
    lines = (out / "top-k-test.csv").read_text().splitlines()
    assert lines[0] == "device_id,rank,item_id,user,item,title"
    rows = [tuple(int(x) for x in line.split(",")[:3]) for line in lines[1:]]
    assert {r[0] for r in rows} == set(range(8))
    for device in range(8):  # ranks 1..n, n <= 10 (fewer only when fewer items are unseen)
        ranks = [r[1] for r in rows if r[0] == device]
        assert ranks == list(range(1, len(ranks) + 1)) and 1 <= len(ranks) <= 10


def test_real_flower_simulation_sync_completes(tmp_path: Path) -> None:
    # Three actors: more than this machine's cores when it has two (fractional Ray CPUs).
    summary = simulate(_overrides(tmp_path, "ray-sync", mode="sync", num_versions=2), num_actors=3, backend="ray")
    assert summary["aggregation"]["mode"] == "sync"
    assert summary["aggregation"]["versions"] == 2
    assert summary["aggregation"]["staleness-max"] == 0
    assert summary["aggregation"]["updates-applied"] >= 4


def test_ray_and_in_process_backends_give_the_same_numbers(ray_async, tmp_path: Path) -> None:
    tmp, ray_summary = ray_async
    local = simulate(_overrides(tmp, "local-async"), backend="local")
    assert _comparable(local) == _comparable(ray_summary)


def test_every_claimed_epsilon_recomputes_from_the_logged_mechanism(ray_async) -> None:
    tmp, summary = ray_async
    store = RunStore(f"sqlite:///{tmp / 'ray-async' / 'fedrec.db'}")
    try:
        run_id = store.run_ids()[-1]
        records = [r for r in store.privacy_records(run_id) if r.status == "spent"]
        assert records
        by_device: dict[int, list] = {}
        for r in records:
            by_device.setdefault(r.device_id, []).append(r)
        for device, rows in by_device.items():
            acc = RDPAccountant()
            for r in rows:
                acc.history.append((r.noise_multiplier, r.sample_rate, r.steps))
                assert acc.get_epsilon(r.delta) == pytest.approx(r.epsilon, rel=1e-9), device
        assert max(store.device_epsilons(run_id).values()) == pytest.approx(summary["privacy"]["epsilon-max"])
    finally:
        store.close()


def test_devices_refuse_at_their_budget_and_are_never_scheduled_again(tmp_path: Path) -> None:
    summary = simulate(
        _overrides(tmp_path, "budget", epsilon_budget=4.0, num_versions=30, noise_multiplier=1.0), backend="local"
    )
    assert summary["aggregation"]["tasks-refused"] > 0
    assert summary["privacy"]["epsilon-max"] <= 4.0
    store = RunStore(f"sqlite:///{tmp_path / 'budget' / 'fedrec.db'}")
    try:
        tasks = store.tasks(store.run_ids()[-1])
    finally:
        store.close()
    refused_at = {}
    for t in sorted(tasks, key=lambda t: t.finished_at):
        if t.status == "refused":
            refused_at.setdefault(t.device_id, t.finished_at)
    assert refused_at
    for t in tasks:
        if t.device_id in refused_at:
            assert t.dispatched_at < refused_at[t.device_id], "an exhausted device was scheduled again"


def test_each_version_records_the_updates_it_applied_when_the_sync_cohort_exceeds_the_buffer(tmp_path: Path) -> None:
    """A synchronous version applies its whole cohort, however large buffer-size is or is not.

    (The sync preset has a cohort of 100 and a buffer size of 50; the last buffer-size
    staleness values used to be recorded as each version's updates.)
    """
    overrides = _overrides(tmp_path, "cohort", mode="sync", concurrency=6, buffer_size=2, num_versions=2)
    summary = simulate(overrides, backend="local")
    with RunStore(f"sqlite:///{tmp_path / 'cohort' / 'fedrec.db'}") as store:
        (run_id,) = store.run_ids()
        versions = store.versions(run_id)
        tasks = store.tasks(run_id)
    assert [v.version for v in versions] == [1, 2]
    for v in versions:
        # In sync mode every accepted update of the cohort dispatched on version v - 1 is in v.
        cohort = [t for t in tasks if t.base_version == v.version - 1 and t.status == "accepted"]
        assert v.num_updates == len(cohort) > overrides["buffer-size"]
        assert (v.mean_staleness, v.max_staleness) == (0.0, 0)
    assert sum(v.num_updates for v in versions) == summary["aggregation"]["updates-applied"]


def test_same_seed_same_numbers_and_a_new_seed_changes_them(tmp_path: Path) -> None:
    a = simulate(_overrides(tmp_path, "a"), backend="local")
    b = simulate(_overrides(tmp_path, "b"), backend="local")
    c = simulate(_overrides(tmp_path, "c", seed=7), backend="local")
    assert _comparable(a) == _comparable(b)
    assert _comparable(a) != _comparable(c)


def test_reported_epsilon_is_every_devices_true_spending_even_for_lost_tasks(tmp_path: Path) -> None:
    """Dropped tasks still train on the device; the summary must not under-report their epsilon."""
    from client.app import build_client_app
    from client.node_config import store_path
    from server.app import run_federation
    from shared.config import parse_config
    from shared.privacy.accounting import DeviceAccountant
    from shared.privacy.ledger_store import DeviceLedgerStore
    from simulations.local_grid import LocalGrid

    flat = {**_overrides(tmp_path, "lossy", dropout_rate=0.4, num_versions=6), "reproducible-noise": True}
    cfg = parse_config(flat)
    grid = LocalGrid(build_client_app(flat), 8)
    summary = run_federation(grid, cfg)
    assert summary["aggregation"]["tasks-dropped"] > 0
    true_eps = {}
    for node, context in grid._contexts.items():
        # What the device really spent: its own signed ledger, from which its accountant is rebuilt.
        with DeviceLedgerStore(store_path(cfg, context.node_config), device_id=node - 1) as ledger:
            history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries() if e.unit == "record"]
        true_eps[node - 1] = DeviceAccountant("rdp", cfg.privacy.delta, 1e9, history).epsilon() if history else 0.0
    spent = sorted(e for e in true_eps.values() if e > 0)
    assert summary["privacy"]["epsilon-max"] == pytest.approx(max(spent), rel=1e-12)
    assert summary["privacy"]["devices-with-spending"] == len(spent)
    store = RunStore(f"sqlite:///{tmp_path / 'lossy' / 'fedrec.db'}")
    try:
        logged = store.device_epsilons(store.run_ids()[-1])
    finally:
        store.close()
    # The database records each lost task's release too, from its late reply.
    for device, eps in true_eps.items():
        assert logged.get(device, 0.0) == pytest.approx(eps, rel=1e-12), device


def test_secure_aggregation_gives_the_plain_fedavg_model_within_quantization(tmp_path: Path) -> None:
    """Sync mode through SecAgg+ (the server sees only each cohort's sum) equals plain sync FedAvg."""
    import torch

    plain = simulate(_overrides(tmp_path, "plain", mode="sync", num_versions=2), backend="local")
    secure = simulate(
        _overrides(
            tmp_path,
            "secure",
            mode="sync",
            num_versions=2,
            secure_aggregation=True,
            secure_aggregation_protocol="flower-secagg+",
        ),
        backend="local",
    )
    assert secure["aggregation"]["versions"] == 2
    assert secure["aggregation"]["updates-applied"] == plain["aggregation"]["updates-applied"]
    from server.run_store import RunStore
    from server.secagg import quantization_error_bound
    from shared.protocol import PUBLIC_WEIGHT

    a = torch.load(tmp_path / "plain" / "global_model.pt")["params"]
    b = torch.load(tmp_path / "secure" / "global_model.pt")["params"]
    with RunStore(f"sqlite:///{tmp_path / 'plain' / 'fedrec.db'}") as store:
        tasks = [t for t in store.tasks(store.run_ids()[-1]) if t.status == "accepted"]
    # Per version the gap is at most the SecAgg+ quantization bound for that cohort (server
    # SGD with learning rate 1 adds the two versions' mean deltas), with |delta| <= 1 here.
    atol = sum(
        quantization_error_bound(
            [PUBLIC_WEIGHT for t in tasks if t.base_version == v - 1],
            1.0,
            clipping_range=8.0,
            quantization_range=2**22,
            max_weight=float(PUBLIC_WEIGHT),
        )
        for v in (1, 2)
    )
    assert atol < 1e-2
    differs = False
    for key in a:
        differs |= not torch.equal(a[key], b[key])
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0)
    assert differs, "quantization leaves a trace: identical models would mean SecAgg+ was bypassed"
    # The devices' ledgers reached the server through the post-round query and verify.
    from shared.entrypoint import main

    assert main(["audit", str(tmp_path / "secure")]) == 0
    assert secure["privacy"]["epsilon-max"] == pytest.approx(plain["privacy"]["epsilon-max"])


def test_secure_aggregation_withholds_a_sum_whose_contributor_ledger_fails(tmp_path: Path) -> None:
    """A SecAgg+ contributor whose ledger does not verify: the masked sum is never applied.

    Device 0 answers the post-round ledger query with no entries (as a device hiding its
    spending would). Its update cannot be taken back out of the cohort's sum, so every
    cohort it joins is withheld, it is retired after ``max-device-failures`` rejections,
    and the honest contributors' spending is still recorded from their verified entries.
    """
    from flwr.app import MessageType

    from client.app import build_client_app
    from server.app import run_federation
    from shared.config import parse_config, to_flat
    from shared.protocol import LEDGER_REPLY, Ledger, ProtocolError, build_identity, parse_identity, parse_ledger
    from simulations.local_grid import LocalGrid

    class HidingDeviceGrid(LocalGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            replies = list(super().pull_messages(message_ids))
            for reply in replies:
                hiding = reply.metadata.src_node_id == 1 and reply.metadata.message_type == MessageType.QUERY
                if not hiding or reply.has_error():
                    continue
                try:
                    parse_ledger(reply, kind=LEDGER_REPLY.kind)
                except ProtocolError:
                    continue  # a bare identity (discovery), not a ledger reply
                # The same identity, with no ledger entries at all.
                reply.content = build_identity(parse_identity(reply, kind=LEDGER_REPLY.kind), Ledger(()))
            return replies

    cfg = parse_config(
        # Exact evaluation: a private one would bring the hidden entries in its own reply.
        _overrides(
            tmp_path,
            "hiding",
            mode="sync",
            concurrency=8,
            num_versions=2,
            secure_aggregation=True,
            secure_aggregation_protocol="flower-secagg+",
            evaluation="exact",
        )
    )
    grid = HidingDeviceGrid(build_client_app(to_flat(cfg)), 8)
    summary = run_federation(grid, cfg)
    agg = summary["aggregation"]
    assert agg["versions"] == 2
    assert agg["updates-rejected-ledger"] == cfg.aggregation.max_device_failures
    assert agg["updates-withheld"] >= cfg.aggregation.max_device_failures
    assert agg["devices-retired"] == 1
    with RunStore(f"sqlite:///{tmp_path / 'hiding' / 'fedrec.db'}") as store:
        (run_id,) = store.run_ids()
        tasks = store.tasks(run_id)
        spent = {r.task_id for r in store.privacy_records(run_id) if r.status == "spent"}
    hidden = [t for t in tasks if t.device_id == 0]
    assert hidden and all(t.status == "rejected-ledger" and t.applied_version is None for t in hidden)
    withheld = [t for t in tasks if t.status == "withheld"]
    assert all(t.applied_version is None and t.device_id != 0 for t in withheld)
    # A withheld cohort applies nothing: every applied version comes from a cohort without device 0.
    for t in tasks:
        if t.applied_version is not None:
            cohort = [u for u in tasks if u.base_version == t.base_version and u.dispatched_at == t.dispatched_at]
            assert all(u.device_id != 0 for u in cohort)
    # The honest devices spent privacy in the withheld rounds too, and the server recorded it.
    assert {t.task_id for t in withheld} <= spent
    assert not {t.task_id for t in hidden} & spent


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_cpus_per_actor_gives_flower_a_pool_of_exactly_the_asked_size(cpus: int) -> None:
    from simulations.runner import _cpus_per_actor

    for actors in range(1, 33):
        per_actor = _cpus_per_actor(cpus, actors)
        # flwr's pool_size_from_resources: int(node CPUs / client num_cpus)
        assert int(cpus / per_actor) == actors, (cpus, actors, per_actor)
    with pytest.raises(ValueError, match="at least one actor"):
        _cpus_per_actor(cpus, 0)


def test_a_device_that_declines_evaluations_is_left_out_of_the_metrics_and_keeps_training(tmp_path: Path) -> None:
    from client.app import build_client_app
    from server.app import run_federation
    from shared.config import parse_config, to_flat
    from shared.data.partition import prepare_partitions
    from simulations.local_grid import LocalGrid

    cfg = parse_config(_overrides(tmp_path, "declines"))
    info = prepare_partitions(cfg.data)
    grid = LocalGrid(build_client_app(to_flat(cfg)), info.num_devices)
    # Device 0 behaves as a deployed device whose own policy answers no evaluation at all.
    node = grid._contexts[1].node_config
    node["store"] = str(tmp_path / "device-0.db")
    node["max-evaluations-per-day"] = "0"
    summary = run_federation(grid, cfg)
    assert summary["final"]["users"] == info.num_devices - 1
    with RunStore(f"sqlite:///{tmp_path / 'declines' / 'fedrec.db'}") as store:
        (run_id,) = store.run_ids()
        applied = {t.device_id for t in store.tasks(run_id) if t.status == "accepted"}
        evaluated = [e.users for e in store.evaluations(run_id)]
    assert 0 in applied  # declining evaluations did not retire it
    assert evaluated and all(users < info.num_devices for users in evaluated)


def test_default_actors_is_one_more_than_the_cores_as_far_as_memory_allows() -> None:
    from simulations.runner import default_actors

    assert default_actors(cpus=2, memory_gib=24.0) == 3
    assert default_actors(cpus=64, memory_gib=32.0) == 30  # 1 GiB each after 2 GiB reserved
    assert default_actors(cpus=8, memory_gib=2.5) == 1
    assert default_actors() >= 1  # this machine


def test_a_late_reply_is_verified_and_recorded_even_when_its_lost_task_is_no_longer_known(tmp_path: Path) -> None:
    """A device with two lost tasks: each late reply delivers its signed entry, whatever task it answers."""
    from flwr.app import ArrayRecord, Message

    from client.app import build_client_app
    from server.federation import Federation
    from server.privacy_store import PrivacyStore
    from shared.config import parse_config, to_flat
    from shared.data.partition import prepare_partitions
    from shared.models.factory import build_model
    from shared.protocol import TRAIN_TASK, TrainTask, build_train_task
    from simulations.local_grid import LocalGrid

    cfg = parse_config(_overrides(tmp_path, "late"))
    info = prepare_partitions(cfg.data)
    model = build_model(cfg.model, info.num_items, 1, seed=cfg.seed)
    initial = {k: v.detach().clone() for k, v in model.global_state().items()}
    grid = LocalGrid(build_client_app(to_flat(cfg)), info.num_devices)
    (tmp_path / "late").mkdir()
    url = f"sqlite:///{tmp_path / 'late' / 'fedrec.db'}"
    with RunStore(url) as runs, PrivacyStore(url) as privacy:
        fed = Federation(grid, cfg, info.num_devices, info.num_items, initial, runs, privacy_store=privacy)
        fed.driver.discover(info.num_devices, timeout=30.0)
        fed.intake.register(0, fed.driver.public_keys.get(0))
        replies = []
        for task_id in (1, 2):  # both dispatched before the server held any entry of device 0
            task = TrainTask(ArrayRecord(initial), 0, task_id, run=fed.run_label, ledger_head=-1)
            msg = Message(build_train_task(task), dst_node_id=1, message_type=TRAIN_TASK.message_type)
            replies.append(grid.send_and_receive([msg], timeout=30.0)[0])  # type: ignore[index]
        # The server keeps no lost task to match: a late reply's entries name their own tasks.
        assert fed.driver.on_late_reply == fed.spending.take_late_reply
        fed.spending.take_late_reply(0, replies[0])
        fed.spending.take_late_reply(0, replies[1])
        stored = privacy.entries(0)
        assert [e.task_id for e in stored] == [1, 2]
        assert fed.spending.device_epsilon[0] == pytest.approx(stored[-1].epsilon)
        spending = [r.task_id for r in runs.privacy_records(fed.run_id, 0) if r.status == "spent"]
    assert spending == [1, 2]


def test_a_reply_lost_to_a_real_timeout_still_gets_its_ledger_to_the_server(tmp_path: Path) -> None:
    """The device trained and signed, but its reply never arrived: the final ledger query fetches it."""
    from flwr.app import MessageType

    from client.app import build_client_app
    from client.node_config import store_path
    from server.app import run_federation
    from server.privacy_store import PrivacyStore
    from shared.config import parse_config, to_flat
    from shared.privacy.ledger_store import DeviceLedgerStore
    from simulations.local_grid import LocalGrid

    class LosingGrid(LocalGrid):
        lost: list[int] = []

        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            replies = []
            for reply in super().pull_messages(message_ids):
                first_train = reply.metadata.message_type == MessageType.TRAIN and not self.lost
                if first_train and reply.metadata.src_node_id == 1 and not reply.has_error():
                    self.lost.append(1)  # executed on the device, never delivered
                    continue
                replies.append(reply)
            return replies

    cfg = parse_config(_overrides(tmp_path, "timeout", wall_timeout=1.0))
    grid = LosingGrid(build_client_app(to_flat(cfg)), 8)
    summary = run_federation(grid, cfg)
    assert grid.lost == [1] and summary["aggregation"]["tasks-timed-out"] >= 1
    assert summary["privacy"]["devices-unreconciled"] == 0
    device = DeviceLedgerStore(store_path(cfg, grid._contexts[1].node_config), device_id=0)
    signed = [(e.seq, e.entry_hash) for e in device.entries()]
    with PrivacyStore(f"sqlite:///{tmp_path / 'timeout' / 'fedrec.db'}") as store:
        held = [(e.seq, e.entry_hash) for e in store.entries(0)]
    assert signed and held == signed  # the timed-out task's entry included
    assert summary["privacy"]["epsilon-max"] >= device.entries()[-1].epsilon
