"""The FedBuff / FedAvg engine on a virtual clock, free of any transport.

The scheduler decides which device gets which model version when, and in what
order replies are folded in. It never waits on real time: each dispatched task's
completion time comes from the simulated fleet, and tasks are completed strictly
in that virtual-time order (ties broken by dispatch order). The Flower driver
(``server/grid_driver.py``) only moves messages; so the same seed and config give
the same sequence of model versions whatever the machine's load.

Modes:

* ``async`` (FedBuff, Nguyen et al. 2022): keep ``concurrency`` tasks in flight;
  fold each reply into the buffer with a staleness discount; apply the buffer
  every ``buffer_size`` accepted updates.
* ``sync`` (FedAvg): dispatch a cohort of ``concurrency`` devices at once, wait
  for all of them (or their timeout), apply one buffer of the cohort's updates
  (staleness is always 0).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import torch

from server.aggregation import ServerOptimizer, StalenessFn, StateDict, UpdateBuffer
from server.fleet import Fleet
from shared.config import AggregationConfig

if TYPE_CHECKING:
    from server.user_level import UserLevelMechanism, UserRelease

# Simulated seconds the scheduler waits before retrying when no device is reachable.
_RETRY_SECONDS = 30.0


class DeviceStatus(Enum):
    """Where a device stands with the scheduler."""

    IDLE = "idle"
    BUSY = "busy"
    EXHAUSTED = "exhausted"  # refused for budget: never scheduled again
    RETIRED = "retired"  # unresponsive or failing repeatedly: never scheduled again
    BUFFERED = "buffered"  # user-level DP: its update waits in the buffer; not rescheduled until applied
    USER_EXHAUSTED = "user-exhausted"  # the Renyi filter stopped it: never scheduled again


@dataclass(order=True)
class Task:
    """One dispatched training task."""

    finish_at: float
    seq: int
    task_id: int = field(compare=False)
    device_id: int = field(compare=False)
    base_version: int = field(compare=False)
    dispatched_at: float = field(compare=False)
    lost: str = field(compare=False)  # "", "dropped" or "timeout": no usable reply


@dataclass(frozen=True)
class Update:
    """A device's reply with a model delta (global parameters only)."""

    delta: Mapping[str, torch.Tensor]
    loss: float | None  # None under DP: the device does not report it


@dataclass(frozen=True)
class Refusal:
    """The device refused: the task would have exceeded its privacy budget."""

    reason: str


@dataclass(frozen=True)
class Failure:
    """The task produced nothing usable (error reply, drop-out, timeout, bad update)."""

    kind: str  # "failed" | "dropped" | "timeout"
    reason: str


Outcome = Update | Refusal | Failure


@dataclass(frozen=True)
class AppliedVersion:
    """What one new global version applied: its updates' staleness, and the user-level releases.

    One entry of ``staleness`` per update folded in: a FedBuff buffer holds
    ``buffer_size`` of them, a synchronous cohort every accepted update of the cohort
    (however many that is), a SecAgg+ sum every contributor.
    """

    version: int
    staleness: tuple[int, ...]
    user_releases: tuple[UserRelease, ...] = ()


@dataclass(frozen=True)
class Completion:
    """What processing one task did, for logging and the results store."""

    task: Task
    status: str  # accepted | rejected-stale | rejected-ledger | failed | dropped | timeout | refused | withheld
    staleness: int | None
    applied_version: int | None  # the version this completion produced, if it applied the buffer
    loss: float | None


class Scheduler:
    """Virtual-time FedBuff/FedAvg scheduler holding the global model.

    Parameters
    ----------
    cfg
        Aggregation settings (mode, concurrency, buffer size, staleness limit...).
    fleet
        Simulated device profiles (speed, availability, drop-out).
    local_steps
        Steps per task, which sets a task's simulated compute time.
    initial
        Initial global parameters.
    staleness_fn
        Discount as a function of staleness (pluggable; FedBuff's 1/sqrt(1+s) by default).
    seed
        Seeds device selection.
    """

    def __init__(
        self,
        cfg: AggregationConfig,
        fleet: Fleet,
        local_steps: int,
        initial: StateDict,
        staleness_fn: StalenessFn,
        seed: int,
        user_level: UserLevelMechanism | None = None,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.local_steps = local_steps
        self.params: StateDict = {k: v.clone() for k, v in initial.items()}
        self.version = 0
        self.now = 0.0
        self.optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum)
        self.buffer = UpdateBuffer(staleness_fn, cfg.max_staleness if cfg.mode == "async" else 0)
        self.status = [DeviceStatus.IDLE] * len(fleet)
        self._rng = np.random.default_rng([seed, 0x5C4E])
        self._in_flight: list[Task] = []
        self._seq = 0
        self._tasks_per_device = [0] * len(fleet)
        self._availability_attempts = [0] * len(fleet)
        self._consecutive_failures = [0] * len(fleet)
        self._cohort_open = 0  # sync mode: tasks of the current cohort not yet completed
        self.applied_staleness: list[int] = []  # every applied update's, over the whole run
        self.user_level = user_level
        self.last_applied: AppliedVersion | None = None  # what the latest version applied
        # Secure sums: fewer idle devices than this can never form a sum that may be unmasked.
        self.min_cohort = 0

    # -- scheduling -------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Number of tasks dispatched and not yet completed."""
        return len(self._in_flight)

    @property
    def finished(self) -> bool:
        """True when the version target or time limit is reached, or nothing can progress."""
        if self.version >= self.cfg.num_versions:
            return True
        if self.cfg.max_sim_seconds and self.now >= self.cfg.max_sim_seconds:
            return True
        if self.min_cohort and not self._in_flight and len(self._idle_devices()) < self.min_cohort:
            return True
        return not self._in_flight and not self._idle_devices()

    def _idle_devices(self) -> list[int]:
        if self.user_level is not None:
            # The Renyi filter: a device whose next full-weight release would exceed its
            # user-level budget is never scheduled again.
            for i, s in enumerate(self.status):
                if s is DeviceStatus.IDLE and not self.user_level.admits(i):
                    self.status[i] = DeviceStatus.USER_EXHAUSTED
        return [i for i, s in enumerate(self.status) if s is DeviceStatus.IDLE]

    def _pick(self, idle: list[int]) -> int | None:
        """Uniformly choose an idle device that is online now (seeded)."""
        while idle:
            j = int(self._rng.integers(len(idle)))
            device = idle[j]
            self._availability_attempts[device] += 1
            if self.fleet.is_online(device, self._availability_attempts[device]):
                return device
            idle[j] = idle[-1]
            idle.pop()
        return None

    def dispatch(self) -> list[Task]:
        """Tasks to start now, at ``self.now``, on the current global model."""
        if self.finished:
            return []
        if self.cfg.mode == "sync":
            if self._in_flight:
                return []
            want = self.cfg.concurrency
        else:
            want = self.cfg.concurrency - len(self._in_flight)
        idle = self._idle_devices()
        started: list[Task] = []
        for _ in range(want):
            device = self._pick(idle)
            if device is None:
                break
            idle.remove(device)
            started.append(self._start(device))
        if self.cfg.mode == "sync":
            self._cohort_open = len(started)
        if not started and not self._in_flight:
            # Every idle device happened to be offline: let simulated time pass.
            self.now += _RETRY_SECONDS
        return started

    def _start(self, device: int) -> Task:
        timing = self.fleet.task_timing(device, self._tasks_per_device[device], self.local_steps)
        self._tasks_per_device[device] += 1
        lost = "dropped" if timing.dropped else ("timeout" if timing.duration > self.cfg.task_timeout else "")
        finish = self.now + (self.cfg.task_timeout if lost else timing.duration)
        task = Task(
            finish_at=finish,
            seq=self._seq,
            task_id=self._seq,
            device_id=device,
            base_version=self.version,
            dispatched_at=self.now,
            lost=lost,
        )
        self._seq += 1
        self.status[device] = DeviceStatus.BUSY
        heapq.heappush(self._in_flight, task)
        return task

    def next_due(self) -> Task | None:
        """The in-flight task that completes first in virtual time."""
        return self._in_flight[0] if self._in_flight else None

    # -- completion -------------------------------------------------------------
    def complete(self, task: Task, outcome: Outcome) -> Completion:
        """Process ``task`` (which must be :meth:`next_due`) with its outcome."""
        head = heapq.heappop(self._in_flight)
        if head is not task:
            raise RuntimeError("tasks must be completed in virtual-time order")
        self.now = max(self.now, task.finish_at)
        staleness = self.version - task.base_version
        self.status[task.device_id] = DeviceStatus.IDLE
        applied: int | None = None
        loss: float | None = None
        if task.lost:
            status = task.lost
        elif isinstance(outcome, Refusal):
            status = "refused"
            self.status[task.device_id] = DeviceStatus.EXHAUSTED
        elif isinstance(outcome, Failure):
            status = outcome.kind
            self._consecutive_failures[task.device_id] += 1
            # A real (not simulated) timeout means the device may still be running the
            # task: sending it another could have two tasks update its state at once.
            if outcome.kind == "timeout" or (
                self._consecutive_failures[task.device_id] >= self.cfg.max_device_failures
            ):
                self.status[task.device_id] = DeviceStatus.RETIRED
        else:
            self._consecutive_failures[task.device_id] = 0
            loss = outcome.loss
            delta = outcome.delta
            if self.user_level is not None:
                # Sensitivity needs every update clipped and weighted by at most 1.
                delta = self.user_level.clip_update(dict(delta))
                weight = 1.0
            else:
                # Public weights: a device's record count is private (docs/privacy.md). Under DP its
                # update already grows with its data, the noisy sum being divided by a public constant.
                weight = 1.0
            accepted = self.buffer.add(task.device_id, delta, weight, staleness)
            status = "accepted" if accepted else "rejected-stale"
            if accepted and self.user_level is not None:
                self.status[task.device_id] = DeviceStatus.BUFFERED
        if self.cfg.mode == "sync":
            self._cohort_open -= 1
            if self._cohort_open == 0 and len(self.buffer):
                applied = self._apply()
        elif len(self.buffer) >= self.cfg.buffer_size:
            applied = self._apply()
        return Completion(task, status, staleness, applied, loss)

    def complete_cohort(
        self,
        tasks: list[Task],
        mean_delta: StateDict | None,
        contributed: set[int],
        rejected: set[int] | frozenset[int] = frozenset(),
    ) -> list[Completion]:
        """Sync mode with secure aggregation: complete a whole cohort from its aggregate alone.

        The server never sees individual updates, only the cohort's mean
        delta (``mean_delta``; None when the round failed or was withheld). ``contributed``
        are the devices whose updates are in it; the others failed or dropped out.
        ``rejected`` are contributors whose ledger failed verification: one bad update
        cannot be taken back out of a masked sum, so the caller withholds the whole
        aggregate (``mean_delta`` None); the rejected devices count a failure, the other
        contributors are ``withheld`` without blame.
        """
        if rejected and mean_delta is not None:
            raise ValueError("an aggregate with a rejected contribution must not be applied")
        if not rejected <= contributed:
            raise ValueError("only contributors' ledgers can be rejected")
        if self.cfg.mode != "sync":
            raise RuntimeError("a cohort is completed at once only in synchronous mode")
        if sorted(self._in_flight) != sorted(tasks):
            raise RuntimeError("complete_cohort needs exactly the tasks in flight")
        self._in_flight = []
        self._cohort_open = 0
        self.now = max([self.now, *(t.finish_at for t in tasks)])
        applied = None
        if mean_delta is not None and contributed:
            staleness = tuple(0 for _ in contributed)
            self.applied_staleness.extend(staleness)
            self.params = self.optimizer.apply(self.params, mean_delta)
            self.version += 1
            applied = self.version
            self.last_applied = AppliedVersion(applied, staleness)
        completions = []
        for t in sorted(tasks):
            self.status[t.device_id] = DeviceStatus.IDLE
            if t.lost:
                status = t.lost
            elif t.device_id in rejected:
                status = "rejected-ledger"
            elif t.device_id in contributed and applied is not None:
                status = "accepted"
            elif t.device_id in contributed and rejected:
                status = "withheld"  # honest, but in a sum that also held a rejected update
            else:
                status = "failed"
            if status == "accepted":
                self._consecutive_failures[t.device_id] = 0
            elif status in ("rejected-ledger", "failed"):
                self._consecutive_failures[t.device_id] += 1
                if self._consecutive_failures[t.device_id] >= self.cfg.max_device_failures:
                    self.status[t.device_id] = DeviceStatus.RETIRED
            completions.append(Completion(t, status, 0, applied if status == "accepted" else None, None))
        return completions

    def dispatch_cohort(self, size: int) -> list[Task]:
        """Secure sums: start up to ``size`` idle, online devices together on the current version.

        Every task of a cohort has the same base version, so the staleness of the cohort's
        sum is one public number, applied to the sum the server learns.
        """
        if self.finished:
            return []
        idle = self._idle_devices()
        started: list[Task] = []
        for _ in range(size):
            device = self._pick(idle)
            if device is None:
                break
            idle.remove(device)
            started.append(self._start(device))
        if not started and not self._in_flight:
            self.now += _RETRY_SECONDS
        return started

    def complete_secure(
        self,
        tasks: list[Task],
        close_at: float,
        delta: StateDict | None,
        outcome: Mapping[int, str],
    ) -> list[Completion]:
        """Complete one secure cohort at virtual time ``close_at`` from its sum alone.

        ``delta`` is the cohort's mean update (None: withheld or failed); ``outcome`` gives
        each task's device a status: ``accepted`` (in the sum), ``late`` (trained after the
        sum closed), ``refused``, ``failed``, ``rejected-ledger`` or ``withheld``. The sum is
        discounted by the staleness function at its one staleness and refused beyond
        ``max-staleness`` (its devices are then ``rejected-stale``).
        """
        ids = {t.task_id for t in tasks}
        self._in_flight = [t for t in self._in_flight if t.task_id not in ids]
        heapq.heapify(self._in_flight)
        self.now = max(self.now, close_at)
        base = tasks[0].base_version if tasks else self.version
        staleness = self.version - base
        applied = None
        contributors = sorted(t.device_id for t in tasks if outcome.get(t.device_id) == "accepted")
        stale = self.cfg.mode == "async" and staleness > self.cfg.max_staleness
        if delta is not None and contributors and not stale:
            weight = self.buffer.staleness_fn(staleness)
            self.params = self.optimizer.apply(self.params, {k: v * weight for k, v in delta.items()})
            self.version += 1
            applied = self.version
            self.applied_staleness.extend([staleness] * len(contributors))
            self.last_applied = AppliedVersion(applied, tuple([staleness] * len(contributors)))
        completions = []
        for t in sorted(tasks):
            status = t.lost or outcome.get(t.device_id, "failed")
            if status == "accepted" and applied is None:
                status = "rejected-stale" if stale else "withheld"
            self.status[t.device_id] = DeviceStatus.IDLE
            if status == "refused":
                self.status[t.device_id] = DeviceStatus.EXHAUSTED
            elif status == "accepted":
                self._consecutive_failures[t.device_id] = 0
            elif status in ("rejected-ledger", "failed"):
                self._consecutive_failures[t.device_id] += 1
                if self._consecutive_failures[t.device_id] >= self.cfg.max_device_failures:
                    self.status[t.device_id] = DeviceStatus.RETIRED
            completions.append(Completion(t, status, staleness, applied if status == "accepted" else None, None))
        return completions

    def _apply(self) -> int:
        entries = list(self.buffer.entries)
        staleness = tuple(e.staleness for e in entries)
        self.applied_staleness.extend(staleness)
        releases: tuple[UserRelease, ...] = ()
        if self.user_level is not None:
            delta = self.buffer.aggregate(noise=self.user_level.noise)
            releases = tuple(self.user_level.charge(entries))
            for e in entries:
                if self.status[e.device_id] is DeviceStatus.BUFFERED:
                    self.status[e.device_id] = DeviceStatus.IDLE
        else:
            delta = self.buffer.aggregate()
        self.params = self.optimizer.apply(self.params, delta)
        self.version += 1
        self.last_applied = AppliedVersion(self.version, staleness, releases)
        return self.version
