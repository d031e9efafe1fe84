"""The virtual-time FedBuff/FedAvg scheduler, driven directly (it has no transport)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.aggregation import constant_staleness, polynomial_staleness
from server.fleet import Fleet
from server.scheduler import AppliedVersion, DeviceStatus, Failure, Refusal, Scheduler, Update
from shared.config import AggregationConfig, FleetConfig

PARAMS = {"w": torch.zeros(3)}


def _scheduler(mode: str = "async", devices: int = 20, **kw: object) -> Scheduler:
    user_level = kw.pop("user_level", None)
    cfg = AggregationConfig(
        mode=mode,
        concurrency=kw.pop("concurrency", 5),
        buffer_size=kw.pop("buffer_size", 2),
        num_versions=kw.pop("num_versions", 10),
        **kw,
    )  # type: ignore[arg-type]
    fleet = Fleet(devices, FleetConfig(dropout_rate=0.0, availability_mean=0.9), seed=7)
    fn = polynomial_staleness(0.5) if mode == "async" else constant_staleness
    return Scheduler(cfg, fleet, local_steps=5, initial=PARAMS, staleness_fn=fn, seed=3, user_level=user_level)  # type: ignore[arg-type]


def _run(s: Scheduler, outcome=lambda task: Update({"w": torch.ones(3)}, 0.5), limit: int = 10_000):
    log = []
    while not s.finished and limit:
        limit -= 1
        for _ in s.dispatch():
            assert s.in_flight <= s.cfg.concurrency
        task = s.next_due()
        if task is None:
            continue
        log.append(s.complete(task, outcome(task)))
    return log


def test_tasks_complete_in_virtual_time_order_and_versions_advance() -> None:
    s = _scheduler()
    log = _run(s)
    times = [c.task.finish_at for c in log]
    assert times == sorted(times)
    assert s.version == 10
    applied = [c for c in log if c.applied_version is not None]
    assert [c.applied_version for c in applied] == list(range(1, 11))
    assert all(c.status == "accepted" for c in log)


def test_same_seed_same_schedule() -> None:
    a = [(c.task.device_id, c.task.base_version, c.task.finish_at) for c in _run(_scheduler())]
    b = [(c.task.device_id, c.task.base_version, c.task.finish_at) for c in _run(_scheduler())]
    assert a == b


def test_sync_mode_has_no_staleness_and_one_version_per_cohort() -> None:
    s = _scheduler("sync", concurrency=4, num_versions=3)
    log = _run(s)
    assert s.version == 3
    assert {c.staleness for c in log} == {0}
    assert len(log) == 12  # three cohorts of four
    # A round ends with its slowest device: the next cohort starts no earlier.
    first_round_end = max(c.task.finish_at for c in log[:4])
    assert min(c.task.dispatched_at for c in log[4:]) == first_round_end


def test_stale_updates_beyond_the_limit_are_rejected() -> None:
    s = _scheduler(concurrency=10, buffer_size=1, max_staleness=2, num_versions=30)
    log = _run(s)
    rejected = [c for c in log if c.status == "rejected-stale"]
    assert rejected and all(c.staleness > 2 for c in rejected)
    assert all(c.staleness <= 2 for c in log if c.status == "accepted")


def test_refusing_device_is_never_scheduled_again() -> None:
    s = _scheduler(num_versions=40)
    refused_at: dict[int, float] = {}

    def outcome(task):
        if task.device_id == 4:
            return Refusal("budget")
        return Update({"w": torch.ones(3)}, 0.5)

    log = _run(s, outcome)
    for c in log:
        if c.status == "refused":
            refused_at.setdefault(c.task.device_id, c.task.finish_at)
    assert 4 in refused_at
    assert sum(c.status == "refused" for c in log) == 1
    later = [c for c in log if c.task.device_id == 4 and c.task.dispatched_at >= refused_at[4]]
    assert later == []


def test_failures_never_hang_and_do_not_count_as_updates() -> None:
    s = _scheduler(num_versions=5)
    flip = {"n": 0}

    def outcome(task):
        flip["n"] += 1
        return Failure("failed", "boom") if flip["n"] % 2 else Update({"w": torch.ones(3)}, 0.1)

    log = _run(s, outcome)
    assert s.version == 5
    assert sum(c.status == "failed" for c in log) >= 5


def test_everyone_exhausted_finishes_the_run() -> None:
    s = _scheduler(devices=6, num_versions=100)
    log = _run(s, lambda task: Refusal("budget"))
    assert s.finished
    assert s.version == 0
    assert {c.task.device_id for c in log} == set(range(6))


def test_lost_tasks_complete_at_the_timeout() -> None:
    cfg = AggregationConfig(concurrency=4, buffer_size=2, num_versions=40, task_timeout=100.0)
    fleet = Fleet(8, FleetConfig(dropout_rate=0.5), seed=1)
    s = Scheduler(cfg, fleet, 5, PARAMS, polynomial_staleness(0.5), seed=0)
    log = _run(s)
    lost = [c for c in log if c.status == "dropped"]
    assert lost
    assert all(abs(c.task.finish_at - c.task.dispatched_at - 100.0) < 1e-9 for c in lost)


def test_async_reaches_versions_sooner_than_sync_on_a_long_tailed_fleet() -> None:
    a = _scheduler("async", devices=100, concurrency=20, buffer_size=10, num_versions=20)
    s = _scheduler("sync", devices=100, concurrency=20, num_versions=10)
    _run(a)
    _run(s)
    # Equal numbers of updates folded (200), async needs far less simulated time.
    assert a.now < s.now


def test_config_is_not_mutated() -> None:
    s = _scheduler()
    before = dataclasses.asdict(s.cfg)
    _run(s)
    assert dataclasses.asdict(s.cfg) == before


def test_a_device_failing_repeatedly_is_retired() -> None:
    broken = {0, 1, 2}

    def outcome(task):
        if task.device_id in broken:
            return Failure("failed", "device error")
        return Update({"w": torch.ones(3)}, None)

    s = _scheduler(devices=6, concurrency=3, num_versions=10_000, max_device_failures=2)
    log = _run(s, outcome, limit=5_000)
    for device in broken:
        failures = [c for c in log if c.task.device_id == device]
        assert len(failures) == 2, "retired after exactly max-device-failures consecutive failures"
        assert s.status[device] is DeviceStatus.RETIRED
    assert all(s.status[d] is not DeviceStatus.RETIRED for d in range(3, 6))


def test_a_fleet_that_always_fails_ends_the_run_instead_of_looping() -> None:
    s = _scheduler(devices=5, concurrency=3, num_versions=10, max_device_failures=3)
    log = _run(s, lambda task: Failure("failed", "broken build"), limit=1_000)
    assert s.finished and s.version == 0
    assert len(log) == 15 and set(s.status) == {DeviceStatus.RETIRED}


def test_success_resets_the_failure_count() -> None:
    seen: dict[int, int] = {}

    def outcome(task):  # every device alternates failure and success: never retired
        seen[task.device_id] = seen.get(task.device_id, 0) + 1
        if seen[task.device_id] % 2:
            return Failure("failed", "flaky")
        return Update({"w": torch.ones(3)}, None)

    s = _scheduler(devices=6, concurrency=3, num_versions=5, max_device_failures=2)
    _run(s, outcome)
    assert s.version == 5
    assert DeviceStatus.RETIRED not in s.status


def test_an_unresponsive_device_is_retired_at_once() -> None:
    """After a real timeout the device may still be busy: it must never get a second task."""

    def outcome(task):
        if task.device_id == 0:
            return Failure("timeout", "no reply within wall-timeout")
        return Update({"w": torch.ones(3)}, None)

    s = _scheduler(devices=4, concurrency=2, num_versions=20, max_device_failures=5)
    log = _run(s, outcome)
    assert [c.status for c in log if c.task.device_id == 0] == ["timeout"]
    assert s.status[0] is DeviceStatus.RETIRED


def test_the_renyi_filter_stops_each_device_exactly_at_its_user_level_budget() -> None:
    """Sync mode (no staleness: every weight is 1): each device takes part in exactly the number of
    full-weight releases its budget admits, is then never scheduled, and no epsilon exceeds the budget."""
    from server.user_level import UserLevelMechanism
    from shared.config import PrivacyConfig
    from shared.privacy.user_level import gaussian_rdp

    privacy = PrivacyConfig(user_dp=True, user_noise_multiplier=3.0, user_epsilon_budget=4.0, reproducible_noise=True)
    mech = UserLevelMechanism(privacy, seed=0)
    allowed = int(mech.filter.rdp_budget // gaussian_rdp(mech.order, 3.0))
    assert allowed >= 2
    s = _scheduler("sync", devices=6, concurrency=6, num_versions=1000, user_level=mech)
    log = _run(s)
    assert s.finished
    per_device = {d: sum(c.status == "accepted" for c in log if c.task.device_id == d) for d in range(6)}
    assert set(per_device.values()) == {allowed}
    assert set(s.status) == {DeviceStatus.USER_EXHAUSTED}
    for d in range(6):
        assert mech.filter.history(d) == [1.0] * allowed
        assert mech.filter.epsilon(d) <= 4.0
        assert not mech.filter.admits(d, 1.0)  # one more release would have exceeded it


def test_user_level_aggregation_clips_and_adds_the_configured_noise() -> None:
    from server.user_level import UserLevelMechanism
    from shared.config import PrivacyConfig

    privacy = PrivacyConfig(
        user_dp=True, user_clip_norm=0.5, user_noise_multiplier=2.0, user_epsilon_budget=50.0, reproducible_noise=True
    )
    big = {"w": torch.full((3,), 100.0)}
    s = _scheduler("sync", devices=4, concurrency=4, num_versions=1, user_level=UserLevelMechanism(privacy, seed=1))
    log = _run(s, lambda task: Update(big, None))
    k = sum(c.status == "accepted" for c in log)  # the cohort (devices online at dispatch)
    assert k >= 2
    # Each update clipped to norm 0.5 along (1,1,1); the sum of k gets N(0, (2 * 0.5)^2) per
    # coordinate from the mechanism's generator, then is divided by k.
    from shared.privacy.user_level import add_gaussian_noise

    clipped = torch.full((3,), 0.5 / 3**0.5, dtype=torch.float64)
    noise = add_gaussian_noise({"w": torch.zeros(3, dtype=torch.float64)}, 2.0, 0.5, torch.Generator().manual_seed(1))[
        "w"
    ]
    assert noise.abs().max() > 0
    torch.testing.assert_close(s.params["w"].double(), (k * clipped + noise) / k, atol=1e-6, rtol=0)


def test_a_secure_cohort_with_a_rejected_contributor_applies_nothing_and_blames_only_it() -> None:
    s = _scheduler(mode="sync", concurrency=4)
    tasks = s.dispatch()
    ids = {t.device_id for t in tasks}
    bad = min(ids)
    delta = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="must not be applied"):
        s.complete_cohort(tasks, delta, ids, rejected={bad})
    with pytest.raises(ValueError, match="only contributors"):
        s.complete_cohort(tasks, None, ids - {bad}, rejected={bad})
    log = s.complete_cohort(tasks, None, ids, rejected={bad})
    assert s.version == 0 and torch.equal(s.params["w"], PARAMS["w"])
    status = {c.task.device_id: c.status for c in log}
    assert status[bad] == "rejected-ledger"
    assert {status[d] for d in ids - {bad}} == {"withheld"}
    assert all(c.applied_version is None for c in log)
    assert s._consecutive_failures[bad] == 1
    assert all(s._consecutive_failures[d] == 0 for d in ids - {bad})


def _applied_versions(s: Scheduler) -> list[tuple[AppliedVersion, list[int]]]:
    """Run ``s``; each new version as the scheduler reports it, with the staleness of the updates
    accepted since the version before (what that version must have applied)."""
    out: list[tuple[AppliedVersion, list[int]]] = []
    since: list[int] = []
    while not s.finished:
        s.dispatch()
        task = s.next_due()
        if task is None:
            continue
        c = s.complete(task, Update({"w": torch.ones(3)}, 0.5))
        if c.status == "accepted":
            assert c.staleness is not None
            since.append(c.staleness)
        if c.applied_version is not None:
            assert s.last_applied is not None and s.last_applied.version == c.applied_version
            out.append((s.last_applied, since))
            since = []
    return out


def test_a_sync_version_reports_its_whole_cohort_even_when_the_cohort_exceeds_the_buffer_size() -> None:
    """Sync FedAvg applies one cohort per version, whatever buffer-size says (the sync preset: 100 vs 50)."""
    s = _scheduler("sync", devices=12, concurrency=8, buffer_size=2, num_versions=3)
    versions = _applied_versions(s)
    assert [v.version for v, _ in versions] == [1, 2, 3]
    for applied, accepted in versions:
        assert len(applied.staleness) == len(accepted) > s.cfg.buffer_size
        assert set(applied.staleness) == {0}


def test_a_sync_version_smaller_than_the_buffer_reports_only_its_own_updates() -> None:
    s = _scheduler("sync", devices=12, concurrency=3, buffer_size=50, num_versions=3)
    for applied, accepted in _applied_versions(s):
        assert list(applied.staleness) == accepted and len(accepted) <= 3


def test_an_async_version_reports_the_staleness_of_its_buffer() -> None:
    s = _scheduler(concurrency=6, buffer_size=3, num_versions=8)
    versions = _applied_versions(s)
    assert len(versions) == 8
    for applied, accepted in versions:
        assert list(applied.staleness) == accepted and len(accepted) == 3
    assert [x for v, _ in versions for x in v.staleness] == s.applied_staleness


def test_a_secure_cohort_reports_each_contributor() -> None:
    s = _scheduler(mode="sync", concurrency=4)
    tasks = s.dispatch()
    ids = {t.device_id for t in tasks}
    s.complete_cohort(tasks, {"w": torch.ones(3)}, ids)
    assert s.last_applied is not None
    assert (s.last_applied.version, s.last_applied.staleness) == (1, (0,) * len(ids))
