"""One federated training run: scheduler + Grid driver + evaluation + results.

Data flows one way: the scheduler picks devices and versions, the driver carries
the global model out and deltas back, the scheduler folds deltas into new
versions in virtual-time order, and every event is written to the run database.
"""

from __future__ import annotations

import logging
import math
import secrets
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.aggregation import StateDict, polynomial_staleness
from server.fleet import Fleet
from server.grid_driver import GridDriver
from server.ledger_intake import IntakeResult, LedgerIntake
from server.privacy_store import PrivacyStore
from server.run_store import (
    EvalRecord,
    PrivacyRecord,
    RunStore,
    TaskRecord,
    UserReleaseRecord,
    VersionRecord,
)
from server.scheduler import Completion, DeviceStatus, Failure, Outcome, Refusal, Scheduler, Task, Update
from shared.config import FedrecConfig, to_flat
from shared.typed_fields import get_float, get_int, get_int_list

log = logging.getLogger("fedrec.server")

_DISCOVERY_TIMEOUT = 300.0


@dataclass
class EvalOutcome:
    """Averages of one on-device evaluation round."""

    record: EvalRecord
    top_lists: dict[int, list[int]] = field(default_factory=dict)


def validate_update(reply: Message, reference: StateDict) -> Outcome:
    """Turn a train reply into an Update, Refusal or Failure; never trust its content blindly."""
    if reply.has_error():
        return Failure("failed", f"device error {reply.error.code}: {reply.error.reason}")
    content = reply.content
    try:
        status = str(content.config_records["status"]["status"])
    except KeyError:
        return Failure("failed", "malformed reply: no status")
    if status == "refused":
        return Refusal(str(content.config_records["status"].get("reason", "budget exhausted")))
    if status != "ok":
        return Failure("failed", f"malformed reply: unknown status {status!r}")
    try:
        delta = dict(content.array_records["delta"].to_torch_state_dict())
        metrics = content.metric_records["metrics"]
        num_examples = get_int(metrics, "num-examples")
        # Under DP the device does not report its training loss (it is computed from
        # its records and is not covered by the DP guarantee).
        loss = get_float(metrics, "loss") if "loss" in metrics else None
    except (KeyError, ValueError, TypeError) as exc:
        return Failure("failed", f"malformed reply: {exc}")
    if set(delta) != set(reference):
        extra = sorted(set(delta) - set(reference))
        missing = sorted(set(reference) - set(delta))
        return Failure("failed", f"corrupt update: unexpected {extra} / missing {missing}")
    for key, value in delta.items():
        if value.shape != reference[key].shape:
            return Failure("failed", f"corrupt update: {key} has shape {tuple(value.shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            return Failure("failed", f"corrupt update: {key} has non-finite values")
    if num_examples <= 0:
        return Failure("failed", f"corrupt update: num-examples = {num_examples}")
    return Update(delta, num_examples, loss)


class Federation:
    """Runs one training job to completion and records it."""

    def __init__(
        self,
        grid: Grid,
        cfg: FedrecConfig,
        num_devices: int,
        num_items: int,
        initial: StateDict,
        store: RunStore,
        run_name: str = "run",
        privacy_store: PrivacyStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.num_devices = num_devices
        self.num_items = num_items
        self.driver = GridDriver(
            grid,
            cfg.aggregation.wall_timeout,
            on_late_reply=self._late_reply,
            # Simulated devices share a few CPU cores: a small window of messages at the
            # Grid keeps them busy (grid_driver.py says why more costs time). Real devices
            # each compute on their own, so every dispatched task goes out at once.
            max_in_flight=None if cfg.data.deploy_devices else (cfg.aggregation.max_in_flight or None),
        )
        fleet_cfg = cfg.fleet
        if cfg.data.deploy_devices:
            # Real devices: availability and drop-outs are whatever really happens; the
            # simulated ones would make the server skip or give up on devices that are there.
            fleet_cfg = replace(fleet_cfg, availability_mean=1.0, dropout_rate=0.0)
        self.fleet = Fleet(num_devices, fleet_cfg, cfg.seed)
        user_level = None
        if cfg.privacy.user_dp:
            from server.user_level import UserLevelMechanism

            user_level = UserLevelMechanism(cfg.privacy, seed=cfg.seed)
        self.scheduler = Scheduler(
            cfg.aggregation,
            self.fleet,
            cfg.train.local_steps,
            initial,
            polynomial_staleness(cfg.aggregation.staleness_exponent),
            cfg.seed,
            user_level,
        )
        self.device_user_epsilon: dict[int, float] = {}
        self.store = store
        self.run_id = store.start_run(run_name, cfg.seed, to_flat(cfg))
        # Unique across runs (the database restarts run ids): ledger entries name their run.
        self.run_label = f"{run_name}#{self.run_id}-{secrets.token_hex(4)}"
        store.label_run(self.run_id, self.run_label)
        self.intake = LedgerIntake(cfg, privacy_store) if privacy_store is not None else None
        if self.intake is not None:
            self.intake.run_label = self.run_label
        self.device_epsilon: dict[int, float] = {}
        self.status_counts: dict[str, int] = {}
        self.evaluations: list[EvalRecord] = []
        self._t0 = time.monotonic()
        self._model_rec: ArrayRecord | None = None
        self._model_rec_version = -1
        self._lost: dict[int, Task] = {}  # device -> its task resolved as lost, reply still due
        # Devices whose latest releases may not have reached the server (a reply that never
        # came or could not be used): asked for their ledgers at the end (reconcile_ledgers).
        self._unsettled: set[int] = set()
        self.unreconciled: set[int] = set()
        rng = np.random.default_rng([cfg.seed, 0xE7A1])
        n_eval = cfg.eval.eval_devices or num_devices
        self.eval_subset = sorted(rng.choice(num_devices, size=min(n_eval, num_devices), replace=False).tolist())

    def wall(self) -> float:
        """Real seconds since the federation started."""
        return time.monotonic() - self._t0

    # -- messages --------------------------------------------------------------------
    def _model_record(self) -> ArrayRecord:
        # One record per model version, shared by every message that carries it: a copy
        # per message would hold concurrency x model size in memory (GBs for large models).
        if self._model_rec_version != self.scheduler.version or self._model_rec is None:
            self._model_rec = ArrayRecord({k: v for k, v in self.scheduler.params.items()})
            self._model_rec_version = self.scheduler.version
        return self._model_rec

    def _dispatch(self, task: Task) -> str:
        content = RecordDict(
            {
                "global": self._model_record(),
                "config": ConfigRecord(
                    {
                        "version": task.base_version,
                        "task-seed": task.task_id,
                        "run": self.run_label,
                        "ledger-head": self.intake.head_seq(task.device_id) if self.intake else -1,
                    }
                ),
            }
        )
        # Pushed in virtual finish order: the order in which the server will wait for them.
        return self.driver.send(task.device_id, content, MessageType.TRAIN, priority=task.finish_at)

    # -- the loop --------------------------------------------------------------------
    def train(self) -> None:
        """Dispatch and complete tasks until the scheduler is finished."""
        if self.cfg.aggregation.secure_aggregation:
            self._train_secure()
            return
        sched = self.scheduler
        messages: dict[int, tuple[Task, str]] = {}
        while not sched.finished:
            for task in sched.dispatch():
                messages[task.task_id] = (task, self._dispatch(task))
            due = sched.next_due()
            if due is None:
                continue
            task = due
            mid = messages.pop(task.task_id)[1]
            if task.lost:
                # The simulated device went away: its reply, whenever it comes, is ignored.
                self._lost[task.device_id] = task
                self.driver.discard(mid)
                outcome: Outcome = Failure(task.lost, "simulated " + task.lost)
                reply = None
            else:
                reply = self.driver.wait(mid)
                outcome = (
                    Failure("timeout", "no reply within wall-timeout")
                    if reply is None
                    else validate_update(reply, sched.params)
                )
                if isinstance(outcome, Update) and reply is not None and self.intake is not None:
                    intake = self._check_ledger(task.device_id, task.task_id, reply, outcome.num_examples)
                    if not intake.accepted:
                        log.warning("device %d: ledger rejected: %s", task.device_id, "; ".join(intake.problems))
                        outcome = Failure("rejected-ledger", "; ".join(intake.problems))
            if not task.lost and isinstance(outcome, Failure) and outcome.kind in ("timeout", "failed"):
                # (A simulated loss is not: its reply still arrives, as a late reply.)
                self._unsettled.add(task.device_id)
            completion = sched.complete(task, outcome)
            self._record(completion, reply)
            if completion.applied_version is not None:
                self._on_version(completion.applied_version)
        # Tasks still running when the run ends: their updates are not used, but the
        # devices train and spend privacy, which their late replies record.
        for task, mid in messages.values():
            self._lost[task.device_id] = task
            self.driver.discard(mid)

    def _train_secure(self) -> None:
        """Synchronous FedAvg where each cohort is aggregated by SecAgg+ (server/secagg.py).

        The server sees only each cohort's sum. Simulated drop-outs never join the round;
        devices' ledger entries, which the legacy SecAgg+ reply cannot carry, are fetched
        with a query after each round and verified like any others, before the sum is
        applied: a contribution whose ledger fails cannot be taken back out of a masked
        sum, so the whole aggregate is then withheld.
        """
        from server.secagg import SecAggError, run_secagg_round

        sched = self.scheduler
        agg = self.cfg.aggregation
        while not sched.finished:
            tasks = sched.dispatch()
            if not tasks:
                continue
            live = {self.driver.node_of[t.device_id]: t for t in tasks if not t.lost}
            contributed: set[int] = set()
            delta = None
            if len(live) >= 3:  # Flower's SecAgg+ needs more than two shares
                try:
                    result = run_secagg_round(
                        self.driver.grid,
                        list(live),
                        sched.params,
                        {"run": self.run_label, "version": sched.version},
                        num_shares=len(live),
                        reconstruction_threshold=max(2, math.ceil(2 * len(live) / 3)),
                        clipping_range=agg.secagg_clipping_range,
                        quantization_range=2**22,
                        timeout=agg.wall_timeout,
                        max_weight=agg.secagg_max_weight,
                        per_node_config={n: {"task-seed": t.task_id} for n, t in live.items()},
                        server_round=sched.version + 1,
                    )
                    delta = result.delta
                    contributed = {live[n].device_id for n in result.contributors}
                except (SecAggError, ValueError) as exc:
                    log.warning("SecAgg+ round at version %d failed: %s", sched.version, exc)
            else:
                log.warning("cohort at version %d has %d live devices; SecAgg+ needs 3", sched.version, len(live))
            # Live devices left out of the sum may still have trained and spent.
            self._unsettled.update(t.device_id for t in live.values() if t.device_id not in contributed)
            rejected = self._collect_ledgers({t.device_id: t.task_id for t in tasks if t.device_id in contributed})
            if rejected and delta is not None:
                log.warning(
                    "SecAgg+ aggregate at version %d withheld: ledgers of devices %s failed verification",
                    sched.version,
                    sorted(rejected),
                )
                delta = None
            for c in sched.complete_cohort(tasks, delta, contributed, rejected=rejected):
                self._record(c, None)
            if delta is not None:
                self._on_version(sched.version)

    def _collect_ledgers(self, contributors: dict[int, int]) -> set[int]:
        """Fetch and verify the new ledger entries of SecAgg+ contributors (device -> task id).

        Returns the devices whose ledger did not arrive or failed verification, including
        a ledger without a release for the task whose update is in the sum.
        """
        if self.intake is None or not self.intake.enabled:
            return set()
        rejected = set()
        for device, reply in self._ask_ledgers(contributors).items():
            if reply is None:
                log.warning("device %d did not send its ledger", device)
                rejected.add(device)
                self._unsettled.add(device)
                continue
            result = self._check_ledger(device, contributors[device], reply, None)
            if not result.accepted:
                log.warning("device %d: ledger rejected: %s", device, "; ".join(result.problems))
                rejected.add(device)
        return rejected

    def _ask_ledgers(self, devices: Iterable[int], timeout: float | None = None) -> dict[int, Message | None]:
        """Ask ``devices`` at once for the ledger entries the server lacks; each reply (None: none, or an error)."""
        assert self.intake is not None
        mids = {}
        for device in sorted(devices):
            conf = ConfigRecord({"ledger-head": self.intake.head_seq(device)})
            mids[device] = self.driver.send(device, RecordDict({"config": conf}), MessageType.QUERY, timeout=timeout)
        replies: dict[int, Message | None] = {}
        for device, mid in mids.items():
            reply = self.driver.wait(mid)
            # A reply without a ledger is passed on: the intake records it as a rejection.
            replies[device] = reply if reply is not None and not reply.has_error() else None
        return replies

    def reconcile_ledgers(self, timeout: float | None = None) -> None:
        """At the end of a run, ask devices whose latest releases may be missing for their new entries.

        A task that timed out or failed, or a SecAgg+ participant left out of the sum, may
        have trained and signed a release whose entry never reached the server (a retired
        device never replies again). Each such device is asked once, with ``timeout``
        (default: the wall timeout, at most 60 s, so a dead device cannot hold the run's
        end); the entries are verified like any others. Devices that do not answer are
        kept in :attr:`unreconciled` and counted in the summary.
        """
        if self.intake is None or not self.intake.enabled or not self._unsettled:
            return
        wait = min(self.cfg.aggregation.wall_timeout, 60.0) if timeout is None else timeout
        for device, reply in self._ask_ledgers(self._unsettled, timeout=wait).items():
            if reply is None:
                log.warning("device %d did not answer the final ledger query", device)
                self.unreconciled.add(device)
                continue
            self._check_ledger(device, None, reply, None)
        self._unsettled.clear()

    def _note_epsilon(self, device_id: int, epsilon: float) -> None:
        """Keep the highest cumulative epsilon any reply of the device has reported.

        Cumulative epsilon only grows, so the maximum is the latest; replies of
        lost tasks and evaluation replies count too, since the device spent the
        budget whether or not the server used its update.
        """
        if self.cfg.privacy.dp and epsilon > self.device_epsilon.get(device_id, 0.0):
            self.device_epsilon[device_id] = epsilon

    def _late_reply(self, device_id: int, reply: Message) -> None:
        """A reply to a task already resolved as lost: record its privacy spending only."""
        task = self._lost.pop(device_id, None)
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            return
        metrics = reply.content.metric_records["metrics"]
        if not self.cfg.privacy.dp or "epsilon" not in metrics:
            return
        status = reply.content.config_records.get("status")
        if status is None or str(status.get("status", "")) != "ok":
            return  # a late refusal spent nothing
        self._note_epsilon(device_id, get_float(metrics, "epsilon"))
        if self.intake is not None:
            # Whether or not the task is still known here (a device with two lost tasks has one
            # entry in _lost), its signed entries name their own tasks.
            examples = get_int(metrics, "num-examples") if "num-examples" in metrics else None
            self._check_ledger(device_id, None, reply, examples)
        elif task is not None:
            self._add_privacy(task, metrics, "spent")

    def _check_ledger(
        self, device_id: int, task_id: int | None, reply: Message, num_examples: int | None
    ) -> IntakeResult:
        """Verify a reply's ledger entries; every verified record-level entry becomes a spending row.

        Rows come from verified, signed entries, whatever path they arrived by (a used
        update, a lost task's late reply, a query after a SecAgg+ round, or entries of
        the device's earlier runs), so replaying a device's rows in order reproduces its
        lifetime claims.
        """
        assert self.intake is not None
        result = self.intake.check(device_id, task_id, reply, num_examples)
        for e in result.entries if result.accepted else ():
            if e.unit != "record":
                continue
            self._note_epsilon(device_id, e.epsilon)
            self.store.add_privacy(
                self.run_id,
                PrivacyRecord(
                    device_id=device_id,
                    task_id=e.task_id,
                    version=e.version,
                    epsilon=e.epsilon,
                    delta=e.delta,
                    noise_multiplier=e.noise_multiplier,
                    sample_rate=e.sample_rate,
                    steps=e.steps,
                    clip_norm=e.clip_norm,
                    accountant=e.accountant,
                    status="spent",
                ),
            )
        return result

    def _add_privacy(self, t: Task, metrics: MetricRecord, status: str) -> None:
        p = self.cfg.privacy
        self.store.add_privacy(
            self.run_id,
            PrivacyRecord(
                device_id=t.device_id,
                task_id=t.task_id,
                version=t.base_version,
                epsilon=get_float(metrics, "epsilon"),
                delta=p.delta,
                noise_multiplier=p.noise_multiplier,
                sample_rate=get_float(metrics, "sample-rate", 0.0),
                steps=get_int(metrics, "steps") if "steps" in metrics else 0,
                clip_norm=p.clip_norm,
                accountant=p.accountant,
                status=status,
            ),
        )

    def _record(self, c: Completion, reply: Message | None) -> None:
        self.status_counts[c.status] = self.status_counts.get(c.status, 0) + 1
        t = c.task
        self.store.add_task(
            self.run_id,
            TaskRecord(
                t.task_id,
                t.device_id,
                t.base_version,
                t.dispatched_at,
                t.finish_at,
                c.status,
                c.staleness,
                c.applied_version,
                c.num_examples,
                c.loss,
            ),
        )
        if c.status == "failed" or reply is None or reply.has_error():
            if c.status == "failed":
                log.warning("task %d on device %d failed", t.task_id, t.device_id)
            return
        metrics = reply.content.metric_records.get("metrics")
        if metrics is None or not self.cfg.privacy.dp or "epsilon" not in metrics:
            return
        # A rejected ledger is unverified, but the device did spend: its claim still counts
        # towards the reported maximum (never under-report).
        self._note_epsilon(t.device_id, get_float(metrics, "epsilon"))
        if c.status == "refused":
            self._add_privacy(t, metrics, "refused")
        elif self.intake is None and c.status != "rejected-ledger":
            self._add_privacy(t, metrics, "spent")  # spending rows otherwise come from verified entries

    def _on_version(self, version: int) -> None:
        sched = self.scheduler
        mech = sched.user_level
        if mech is not None:
            for rel in sched.last_user_releases:
                self.device_user_epsilon[rel.device_id] = rel.epsilon
                self.store.add_user_release(
                    self.run_id,
                    UserReleaseRecord(
                        version,
                        rel.device_id,
                        rel.weight,
                        mech.noise_multiplier,
                        mech.clip,
                        mech.order,
                        rel.epsilon,
                        mech.delta,
                    ),
                )
        recent = sched.applied_staleness[-self.cfg.aggregation.buffer_size :] or [0]
        self.store.add_version(
            self.run_id,
            VersionRecord(version, sched.now, self.wall(), len(recent), float(np.mean(recent)), int(max(recent))),
        )
        if version % self.cfg.eval.eval_every == 0 or version == self.cfg.aggregation.num_versions:
            result = self.evaluate(self.eval_subset, "valid", export=False)
            self._progress(result.record)

    def _progress(self, rec: EvalRecord) -> None:
        eps = max(self.device_epsilon.values(), default=0.0)
        print(
            f"[fedrec] v{rec.version:>4}/{self.cfg.aggregation.num_versions}  sim {rec.sim_time:8.0f}s  "
            f"wall {rec.wall_time:6.0f}s  updates {self.status_counts.get('accepted', 0):>5}  "
            f"valid NDCG@{rec.k} {rec.ndcg:.4f}  HR@{rec.k} {rec.hr:.4f}  eps max {eps:.2f}",
            file=sys.stderr,
            flush=True,
        )

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, devices: list[int], split: str, export: bool) -> EvalOutcome:
        """On-device evaluation of the current global model on ``devices``."""
        content_cfg: dict[str, Any] = {
            "split": split,
            "version": self.scheduler.version,
            "export-top-k": export,
            "run": self.run_label,
        }
        sums = {"hit": 0.0, "ndcg": 0.0, "sampled-hit": 0.0, "sampled-ndcg": 0.0}
        users = 0
        tops: dict[int, list[int]] = {}
        replies: list[tuple[int, Message | None]] = []
        wave = self.cfg.aggregation.concurrency
        # In waves of `concurrency` devices, so pending messages stay bounded.
        for start in range(0, len(devices), wave):
            mids = {}
            for device in devices[start : start + wave]:
                content = RecordDict({"global": self._model_record(), "config": ConfigRecord(dict(content_cfg))})
                mids[device] = self.driver.send(device, content, MessageType.EVALUATE)
            replies.extend((device, self.driver.wait(mid)) for device, mid in mids.items())
        declined = 0
        for device, reply in replies:
            if reply is None or reply.has_error():
                continue
            if "metrics" not in reply.content.metric_records:
                # A deployed device's policy rate-limits evaluations (client/policy.py); the
                # device is fine and stays scheduled for training.
                declined += 1
                continue
            m = reply.content.metric_records["metrics"]
            if "epsilon" in m:
                self._note_epsilon(device, get_float(m, "epsilon"))
            for key in sums:
                sums[key] += get_float(m, key)
            users += 1
            if export and "top-k" in reply.content.config_records:
                tops[device] = get_int_list(reply.content.config_records["top-k"], "items")
        if declined:
            log.info(
                "evaluation of version %d: %d devices declined (their evaluation limit)",
                self.scheduler.version,
                declined,
            )
        mean = {k: (v / users if users else math.nan) for k, v in sums.items()}
        coverage = None
        if tops:
            seen = {i for lst in tops.values() for i in lst}
            coverage = len(seen) / self.num_items
        rec = EvalRecord(
            version=self.scheduler.version,
            sim_time=self.scheduler.now,
            wall_time=self.wall(),
            split=split,
            users=users,
            hr=mean["hit"],
            ndcg=mean["ndcg"],
            sampled_hr=mean["sampled-hit"],
            sampled_ndcg=mean["sampled-ndcg"],
            coverage=coverage,
            k=self.cfg.eval.top_k,
        )
        self.store.add_evaluation(self.run_id, rec)
        self.evaluations.append(rec)
        return EvalOutcome(rec, tops)

    # -- summary ---------------------------------------------------------------------
    def _user_level_summary(self) -> dict[str, Any]:
        mech = self.scheduler.user_level
        if mech is None:
            return {"enabled": False}
        eps = sorted(self.device_user_epsilon.values())
        return {
            "enabled": True,
            "unit": "user (a device's whole history), server-side Gaussian noise per buffer",
            "epsilon-max": eps[-1] if eps else 0.0,
            "epsilon-median": statistics.median(eps) if eps else 0.0,
            "delta": mech.delta,
            "epsilon-budget": mech.budget,
            "noise-multiplier": mech.noise_multiplier,
            "clip-norm": mech.clip,
            "renyi-order": mech.order,
            "devices-contributing": len(eps),
            "devices-stopped-by-filter": sum(s is DeviceStatus.USER_EXHAUSTED for s in self.scheduler.status),
        }

    def summary(self, final: EvalRecord, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run's headline figures (written to summary.json)."""
        eps = sorted(self.device_epsilon.values())
        staleness = self.scheduler.applied_staleness
        counts = self.status_counts
        return {
            "final": {
                "split": final.split,
                "users": final.users,
                "k": final.k,
                "hr@10": final.hr,
                "ndcg@10": final.ndcg,
                "sampled-hr@10": final.sampled_hr,
                "sampled-ndcg@10": final.sampled_ndcg,
                "coverage@10": final.coverage,
            },
            "privacy": {
                "dp": self.cfg.privacy.dp,
                "unit": "record (one interaction / training record on a device)",
                "epsilon-max": eps[-1] if eps else 0.0,
                "epsilon-median": statistics.median(eps) if eps else 0.0,
                "delta": self.cfg.privacy.delta,
                "epsilon-budget": self.cfg.privacy.epsilon_budget,
                "devices-with-spending": len(eps),
                "devices-exhausted": counts.get("refused", 0),
                # Devices whose last releases may be missing here: they never answered the final
                # ledger query (their own ledgers hold the truth).
                "devices-unreconciled": len(self.unreconciled),
                "accountant": self.cfg.privacy.accountant,
                "user-level": self._user_level_summary(),
            },
            "aggregation": {
                "mode": self.cfg.aggregation.mode,
                "versions": self.scheduler.version,
                "updates-applied": counts.get("accepted", 0),
                "updates-rejected-stale": counts.get("rejected-stale", 0),
                "tasks-failed": counts.get("failed", 0),
                "updates-rejected-ledger": counts.get("rejected-ledger", 0),
                "updates-withheld": counts.get("withheld", 0),
                "tasks-dropped": counts.get("dropped", 0),
                "tasks-timed-out": counts.get("timeout", 0),
                "tasks-refused": counts.get("refused", 0),
                "devices-retired": sum(s is DeviceStatus.RETIRED for s in self.scheduler.status),
                "staleness-mean": float(np.mean(staleness)) if staleness else 0.0,
                "staleness-max": int(max(staleness)) if staleness else 0,
            },
            "time": {"simulated-seconds": self.scheduler.now, "wall-seconds": self.wall()},
            "seed": self.cfg.seed,
            "devices": self.num_devices,
            "config": to_flat(self.cfg),
            **(dict(extra) if extra else {}),
        }
