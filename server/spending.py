"""The server's book of what each device has spent: claims, verified ledgers, and asking for them.

Everything the server learns about a device's privacy spending comes in here:

* a training reply's claim (an update's or a refusal's cumulative epsilon) and its
  ledger entries, verified by :class:`server.ledger_intake.LedgerIntake`;
* a late reply (to a task already resolved as lost: the device still trained);
* an evaluation reply's epsilon;
* the entries of devices whose latest releases may not have reached the server,
  fetched with ``ledger-query`` messages (after a SecAgg+ round, whose legacy replies
  cannot carry them, and once at the end of the run);
* the user-level releases the server itself charged when it applied a buffer.

Two tables hold spending, on purpose. The privacy store's ledger entries
(``server/privacy_store.py``) are the *device's* signed evidence, kept exactly as
signed. The run store's privacy rows (``server/run_store.py``) are the *server's own*
record of each release (and refusal), which the audit later compares with that
evidence. :meth:`SpendingBook._take_ledger` is the one code path that writes a
verified entry to both; nothing else writes a spending row but a refusal's.

:attr:`SpendingBook.device_epsilon` keeps each device's highest cumulative epsilon
from any of these sources (never under-report), for the summary and the plots.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message

from server.grid_driver import GridDriver
from server.ledger_intake import IntakeResult, LedgerIntake
from server.run_store import PrivacyRecord, RunStore, UserReleaseRecord
from server.scheduler import AppliedVersion, Task
from server.user_level import UserLevelMechanism
from shared.config import FedrecConfig
from shared.protocol import (
    EVALUATE_PRIVATE,
    LEDGER_QUERY,
    LEDGER_REPLY,
    SECURE_MASKED,
    TRAIN_UPDATE,
    EvaluatePrivate,
    EvaluateResult,
    LedgerQuery,
    ProtocolError,
    TrainRefusal,
    TrainUpdate,
    build_ledger_query,
    parse_ledger,
    parse_train_reply,
    secure_reply_kind,
)

log = logging.getLogger("fedrec.server")

# The status of a spending row (server/run_store.py PRIVACY_STATUSES).
_SPENT, _REFUSED = "spent", "refused"


class SpendingBook:
    """Per-device privacy bookkeeping of one run.

    Parameters
    ----------
    cfg
        The run's configuration.
    intake
        Verifies ledger entries and keeps the verified ones (the device's evidence).
    runs, run_id
        The run store and this run's id (the server's spending rows).
    driver
        Carries the ledger queries.
    """

    def __init__(
        self, cfg: FedrecConfig, intake: LedgerIntake, runs: RunStore, run_id: int, driver: GridDriver
    ) -> None:
        self.cfg = cfg
        self.intake = intake
        self.runs = runs
        self.run_id = run_id
        self.driver = driver
        self.device_epsilon: dict[int, float] = {}  # record-level, highest claimed or verified
        self.device_user_epsilon: dict[int, float] = {}  # user-level, as the server charged it
        # Devices whose latest releases may not have reached the server (a reply that never
        # came or could not be used): asked for their ledgers at the end (reconcile).
        self.unsettled: set[int] = set()
        self.unreconciled: set[int] = set()  # asked at the end, never answered

    def ledger_head(self, device_id: int) -> int:
        """The last ledger seq the server holds for ``device_id`` (a task asks only for newer entries)."""
        return self.intake.head_seq(device_id)

    def _note(self, device_id: int, epsilon: float) -> None:
        """Keep the highest cumulative epsilon any source has reported for the device.

        Cumulative epsilon only grows, so the maximum is the latest; replies of lost
        tasks and evaluation replies count too, since the device spent the budget
        whether or not the server used its update.
        """
        if self.cfg.privacy.dp and epsilon > self.device_epsilon.get(device_id, 0.0):
            self.device_epsilon[device_id] = epsilon

    # -- replies -----------------------------------------------------------------------
    def take_update(self, task: Task, reply: Message, update: TrainUpdate) -> IntakeResult:
        """A usable update's claim and ledger; the update may be used only if the result is accepted.

        A rejected ledger is unverified, but the device did spend: its claim still counts
        towards the reported maximum.
        """
        result = self._take_ledger(task.device_id, task.task_id, reply, TRAIN_UPDATE.kind)
        self._note(task.device_id, update.epsilon)
        return result

    def take_secure_release(self, task: Task, reply: Message) -> IntakeResult:
        """A masked vector's ledger (the secure-sum release among its entries); its vector is used only if accepted."""
        return self._take_ledger(task.device_id, task.task_id, reply, SECURE_MASKED.kind)

    def take_refusal(self, task: Task, refusal: TrainRefusal) -> None:
        """A refusal spent nothing new; its claim (what the device had spent) and a refused row are kept."""
        if not self.cfg.privacy.dp:
            return
        self._note(task.device_id, refusal.epsilon)
        p = self.cfg.privacy
        self.runs.add_privacy(
            self.run_id,
            PrivacyRecord(
                device_id=task.device_id,
                task_id=task.task_id,
                version=task.base_version,
                epsilon=refusal.epsilon,
                delta=p.delta,
                noise_multiplier=p.noise_multiplier,
                sample_rate=0.0,
                steps=0,
                clip_norm=p.clip_norm,
                accountant=p.accountant,
                status=_REFUSED,
            ),
        )

    def take_late_reply(self, device_id: int, reply: Message) -> None:
        """A reply to a task already resolved as lost: its update is ignored, its spending is not.

        Whether or not the task is still known (a device may have two lost tasks), its
        signed entries name their own tasks.
        """
        if reply.has_error() or not self.cfg.privacy.dp:
            return
        secure = secure_reply_kind(reply)
        if secure == SECURE_MASKED.kind:
            # A masked vector the server stopped waiting for: unused, but released and signed.
            self._take_ledger(device_id, None, reply, SECURE_MASKED.kind)
            return
        if secure is not None:
            return  # any other secure-sum reply releases nothing
        try:
            parsed = parse_train_reply(reply)
        except ProtocolError as exc:
            # Its releases may be missing here: the final ledger query asks for them.
            log.warning("device %d: unreadable late reply: %s", device_id, exc)
            self.unsettled.add(device_id)
            return
        if isinstance(parsed, TrainRefusal):
            return  # a late refusal spent nothing
        self._note(device_id, parsed.epsilon)
        self._take_ledger(device_id, None, reply, TRAIN_UPDATE.kind)

    def take_evaluation(self, device_id: int, result: EvaluateResult) -> None:
        """An evaluation reply states the device's cumulative epsilon too."""
        self._note(device_id, result.epsilon)

    def take_private_evaluation(self, device_id: int, reply: Message, result: EvaluatePrivate) -> IntakeResult:
        """A private evaluation is a release: its signed ledger entry is verified like a training task's.

        The caller uses the noisy vector only if the result is accepted; the device spent either way.
        """
        intake = self._take_ledger(device_id, None, reply, EVALUATE_PRIVATE.kind, evaluation=True)
        self._note(device_id, result.epsilon)
        return intake

    def take_user_releases(self, applied: AppliedVersion, mech: UserLevelMechanism) -> None:
        """The user-level releases the server charged when it applied a version."""
        for rel in applied.user_releases:
            self.device_user_epsilon[rel.device_id] = rel.epsilon
            self.runs.add_user_release(
                self.run_id,
                UserReleaseRecord(
                    applied.version,
                    rel.device_id,
                    rel.weight,
                    mech.noise_multiplier,
                    mech.clip,
                    mech.order,
                    rel.epsilon,
                    mech.delta,
                ),
            )

    def _take_ledger(
        self, device_id: int, task_id: int | None, reply: Message, kind: str, *, evaluation: bool = False
    ) -> IntakeResult:
        """Verify a reply's ledger entries; every verified record-level entry becomes a spending row.

        The one path a verified entry takes, whatever message brought it (a used update,
        a lost task's late reply, a ledger query after a SecAgg+ round or at the end, or
        entries of the device's earlier runs): the intake stores the signed entry, this
        writes the server's row of it, so replaying a device's rows in order reproduces
        its lifetime claims.
        """
        if not self.intake.enabled:
            return IntakeResult(True, (), ())
        try:
            ledger = parse_ledger(reply, kind=kind)
        except ProtocolError as exc:
            return self.intake.unreadable(device_id, task_id, str(exc))
        result = self.intake.check(device_id, task_id, ledger.entries, evaluation=evaluation)
        for e in result.entries if result.accepted else ():
            if e.unit != "record":
                continue
            self._note(device_id, e.epsilon)
            self.runs.add_privacy(
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
                    status=_SPENT,
                ),
            )
        return result

    # -- asking devices ------------------------------------------------------------------
    def _ask_ledgers(self, devices: Iterable[int], timeout: float | None = None) -> dict[int, Message | None]:
        """Ask ``devices`` at once for the ledger entries the server lacks; each reply (None: none, or an error)."""
        handles = {}
        for device in sorted(devices):
            content = build_ledger_query(LedgerQuery(self.ledger_head(device)))
            handles[device] = self.driver.send(device, content, LEDGER_QUERY.message_type, timeout=timeout)
        replies: dict[int, Message | None] = {}
        for device, handle in handles.items():
            reply = self.driver.wait(handle)
            # A reply without a ledger is passed on: the intake records it as a rejection.
            replies[device] = reply if reply is not None and not reply.has_error() else None
        return replies

    def collect_ledgers(self, contributors: dict[int, int]) -> set[int]:
        """Fetch and verify the new ledger entries of SecAgg+ contributors (device -> task id).

        Returns the devices whose ledger did not arrive or failed verification, including
        a ledger without a release for the task whose update is in the sum.
        """
        if not self.intake.enabled:
            return set()
        rejected = set()
        for device, reply in self._ask_ledgers(contributors).items():
            if reply is None:
                log.warning("device %d did not send its ledger", device)
                rejected.add(device)
                self.unsettled.add(device)
                continue
            result = self._take_ledger(device, contributors[device], reply, LEDGER_REPLY.kind)
            if not result.accepted:
                log.warning("device %d: ledger rejected: %s", device, "; ".join(result.problems))
                rejected.add(device)
        return rejected

    def reconcile(self, timeout: float | None = None) -> None:
        """At the end of a run, ask devices whose latest releases may be missing for their new entries.

        A task that timed out or failed, or a SecAgg+ participant left out of the sum, may
        have trained and signed a release whose entry never reached the server (a retired
        device never replies again). Each such device is asked once, with ``timeout``
        (default: the wall timeout, at most 60 s, so a dead device cannot hold the run's
        end); the entries are verified like any others. Devices that do not answer are
        kept in :attr:`unreconciled` and counted in the summary.
        """
        if not self.intake.enabled or not self.unsettled:
            return
        wait = min(self.cfg.aggregation.wall_timeout, 60.0) if timeout is None else timeout
        for device, reply in self._ask_ledgers(self.unsettled, timeout=wait).items():
            if reply is None:
                log.warning("device %d did not answer the final ledger query", device)
                self.unreconciled.add(device)
                continue
            self._take_ledger(device, None, reply, LEDGER_REPLY.kind)
        self.unsettled.clear()
