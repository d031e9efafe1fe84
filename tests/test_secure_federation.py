"""fedrec's secure noisy sum in whole runs (in-process Flower ClientApps): async and sync, ledgers, audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import MessageType

from server.run_store import RunStore
from shared.config import ConfigError, parse_config
from shared.privacy.ledger import SKELLAM_MECHANISM
from shared.secure_sum.release import check_secure_sum_config
from simulations.runner import simulate


def _overrides(tmp: Path, name: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "dataset": "synthetic",
        "synthetic-users": 16,
        "synthetic-items": 80,
        "synthetic-interactions": 20,
        "cache-dir": str(tmp / "cache"),
        "embedding-dim": 8,
        "mlp-layers": "8",
        "num-negatives": 4,
        "local-steps": 3,
        "batch-size": 4,
        "concurrency": 12,
        "buffer-size": 4,
        "num-versions": 3,
        "eval-every": 3,
        "eval-devices": 8,
        "output-dir": str(tmp / name),
        "epsilon-budget": 40.0,
        "secure-aggregation": True,
        "secure-sum-min-contributors": 3,
        "secure-sum-cohort-size": 6,
        "dropout-rate": 0.0,
    }
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return base


def _secure_entries(out: Path) -> list[Any]:
    from shared.privacy.ledger_store import DeviceLedgerStore

    entries = []
    for path in sorted((out / "devices").glob("*/*.db")) + sorted((out / "devices").glob("*.db")):
        store = DeviceLedgerStore(path)
        try:
            entries.extend(e for e in store.entries() if e.mechanism == SKELLAM_MECHANISM)
        finally:
            store.close()
    return entries


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_secure_run_applies_noisy_sums_and_audits_clean(tmp_path: Path, mode: str) -> None:
    summary = simulate(_overrides(tmp_path, mode, mode=mode), backend="local")
    agg = summary["aggregation"]
    assert agg["versions"] == 3
    assert agg["updates-applied"] >= 3 * 3  # at least min-contributors per sum
    with RunStore(f"sqlite:///{tmp_path / mode / 'fedrec.db'}") as store:
        (run_id,) = store.run_ids()
        tasks = store.tasks(run_id)
        spent = [r for r in store.privacy_records(run_id) if r.status == "spent"]
    accepted = [t for t in tasks if t.status == "accepted"]
    # Every accepted task's release is on the server's books as a secure-sum release.
    secure_rows = {(r.device_id, r.task_id) for r in spent if r.noise_multiplier > 0 and r.steps == 3}
    assert {(t.device_id, t.task_id) for t in accepted} <= secure_rows
    if mode == "sync":
        assert all(t.staleness == 0 for t in accepted)
    from shared.entrypoint import main

    assert main(["audit", str(tmp_path / mode)]) == 0


def test_a_device_whose_ledger_fails_is_excluded_from_the_sum(tmp_path: Path) -> None:
    """Device 0 sends its masked vector with no ledger entries: it is left out, the others are summed."""
    from client.app import build_client_app
    from server.app import run_federation
    from shared.config import to_flat
    from shared.protocol import SECURE_MASKED, Ledger, build_secure_reply, parse_secure_reply, secure_reply_kind
    from simulations.local_grid import LocalGrid

    class HidingDeviceGrid(LocalGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            replies = list(super().pull_messages(message_ids))
            for reply in replies:
                if reply.metadata.src_node_id != 1 or reply.has_error():
                    continue
                if not reply.metadata.message_type.startswith(MessageType.TRAIN):
                    continue
                if secure_reply_kind(reply) == SECURE_MASKED.kind:
                    masked = parse_secure_reply(reply, SECURE_MASKED)
                    reply.content = build_secure_reply(masked, Ledger(()))
            return replies

    cfg = parse_config(_overrides(tmp_path, "hiding", mode="sync", concurrency=8, num_versions=2))
    grid = HidingDeviceGrid(build_client_app(to_flat(cfg)), 16)
    summary = run_federation(grid, cfg)
    assert summary["aggregation"]["versions"] == 2
    assert summary["aggregation"]["updates-rejected-ledger"] >= 1
    with RunStore(f"sqlite:///{tmp_path / 'hiding' / 'fedrec.db'}") as store:
        (run_id,) = store.run_ids()
        tasks = store.tasks(run_id)
    hidden = [t for t in tasks if t.device_id == 0 and t.status not in ("late", "dropped")]
    assert hidden and all(t.status == "rejected-ledger" and t.applied_version is None for t in hidden)
    assert any(t.status == "accepted" for t in tasks if t.device_id != 0)


def test_a_secure_config_that_could_wrap_around_is_refused_before_the_run(tmp_path: Path) -> None:
    cfg = parse_config(_overrides(tmp_path, "wrap", secure_sum_bits=16))
    with pytest.raises(ConfigError, match="secure-sum-bits.*secure-sum-scale.*clip-norm.*secure-sum-max-records"):
        check_secure_sum_config(cfg, 80)
    with pytest.raises(ConfigError, match="secure-sum-bits"):
        simulate(_overrides(tmp_path, "wrap", secure_sum_bits=16), backend="local")
    assert not (tmp_path / "wrap").exists()  # refused before anything was written


def test_secure_config_refuses_what_it_cannot_guarantee(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs dp = true"):
        parse_config(_overrides(tmp_path, "x", dp=False, evaluation="exact"))
    with pytest.raises(ConfigError, match="accountant"):
        parse_config(_overrides(tmp_path, "x", accountant="prv"))
    with pytest.raises(ConfigError, match="reproducible-noise"):
        parse_config(_overrides(tmp_path, "x", reproducible_noise=True))
    with pytest.raises(ConfigError, match="secure-sum-min-contributors"):
        parse_config(_overrides(tmp_path, "x", secure_sum_min_contributors=20))
    with pytest.raises(ConfigError, match="secure-sum-neighbours"):
        parse_config(_overrides(tmp_path, "x", secure_sum_neighbours=3))


def test_a_secure_run_on_flowers_ray_runtime_keeps_each_session_on_its_device(tmp_path: Path) -> None:
    """Under Ray, each round of a session may run in another actor: the session travels in the node's context."""
    summary = simulate(_overrides(tmp_path, "ray"), num_actors=2, backend="ray")
    assert summary["aggregation"]["versions"] == 3
    assert summary["aggregation"]["tasks-failed"] == 0
    assert summary["aggregation"]["updates-applied"] >= 9
    from shared.entrypoint import main

    assert main(["audit", str(tmp_path / "ray")]) == 0


@pytest.mark.parametrize(("mode", "availability"), [("async", 0.8), ("sync", 0.8), ("async", 0.25)])
def test_a_secure_run_ends_when_too_few_devices_are_left_to_form_a_sum(
    tmp_path: Path, mode: str, availability: float
) -> None:
    """Budgets of one task each: once the devices left cannot form a sum, the run stops (no endless retries).

    At availability 0.25 more devices than min-contributors may stay idle while too few are
    ever online together: the run must still end.
    """
    budget = 6.0  # one secure task costs about 4.6 here, a second would pass 6
    summary = simulate(
        _overrides(
            tmp_path,
            mode,
            mode=mode,
            num_versions=50,
            epsilon_budget=budget,
            eval_every=50,
            availability_mean=availability,
        ),
        backend="local",
    )
    agg = summary["aggregation"]
    assert 1 <= agg["versions"] < 50
    assert agg["tasks-refused"] >= 1
    assert summary["privacy"]["epsilon-max"] <= budget
