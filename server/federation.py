"""One federated training run: scheduler + Grid driver + evaluation + results.

Data flows one way: the scheduler picks devices and versions, the driver carries
the global model out and deltas back, the scheduler folds deltas into new
versions in virtual-time order, and every event is written to the run database.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from server.aggregation import StateDict, polynomial_staleness
from server.fleet import Fleet
from server.grid_driver import GridDriver
from server.ledger_intake import LedgerIntake
from server.privacy_store import PrivacyStore
from server.reporting import print_progress
from server.run_store import EvalRecord, RunStore, TaskRecord, VersionRecord
from server.scheduler import AppliedVersion, Completion, Failure, Outcome, Refusal, Scheduler, Task
from server.spending import SpendingBook
from server.update_checks import state_norm, update_norm_bound, validate_update
from shared.config import FedrecConfig, to_flat
from shared.privacy.evaluation import SLOT_SIZE, MetricVector, num_tiers, sensitivity, tier_estimates
from shared.protocol import (
    EVALUATE_TASK,
    PUBLIC_WEIGHT,
    TRAIN_TASK,
    EvaluateDeclined,
    EvaluatePrivate,
    EvaluateTask,
    ProtocolError,
    TrainRefusal,
    TrainTask,
    build_evaluate_task,
    build_train_task,
    parse_evaluate_reply,
    parse_train_reply,
    secagg_round_config,
    secagg_task_config,
)

log = logging.getLogger("fedrec.server")


@dataclass
class EvalOutcome:
    """Averages of one on-device evaluation round."""

    record: EvalRecord
    top_lists: dict[int, list[int]] = field(default_factory=dict)


class Federation:
    """Runs one training job to completion and records it.

    The loop lives here: dispatch tasks, wait for replies in virtual-time order, hand
    each to the scheduler, record the completion, evaluate new versions. Messages are
    built and read by ``shared/protocol.py``; what devices spent is kept by
    :attr:`spending` (``server/spending.py``); the summary is ``server/reporting.py``'s.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: FedrecConfig,
        num_devices: int,
        num_items: int,
        initial: StateDict,
        store: RunStore,
        *,
        privacy_store: PrivacyStore,
        run_name: str = "federation",
    ) -> None:
        self.cfg = cfg
        self.num_devices = num_devices
        self.num_items = num_items
        self.driver = GridDriver(
            grid,
            cfg.aggregation.wall_timeout,
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
        self.store = store
        self.run_id = store.start_run(run_name, cfg.seed, to_flat(cfg))
        # Unique across runs (the database restarts run ids): ledger entries name their run.
        self.run_label = f"{run_name}#{self.run_id}-{secrets.token_hex(4)}"
        store.label_run(self.run_id, self.run_label)
        self.intake = LedgerIntake(cfg, privacy_store)
        self.intake.run_label = self.run_label
        self.spending = SpendingBook(cfg, self.intake, store, self.run_id, self.driver)
        # A reply to a task already resolved as lost: the device still trained and spent.
        self.driver.on_late_reply = self.spending.take_late_reply
        self.status_counts: dict[str, int] = {}
        self.contributors: set[int] = set()  # devices with at least one accepted update
        self.evaluations: list[EvalRecord] = []
        self._t0 = time.monotonic()
        self._model_rec: ArrayRecord | None = None
        self._model_rec_version = -1
        self._model_norms: dict[int, float] = {}  # global model norm per version (update bounds)
        self._model_dim = sum(v.numel() for v in initial.values())  # shapes never change
        # A private metric slot: a value in [0, 1] plus noise of std eval-noise-multiplier x the
        # vector's sensitivity; beyond 10 standard deviations no honest device goes.
        self._private_metric_bound = 1.0 + 10.0 * cfg.eval.eval_noise_multiplier * sensitivity(
            num_tiers(cfg.eval.activity_tiers)
        )
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
            self._model_norms[self.scheduler.version] = state_norm(self.scheduler.params)
        return self._model_rec

    def _update_bound(self, base_version: int) -> float | None:
        """The largest update norm accepted from a task trained on ``base_version``."""
        norm = self._model_norms.get(base_version)
        if norm is None:
            norm = state_norm(self.scheduler.params)
        return update_norm_bound(self.cfg, self._model_dim, norm)

    def _dispatch(self, task: Task) -> str:
        content = build_train_task(
            TrainTask(
                model=self._model_record(),
                version=task.base_version,
                task_seed=task.task_id,
                run=self.run_label,
                ledger_head=self.spending.ledger_head(task.device_id),
            )
        )
        # Pushed in virtual finish order: the order in which the server will wait for them.
        return self.driver.send(task.device_id, content, TRAIN_TASK.message_type, priority=task.finish_at)

    def _outcome(self, task: Task, reply: Message | None) -> Outcome:
        """What a task's reply (None: none within the wall timeout) amounts to.

        A malformed reply, a corrupt update or a rejected ledger is a Failure; a
        well-formed reply's spending goes to the spending book whatever its fate.
        """
        if reply is None:
            return Failure("timeout", "no reply within wall-timeout")
        if reply.has_error():
            return Failure("failed", f"device error {reply.error.code}: {reply.error.reason}")
        try:
            parsed = parse_train_reply(reply)
        except ProtocolError as exc:
            return Failure("failed", f"malformed reply: {exc}")
        if isinstance(parsed, TrainRefusal):
            self.spending.take_refusal(task, parsed)
            return Refusal(parsed.reason)
        outcome = validate_update(parsed, self.scheduler.params, self._update_bound(task.base_version))
        if isinstance(outcome, Failure):
            return outcome
        intake = self.spending.take_update(task, reply, parsed)
        if not intake.accepted:
            log.warning("device %d: ledger rejected: %s", task.device_id, "; ".join(intake.problems))
            return Failure("rejected-ledger", "; ".join(intake.problems))
        return outcome

    # -- the loop --------------------------------------------------------------------
    def train(self) -> None:
        """Dispatch and complete tasks until the scheduler is finished."""
        agg = self.cfg.aggregation
        if agg.secure_aggregation and agg.secure_aggregation_protocol == "fedrec":
            from server.secure_cohorts import SecureCohorts

            SecureCohorts(self).train()
            return
        if agg.secure_aggregation:
            self._train_secure()
            return
        sched = self.scheduler
        messages: dict[int, str] = {}
        while not sched.finished:
            for task in sched.dispatch():
                messages[task.task_id] = self._dispatch(task)
            task_due = sched.next_due()
            if task_due is None:
                continue
            task = task_due
            handle = messages.pop(task.task_id)
            if task.lost:
                # The simulated device went away: its reply, whenever it comes, is a late reply.
                self.driver.discard(handle)
                outcome: Outcome = Failure(task.lost, "simulated " + task.lost)
            else:
                outcome = self._outcome(task, self.driver.wait(handle))
                if isinstance(outcome, Failure) and outcome.kind in ("timeout", "failed"):
                    # (A simulated loss is not: its reply still arrives, as a late reply.)
                    self.spending.unsettled.add(task.device_id)
            completion = sched.complete(task, outcome)
            self._record(completion)
            if completion.applied_version is not None:
                assert sched.last_applied is not None
                self._on_version(sched.last_applied)
        # Tasks still running when the run ends: their updates are not used, but the
        # devices train and spend privacy, which their late replies record.
        for handle in messages.values():
            self.driver.discard(handle)

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
                        secagg_round_config(self.run_label, sched.version),
                        num_shares=len(live),
                        reconstruction_threshold=max(2, math.ceil(2 * len(live) / 3)),
                        clipping_range=agg.secagg_clipping_range,
                        quantization_range=2**22,
                        timeout=agg.wall_timeout,
                        max_weight=float(PUBLIC_WEIGHT),
                        per_node_config={n: secagg_task_config(t.task_id) for n, t in live.items()},
                        server_round=sched.version + 1,
                    )
                    delta = result.delta
                    contributed = {live[n].device_id for n in result.contributors}
                except (SecAggError, ValueError) as exc:
                    log.warning("SecAgg+ round at version %d failed: %s", sched.version, exc)
            else:
                log.warning("cohort at version %d has %d live devices; SecAgg+ needs 3", sched.version, len(live))
            # Live devices left out of the sum may still have trained and spent.
            self.spending.unsettled.update(t.device_id for t in live.values() if t.device_id not in contributed)
            rejected = self.spending.collect_ledgers(
                {t.device_id: t.task_id for t in tasks if t.device_id in contributed}
            )
            if rejected and delta is not None:
                log.warning(
                    "SecAgg+ aggregate at version %d withheld: ledgers of devices %s failed verification",
                    sched.version,
                    sorted(rejected),
                )
                delta = None
            for c in sched.complete_cohort(tasks, delta, contributed, rejected=rejected):
                self._record(c)
            if delta is not None:
                assert sched.last_applied is not None
                self._on_version(sched.last_applied)

    def _record(self, c: Completion) -> None:
        self.status_counts[c.status] = self.status_counts.get(c.status, 0) + 1
        if c.status == "accepted":
            self.contributors.add(c.task.device_id)
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
                c.loss,
            ),
        )
        if c.status == "failed":
            log.warning("task %d on device %d failed", t.task_id, t.device_id)

    def _on_version(self, applied: AppliedVersion) -> None:
        """Record a new version: what it applied (as the scheduler reports it), and evaluate it if due."""
        mech = self.scheduler.user_level
        if mech is not None:
            self.spending.take_user_releases(applied, mech)
        staleness = applied.staleness or (0,)
        self.store.add_version(
            self.run_id,
            VersionRecord(
                applied.version,
                self.scheduler.now,
                self.wall(),
                len(applied.staleness),
                float(np.mean(staleness)),
                int(max(staleness)),
            ),
        )
        version = applied.version
        if version % self.cfg.eval.eval_every == 0 or version == self.cfg.aggregation.num_versions:
            result = self.evaluate(self.eval_subset, "valid", export=False)
            epsilon_max = max(self.spending.device_epsilon.values(), default=0.0)
            print_progress(result.record, self.cfg, self.status_counts.get("accepted", 0), epsilon_max)

    # -- evaluation ------------------------------------------------------------------
    def take_evaluation_reply(
        self, device: int, reply: Message | None, length: int
    ) -> tuple[np.ndarray, list[int] | None] | str:
        """One device's evaluation reply: its metric vector (and top-k list) to add, or why not.

        Returns ``(values, top_k)`` for a reply that counts, else ``"declined"`` or
        ``"ignored"`` (lost, malformed, of the wrong kind, out of range, or an unverified
        release: logged, never added).
        """
        private = self.cfg.eval.evaluation == "private"
        tiers = num_tiers(self.cfg.eval.activity_tiers)
        if reply is None or reply.has_error():
            return "ignored"
        try:
            parsed = parse_evaluate_reply(reply)
        except ProtocolError as exc:
            log.warning("device %d: malformed evaluation reply: %s", device, exc)
            return "ignored"
        if isinstance(parsed, EvaluateDeclined):
            # A deployed device's policy rate-limits evaluations (client/policy.py), or its
            # budget has no room; the device is fine and stays scheduled for training.
            return "declined"
        if isinstance(parsed, EvaluatePrivate):
            if not private or len(parsed.values) != length:
                log.warning("device %d: evaluation reply of the wrong kind or length; ignored", device)
                return "ignored"
            values = np.asarray(parsed.values, dtype=np.float64)
            if not np.all(np.abs(values) <= self._private_metric_bound):
                # Each slot is a metric in [0, 1] (or a count of one) plus Gaussian noise: a value
                # beyond the noise's 1e-22 tail is not a device following the protocol.
                log.warning("device %d: private evaluation values out of range; ignored", device)
                return "ignored"
            if not self.spending.take_private_evaluation(device, reply, parsed).accepted:
                return "ignored"  # its release is unverified: the intake recorded why
            return values, None
        if private:
            log.warning("device %d: exact metrics in a private evaluation; ignored", device)
            return "ignored"
        tier = parsed.tier if parsed.tier is not None and 0 <= parsed.tier < tiers else 0
        metrics = MetricVector(parsed.hit, parsed.ndcg, parsed.sampled_hit, parsed.sampled_ndcg, tier)
        try:
            values = metrics.to_array(tiers)
        except ValueError as exc:
            log.warning("device %d: evaluation reply out of range (%s); ignored", device, exc)
            return "ignored"
        top_k = None
        if parsed.top_k is not None:
            top_k = [int(i) for i in parsed.top_k if 0 <= int(i) < self.num_items][: self.cfg.eval.top_k]
        self.spending.take_evaluation(device, parsed)
        return values, top_k

    def evaluate(self, devices: list[int], split: str, export: bool) -> EvalOutcome:
        """On-device evaluation of the current global model on ``devices``.

        Under ``evaluation = "private"`` each device sends only its noisy metric vector
        (``shared/privacy/evaluation.py``) and the server learns noisy sums; under
        ``"exact"`` (simulation only) per-device metrics, each device's activity tier and,
        when exporting, its top-k list.
        """
        e = self.cfg.eval
        private = e.evaluation == "private"
        tiers = num_tiers(e.activity_tiers)
        model = self._model_record()

        def task_for(device: int) -> EvaluateTask:
            head = self.spending.ledger_head(device) if private else -1
            return EvaluateTask(model, split, self.scheduler.version, export, self.run_label, head)

        total = np.zeros(tiers * SLOT_SIZE)
        users = 0
        tops: dict[int, list[int]] = {}
        replies: list[tuple[int, Message | None]] = []
        wave = self.cfg.aggregation.concurrency
        # In waves of `concurrency` devices, so pending messages stay bounded.
        for start in range(0, len(devices), wave):
            handles = {}
            for device in devices[start : start + wave]:
                content = build_evaluate_task(task_for(device))
                handles[device] = self.driver.send(device, content, EVALUATE_TASK.message_type)
            replies.extend((device, self.driver.wait(handle)) for device, handle in handles.items())
        declined = 0
        for device, reply in replies:
            taken = self.take_evaluation_reply(device, reply, len(total))
            if taken == "declined":
                declined += 1
            if not isinstance(taken, tuple):
                continue
            values, top_k = taken
            total += values
            if export and top_k is not None:
                tops[device] = top_k
            users += 1
        if declined:
            log.info(
                "evaluation of version %d: %d devices declined (their evaluation limit or budget)",
                self.scheduler.version,
                declined,
            )
        # Fleet means divide by the number of replies (public); per tier, by the tier's
        # (noisy, under private evaluation) user count.
        per_tier = tier_estimates(total, tiers)
        sums = total.reshape(tiers, SLOT_SIZE).sum(axis=0)[:4]
        hr, ndcg, sampled_hr, sampled_ndcg = (float(v / users) if users else math.nan for v in sums)
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
            hr=hr,
            ndcg=ndcg,
            sampled_hr=sampled_hr,
            sampled_ndcg=sampled_ndcg,
            coverage=coverage,
            k=self.cfg.eval.top_k,
            mode=e.evaluation,
            tiers=json.dumps([t.to_json() for t in per_tier]),
        )
        self.store.add_evaluation(self.run_id, rec)
        self.evaluations.append(rec)
        return EvalOutcome(rec, tops)
