"""The one-run empirical privacy audit: its statistics, its ceiling, and a small real federation
with canaries, run honestly and with a mechanism broken on purpose."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import special

from server.audit.empirical import (
    AuditResult,
    audit_ceiling,
    best_lower_bound,
    guesses_from_scores,
    one_run_lower_bound,
    p_value,
    p_value_pure,
)

# ------------------------------------------------------------------------- statistics


def test_all_correct_bound_grows_with_the_number_of_guesses() -> None:
    bounds = [one_run_lower_bound(r, r, delta=1e-5, num_canaries=1000) for r in (10, 30, 100, 300, 1000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] > 0.5 and bounds[-1] > 5.0


def test_all_correct_pure_bound_matches_the_closed_form() -> None:
    # r = v = 10, δ = 0: reject while q^10 <= 0.05, so q* = 0.05^(1/10) and ε* = logit(q*).
    expected = float(special.logit(0.05 ** (1 / 10)))
    assert one_run_lower_bound(10, 10, delta=0.0) == pytest.approx(expected, abs=1e-6)
    assert p_value_pure(10, 10, expected) == pytest.approx(0.05, rel=1e-6)


def test_half_correct_gives_no_evidence() -> None:
    assert one_run_lower_bound(1000, 500, delta=1e-5, num_canaries=1000) == 0.0
    assert one_run_lower_bound(1000, 480, delta=0.0) == 0.0
    assert one_run_lower_bound(0, 0, delta=1e-5, num_canaries=10) == 0.0
    assert one_run_lower_bound(1000, 530, delta=1e-5, num_canaries=1000) < 0.1


def test_bound_is_monotone_in_correct_guesses() -> None:
    bounds = [one_run_lower_bound(200, v, delta=1e-5, num_canaries=500) for v in range(90, 201, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > 3.0


def test_delta_term_only_weakens_the_bound() -> None:
    assert p_value(50, 45, 1.0, 0.0) == pytest.approx(p_value_pure(50, 45, 1.0))
    assert p_value(50, 45, 1.0, 1e-3, num_canaries=1000) > p_value_pure(50, 45, 1.0)
    pure = one_run_lower_bound(100, 90, delta=0.0, num_canaries=1000)
    approx = one_run_lower_bound(100, 90, delta=1e-4, num_canaries=1000)
    more_canaries = one_run_lower_bound(100, 90, delta=1e-4, num_canaries=10_000)
    assert pure > approx > more_canaries > 0.0


def test_invalid_counts_are_rejected() -> None:
    with pytest.raises(ValueError):
        one_run_lower_bound(10, 11, delta=0.0)
    with pytest.raises(ValueError):
        one_run_lower_bound(10, 5, delta=0.0, num_canaries=5)
    with pytest.raises(ValueError):
        one_run_lower_bound(10, 5, delta=0.0, confidence=1.0)


def _randomized_response_bound(rng: np.random.Generator, m: int, epsilon: float, delta: float) -> float:
    correct = int((rng.random(m) < special.expit(epsilon)).sum())
    return one_run_lower_bound(m, correct, delta=delta, num_canaries=m)


def test_randomized_response_bound_stays_below_its_epsilon() -> None:
    rng = np.random.default_rng(7)
    epsilon = 1.0
    bounds = np.array([_randomized_response_bound(rng, 500, epsilon, 1e-5) for _ in range(200)])
    # The bound exceeds the true ε with probability <= 5%; allow sampling slack.
    assert (bounds > epsilon).mean() <= 0.10
    assert np.median(bounds) > 0.5  # and it is not vacuous


def test_randomized_response_bound_is_tight_for_many_canaries() -> None:
    rng = np.random.default_rng(11)
    bound = _randomized_response_bound(rng, 200_000, 1.0, 1e-6)
    assert 0.95 < bound < 1.05


def test_guesses_from_scores_picks_extremes_and_skips_unobserved() -> None:
    scores = np.array([0.5, np.nan, 3.0, -1.0, 2.0, 0.0])
    assert guesses_from_scores(scores, 2, 1).tolist() == [0, 0, 1, -1, 1, 0]
    assert guesses_from_scores(scores, 0, 0).tolist() == [0] * 6
    capped = guesses_from_scores(scores, 4, 4)  # 5 finite scores: 4 positive, 1 negative
    assert (capped == 1).sum() == 4 and (capped == -1).sum() == 1 and capped[1] == 0


def test_best_lower_bound_pays_for_its_grid() -> None:
    truth = np.array([True] * 60 + [False] * 60)
    scores = np.where(truth, 1.0, -1.0) + np.linspace(0, 0.1, 120)
    single = best_lower_bound(scores, truth, 1e-5, ks=[(40, 0)])
    assert isinstance(single, AuditResult)
    assert (single.num_guesses, single.num_correct, single.num_canaries) == (40, 40, 120)
    assert single.epsilon_lower_bound == pytest.approx(one_run_lower_bound(40, 40, 1e-5, 0.95, 120))
    grid = best_lower_bound(scores, truth, 1e-5, ks=[(40, 0), (10, 0), (5, 0), (1, 0)])
    # Same best guesses, but tested at 0.05 / 4: a smaller bound.
    assert grid.k_plus == 40 and grid.epsilon_lower_bound < single.epsilon_lower_bound
    both = best_lower_bound(scores, truth, 1e-5)  # default grid, fixed before seeing the truth
    assert both.epsilon_lower_bound > 1.0 and both.confidence == 0.95


def test_scores_independent_of_truth_rarely_give_a_positive_bound() -> None:
    rng = np.random.default_rng(3)
    bounds = [
        best_lower_bound(rng.normal(size=400), rng.random(400) < 0.5, 1e-5).epsilon_lower_bound for _ in range(100)
    ]
    assert np.mean(np.array(bounds) > 0) <= 0.10


# ----------------------------------------------------------------------- ceiling


def test_ceiling_of_one_canary_per_device_is_below_the_default_epsilon() -> None:
    # The old design: 943 canaries at δ = 1e-5 could never certify the accounted ~7.9.
    assert audit_ceiling(943, 1e-5) == pytest.approx(4.256, abs=0.01)


def test_ceiling_grows_with_canaries_then_the_delta_term_caps_it() -> None:
    ceilings = [audit_ceiling(m, 1e-5) for m in (240, 943, 1920, 7544)]
    assert all(a < b for a, b in zip(ceilings, ceilings[1:], strict=False))
    # 2 m δ grows as fast as the guesses: with the default grid the ceiling stays near 5.
    assert audit_ceiling(40_000, 1e-5) < math.log(0.05 / 2e-5) < 7.9
    assert audit_ceiling(1920, 1e-5, num_scored=0) == 0.0
    assert audit_ceiling(1920, 1e-5, num_scored=960) < audit_ceiling(1920, 1e-5)
    with pytest.raises(ValueError):
        audit_ceiling(10, 1e-5, num_scored=11)


def test_ceiling_is_what_a_perfect_attacker_gets() -> None:
    truth = np.arange(1000) % 2 == 0
    perfect = best_lower_bound(truth.astype(float), truth, 1e-5).epsilon_lower_bound
    assert perfect == pytest.approx(audit_ceiling(1000, 1e-5), abs=1e-9)


def test_verdicts_and_exit_codes() -> None:
    from simulations.canary_audit import audit_exit_code, audit_verdict

    assert audit_verdict(3.0, 2.0, 5.0) == "fail"
    assert audit_verdict(1.0, 2.0, 5.0) == "pass"
    # Below a ceiling that is itself below the accounted ε: the audit could not have failed.
    assert audit_verdict(1.0, 7.9, 4.26) == "inconclusive"
    assert audit_verdict(4.26, 7.9, 4.26) == "inconclusive"
    assert audit_verdict(3.0, None, 5.0) == "no-guarantee"
    codes = {v: audit_exit_code({"verdict": v}) for v in ("pass", "fail", "inconclusive", "no-guarantee")}
    assert codes == {"pass": 0, "fail": 1, "inconclusive": 3, "no-guarantee": 0}


# ------------------------------------------------------------ broken on purpose


def test_broken_noise_trains_with_less_noise_but_accounts_sigma() -> None:
    import client.device
    from shared.config import parse_config
    from shared.models.factory import build_model
    from shared.privacy.accounting import DeviceAccountant
    from shared.training import train_locally
    from simulations.canary_audit import _broken_noise

    cfg = parse_config({"embedding-dim": 4, "mlp-layers": "", "num-negatives": 2, "weight-decay": 0.0})
    p = cfg.privacy

    def bias_change(trainer: Any) -> tuple[float, DeviceAccountant, float]:
        model = build_model(cfg.model, 400, 1, seed=0)
        records = model.build_records(np.arange(5), 0)
        accountant = DeviceAccountant(p.accountant, p.delta, p.epsilon_budget)
        result = trainer(model, records, cfg.train, p, accountant, seed=3)
        # Rows no record or negative touched carry only noise (bias starts at 0).
        return float(model.item_bias.weight.detach()[200:].std()), accountant, result.epsilon

    honest_std, honest_acc, honest_eps = bias_change(train_locally)
    with _broken_noise(0.1):
        assert client.device.train_locally is not train_locally
        broken_std, broken_acc, broken_eps = bias_change(client.device.train_locally)
    assert client.device.train_locally is train_locally  # restored: no other run can see it
    assert broken_std < 0.2 * honest_std
    assert broken_acc.history == honest_acc.history  # charged at σ: the same steps and rate
    assert all(sigma == p.noise_multiplier for sigma, _, _ in broken_acc.history)
    assert broken_eps == pytest.approx(honest_eps)
    for factor in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError), _broken_noise(factor):
            pass


# ---------------------------------------------------------------- real federation

# 60 MovieLens-100K users x 32 canaries = 1,920 canaries (ceiling 4.88 at δ = 1e-5) under
# the audit's defaults (σ 3, sample rate 1/2, 10 steps, one task per device: accounted ε
# about 2.75 with the private final evaluation). Each run takes about 30 s on one core.
_SMALL = [
    "--set", "max-devices=60", "--set", "concurrency=20", "--set", "buffer-size=10",
    "--canaries-per-device", "32", "--audit-seed", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, dict[str, Any]]]:
    """Both runs through the command line: (exit status, report) for ``broken`` and ``honest``."""
    from simulations.canary_audit import main

    tmp = tmp_path_factory.mktemp("audit")
    runs = {"broken": ["--broken-noise-factor", "0.1"], "honest": []}
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for name, extra in runs.items():
        code = main([*_SMALL, "--output", str(tmp / name), *extra])
        out[name] = (code, json.loads((tmp / name / "empirical_audit.json").read_text()))
    return out


def test_broken_mechanism_is_caught(audits: dict[str, tuple[int, dict[str, Any]]]) -> None:
    code, broken = audits["broken"]
    assert broken["broken-on-purpose"] and "BROKEN ON PURPOSE" in broken["label"]
    assert broken["noise-multiplier-trained"] == pytest.approx(0.1 * broken["noise-multiplier"])
    assert 1.0 < broken["epsilon-accounted"] < 3.5
    assert broken["epsilon-ceiling-observed"] > broken["epsilon-accounted"]  # the audit could fail
    assert broken["epsilon-lower-bound"] > broken["epsilon-accounted"]
    assert broken["verdict"] == "fail" and code == 1
    assert broken["num-canaries"] == 1920 and broken["canaries-observed"] >= 1500


def test_broken_mechanism_still_accounts_and_logs_sigma(audits: dict[str, tuple[int, dict[str, Any]]]) -> None:
    from shared.privacy.ledger_store import DeviceLedgerStore

    (_, broken), (_, honest) = audits["broken"], audits["honest"]
    # The run's summary and every signed ledger say σ: only the audit can tell.
    assert broken["epsilon-accounted"] == pytest.approx(honest["epsilon-accounted"])
    sigma = broken["noise-multiplier"]
    devices = Path(broken["config"]["output-dir"]) / "devices"
    records = []
    for path in sorted(devices.glob("device-*.db"))[:5]:
        store = DeviceLedgerStore(path)
        try:
            records += [e for e in store.entries() if e.mechanism == "subsampled-gaussian"]  # DP-SGD tasks
        finally:
            store.close()
    assert records and all(e.noise_multiplier == sigma for e in records)


def test_honest_mechanism_passes(audits: dict[str, tuple[int, dict[str, Any]]]) -> None:
    code, honest = audits["honest"]
    assert not honest["broken-on-purpose"] and honest["noise-multiplier-trained"] == honest["noise-multiplier"]
    assert 1.0 < honest["epsilon-accounted"] < 3.5
    assert honest["epsilon-ceiling-observed"] > honest["epsilon-accounted"]
    assert honest["epsilon-lower-bound"] <= honest["epsilon-accounted"]
    assert honest["verdict"] == "pass" and code == 0
    assert math.isfinite(honest["auc"])


def test_fedrec_audit_empirical_exit_status(
    audits: dict[str, tuple[int, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import simulations.canary_audit
    from simulations.cli import cmd_empirical_audit

    args = argparse.Namespace(
        set=None, no_dp=False, output=None, overwrite=False, canaries_per_device=None, broken_noise_factor=None
    )
    for name, expected in (("broken", 1), ("honest", 0)):
        report = audits[name][1]
        monkeypatch.setattr(simulations.canary_audit, "run_canary_audit", lambda _o, r=report, **_kw: r)
        assert cmd_empirical_audit(args) == expected
    # A report whose ceiling could not reach the accounted epsilon is neither a pass nor a failure.
    inconclusive = {**audits["honest"][1], "verdict": "inconclusive"}
    monkeypatch.setattr(simulations.canary_audit, "run_canary_audit", lambda _o, **_kw: inconclusive)
    assert cmd_empirical_audit(args) == 3
    assert "privacy bug" in capsys.readouterr().err


def test_canary_data_keeps_ids_and_puts_canaries_in_training(tmp_path: Path) -> None:
    from shared.data.split import leave_one_out
    from shared.data.synthetic import generate_synthetic
    from simulations.canary_audit import _check_canary_data, plan_canaries, write_canary_data

    base = generate_synthetic(30, 80, 20, 0)
    plan = plan_canaries(base, audit_seed=1, per_device=4)
    assert plan.num_canaries == 4 * plan.num_devices
    assert 0 < plan.included.sum() < plan.num_canaries
    for device in np.unique(plan.device_ids):
        mine = plan.canary_items[plan.device_ids == device]
        assert len(set(mine.tolist())) == 4  # distinct
        assert not set(mine.tolist()) & set(base.item_ids[base.user_ids == device].tolist())  # never interacted with
    path = write_canary_data(base, plan, tmp_path / "u.data")
    _check_canary_data(base, path, plan)  # raises if ids, split or canary placement differ
    devices = {d.device_id: d for d in leave_one_out(base)}
    assert set(devices) == {int(d) for d in plan.device_ids}
