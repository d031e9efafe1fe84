"""The device accountant: exact agreement with Opacus, planning, refusal."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from shared.privacy.accounting import BudgetExhausted, DeviceAccountant, Release, rdp_epsilon

HISTORIES = [
    [(1.0, 0.1, 100)],
    [(1.0, 0.1, 40), (1.0, 0.05, 40), (1.5, 0.2, 20)],
    [(0.8, 0.5, 3)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_epsilon_equals_opacus_rdp_accountant_exactly(history) -> None:
    acc = RDPAccountant()
    acc.history = list(history)
    assert rdp_epsilon(history, 1e-5) == acc.get_epsilon(1e-5)


def test_known_value_from_the_opacus_notes() -> None:
    # sigma=1, q=0.1, 100 steps at delta=1e-3: RDP 5.64 (docs/privacy.md's reference figures).
    assert rdp_epsilon([(1.0, 0.1, 100)], 1e-3) == pytest.approx(5.64, abs=0.01)


def test_prv_mechanism_uses_opacus_prv() -> None:
    dev = DeviceAccountant("prv", 1e-5, 100.0, [(1.0, 0.1, 100)])
    ref = PRVAccountant()
    ref.history = [(1.0, 0.1, 100)]
    assert dev.epsilon() == pytest.approx(ref.get_epsilon(1e-5))


def test_epsilon_if_plans_without_spending() -> None:
    dev = DeviceAccountant("rdp", 1e-5, 100.0, [(1.0, 0.1, 50)])
    planned = dev.epsilon_if(Release(1.0, 0.1, 50))
    assert planned == pytest.approx(rdp_epsilon([(1.0, 0.1, 100)], 1e-5))
    assert dev.history == [(1.0, 0.1, 50)]


def test_check_refuses_past_the_budget() -> None:
    spent = rdp_epsilon([(1.0, 0.1, 50)], 1e-5)
    after = rdp_epsilon([(1.0, 0.1, 100)], 1e-5)
    dev = DeviceAccountant("rdp", 1e-5, (spent + after) / 2, [(1.0, 0.1, 50)])
    with pytest.raises(BudgetExhausted) as err:
        dev.check(Release(1.0, 0.1, 50))
    assert err.value.would_reach == pytest.approx(after)
    assert err.value.spent == pytest.approx(spent)
    assert "budget" in str(err.value)
    ok = DeviceAccountant("rdp", 1e-5, after, [(1.0, 0.1, 50)])
    assert ok.check(Release(1.0, 0.1, 50)) == pytest.approx(after)


def test_empty_history_spends_nothing() -> None:
    assert DeviceAccountant("rdp", 1e-5, 1.0).epsilon() == 0.0
