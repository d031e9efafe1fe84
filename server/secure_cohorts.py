"""Training through fedrec's secure noisy sum: cohorts, their four rounds, and the sums applied.

A cohort is a set of devices dispatched together on one model version (synchronous: the
whole round; asynchronous: ``secure-sum-cohort-size`` devices, several cohorts in flight
at once). A cohort's sum closes, in virtual time, when ``buffer-size`` of its live devices
have trained (synchronous: all of them); later devices are ``late`` and send nothing. The
server then runs the rounds of ``server.secure_sum_server.SecureSumServer`` with the
devices in the sum, checks each device's ledger entry before unmasking (a device whose
ledger fails is excluded, its masks removed), and applies the decoded mean update,
discounted by the cohort's staleness. A sum that cannot be unmasked safely is withheld.

Simulated time adds three message latencies for the protocol's extra rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message, RecordDict

from server.scheduler import Completion, Task
from server.secure_sum_server import SecureSumServer
from shared.protocol import (
    SECURE_ADVERTISEMENT,
    SECURE_DELIVERY,
    SECURE_MASKED,
    SECURE_ROSTER,
    SECURE_SHARES,
    SECURE_TRAIN_TASK,
    SECURE_UNMASK,
    SECURE_UNMASK_REPLY,
    MessageSpec,
    ProtocolError,
    SecureAdvertisement,
    SecureDeclined,
    SecureDelivery,
    SecureMasked,
    SecureReply,
    SecureRoster,
    SecureShares,
    SecureTrainTask,
    SecureUnmask,
    SecureUnmaskReply,
    TrainRefusal,
    build_secure_delivery,
    build_secure_roster,
    build_secure_train_task,
    build_secure_unmask,
    parse_secure_reply,
)
from shared.secure_sum.encoding import decode_sum
from shared.secure_sum.layout import VectorLayout
from shared.secure_sum.release import SecureReleasePlan, cohort_size, plan_secure_release, session_shape
from shared.secure_sum.rounds import (
    Advertisement,
    EncryptedShare,
    MaskedInput,
    SecureSumError,
    SecureSumWithheld,
    SessionParams,
    UnmaskReply,
)

if TYPE_CHECKING:
    from server.federation import Federation

log = logging.getLogger("fedrec.server")
_PROTOCOL_ROUNDS = 3  # message latencies the secure rounds add after training
# Cohorts in a row that produced no sum: the devices left with budget can no longer form one
# (too few of them online together), so the run ends rather than retrying forever.
MAX_BARREN_COHORTS = 20


@dataclass
class _Cohort:
    """One dispatched cohort: its tasks, session, and the messages of its first round."""

    tasks: list[Task]
    params: SessionParams
    in_sum: list[Task]
    late: list[Task]
    close_at: float
    handles: dict[int, str] = field(default_factory=dict)


class SecureCohorts:
    """Runs a :class:`~server.federation.Federation`'s training through the secure sum."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        cfg = fed.cfg
        self.layout = VectorLayout.of(fed.scheduler.params)
        self.plan: SecureReleasePlan = plan_secure_release(cfg.aggregation, cfg.privacy, cfg.train, self.layout.dim)
        fed.intake.secure_release = self.plan.release
        fed.scheduler.min_cohort = self.plan.min_contributors
        self.size = cohort_size(cfg.aggregation)
        # Asynchronous: at least two cohorts overlap, so a slow cohort never holds the fleet back.
        self.in_flight_max = (
            1 if cfg.aggregation.mode == "sync" else max(2, round(cfg.aggregation.concurrency / self.size))
        )
        self.withheld = 0
        self.sums = 0
        self._applied = False  # whether the cohort just finished produced a version

    # -- the loop ------------------------------------------------------------------------
    def train(self) -> None:
        """Dispatch cohorts and complete them in the virtual-time order of their closing."""
        sched = self.fed.scheduler
        cohorts: list[_Cohort] = []
        barren = 0
        while not sched.finished:
            while len(cohorts) < self.in_flight_max:
                tasks = sched.dispatch_cohort(self.size)
                if not tasks:
                    break
                cohorts.append(self._start(tasks))
            if not cohorts:
                continue
            cohort = min(cohorts, key=lambda c: (c.close_at, c.tasks[0].seq))
            cohorts.remove(cohort)
            for completion in self._finish(cohort):
                self.fed._record(completion)
            if sched.last_applied is not None and sched.last_applied.version == sched.version and self._applied:
                self.fed._on_version(sched.last_applied)
            barren = 0 if self._applied else barren + 1
            if barren >= MAX_BARREN_COHORTS:
                log.warning(
                    "%d cohorts in a row formed no sum (the devices with budget left are too few to reach "
                    "secure-sum-min-contributors together): the run ends at version %d",
                    barren,
                    sched.version,
                )
                break
        for cohort in cohorts:
            # Still training when the run ended: nothing of theirs was released.
            for handle in cohort.handles.values():
                self.fed.driver.discard(handle)
            outcome = {t.device_id: "late" for t in cohort.tasks}
            for completion in sched.complete_secure(cohort.tasks, sched.now, None, outcome):
                self.fed._record(completion)
        log.info("secure sums: %d applied, %d withheld", self.sums, self.withheld)

    def _start(self, tasks: list[Task]) -> _Cohort:
        """Send the first round (train and advertise) to the cohort's live devices."""
        agg = self.fed.cfg.aggregation
        live = sorted((t for t in tasks if not t.lost), key=lambda t: (t.finish_at, t.seq))
        keep = len(live) if agg.mode == "sync" else min(len(live), agg.buffer_size)
        in_sum, late = live[:keep], live[keep:]
        finish = [t.finish_at for t in (in_sum or tasks)]
        close_at = max(finish) + _PROTOCOL_ROUNDS * self.fed.cfg.fleet.latency_seconds
        cohort_ids = sorted(t.device_id for t in live) or [t.device_id for t in tasks]
        neighbours, threshold = session_shape(agg, max(2, len(in_sum)), len(cohort_ids))
        params = SessionParams.new(
            cohort_ids,
            self.plan.encoding.padded_dim,
            self.plan.encoding.bits,
            neighbours,
            threshold,
            self.plan.min_contributors,
        )
        cohort = _Cohort(tasks, params, in_sum, late, close_at)
        model = self.fed._model_record()
        for t in live:
            content = build_secure_train_task(
                SecureTrainTask(
                    model=model,
                    version=t.base_version,
                    task_seed=t.task_id,
                    session_id=params.session_id,
                    cohort=params.cohort,
                    length=params.length,
                    bits=params.bits,
                    neighbours=params.neighbours,
                    threshold=params.threshold,
                    min_contributors=params.min_contributors,
                    run=self.fed.run_label,
                    ledger_head=self.fed.spending.ledger_head(t.device_id),
                )
            )
            cohort.handles[t.device_id] = self.fed.driver.send(
                t.device_id, content, SECURE_TRAIN_TASK.message_type, priority=t.finish_at
            )
        return cohort

    # -- one cohort ----------------------------------------------------------------------
    def _reply(self, device: int, reply: Message | None, expected: MessageSpec) -> SecureReply | None:
        if reply is None or reply.has_error():
            return None
        try:
            parsed = parse_secure_reply(reply, expected)
        except ProtocolError as exc:
            log.warning("device %d: malformed secure-sum reply: %s", device, exc)
            return None
        if isinstance(parsed, SecureDeclined):
            log.info("device %d declined the secure sum: %s", device, parsed.reason)
            return None
        return parsed

    def _round(
        self, devices: list[int], build: Mapping[int, tuple[RecordDict, str]], expected: MessageSpec
    ) -> dict[int, tuple[SecureReply, Message]]:
        """Send each device its message, wait for all, keep the well-formed expected replies."""
        driver, now = self.fed.driver, self.fed.scheduler.now
        handles = {d: driver.send(d, content, kind, priority=now) for d, (content, kind) in build.items()}
        out: dict[int, tuple[SecureReply, Message]] = {}
        for d in devices:
            if d not in handles:
                continue
            message = driver.wait(handles[d])
            parsed = self._reply(d, message, expected)
            if parsed is not None and message is not None:
                out[d] = (parsed, message)
        return out

    def _finish(self, cohort: _Cohort) -> list[Completion]:
        """Run the cohort's rounds 1-4 and complete its tasks."""
        fed, sched = self.fed, self.fed.scheduler
        self._applied = False
        outcome: dict[int, str] = {t.device_id: "late" for t in cohort.late}
        for t in cohort.late:
            fed.driver.discard(cohort.handles[t.device_id])
        keys = {t.device_id: fed.intake.store.public_key(t.device_id) for t in cohort.in_sum}
        server = SecureSumServer(cohort.params, {d: k for d, k in keys.items() if k is not None})
        delta = None
        task_of = {t.device_id: t for t in cohort.in_sum}
        advertised: set[int] = set()
        try:
            # Round 1: the advertisements (their devices trained).
            for t in cohort.in_sum:
                outcome[t.device_id] = "failed"
                parsed = self._reply(t.device_id, fed.driver.wait(cohort.handles[t.device_id]), SECURE_ADVERTISEMENT)
                if isinstance(parsed, TrainRefusal):
                    outcome[t.device_id] = "refused"
                    fed.spending.take_refusal(t, parsed)
                elif isinstance(parsed, SecureAdvertisement):
                    advert = Advertisement(
                        t.device_id,
                        cohort.params.digest,
                        parsed.share_public,
                        parsed.mask_public,
                        parsed.seed_commitment,
                        parsed.signature,
                    )
                    try:
                        server.receive_advertisement(advert)
                        advertised.add(t.device_id)
                    except SecureSumError as exc:
                        log.warning("device %d: advertisement refused: %s", t.device_id, exc)
            roster = server.roster()
            ids = [a.device_id for a in roster]
            ledger_keys = tuple(str(keys[d]) for d in ids)
            roster_msg = build_secure_roster(
                SecureRoster(
                    cohort.params.session_id,
                    tuple(ids),
                    tuple(a.share_public for a in roster),
                    tuple(a.mask_public for a in roster),
                    tuple(a.seed_commitment for a in roster),
                    tuple(a.signature for a in roster),
                    ledger_keys,
                )
            )
            # Round 2: encrypted shares.
            replies = self._round(ids, {d: (roster_msg, SECURE_ROSTER.message_type) for d in ids}, SECURE_SHARES)
            sharers: list[int] = []
            for d, (parsed, _msg) in sorted(replies.items()):
                assert isinstance(parsed, SecureShares)
                shares = [
                    EncryptedShare(d, r, n, c)
                    for r, n, c in zip(parsed.recipients, parsed.nonces, parsed.ciphertexts, strict=False)
                ]
                try:
                    server.receive_shares(d, shares)
                    sharers.append(d)
                except SecureSumError as exc:
                    log.warning("device %d: shares refused: %s", d, exc)
            # Round 3 (only devices whose shares were accepted): masked vectors, each with the
            # ledger entry of its release.
            deliveries = {}
            for d in sharers:
                mine = server.shares_for(d)
                deliveries[d] = (
                    build_secure_delivery(
                        SecureDelivery(
                            cohort.params.session_id,
                            tuple(s.sender for s in mine),
                            tuple(s.nonce for s in mine),
                            tuple(s.ciphertext for s in mine),
                        )
                    ),
                    SECURE_DELIVERY.message_type,
                )
            masked = self._round(sharers, deliveries, SECURE_MASKED)
            words = "<u4" if cohort.params.bits <= 32 else "<u8"
            for d, (parsed, message) in sorted(masked.items()):
                if isinstance(parsed, TrainRefusal):
                    # Another release (an evaluation) took its budget since round 1: nothing sent.
                    outcome[d] = "refused"
                    fed.spending.take_refusal(task_of[d], parsed)
                    continue
                assert isinstance(parsed, SecureMasked)
                intake = fed.spending.take_secure_release(task_of[d], message)
                if not intake.accepted:
                    outcome[d] = "rejected-ledger"
                    server.exclude(d, "; ".join(intake.problems))
                    continue
                try:
                    vector = np.frombuffer(parsed.vector, dtype=words).astype(np.uint64)
                    server.receive_masked(MaskedInput(d, cohort.params.digest, vector))
                except (SecureSumError, ValueError) as exc:
                    log.warning("device %d: masked vector refused: %s", d, exc)
                    server.exclude(d, str(exc))
            # Round 4: unmasking.
            request = server.unmask_request()
            unmask_msg = build_secure_unmask(SecureUnmask(cohort.params.session_id, request.survivors, request.dropped))
            answers = self._round(
                list(request.survivors),
                {d: (unmask_msg, SECURE_UNMASK.message_type) for d in request.survivors},
                SECURE_UNMASK_REPLY,
            )
            for d, (parsed, _msg) in sorted(answers.items()):
                assert isinstance(parsed, SecureUnmaskReply)
                try:
                    server.receive_unmask(
                        UnmaskReply(
                            d,
                            cohort.params.digest,
                            dict(zip(parsed.seed_owners, parsed.seed_shares, strict=True)),
                            dict(zip(parsed.mask_owners, parsed.mask_shares, strict=True)),
                        )
                    )
                except (SecureSumError, ValueError) as exc:
                    log.warning("device %d: unmask reply refused: %s", d, exc)
            total = server.result()
            contributors = server.contributors
            decoded = decode_sum(total, self.plan.encoding, cohort.params.rotation_seed, len(contributors))
            # The mean gradient step: the noisy sum over a public divisor (batch-size per step and
            # device), so the update's scale reveals nothing about how many records were sampled.
            scale = -fed.cfg.train.learning_rate / (fed.cfg.train.batch_size * len(contributors))
            delta = {k: v * scale for k, v in self.layout.unflatten(decoded).items()}
            for d in contributors:
                outcome[d] = "accepted"
            self.sums += 1
        except (SecureSumWithheld, SecureSumError) as exc:
            # Nothing is unmasked: devices whose masked vectors arrived spent, but are not blamed.
            self.withheld += 1
            log.warning("secure sum at version %d withheld: %s", cohort.tasks[0].base_version, exc)
            for d in server.masked_devices:
                outcome[d] = "withheld"
            for d in advertised - set(server.masked_devices):
                if outcome[d] == "failed":
                    outcome[d] = "late"  # it did its part so far, but released nothing: no blame
        completions = sched.complete_secure(cohort.tasks, cohort.close_at, delta, outcome)
        self._applied = delta is not None and any(c.applied_version is not None for c in completions)
        return completions
