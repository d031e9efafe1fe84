"""The privacy audit: verify every ledger, recompute every claim independently, check budgets.

Pure logic over plain inputs (:class:`AuditInput`), so the same audit runs on a
server's run database and on a single device's ledger file (``server/cli_audit.py``
loads either). It never trusts a figure it can recompute:

* each device's chain is verified against the key the server registered for it
  (:func:`shared.privacy.ledger.verify_chain`): edits, deletions, reordering,
  forgeries, unsigned entries and unknown keys are named and located;
* each device's final cumulative epsilon claim, per privacy unit, is recomputed
  from the logged mechanism parameters with dp-accounting (not Opacus, which
  produced the record-level claims, and not the filter code, which produced the
  user-level ones) and flagged beyond :data:`server.audit.independent.TOLERANCE`.
  dp-accounting's fractional-order bound is loose at large epsilon, so a claim it
  finds low is re-checked by numerical integration of the RDP definition
  (:func:`server.audit.independent.record_level_epsilon_quadrature`) before it
  is flagged. Claims of Opacus's PRV accountant are recomputed with dp-accounting's
  PLD accountant (:func:`server.audit.independent.record_level_epsilon_pld`);
* the server's user-level release log is cross-checked against the devices' signed
  user-level entries (``unbacked-user-release``);
* every claim and every recomputation is compared with the budget.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

from server.audit.independent import (
    PRV_ABSOLUTE_TOLERANCE,
    TOLERANCE,
    prv_claim_agrees,
    record_level_epsilon_pld,
    record_level_epsilon_quadrature,
    relative_error,
    user_level_epsilon,
)
from shared.privacy.ledger import LedgerEntry, verify_chain
from shared.privacy.user_level import DEFAULT_ORDERS

# dp-accounting logs a warning for every fractional order its series does not converge at
# (it then excludes that order, which can only make its epsilon larger, i.e. conservative).
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class UserRelease:
    """A device's part in one server-side user-level release, as the server logged it."""

    version: int
    weight: float
    noise_multiplier: float
    order: float
    epsilon: float  # the server's cumulative claim after it
    delta: float


@dataclass(frozen=True)
class AuditInput:
    """Everything the audit reads, whatever it was loaded from."""

    source: str
    keys: Mapping[int, str]  # device -> registered public key
    ledgers: Mapping[int, Sequence[LedgerEntry]]  # device -> entries in storage order
    delta: float
    record_budget: float | None = None
    user_budget: float | None = None
    # Ledger entries each device must have, from the server's own release log: deleting a
    # chain's last entry leaves a valid chain, so only this cross-check can catch it.
    expected_entries: Mapping[int, int] | None = None
    user_releases: Mapping[int, Sequence[UserRelease]] = field(default_factory=dict)
    rejections: int = 0
    # Uploads the server refused at intake: (device, task, kind, detail). Each is a finding:
    # the device spent budget on a release whose record could not be verified.
    rejected_uploads: Sequence[tuple[int, int, str, str]] = ()
    # The audited run's ledger label (entries name the run they were made in); None: unknown.
    run_label: str | None = None


@dataclass(frozen=True)
class Finding:
    """One problem the audit found; every finding is a violation (the audit exits non-zero)."""

    kind: str  # edited | deleted | reordered | forged | unsigned | unknown-key | mismatch |
    #            claim-mismatch | unbacked-user-release | over-budget
    device_id: int
    seq: int | None
    unit: str | None
    detail: str


@dataclass(frozen=True)
class DeviceAudit:
    """One device's figures after verification and recomputation."""

    device_id: int
    entries: int
    record_releases: int
    user_releases: int
    record_claimed: float
    record_recomputed: float
    user_claimed: float  # the server's claim (filter, actual weights), else the device's own
    user_recomputed: float
    device_user_claimed: float  # the device's conservative claim (full weight per update sent)


@dataclass
class AuditReport:
    """The audit's result: findings, per-device figures and the fleet summary."""

    source: str
    delta: float
    record_budget: float | None
    user_budget: float | None
    tolerance: float
    devices: list[DeviceAudit]
    findings: list[Finding]
    rejections: int
    timeline: list[tuple[float, int, str, float]]  # (timestamp, device, unit, cumulative epsilon)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    def fleet(self) -> dict[str, object]:
        """Fleet summary: devices, participation, epsilon distribution per unit, budget left."""
        out: dict[str, object] = {
            "devices": len(self.devices),
            "devices-with-findings": len({f.device_id for f in self.findings}),
            "findings": len(self.findings),
            "updates-rejected-at-intake": self.rejections,
        }
        for unit, budget in (("record", self.record_budget), ("user", self.user_budget)):
            eps = np.array(
                [
                    d.record_recomputed if unit == "record" else d.user_recomputed
                    for d in self.devices
                    if (d.record_releases if unit == "record" else d.user_releases) > 0
                ]
            )
            releases = [d.record_releases if unit == "record" else d.user_releases for d in self.devices]
            block: dict[str, object] = {"devices-with-releases": int(eps.size)}
            if eps.size:
                block.update(
                    {
                        "epsilon-max": float(eps.max()),
                        "epsilon-p50": float(np.percentile(eps, 50)),
                        "epsilon-p90": float(np.percentile(eps, 90)),
                        "epsilon-p99": float(np.percentile(eps, 99)),
                        "releases-per-device-mean": float(statistics.fmean(r for r in releases if r)),
                        "releases-max": int(max(releases)),
                    }
                )
                if budget is not None:
                    left = budget - eps
                    block.update(
                        {
                            "budget": budget,
                            "budget-left-min": float(left.min()),
                            "budget-left-p50": float(np.percentile(left, 50)),
                            "devices-over-budget": int((eps > budget).sum()),
                        }
                    )
            out[unit] = block
        return out


@functools.lru_cache(maxsize=4096)
def _unit_curve(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    # dp-accounting's RDP of one Poisson-subsampled Gaussian step; a composition is this
    # curve times the step count (RDP composes additively), which is what its accountant
    # does too. Memoised: a fleet shares few (sigma, q) pairs, and this is the cost.
    curve = dp_rdp._compute_rdp_poisson_subsampled_gaussian(sample_rate, noise_multiplier, DEFAULT_ORDERS)
    return tuple(float(v) for v in np.atleast_1d(curve))


def independent_record_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Record-level epsilon of ``[(sigma, q, steps), ...]`` with dp-accounting's RDP analysis."""
    if not history:
        return 0.0
    total = np.zeros(len(DEFAULT_ORDERS))
    for sigma, q, steps in history:
        total += np.asarray(_unit_curve(float(sigma), float(q))) * int(steps)
    eps, _order = dp_rdp.compute_epsilon(DEFAULT_ORDERS, total.tolist(), delta)
    return float(eps)


def _recompute_record_claim(
    claim: float, history: Sequence[tuple[float, float, int]], delta: float, *, prv: bool
) -> tuple[float, bool, str]:
    """``(recomputed epsilon, whether the claim agrees, how it was checked)`` for one device's history."""
    if prv:
        # Opacus's PRV accountant is tight: recompute with another tight one (PLD), not RDP.
        try:
            recomputed = record_level_epsilon_pld(history, delta)
        except ValueError:
            recomputed = math.inf  # a logged mechanism no accountant accepts
        how = f"PRV claim vs a PLD accountant, tolerance {TOLERANCE:.0%} or {PRV_ABSOLUTE_TOLERANCE:g}"
        return recomputed, prv_claim_agrees(claim, recomputed), how
    recomputed = independent_record_epsilon(history, delta)
    if recomputed > claim and relative_error(claim, recomputed) > TOLERANCE:
        # dp-accounting bounds fractional orders loosely (a valid but up to ~40% high upper
        # bound at large epsilon): before calling a claim low, integrate the RDP definition.
        recomputed = record_level_epsilon_quadrature(history, delta)
    error = relative_error(claim, recomputed)
    return recomputed, error <= TOLERANCE, f"relative error {error:.2%}, tolerance {TOLERANCE:.0%}"


def _device_user_epsilon(count: int, last: LedgerEntry, order: float) -> float:
    # The device prices its lifetime count of updates at its latest entry's noise and delta.
    return user_level_epsilon([1.0] * count, last.noise_multiplier, last.delta, order)


def run_audit(data: AuditInput, user_order: float | None = None) -> AuditReport:
    """Audit ``data``; ``user_order`` is the Renyi filter's fixed order (for device-side user claims)."""
    findings: list[Finding] = []
    devices: list[DeviceAudit] = []
    timeline: list[tuple[float, int, str, float]] = []
    for device, task, kind, detail in data.rejected_uploads:
        findings.append(
            Finding(
                "rejected-upload",
                device,
                None,
                None,
                f"the server rejected device {device}'s ledger upload for task {task} ({kind}): {detail}",
            )
        )
    # Every device the server knows of, so a device whose entries were all removed is still audited.
    known = set(data.ledgers) | set(data.user_releases) | set(data.keys) | set(data.expected_entries or {})
    for device in sorted(known):
        entries = list(data.ledgers.get(device, []))
        key = data.keys.get(device)
        expected = None
        if data.expected_entries is not None and device in data.expected_entries:
            expected = data.expected_entries[device]
        for p in verify_chain(entries, key, expected_count=expected):
            findings.append(Finding(p.kind, device, p.seq, None, p.detail))
        chain = sorted(entries, key=lambda e: e.seq)
        record = [e for e in chain if e.unit == "record"]
        user = [e for e in chain if e.unit == "user"]
        for e in chain:
            timeline.append((e.timestamp, device, e.unit, e.epsilon))
        # Record level: recompute the final cumulative claim from every logged mechanism, with the
        # kind of accountant that made it (the device's accountant is fixed for its life).
        rec_claim = record[-1].epsilon if record else 0.0
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in record]
        rec_true, agrees, how = _recompute_record_claim(
            rec_claim,
            history,
            record[-1].delta if record else data.delta,
            prv=bool(record) and record[-1].accountant == "prv",
        )
        if record and not agrees:
            findings.append(
                Finding(
                    "claim-mismatch",
                    device,
                    record[-1].seq,
                    "record",
                    f"device {device} claims record-level epsilon {rec_claim:.6g} after {len(record)} releases; "
                    f"recomputed {rec_true:.6g} ({how})",
                )
            )
        # User level, device side: full weight per update it sent.
        # Only a claim made in the audited run is priced at its filter order: an earlier run's
        # order came from that run's budget, which the audit does not know.
        dev_user_claim = user[-1].epsilon if user else 0.0
        dev_user_true = 0.0
        if user and user_order is not None and data.run_label in (None, user[-1].run):
            dev_user_true = _device_user_epsilon(len(user), user[-1], user_order)
        if dev_user_true and relative_error(dev_user_claim, dev_user_true) > TOLERANCE:
            findings.append(
                Finding(
                    "claim-mismatch",
                    device,
                    user[-1].seq,
                    "user",
                    f"device {device} claims user-level epsilon {dev_user_claim:.6g} for {len(user)} updates; "
                    f"recomputed {dev_user_true:.6g}",
                )
            )
        # User level, server side: the releases it actually applied, with their weights.
        releases = list(data.user_releases.get(device, []))
        if releases and len(releases) > len(user):
            # The device signs a user entry for every update it sends, and the server can apply
            # only updates it received: more server releases than signed entries (over the
            # device's whole life, so this run's can only be fewer) were not backed by the device.
            findings.append(
                Finding(
                    "unbacked-user-release",
                    device,
                    None,
                    "user",
                    f"the server logged {len(releases)} user-level releases for device {device}, but the device "
                    f"signed only {len(user)} user-level ledger entries",
                )
            )
        srv_claim = releases[-1].epsilon if releases else dev_user_claim
        srv_true = dev_user_true
        if releases:
            srv_true = user_level_epsilon(
                [r.weight for r in releases], releases[0].noise_multiplier, releases[0].delta, releases[0].order
            )
            if relative_error(srv_claim, srv_true) > TOLERANCE:
                findings.append(
                    Finding(
                        "claim-mismatch",
                        device,
                        None,
                        "user",
                        f"server claims user-level epsilon {srv_claim:.6g} for device {device} over "
                        f"{len(releases)} releases; recomputed {srv_true:.6g}",
                    )
                )
        for unit, budget, figures in (
            ("record", data.record_budget, (rec_claim, rec_true)),
            ("user", data.user_budget, (srv_claim, srv_true, dev_user_claim, dev_user_true)),
        ):
            worst = max(figures)
            if budget is not None and worst > budget * (1 + 1e-12):
                findings.append(
                    Finding(
                        "over-budget",
                        device,
                        None,
                        unit,
                        f"device {device} {unit}-level epsilon {worst:.6g} exceeds its budget {budget:g}",
                    )
                )
        devices.append(
            DeviceAudit(
                device,
                len(entries),
                len(record),
                max(len(user), len(releases)),
                rec_claim,
                rec_true,
                srv_claim,
                srv_true,
                dev_user_claim,
            )
        )
    timeline.sort()
    return AuditReport(
        data.source,
        data.delta,
        data.record_budget,
        data.user_budget,
        TOLERANCE,
        devices,
        findings,
        data.rejections,
        timeline,
    )


def summarize_findings(findings: Sequence[Finding]) -> dict[str, int]:
    """Count of findings per kind."""
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return dict(sorted(counts.items()))


def finite(value: float) -> float | None:
    """JSON-safe float (None for inf/NaN)."""
    return value if math.isfinite(value) else None
