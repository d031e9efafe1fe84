"""Empirical privacy audit of a real fedrec federation with one run (Steinke, Nasr and Jagielski 2023).

Design
------
* **Canaries: k per device.** Every federated device (user) ``d`` gets ``k`` canary
  interactions (:data:`CANARIES_PER_DEVICE`, 8 by default): distinct items drawn uniformly
  from the items the user never interacted with. Each canary is included independently
  with probability 1/2 (its bit ``S_j``, drawn from ``audit_seed``); an included canary is
  added to the user's history before the user's first interaction, so the leave-one-out
  split keeps it in training (validation and test items are unchanged). The modified data
  set is written in GroupLens ``u.data`` format into the run's output directory and the
  federation runs on it with ``dataset = "grouplens"``.
* **Why k per device, and why the theorem still holds.** With one canary per device the
  audit had 943 canaries, and at δ = 1e-5 even a perfect attacker cannot certify more than
  4.26 (:func:`~server.audit.empirical.audit_ceiling`): it could never fail. The one-run
  theorem needs only that the whole transcript be (ε, δ)-DP with respect to *each* canary's
  bit with the others fixed; it does not need the canaries to sit on different devices.
  Each canary is one training record, and record-level DP-SGD protects every record of a
  device, the other canaries of the same device included: adding or removing one canary
  changes only its own device's releases, which that device's accountant covers (adaptive
  composition over its tasks), at a Poisson rate and an update scale that are public
  constants (``sample-rate``, ``batch-size``), not functions of how many canaries a device
  holds. So the transcript is (ε_max, δ)-DP for each canary, and ``k x devices`` canaries
  are as valid as one per device.
* **Ceiling and verdict.** The most any attacker could certify (every guess right, same
  grid and δ term) is computed for the configured canaries before the run (a loud warning
  if it is below the ε budget) and for the canaries actually scored after it. The verdict
  is ``fail`` when the lower bound exceeds the accounted ε (exit 1: a privacy bug),
  ``pass`` when it does not and the ceiling lies above the accounted ε (exit 0), and
  ``inconclusive`` when the ceiling is at or below the accounted ε (exit 3, with a warning
  on stderr): the audit could not have failed, so it must not read as a pass, and a
  distinct status keeps scripts from confusing it with either a pass or a found bug.
* **Audit defaults** (:data:`AUDIT_DEFAULTS`). The δ term ``2 m δ`` of the bound grows with
  the canaries as fast as the guesses do, so at δ = 1e-5 no number of canaries lifts the
  ceiling above about 5.4 with the default grid (a single test guessing every canary tends
  to ``ln(β / 2δ)`` = 7.8, and needs some 100,000 canaries all guessed right to pass 7.9):
  the project's defaults (σ 1, budget 8, accounted ε about 7.9) cannot be audited by this
  theorem in practice. The audit therefore exercises the same code (Opacus DP-SGD,
  clipping, noise, accountant, ledger) at a privacy level it can resolve: σ 3, sample rate
  1/2, 10 local steps and a budget of 3 that admits exactly one task per device (ε 2.60,
  2.75 with the private final evaluation), so every canary's device spends the same ε and
  each device is scored on exactly one update. 943 x 8 = 7,544 canaries give a ceiling of
  5.33. A noise bug is a property of the code, not of σ, so catching it here catches it at
  the defaults.
* **A broken mechanism, on purpose.** ``broken_noise_factor`` (``--broken-noise-factor``;
  never a configuration key) makes the audit's in-process devices train with noise
  multiplier ``σ x factor`` while their accountants, signed ledgers and the run's summary
  still say ``σ`` (:func:`_broken_noise`). Its report is labelled "broken on purpose";
  the audit must answer ``fail``.
* **Attacker = the honest-but-curious server.** :class:`AuditingGrid` wraps the
  in-process :class:`~simulations.local_grid.LocalGrid`: every TRAIN reply the server
  receives is also handed to :class:`CanaryAttacker` together with the global
  parameters that task was sent. That is exactly the server's view: the delta of the
  global parameters (never the user embedding). The attacker knows the public canary
  candidates and the protocol configuration, never the bits.
* **Score.** NCF's item bias row ``c`` moves *up* by about ``lr (1 - p) / B`` every
  step the record ``(d, c)`` is in the batch, and only *down* (by ``lr p_neg / B``,
  ``p_neg`` about ``1 / (1 + K)``) when ``c`` is drawn as one of the uniform negatives. Weight
  decay shrinks every row by the same known factor, so the attacker removes
  ``((1 - lr wd)^steps - 1) * b`` (what the row would have moved with no gradient at
  all) and sums the residual of row ``c`` over device ``d``'s updates. The residual is
  in absolute units (learning-rate steps), which are comparable across devices, unlike a
  rank within one device's update. Canaries of devices that never trained have no score
  (abstain). Only the delta (and the step count) is used, never a record count.
* **Bound.** :func:`server.audit.empirical.best_lower_bound` over a public
  ``(k+, k-)`` grid with a Bonferroni correction, at the run's δ, compared with the
  accounted ε (``summary["privacy"]["epsilon-max"]``); with DP on the lower bound must stay
  below it with probability ≥ ``confidence``.

Run ``python -m simulations.canary_audit --no-dp`` (or ``--dp``, or
``--broken-noise-factor 0.1``); ``--set KEY=VALUE`` overrides any configuration key.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType
from flwr.clientapp import ClientApp
from scipy import stats

from server.audit.empirical import AuditResult, audit_ceiling, best_lower_bound
from server.output_dir import claim_output_dir
from shared.config import FedrecConfig, parse_config, parse_set_pairs, to_flat
from shared.data.datasets import load_interactions
from shared.data.formats import load_grouplens
from shared.data.partition import prepare_partitions
from shared.data.split import MIN_INTERACTIONS, leave_one_out
from shared.data.types import InteractionLog
from shared.protocol import ProtocolError, TrainUpdate, parse_train_reply, parse_train_task
from simulations.local_grid import LocalGrid

log = logging.getLogger("fedrec.audit")

__all__ = [
    "AUDIT_DEFAULTS",
    "CANARIES_PER_DEVICE",
    "AuditingGrid",
    "CanaryAttacker",
    "CanaryPlan",
    "audit_exit_code",
    "audit_verdict",
    "main",
    "plan_canaries",
    "run_canary_audit",
    "write_canary_data",
]

# The audited configuration (see "Audit defaults" in the module docstring): every
# device trains exactly once (the budget admits one task, the second is refused), at a
# noise level whose accounted epsilon lies below the ceiling of the default canaries.
AUDIT_DEFAULTS: Mapping[str, Any] = {
    "noise-multiplier": 3.0,
    "sample-rate": 0.5,
    "local-steps": 10,
    "epsilon-budget": 3.0,
    "num-versions": 1000,
    "concurrency": 100,
    "buffer-size": 50,
    "eval-every": 1000,
    "eval-devices": 0,
    "export-top-k": "none",
    "output-dir": "runs/empirical-audit",
}

# k canaries per device: 943 x 8 = 7,544 canaries, whose ceiling (5.33 at δ = 1e-5) is
# near the largest the one-run bound allows at that δ (it peaks around 5,000 canaries).
CANARIES_PER_DEVICE = 8

# Where a broken-on-purpose audit writes unless told otherwise: apart from honest audits.
BROKEN_OUTPUT_DIR = "runs/empirical-audit-broken"

_EXIT_CODES: Mapping[str, int] = {"pass": 0, "no-guarantee": 0, "fail": 1, "inconclusive": 3}

_BIAS = "item_bias.weight"


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class CanaryPlan:
    """``k`` canaries per federated device; ``included`` is the secret the attacker never reads.

    Canary ``j`` belongs to device index ``device_index[j]`` (the partition / node order),
    whose dense user id is ``device_ids[j]``. A device's canaries are consecutive and
    distinct items.
    """

    device_ids: np.ndarray  # int64 (m,): dense user id of each canary's device
    device_index: np.ndarray  # int64 (m,): the device's position in the partitions (the attacker's index)
    canary_items: np.ndarray  # int64 (m,): dense item ids, public candidates
    included: np.ndarray  # bool (m,): the true bits S_j
    num_devices: int

    @property
    def num_canaries(self) -> int:
        """``m`` (devices x canaries per device)."""
        return int(self.device_ids.shape[0])


def plan_canaries(
    log_: InteractionLog, audit_seed: int, max_devices: int = 0, per_device: int = CANARIES_PER_DEVICE
) -> CanaryPlan:
    """Choose every federated device's canary items and their independent inclusion bits.

    Parameters
    ----------
    log_
        The base interactions (dense ids).
    audit_seed
        Seeds both the canary items and the bits (the attacker never sees this seed).
    max_devices
        As in the configuration: 0 = every device, else the first ``max_devices``.
    per_device
        ``k``: canaries per device, distinct items the user never interacted with.

    Returns
    -------
    CanaryPlan
        Devices are the users the leave-one-out split keeps (at least
        ``MIN_INTERACTIONS`` interactions), in ascending id, as the partitions order them.
    """
    if per_device < 1:
        raise ValueError(f"per_device must be >= 1, got {per_device}")
    counts = np.bincount(log_.user_ids, minlength=log_.num_users)
    devices = np.flatnonzero(counts >= MIN_INTERACTIONS).astype(np.int64)
    if max_devices:
        devices = devices[:max_devices]
    rng = np.random.default_rng([audit_seed, 0xCA7A])
    seen = np.zeros((log_.num_users, log_.num_items), dtype=bool)
    seen[log_.user_ids, log_.item_ids] = True
    items = np.empty((len(devices), per_device), dtype=np.int64)
    for j, user in enumerate(devices):
        unseen = np.flatnonzero(~seen[user])
        if len(unseen) < per_device:
            raise ValueError(f"user {user} has only {len(unseen)} items never interacted with; need {per_device}")
        items[j] = rng.choice(unseen, size=per_device, replace=False)
    # One independent fair bit per canary (record), as the one-run theorem requires.
    included = rng.random(items.size) < 0.5
    index = np.repeat(np.arange(len(devices), dtype=np.int64), per_device)
    return CanaryPlan(devices[index], index, items.reshape(-1), included, len(devices))


def write_canary_data(log_: InteractionLog, plan: CanaryPlan, path: Path) -> Path:
    """Write the base interactions plus the included canaries as a GroupLens ``u.data`` file.

    Ids are written 1-based (dense id + 1); every user and item of the base log keeps
    appearing, so :func:`~shared.data.formats.load_grouplens` maps them back to the
    same dense ids. Rows keep the base log's order (it breaks timestamp ties in the
    split) and the canaries follow, all before their user's first interaction and in plan
    order (one second apart), so they lead the user's training items.

    Returns
    -------
    Path
        The ``u.data`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = np.full(log_.num_users, np.inf)
    np.minimum.at(first, log_.user_ids, log_.timestamps)
    users = plan.device_ids[plan.included]
    items = plan.canary_items[plan.included]
    # Position of each included canary among its user's included canaries, and their count.
    rank = np.zeros(len(users), dtype=np.int64)
    total = np.bincount(users, minlength=log_.num_users)
    seen_so_far: dict[int, int] = {}
    for n, u in enumerate(users):
        rank[n] = seen_so_far.get(int(u), 0)
        seen_so_far[int(u)] = rank[n] + 1
    times = first[users] - (total[users] - rank).astype(np.float64)
    with path.open("w", encoding="latin-1") as f:
        # The rating column is ignored by the loader (every rating is an interaction).
        for u, i, t in zip(log_.user_ids, log_.item_ids, log_.timestamps, strict=True):
            f.write(f"{u + 1}\t{i + 1}\t1\t{t:.17g}\n")
        for u, i, t in zip(users, items, times, strict=True):
            f.write(f"{u + 1}\t{i + 1}\t1\t{t:.17g}\n")
    return path


def _check_canary_data(base: InteractionLog, path: Path, plan: CanaryPlan) -> None:
    """Re-read the written file and check ids, the split and the canaries' place in training."""
    written = load_grouplens(path)
    if (written.num_users, written.num_items) != (base.num_users, base.num_items):
        raise RuntimeError(
            f"{path}: {written.num_users} users / {written.num_items} items, "
            f"expected {base.num_users} / {base.num_items}"
        )
    before = {d.device_id: d for d in leave_one_out(base, MIN_INTERACTIONS)}
    after = {d.device_id: d for d in leave_one_out(written, MIN_INTERACTIONS)}
    for device in np.unique(plan.device_ids):
        b, a = before[int(device)], after[int(device)]
        if (a.valid_item, a.test_item) != (b.valid_item, b.test_item):
            raise RuntimeError(f"device {device}: the canaries moved its validation/test items")
        mine = plan.device_ids == device
        expected = np.concatenate((plan.canary_items[mine & plan.included], b.train_items))
        if not np.array_equal(a.train_items, expected):
            raise RuntimeError(f"device {device}: training items are not the base ones plus its included canaries")


# --------------------------------------------------------------------------- attacker


class CanaryAttacker:
    """The server's membership attack on every canary, from the updates it receives.

    Parameters
    ----------
    canary_items
        ``c_j`` per canary (public: the audit's candidates, not the bits).
    canary_devices
        The device index each canary belongs to (public too).
    learning_rate, weight_decay
        The devices' local SGD settings (part of the public protocol), used to remove
        the uniform weight-decay shrinkage from each update.
    """

    def __init__(
        self, canary_items: np.ndarray, canary_devices: np.ndarray, learning_rate: float, weight_decay: float
    ) -> None:
        self.canary_items = np.asarray(canary_items, dtype=np.int64)
        self.canary_devices = np.asarray(canary_devices, dtype=np.int64)
        if self.canary_items.shape != self.canary_devices.shape:
            raise ValueError("canary_items and canary_devices differ in length")
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        num_devices = int(self.canary_devices.max()) + 1 if len(self.canary_devices) else 0
        # Canaries of each device, so one update scores all of its k canaries at once.
        order = np.argsort(self.canary_devices, kind="stable")
        bounds = np.searchsorted(self.canary_devices[order], np.arange(num_devices + 1))
        self._of_device = [order[bounds[d] : bounds[d + 1]] for d in range(num_devices)]
        self.bias_score = np.zeros(len(self.canary_items))
        self.updates = np.zeros(num_devices, dtype=np.int64)

    def observe(self, device: int, sent: ArrayRecord, update: TrainUpdate) -> None:
        """Fold one TRAIN reply of ``device`` (its global-parameter delta) into its canaries' scores.

        Reads the delta and the step count only: never a record count or sampling rate.
        """
        delta, steps = update.delta, update.steps
        if not 0 <= device < len(self._of_device) or _BIAS not in delta:
            return
        mine = self._of_device[device]
        c = self.canary_items[mine]
        bias = sent[_BIAS].numpy().reshape(-1)
        change = delta[_BIAS].numpy().reshape(-1)
        # What weight decay alone does to a row over `steps` plain SGD steps.
        shrink = (1.0 - self.learning_rate * self.weight_decay) ** steps - 1.0
        self.bias_score[mine] += change[c] - shrink * bias[c]
        self.updates[device] += 1

    def scores(self) -> np.ndarray:
        """One score per canary (higher = more likely included); NaN where its device sent no update."""
        out = self.bias_score.copy()
        out[self.updates[self.canary_devices] == 0] = np.nan
        return out


class AuditingGrid(LocalGrid):
    """:class:`LocalGrid` that also hands every TRAIN reply the server receives to an attacker.

    Node ``i + 1`` is device index ``i`` (as in LocalGrid), which is the attacker's index.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, attacker: CanaryAttacker) -> None:
        super().__init__(client_app, num_nodes)
        self.attacker = attacker
        self._train_sent: dict[str, tuple[int, ArrayRecord]] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages, remembering what each TRAIN message carried (the server knows it)."""
        batch = list(messages)
        ids = list(super().push_messages(batch))
        accepted = set(ids)
        for msg in batch:
            mid = msg.metadata.message_id
            if mid in accepted and msg.metadata.message_type == MessageType.TRAIN:
                try:
                    self._train_sent[mid] = (msg.metadata.dst_node_id, parse_train_task(msg).model)
                except ProtocolError:
                    continue  # not a fedrec train task (a SecAgg+ stage): no plain update to see
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run and return the replies; show every successful TRAIN reply to the attacker."""
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            sent = self._train_sent.pop(reply.metadata.reply_to_message_id, None)
            if sent is None or reply.has_error():
                continue
            try:
                update = parse_train_reply(reply)
            except ProtocolError:
                continue  # the server would reject it too
            if isinstance(update, TrainUpdate):  # a refusal carries no delta
                self.attacker.observe(sent[0] - 1, sent[1], update)
        return replies


# ------------------------------------------------------------------------------ audit


@contextlib.contextmanager
def _broken_noise(factor: float) -> Iterator[None]:
    """Audit-only fault injection: devices train with noise ``σ x factor`` but account and log ``σ``.

    Patches :func:`client.device.train_locally` in this process (the audit's in-process
    devices) and restores it on exit. The wrapped call trains with a copy of the privacy
    configuration whose noise multiplier is ``σ x factor`` and charges that to a throwaway
    copy of the device's accountant; the real accountant is then charged the same
    steps and rates at ``σ``, so the epsilon the device reports, the ledger entries it
    signs and the run's summary all say ``σ``: exactly a DP-SGD bug that the accounting
    cannot see. No configuration key reaches this, so a ``fedrec simulate`` run or a
    Flower app config cannot enable it.
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"broken noise factor must lie in (0, 1), got {factor}")
    import client.device as device_module
    from shared.privacy.accounting import DeviceAccountant

    honest = device_module.train_locally

    def broken(model: Any, records: Any, train: Any, privacy: Any, accountant: Any, seed: int, **kwargs: Any) -> Any:
        if not privacy.dp or accountant is None:
            return honest(model, records, train, privacy, accountant, seed, **kwargs)
        before = accountant.history
        shadow = DeviceAccountant(privacy.accountant, privacy.delta, privacy.epsilon_budget, before)
        weak = dataclasses.replace(privacy, noise_multiplier=privacy.noise_multiplier * factor)
        result = honest(model, records, train, weak, shadow, seed, **kwargs)
        spent = shadow.history
        if spent[: len(before)] != before:  # σ x factor never merges into an entry at σ
            raise RuntimeError("broken-noise audit: the accountant's earlier history changed")
        # Charge what the honest mechanism would have: the same steps and rates, at σ.
        accountant.opacus.history = [*before, *((privacy.noise_multiplier, q, n) for _, q, n in spent[len(before) :])]
        return dataclasses.replace(result, epsilon=accountant.epsilon())

    device_module.train_locally = broken  # type: ignore[assignment]
    try:
        yield
    finally:
        device_module.train_locally = honest


def _auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of the observed scores (diagnostic only; NaN if undefined)."""
    ok = np.isfinite(scores)
    s, t = scores[ok], truth[ok]
    pos, neg = int(t.sum()), int((~t).sum())
    if not pos or not neg:
        return math.nan
    ranks = stats.rankdata(s)  # average ranks: ties count one half
    return float((ranks[t].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _precision_at(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    ok = np.flatnonzero(np.isfinite(scores))
    top = ok[np.argsort(scores[ok], kind="stable")][::-1][:k]
    return float(truth[top].mean()) if len(top) else math.nan


def audit_verdict(bound: float, accounted: float | None, ceiling: float) -> str:
    """``fail`` (bound above accounted ε), ``pass``, ``inconclusive`` (could not fail), ``no-guarantee`` (DP off)."""
    if accounted is None:
        return "no-guarantee"
    if bound > accounted:
        return "fail"
    # A ceiling at or below the accounted ε means no attack, however strong, could have
    # shown a violation: staying below it is no evidence for the mechanism.
    return "pass" if ceiling > accounted else "inconclusive"


def audit_exit_code(report: Mapping[str, Any]) -> int:
    """The command's exit status for a report: 0 pass / no guarantee, 1 fail, 3 inconclusive."""
    return _EXIT_CODES[str(report["verdict"])]


def run_canary_audit(
    overrides: Mapping[str, Any],
    audit_seed: int = 0,
    confidence: float = 0.95,
    *,
    canaries_per_device: int = CANARIES_PER_DEVICE,
    broken_noise_factor: float | None = None,
) -> dict[str, Any]:
    """Plant canaries, run one federation in-process with the server as attacker, and bound ε from below.

    Parameters
    ----------
    overrides
        Flat configuration keys over :data:`AUDIT_DEFAULTS` (which lie over the project
        defaults). The base data come from ``dataset`` / ``data-path`` / ``synthetic-*``;
        the federation itself runs on the canary data set (``dataset = "grouplens"``).
    audit_seed
        Seeds the canary items and inclusion bits; nothing the attacker reads depends on it
        except the public candidate items.
    confidence
        Of the lower bound (after the Bonferroni correction over the ``(k+, k-)`` grid).
    canaries_per_device
        ``k``; the audit has ``k x devices`` canaries.
    broken_noise_factor
        Audit-only fault injection (see :func:`_broken_noise`): devices train with noise
        multiplier ``σ x factor`` while accounting and logging ``σ``. The report is
        labelled "broken on purpose" and its verdict should be ``fail``.

    Returns
    -------
    dict
        ``dp``, ``verdict``, ``epsilon-accounted`` (max over devices, from the run's summary;
        None with DP off), ``epsilon-lower-bound``, ``epsilon-ceiling`` (what a perfect
        attacker could certify with every canary scored) and ``epsilon-ceiling-observed``
        (with the canaries actually scored), the :class:`AuditResult` fields, diagnostics,
        paths; also written to ``<output-dir>/empirical_audit.json``.

    Raises
    ------
    ValueError
        If DP is on with ``reproducible-noise``: the server could then regenerate and
        subtract the noise, so the guarantee being audited would not hold. Also for a
        broken-noise factor outside (0, 1) or with DP off.
    """
    started = time.monotonic()
    merged = {**AUDIT_DEFAULTS, **dict(overrides)}
    if broken_noise_factor is not None and "output-dir" not in overrides:
        merged["output-dir"] = BROKEN_OUTPUT_DIR  # never mistaken for an honest audit's results
    base_cfg = parse_config(merged)
    if base_cfg.privacy.dp and base_cfg.privacy.reproducible_noise:
        raise ValueError("reproducible-noise = true lets the server regenerate the DP noise; audit with false")
    if broken_noise_factor is not None:
        if not base_cfg.privacy.dp:
            raise ValueError("a broken-noise audit needs dp = true (there is no noise to break)")
        if not 0.0 < broken_noise_factor < 1.0:
            raise ValueError(f"broken noise factor must lie in (0, 1), got {broken_noise_factor}")
    out = Path(base_cfg.output_dir)
    claim_output_dir(out, overwrite=base_cfg.overwrite)
    data_dir = out / "canary-data"
    base = load_interactions(base_cfg.data)
    plan = plan_canaries(base, audit_seed, base_cfg.data.max_devices, canaries_per_device)
    delta = base_cfg.privacy.delta
    ceiling = audit_ceiling(plan.num_canaries, delta, confidence)
    if base_cfg.privacy.dp and ceiling <= base_cfg.privacy.epsilon_budget:
        _loud(
            f"with {plan.num_canaries} canaries at delta {delta:g} no attack can certify more than "
            f"epsilon {ceiling:.2f}, below the budget {base_cfg.privacy.epsilon_budget:g}: unless the devices "
            "spend less than that, the audit cannot fail and will report 'inconclusive'"
        )
    data_path = write_canary_data(base, plan, data_dir / "u.data")
    _check_canary_data(base, data_path, plan)

    run_keys = {"dataset": "grouplens", "data-path": str(data_path.resolve()),
                "cache-dir": str((data_dir / "cache").resolve())}  # fmt: skip
    cfg: FedrecConfig = parse_config({**merged, **run_keys})
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    info = prepare_partitions(cfg.data)  # before any device starts, as the runner does
    if info.num_devices != plan.num_devices:
        raise RuntimeError(f"{info.num_devices} devices but canaries planned for {plan.num_devices}")

    from client.app import build_client_app
    from server.app import run_federation

    attacker = CanaryAttacker(plan.canary_items, plan.device_index, cfg.train.learning_rate, cfg.train.weight_decay)
    if cfg.train.optimizer != "sgd" or cfg.train.momentum:
        log.warning("the attack's weight-decay correction assumes plain SGD; scores will be noisier")
    grid = AuditingGrid(build_client_app(to_flat(cfg)), info.num_devices, attacker)
    fault = _broken_noise(broken_noise_factor) if broken_noise_factor is not None else contextlib.nullcontext()
    with fault:
        summary = run_federation(grid, cfg, output_claimed=True)

    # Only now, after the run, are the bits compared with the attacker's scores.
    scores = attacker.scores()
    result: AuditResult = best_lower_bound(scores, plan.included, delta, confidence)
    observed = np.isfinite(scores)
    ceiling_observed = audit_ceiling(plan.num_canaries, delta, confidence, num_scored=int(observed.sum()))
    accounted = float(summary["privacy"]["epsilon-max"]) if cfg.privacy.dp else None  # DP off: no guarantee
    verdict = audit_verdict(result.epsilon_lower_bound, accounted, ceiling_observed)
    sigma = cfg.privacy.noise_multiplier if cfg.privacy.dp else 0.0
    report: dict[str, Any] = {
        "dp": cfg.privacy.dp,
        "verdict": verdict,
        "broken-on-purpose": broken_noise_factor is not None,
        "epsilon-accounted": accounted,
        "epsilon-lower-bound": result.epsilon_lower_bound,
        "epsilon-ceiling": ceiling,
        "epsilon-ceiling-observed": ceiling_observed,
        **{k.replace("_", "-"): v for k, v in asdict(result).items()},
        "precision": result.num_correct / result.num_guesses if result.num_guesses else math.nan,
        "canaries-per-device": canaries_per_device,
        "devices": plan.num_devices,
        "canaries-included": int(plan.included.sum()),
        "canaries-observed": int(observed.sum()),
        "updates-observed": int(attacker.updates.sum()),
        "auc": _auc(scores, plan.included),
        "precision-at-50": _precision_at(scores, plan.included, 50),
        "score": "sum over the device's updates of the canary's item-bias change minus weight-decay shrinkage",
        "audit-seed": audit_seed,
        "noise-multiplier": sigma,
        "noise-multiplier-trained": sigma * (broken_noise_factor or 1.0),
        "broken-noise-factor": broken_noise_factor,
        "clip-norm": cfg.privacy.clip_norm,
        "epsilon-budget": cfg.privacy.epsilon_budget,
        "final-test-hr@10": summary["final"]["hr@10"],
        "data-path": str(data_path),
        "wall-seconds": time.monotonic() - started,
        "config": to_flat(cfg),
    }
    if broken_noise_factor is not None:
        report["label"] = (
            f"BROKEN ON PURPOSE: devices trained with noise multiplier {sigma * broken_noise_factor:g} "
            f"(factor {broken_noise_factor:g}) while their ledgers and epsilon say {sigma:g}"
        )
    if verdict == "inconclusive":
        _loud(
            f"INCONCLUSIVE: the accounted epsilon {accounted:.3f} is at or above what a perfect attacker could "
            f"certify with these {int(observed.sum())} scored canaries ({ceiling_observed:.3f}); the audit could "
            "not have failed, so it says nothing about the mechanism. Use more canaries "
            "(--canaries-per-device) or a configuration that spends less"
        )
    (out / "empirical_audit.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return report


def _loud(message: str) -> None:
    """A warning nobody scrolls past: logged and printed to stderr."""
    log.warning("%s", message)
    print(f"fedrec audit --empirical: WARNING: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m simulations.canary_audit [--dp|--no-dp] [--set K=V ...] [--output DIR]``.

    Exit status: 0 pass (or DP off), 1 the bound exceeds the accounted epsilon (a privacy
    bug, or the broken mechanism caught), 3 inconclusive (the audit could not have failed).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (repeatable)")  # fmt: skip
    parser.add_argument("--dp", action=argparse.BooleanOptionalAction, default=None,
                        help="DP-SGD on the devices (default: the configuration's, on)")  # fmt: skip
    parser.add_argument("--output", default=None, help="output directory (default runs/empirical-audit)")
    parser.add_argument("--overwrite", action="store_true", help="replace the fedrec run in --output")
    parser.add_argument("--audit-seed", type=int, default=0, help="seed of the canaries and their bits")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--canaries-per-device", type=int, default=CANARIES_PER_DEVICE,
                        help="canaries per device, each in with probability 1/2 (default %(default)s)")  # fmt: skip
    parser.add_argument("--broken-noise-factor", type=float, default=None, metavar="F",
                        help="TEST THE AUDIT: devices train with noise multiplier x F but account the configured one "
                        "(a deliberately broken mechanism the audit must catch; exit 1 expected)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = parse_set_pairs(args.sets)
    if args.dp is not None:
        overrides["dp"] = args.dp
    if args.output:
        overrides["output-dir"] = args.output
    if args.overwrite:
        overrides["overwrite"] = True
    report = run_canary_audit(
        overrides,
        audit_seed=args.audit_seed,
        confidence=args.confidence,
        canaries_per_device=args.canaries_per_device,
        broken_noise_factor=args.broken_noise_factor,
    )
    accounted = "none (DP off)" if report["epsilon-accounted"] is None else f"{report['epsilon-accounted']:.3f}"
    label = f"{report['label']}\n" if report.get("label") else ""
    print(
        f"{label}[audit] DP {'on' if report['dp'] else 'off'}: verdict {report['verdict'].upper()}: "
        f"empirical epsilon lower bound {report['epsilon-lower-bound']:.3f} vs accounted epsilon {accounted} "
        f"(ceiling {report['epsilon-ceiling-observed']:.3f}; confidence {report['confidence']}, "
        f"delta {report['delta']:g}; {report['num-correct']}/{report['num-guesses']} correct, "
        f"k+={report['k-plus']}, k-={report['k-minus']}, {report['num-canaries']} canaries "
        f"({report['canaries-per-device']} per device, {report['canaries-observed']} scored), "
        f"AUC {report['auc']:.3f}); {report['wall-seconds']:.0f} s",
        flush=True,
    )
    return audit_exit_code(report)


if __name__ == "__main__":
    raise SystemExit(main())
