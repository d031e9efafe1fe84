"""Empirical privacy audit of a real fedrec federation with one run (Steinke, Nasr and Jagielski 2023).

Design
------
* **Canaries.** Every federated device (user) ``d`` gets one canary interaction: an item
  ``c_d`` drawn uniformly from the items the user never interacted with. With
  probability 1/2 (the bit ``S_d``, drawn from ``audit_seed``) the canary is added to
  the user's history with a timestamp one second before the user's first interaction,
  so the leave-one-out split keeps it in training (validation and test items are
  unchanged). The modified data set is written in GroupLens ``u.data`` format into the
  run's output directory and the federation runs on it with ``dataset = "grouplens"``.
* **Attacker = the honest-but-curious server.** :class:`AuditingGrid` wraps the
  in-process :class:`~simulations.local_grid.LocalGrid`: every TRAIN reply the server
  receives is also handed to :class:`CanaryAttacker` together with the global
  parameters that task was sent. That is exactly the server's view: the delta of the
  global parameters (never the user embedding). The attacker knows the public canary
  candidates ``c_d`` and the protocol configuration, never the bits.
* **Score.** NCF's item bias row ``c`` moves *up* by about ``lr (1 - p) / B`` every
  step the record ``(d, c)`` is in the batch, and only *down* (by ``lr p_neg / B``,
  ``p_neg`` about ``1 / (1 + K)``) when ``c`` is drawn as one of the uniform negatives. Weight
  decay shrinks every row by the same known factor, so the attacker removes
  ``((1 - lr wd)^steps - 1) * b`` (what the row would have moved with no gradient at
  all) and sums the residual of row ``c_d`` over device ``d``'s updates. The residual is
  in absolute units (learning-rate steps), which are comparable across devices, unlike a
  rank within one device's update. Devices that never trained have no score (abstain).
  Only the delta is used: ``num-examples`` and ``sample-rate`` (which depend on whether
  the canary is included, and are not covered by DP) are deliberately ignored.
* **Bound.** :func:`server.audit.empirical.best_lower_bound` over a public
  ``(k+, k-)`` grid with a Bonferroni correction, at the run's δ, compared with the
  accounted ε (``summary["privacy"]["epsilon-max"]``). The run's transcript is
  (ε_max, δ)-DP with respect to each canary (the canary changes only its own device's
  releases, which that device's accountant covers under adaptive composition), so with
  DP on the lower bound must stay below ε_max with probability ≥ ``confidence``.

Run ``python -m simulations.canary_audit --no-dp`` (or ``--dp``); ``--set KEY=VALUE``
overrides any configuration key.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType
from flwr.clientapp import ClientApp
from scipy import stats

from server.audit.empirical import AuditResult, best_lower_bound
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
    "AuditingGrid",
    "CanaryAttacker",
    "CanaryPlan",
    "main",
    "plan_canaries",
    "run_canary_audit",
    "write_canary_data",
]

# The audited configuration: the project's defaults (DP σ 1.0, clip 1, budget ε 8,
# 10 local steps, batch 8) on all 943 MovieLens-100K users, with enough versions that
# most devices train at least once (the scheduler picks idle devices uniformly, so
# 40 versions x 50 updates give ~2 tasks per device) and without intermediate
# evaluations or exports, which the audit does not need. Only ``dp`` differs between the
# DP-on and DP-off audits.
AUDIT_DEFAULTS: Mapping[str, Any] = {
    "num-versions": 40,
    "concurrency": 100,
    "buffer-size": 50,
    "eval-every": 1000,
    "eval-devices": 0,
    "export-top-k": "none",
    "output-dir": "runs/empirical-audit",
}

_BIAS = "item_bias.weight"


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class CanaryPlan:
    """One canary per federated device; ``included`` is the secret the attacker never reads."""

    device_ids: np.ndarray  # int64 (m,), dense user ids == device ids, in device order
    canary_items: np.ndarray  # int64 (m,), dense item ids: public candidates
    included: np.ndarray  # bool (m,): the true bits S_d

    @property
    def num_canaries(self) -> int:
        """``m``."""
        return int(self.device_ids.shape[0])


def plan_canaries(log_: InteractionLog, audit_seed: int, max_devices: int = 0) -> CanaryPlan:
    """Choose every federated device's canary item and its inclusion bit.

    Parameters
    ----------
    log_
        The base interactions (dense ids).
    audit_seed
        Seeds both the canary items and the bits (the attacker never sees this seed).
    max_devices
        As in the configuration: 0 = every device, else the first ``max_devices``.

    Returns
    -------
    CanaryPlan
        Devices are the users the leave-one-out split keeps (at least
        ``MIN_INTERACTIONS`` interactions), in ascending id, as the partitions order them.
    """
    counts = np.bincount(log_.user_ids, minlength=log_.num_users)
    devices = np.flatnonzero(counts >= MIN_INTERACTIONS).astype(np.int64)
    if max_devices:
        devices = devices[:max_devices]
    rng = np.random.default_rng([audit_seed, 0xCA7A])
    seen = np.zeros((log_.num_users, log_.num_items), dtype=bool)
    seen[log_.user_ids, log_.item_ids] = True
    items = np.empty(len(devices), dtype=np.int64)
    for j, user in enumerate(devices):
        unseen = np.flatnonzero(~seen[user])
        if len(unseen) == 0:
            raise ValueError(f"user {user} has interacted with every item: no canary candidate")
        items[j] = unseen[rng.integers(len(unseen))]
    included = rng.random(len(devices)) < 0.5
    return CanaryPlan(devices, items, included)


def write_canary_data(log_: InteractionLog, plan: CanaryPlan, path: Path) -> Path:
    """Write the base interactions plus the included canaries as a GroupLens ``u.data`` file.

    Ids are written 1-based (dense id + 1); every user and item of the base log keeps
    appearing, so :func:`~shared.data.formats.load_grouplens` maps them back to the
    same dense ids. Rows keep the base log's order (it breaks timestamp ties in the
    split) and the canaries follow, each one second before its user's first interaction.

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
    canary_rows = zip(users, plan.canary_items[plan.included], first[users] - 1.0, strict=True)
    with path.open("w", encoding="latin-1") as f:
        # The rating column is ignored by the loader (every rating is an interaction).
        for u, i, t in zip(log_.user_ids, log_.item_ids, log_.timestamps, strict=True):
            f.write(f"{u + 1}\t{i + 1}\t1\t{t:.17g}\n")
        for u, i, t in canary_rows:
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
    for device, item, inc in zip(plan.device_ids, plan.canary_items, plan.included, strict=True):
        b, a = before[int(device)], after[int(device)]
        if (a.valid_item, a.test_item) != (b.valid_item, b.test_item):
            raise RuntimeError(f"device {device}: the canary moved its validation/test items")
        expected = np.concatenate(([item], b.train_items)) if inc else b.train_items
        if not np.array_equal(a.train_items, expected):
            raise RuntimeError(f"device {device}: training items are not the base ones plus the canary")


# --------------------------------------------------------------------------- attacker


class CanaryAttacker:
    """The server's membership attack on each device's canary, from the updates it receives.

    Parameters
    ----------
    canary_items
        ``c_d`` per device index (public: the audit's candidates, not the bits).
    learning_rate, weight_decay
        The devices' local SGD settings (part of the public protocol), used to remove
        the uniform weight-decay shrinkage from each update.
    """

    def __init__(self, canary_items: np.ndarray, learning_rate: float, weight_decay: float) -> None:
        self.canary_items = np.asarray(canary_items, dtype=np.int64)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        m = len(self.canary_items)
        self.bias_score = np.zeros(m)
        self.updates = np.zeros(m, dtype=np.int64)

    def observe(self, device: int, sent: ArrayRecord, update: TrainUpdate) -> None:
        """Fold one TRAIN reply of ``device`` (its global-parameter delta) into its score."""
        delta, steps = update.delta, update.steps
        if not 0 <= device < len(self.canary_items) or _BIAS not in delta:
            return
        c = int(self.canary_items[device])
        bias = sent[_BIAS].numpy().reshape(-1)
        change = delta[_BIAS].numpy().reshape(-1)
        # What weight decay alone does to a row over `steps` plain SGD steps.
        shrink = (1.0 - self.learning_rate * self.weight_decay) ** steps - 1.0
        self.bias_score[device] += float(change[c] - shrink * bias[c])
        self.updates[device] += 1

    def scores(self) -> np.ndarray:
        """One score per device (higher = canary more likely included); NaN where no update was seen."""
        out = self.bias_score.copy()
        out[self.updates == 0] = np.nan
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


def run_canary_audit(overrides: Mapping[str, Any], audit_seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
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

    Returns
    -------
    dict
        ``dp``, ``epsilon-accounted`` (max over devices, from the run's summary; None with DP off),
        ``epsilon-lower-bound``, the :class:`AuditResult` fields, diagnostics, paths; also
        written to ``<output-dir>/empirical_audit.json``.

    Raises
    ------
    ValueError
        If DP is on with ``reproducible-noise``: the server could then regenerate and
        subtract the noise, so the guarantee being audited would not hold.
    """
    started = time.monotonic()
    merged = {**AUDIT_DEFAULTS, **dict(overrides)}
    base_cfg = parse_config(merged)
    if base_cfg.privacy.dp and base_cfg.privacy.reproducible_noise:
        raise ValueError("reproducible-noise = true lets the server regenerate the DP noise; audit with false")
    out = Path(base_cfg.output_dir)
    claim_output_dir(out, overwrite=base_cfg.overwrite)
    data_dir = out / "canary-data"
    base = load_interactions(base_cfg.data)
    plan = plan_canaries(base, audit_seed, base_cfg.data.max_devices)
    data_path = write_canary_data(base, plan, data_dir / "u.data")
    _check_canary_data(base, data_path, plan)

    run_keys = {"dataset": "grouplens", "data-path": str(data_path.resolve()),
                "cache-dir": str((data_dir / "cache").resolve())}  # fmt: skip
    cfg: FedrecConfig = parse_config({**merged, **run_keys})
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    info = prepare_partitions(cfg.data)  # before any device starts, as the runner does
    if info.num_devices != plan.num_canaries:
        raise RuntimeError(f"{info.num_devices} devices but {plan.num_canaries} canaries")

    from client.app import build_client_app
    from server.app import run_federation

    attacker = CanaryAttacker(plan.canary_items, cfg.train.learning_rate, cfg.train.weight_decay)
    if cfg.train.optimizer != "sgd" or cfg.train.momentum:
        log.warning("the attack's weight-decay correction assumes plain SGD; scores will be noisier")
    grid = AuditingGrid(build_client_app(to_flat(cfg)), info.num_devices, attacker)
    summary = run_federation(grid, cfg, output_claimed=True)

    # Only now, after the run, are the bits compared with the attacker's scores.
    scores = attacker.scores()
    result: AuditResult = best_lower_bound(scores, plan.included, cfg.privacy.delta, confidence)
    observed = np.isfinite(scores)
    report: dict[str, Any] = {
        "dp": cfg.privacy.dp,
        "epsilon-accounted": float(summary["privacy"]["epsilon-max"]) if cfg.privacy.dp else None,  # no guarantee
        "epsilon-lower-bound": result.epsilon_lower_bound,
        **{k.replace("_", "-"): v for k, v in asdict(result).items()},
        "precision": result.num_correct / result.num_guesses if result.num_guesses else math.nan,
        "canaries-included": int(plan.included.sum()),
        "canaries-observed": int(observed.sum()),
        "updates-observed": int(attacker.updates.sum()),
        "auc": _auc(scores, plan.included),
        "precision-at-50": _precision_at(scores, plan.included, 50),
        "score": "sum over the device's updates of the canary's item-bias change minus weight-decay shrinkage",
        "audit-seed": audit_seed,
        "noise-multiplier": cfg.privacy.noise_multiplier if cfg.privacy.dp else 0.0,
        "clip-norm": cfg.privacy.clip_norm,
        "epsilon-budget": cfg.privacy.epsilon_budget,
        "final-test-hr@10": summary["final"]["hr@10"],
        "data-path": str(data_path),
        "wall-seconds": time.monotonic() - started,
        "config": to_flat(cfg),
    }
    (out / "empirical_audit.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m simulations.canary_audit [--dp|--no-dp] [--set K=V ...] [--output DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (repeatable)")  # fmt: skip
    parser.add_argument("--dp", action=argparse.BooleanOptionalAction, default=None,
                        help="DP-SGD on the devices (default: the configuration's, on)")  # fmt: skip
    parser.add_argument("--output", default=None, help="output directory (default runs/empirical-audit)")
    parser.add_argument("--audit-seed", type=int, default=0, help="seed of the canaries and their bits")
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = parse_set_pairs(args.sets)
    if args.dp is not None:
        overrides["dp"] = args.dp
    if args.output:
        overrides["output-dir"] = args.output
    report = run_canary_audit(overrides, audit_seed=args.audit_seed, confidence=args.confidence)
    accounted = "none (DP off)" if report["epsilon-accounted"] is None else f"{report['epsilon-accounted']:.3f}"
    print(
        f"[audit] DP {'on' if report['dp'] else 'off'}: empirical epsilon lower bound "
        f"{report['epsilon-lower-bound']:.3f} (confidence {report['confidence']}, delta {report['delta']:g}; "
        f"{report['num-correct']}/{report['num-guesses']} correct, k+={report['k-plus']}, k-={report['k-minus']}, "
        f"{report['num-canaries']} canaries, AUC {report['auc']:.3f}) vs accounted epsilon "
        f"{accounted}; {report['wall-seconds']:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
