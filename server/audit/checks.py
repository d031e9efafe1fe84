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
* every claim and every recomputation is compared with the budget;
* the server's own records are checked against the devices' signed evidence (the server
  writes them, so they prove nothing alone): each spending row against the signed entry
  it copies (``spending-mismatch``, ``spending-unbacked``), each signed entry of the run
  against its spending row (``spending-missing``), each task the server recorded as
  trained under DP against a signed entry for it (``unbacked-task``), each device's own
  ledger file, where the run directory holds one, against the server's copy
  (``device-ledger-ahead``), and the stored configuration against the parameters the
  devices signed (``config-mismatch``) and against the run's other copies of it
  (``config-inconsistent``).

A run whose configuration seeded its DP noise from the run seed (``reproducible-noise``)
is reported ``PASS (nominal)`` at best: its figures are the accounting's, but anyone
holding the config can regenerate and subtract the noise.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

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
from shared.privacy.accounting import record_epsilon
from shared.privacy.evaluation import EVALUATION_MECHANISM
from shared.privacy.identity import verify_signature
from shared.privacy.ledger import LedgerEntry, compute_hash, record_histories, verify_chain
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
class ServerSpending:
    """One ``spent`` row of the server's spending log (``privacy_spending``): its copy of a signed entry."""

    device_id: int
    task_id: int
    version: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    accountant: str


# The fields a spending row copies from its signed record-level entry (same names on both).
SPENDING_FIELDS: Final = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "clip_norm", "accountant")

# Task outcomes the server records only after it verified the task's signed ledger entries
# (server/federation.py: the intake runs before the scheduler decides accepted or stale;
# a SecAgg+ cohort is withheld only for another contributor's failed ledger).
RELEASED_TASK_STATUSES: Final = ("accepted", "rejected-stale", "withheld")

# The mechanism of a device's DP-SGD release (client/app.py), whose parameters the config fixes.
DP_SGD_MECHANISM: Final = "subsampled-gaussian"
EXACT_EVALUATION: Final = "exact (simulation only, not private)"

# Stands for the run as a whole in a finding that concerns no one device.
RUN: Final = -1


@dataclass(frozen=True)
class ServerTask:
    """One task in the server's task log, with the outcome it recorded."""

    task_id: int
    device_id: int
    status: str


@dataclass(frozen=True)
class RunSettings:
    """What the audited run's stored configuration says the devices were asked to do."""

    record_dp: bool
    user_dp: bool
    delta: float
    noise_multiplier: float
    clip_norm: float
    accountant: str
    steps: int  # local-steps: DP-SGD steps per task
    user_noise_multiplier: float
    user_clip_norm: float
    user_order: float | None  # the Renyi order the user-level budget fixes; None without user-level DP
    reproducible_noise: bool
    # The public DP-SGD rate Opacus charges; None for a run from before it was public (its rate
    # then depended on each device's record count, which this audit cannot check).
    sample_rate: float | None = None
    evaluation: str = "exact"  # "private": noisy releases on the ledgers; "exact": simulation only
    eval_noise_multiplier: float = 0.0
    eval_sensitivity: float = 0.0


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
    # The server's own records of the run, compared with the signed evidence; None (a single
    # device's ledger): no server records to compare.
    spending: Sequence[ServerSpending] | None = None
    tasks: Sequence[ServerTask] = ()
    # Whether the run's spending log must cover every stored entry: true when the database
    # holds this run only (the server writes a row for every record-level entry it verifies,
    # whichever run made it); otherwise only entries labelled with this run are required.
    spending_covers_all_entries: bool = False
    settings: RunSettings | None = None
    # Other copies of the stored flat config (e.g. the run's summary), by where they were
    # read; the stored one is ``"runs.config"``.
    config_copies: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # The devices' own ledger files found beside the run (device -> entries in storage
    # order, and the public key the file states, used where the server holds none).
    device_files: Mapping[int, Sequence[LedgerEntry]] = field(default_factory=dict)
    device_file_keys: Mapping[int, str] = field(default_factory=dict)
    # Whether every device of the run keeps a ledger file beside it (a simulated run with DP),
    # so that a missing one is a finding rather than a deployed device's own business.
    device_files_expected: bool = False
    # False when the run database says the run never finished (interrupted or crashed).
    run_finished: bool = True
    # Output files beside the database that an unfinished run did not write (an earlier run's).
    stale_outputs: Sequence[str] = ()
    # What the loader wants said in the report (e.g. where device files were looked for).
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class Finding:
    """One problem the audit found; every finding is a violation (the audit exits non-zero)."""

    kind: str  # edited | deleted | reordered | forged | unsigned | unknown-key | mismatch |
    #            claim-mismatch | unbacked-user-release | over-budget | rejected-upload |
    #            spending-mismatch | spending-missing | spending-unbacked | unbacked-task |
    #            device-ledger-ahead | device-ledger-missing | unfinished-run | config-mismatch |
    #            config-inconsistent
    device_id: int  # RUN (-1) when the finding concerns the run, not one device
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
    # Why a clean result is only nominal (reproducible noise); None: nothing qualifies it.
    nominal: str | None = None
    record_dp: bool | None = None  # the run's configuration; None: not known (a device's ledger)
    user_dp: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    @property
    def dp_off(self) -> bool:
        """True when the run's configuration had neither record- nor user-level DP."""
        return self.record_dp is False and self.user_dp is False

    @property
    def verdict(self) -> str:
        """``FAIL`` on any finding; else ``PASS``, qualified when the figures are only nominal or DP was off."""
        if self.findings:
            return "FAIL"
        if self.dp_off:
            return "PASS (DP off)"
        return "PASS (nominal)" if self.nominal else "PASS"

    def fleet(self) -> dict[str, object]:
        """Fleet summary: devices, participation, epsilon distribution per unit, budget left."""
        out: dict[str, object] = {
            "devices": len(self.devices),
            "devices-with-findings": len({f.device_id for f in self.findings if f.device_id != RUN}),
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


def _recompute_skellam_claim(
    claim: float,
    history: Sequence[tuple[float, float, int]],
    skellam: Sequence[tuple[float, float, int, float]],
    delta: float,
) -> tuple[float, bool, str]:
    """A history with secure-sum (Skellam) releases: recomputed from the logged parameters.

    No accounting library implements the subsampled Skellam mechanism, so the claim is
    recomputed with fedrec's own RDP (``shared.privacy.skellam``: the closed form of Agarwal,
    Kairouz and Liu, Zhu and Wang's subsampling bound), from the entries alone; the audit's
    numerical check of that closed form is ``shared.privacy.skellam.skellam_rdp_numerical_1d``.
    """
    recomputed = record_epsilon(history, skellam, delta)
    error = relative_error(claim, recomputed)
    how = f"Skellam RDP from the logged entries, relative error {error:.2%}, tolerance {TOLERANCE:.0%}"
    return recomputed, error <= TOLERANCE, how


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
        history, skellam = record_histories(record)
        if skellam:
            rec_true, agrees, how = _recompute_skellam_claim(rec_claim, history, skellam, record[-1].delta)
        else:
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
    findings += crosscheck_server_records(data)
    timeline.sort()
    settings = data.settings
    notes = list(data.notes)
    nominal = None
    if settings is not None:
        if not settings.record_dp and not settings.user_dp:
            notes.insert(
                0,
                "DP is off in this run's configuration (dp = false, user-dp = false): its updates carry no "
                "differential privacy guarantee, and there is no epsilon to verify.",
            )
        if settings.evaluation == "exact" and (settings.record_dp or settings.user_dp):
            notes.append(
                f"evaluation: {EXACT_EVALUATION} (per-device metrics and top-k lists went to the server "
                "outside any DP release; no epsilon here covers them)"
            )
        if (settings.record_dp or settings.user_dp) and settings.reproducible_noise:
            nominal = "nominal epsilon: noise reproducible from the config"
            notes.insert(
                0,
                f"{nominal} (reproducible-noise = true seeded the DP noise from the run seed, so anyone "
                "holding the config can regenerate and subtract it; the figures hold only against "
                "someone who does not).",
            )
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
        nominal=nominal,
        record_dp=None if settings is None else settings.record_dp,
        user_dp=None if settings is None else settings.user_dp,
        notes=notes,
    )


# ------------------------------------------------------------------- server vs devices


def _same(a: object, b: object) -> bool:
    # Spending rows and entries hold the same doubles, so honest runs agree exactly; the
    # tolerance only forgives a backend that rounds a stored double.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _differences(row: ServerSpending, entry: LedgerEntry) -> list[str]:
    return [
        f"{name} {getattr(row, name)!r} (signed {getattr(entry, name)!r})"
        for name in SPENDING_FIELDS
        if not _same(getattr(row, name), getattr(entry, name))
    ]


def _this_run(entry: LedgerEntry, run_label: str | None) -> bool:
    # Without a label (an older database) entries cannot be told apart by run: all count.
    return run_label is None or entry.run == run_label


def crosscheck_spending(data: AuditInput) -> list[Finding]:
    """The server's ``spent`` rows against the signed record-level entries they copy.

    Rows and entries are paired per device and (task, version): first the rows that copy
    an entry exactly, then the rest in order, so an edited row is reported against the
    entry it was a copy of (``spending-mismatch``), a row with no entry left to copy is
    ``spending-unbacked``, and a signed entry of the run with no row is ``spending-missing``.
    """
    if data.spending is None:
        return []
    findings: list[Finding] = []
    rows: dict[tuple[int, int, int], list[ServerSpending]] = {}
    for r in data.spending:
        rows.setdefault((r.device_id, r.task_id, r.version), []).append(r)
    entries: dict[tuple[int, int, int], list[LedgerEntry]] = {}
    for device, chain in data.ledgers.items():
        for e in sorted(chain, key=lambda e: e.seq):
            if e.unit == "record":
                entries.setdefault((device, e.task_id, e.version), []).append(e)
    for key in sorted(set(rows) | set(entries)):
        device, task, _version = key
        left_rows = list(rows.get(key, []))
        left_entries = list(entries.get(key, []))
        for r in list(left_rows):
            exact = next((e for e in left_entries if not _differences(r, e)), None)
            if exact is not None:
                left_rows.remove(r)
                left_entries.remove(exact)
        for r, e in zip(left_rows, left_entries, strict=False):
            findings.append(
                Finding(
                    "spending-mismatch",
                    device,
                    e.seq,
                    "record",
                    f"the server's spending row for device {device}, task {task} differs from the entry the "
                    f"device signed (seq {e.seq}): {'; '.join(_differences(r, e))}",
                )
            )
        paired = min(len(left_rows), len(left_entries))
        for r in left_rows[paired:]:
            findings.append(
                Finding(
                    "spending-unbacked",
                    device,
                    None,
                    "record",
                    f"the server's spending row for device {device}, task {task} (epsilon {r.epsilon:.6g}) "
                    "matches no record-level entry the device signed",
                )
            )
        for e in left_entries[paired:]:
            if data.spending_covers_all_entries or (data.run_label is not None and e.run == data.run_label):
                findings.append(
                    Finding(
                        "spending-missing",
                        device,
                        e.seq,
                        "record",
                        f"device {device} signed a record-level release for task {task} (seq {e.seq}, epsilon "
                        f"{e.epsilon:.6g}) that the server's spending log does not hold",
                    )
                )
    return findings


def crosscheck_tasks(data: AuditInput) -> list[Finding]:
    """Every task the server recorded as trained under DP must have the device's signed entry for it."""
    settings = data.settings
    if settings is None or not data.tasks:
        return []
    units = [u for u, on in (("record", settings.record_dp), ("user", settings.user_dp)) if on]
    signed: set[tuple[int, int, str]] = {
        (device, e.task_id, e.unit)
        for device, chain in data.ledgers.items()
        for e in chain
        if _this_run(e, data.run_label)
    }
    findings: list[Finding] = []
    for t in data.tasks:
        if t.status not in RELEASED_TASK_STATUSES:
            continue
        missing = [u for u in units if (t.device_id, t.task_id, u) not in signed]
        if missing:
            findings.append(
                Finding(
                    "unbacked-task",
                    t.device_id,
                    None,
                    missing[0] if len(missing) == 1 else None,
                    f"the server recorded task {t.task_id} of device {t.device_id} as {t.status}, which it "
                    f"records only after verifying the device's ledger, but holds no signed "
                    f"{' or '.join(missing)}-level entry of this run for it",
                )
            )
    return findings


def _signed_by(entry: LedgerEntry, key: str) -> bool:
    try:
        intact = compute_hash(entry) == entry.entry_hash
    except (TypeError, ValueError):  # a retyped column: not an entry anyone signed
        return False
    return intact and verify_signature(key, entry.entry_hash.encode("ascii"), entry.signature)


def crosscheck_device_files(data: AuditInput) -> list[Finding]:
    """Entries of the run in a device's own ledger file that the server's copy lacks.

    Deleting a device's last entry together with its spending and task rows leaves the
    server's records consistent with each other; the device's file still holds the
    signed entry. Only entries that verify (against the registered key, or the file's
    own key when the server holds none) count: a file is evidence only where signed.
    """
    if data.run_label is None:
        return []  # entries of this run cannot be told from a later run's in a shared store
    findings: list[Finding] = []
    for device in sorted(data.device_files):
        key = data.keys.get(device)
        whose = "its registered key"
        if key is None:
            key, whose = data.device_file_keys.get(device), "the key its own file states (none is registered)"
        if key is None:
            continue
        held = {e.entry_hash for e in data.ledgers.get(device, [])}
        for e in data.device_files[device]:
            if e.run != data.run_label or e.entry_hash in held or not _signed_by(e, key):
                continue
            findings.append(
                Finding(
                    "device-ledger-ahead",
                    device,
                    e.seq,
                    e.unit,
                    f"device {device}'s own ledger file holds entry seq {e.seq} of this run (task {e.task_id}, "
                    f"{e.unit}-level, epsilon {e.epsilon:.6g}), signed with {whose}, which the server's records "
                    "lack: removed from them, or never reported to the server",
                )
            )
    return findings


def crosscheck_config(data: AuditInput) -> list[Finding]:
    """The stored configuration against what the devices signed and against its other copies.

    The budgets are not in any signed entry, so they can be compared only with the run's
    other (server-written) copies of the config; the mechanism parameters and ``delta``
    are in every entry of the run.
    """
    settings = data.settings
    findings: list[Finding] = []
    stored = data.config_copies.get("runs.config")
    if stored is not None:
        for where, copy in data.config_copies.items():
            if where == "runs.config":
                continue
            for name in sorted(set(stored) & set(copy)):
                if not _same_config_value(stored[name], copy[name]):
                    findings.append(
                        Finding(
                            "config-inconsistent",
                            RUN,
                            None,
                            None,
                            f"the stored config says {name} = {stored[name]!r}, but {where} says {copy[name]!r}",
                        )
                    )
    if settings is None or data.run_label is None:
        return findings
    # Per (unit, mechanism) what the config fixes; a record-level release of another mechanism
    # (e.g. a private evaluation) is held to the run-wide delta and accountant only.
    dp_sgd: dict[str, object] = {
        "delta": settings.delta,
        "noise_multiplier": settings.noise_multiplier,
        "clip_norm": settings.clip_norm,
        "accountant": settings.accountant,
        "steps": settings.steps,
    }
    if settings.sample_rate is not None:
        dp_sgd["sample_rate"] = settings.sample_rate
    private_eval: dict[str, object] = {
        "delta": settings.delta,
        "accountant": settings.accountant,
        "noise_multiplier": settings.eval_noise_multiplier,
        "clip_norm": settings.eval_sensitivity,
        "sample_rate": 1.0,
        "steps": 1,
    }
    wanted: dict[str, dict[str, object]] = {
        "record": {"delta": settings.delta, "accountant": settings.accountant},
        "user": {
            "delta": settings.delta,
            "noise_multiplier": settings.user_noise_multiplier,
            "clip_norm": settings.user_clip_norm,
        },
    }
    enabled = {"record": settings.record_dp, "user": settings.user_dp}
    switch = {"record": "dp", "user": "user-dp"}
    for device in sorted(data.ledgers):
        seen: set[tuple[str, str]] = set()  # one finding per device, unit and parameter
        for e in sorted(data.ledgers[device], key=lambda e: e.seq):
            if e.run != data.run_label or e.unit not in wanted:
                continue
            if not enabled[e.unit]:
                if (e.unit, "") not in seen:
                    seen.add((e.unit, ""))
                    findings.append(
                        Finding(
                            "config-mismatch",
                            device,
                            e.seq,
                            e.unit,
                            f"the stored config says {switch[e.unit]} = false, but device {device} signed "
                            f"{e.unit}-level releases in this run (first: seq {e.seq}, task {e.task_id})",
                        )
                    )
                continue
            asked = wanted[e.unit]
            if e.unit == "record" and e.mechanism == DP_SGD_MECHANISM:
                asked = dp_sgd
            elif e.unit == "record" and e.mechanism == EVALUATION_MECHANISM:
                if settings.evaluation != "private":
                    asked = {**wanted[e.unit], "mechanism": "none: the run's evaluation is exact"}
                else:
                    asked = private_eval
            for name, want in asked.items():
                got = getattr(e, name)
                if (e.unit, name) in seen or _same(got, want):
                    continue
                seen.add((e.unit, name))
                findings.append(
                    Finding(
                        "config-mismatch",
                        device,
                        e.seq,
                        e.unit,
                        f"the stored config gives {e.unit}-level {name} {want!r}, but device {device} signed "
                        f"{got!r} in this run (first: seq {e.seq}, task {e.task_id})",
                    )
                )
    if settings.user_order is not None:
        for device in sorted(data.user_releases):
            orders = {r.order for r in data.user_releases[device]}
            wrong = sorted(o for o in orders if not _same(o, settings.user_order))
            if wrong:
                findings.append(
                    Finding(
                        "config-mismatch",
                        device,
                        None,
                        "user",
                        f"the server priced device {device}'s user-level releases at Renyi order {wrong[0]:g}; "
                        f"the stored config's user-epsilon-budget gives order {settings.user_order:g}",
                    )
                )
    return findings


def _same_config_value(a: object, b: object) -> bool:
    # The run store keeps non-finite floats as text ("inf"); a JSON file keeps them as numbers.
    def norm(v: object) -> object:
        if isinstance(v, str) and v in ("inf", "-inf", "nan"):
            return float(v)
        return v

    a, b = norm(a), norm(b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return _same(a, b)


def check_run_state(data: AuditInput) -> list[Finding]:
    """An unfinished run, and devices whose own ledger files are missing where they must be."""
    findings: list[Finding] = []
    if not data.run_finished:
        stale = f"; {', '.join(data.stale_outputs)} beside it are not this run's" if data.stale_outputs else ""
        findings.append(
            Finding(
                "unfinished-run",
                RUN,
                None,
                None,
                "the run never finished (interrupted or crashed): its spending may be incomplete and devices may "
                f"hold releases the server never received{stale}",
            )
        )
    if data.device_files_expected and data.run_label is not None:
        for device in sorted(data.ledgers):
            ours = [e for e in data.ledgers[device] if e.run == data.run_label]
            if ours and device not in data.device_files:
                findings.append(
                    Finding(
                        "device-ledger-missing",
                        device,
                        None,
                        None,
                        f"device {device} released {len(ours)} entries in this run, but its own ledger file is "
                        "missing: the server's records cannot be checked against the device's",
                    )
                )
    return findings


def crosscheck_server_records(data: AuditInput) -> list[Finding]:
    """Every comparison of the server's own records with the devices' signed evidence."""
    return (
        check_run_state(data)
        + crosscheck_config(data)
        + crosscheck_spending(data)
        + crosscheck_tasks(data)
        + crosscheck_device_files(data)
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
