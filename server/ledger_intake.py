"""The server's intake of devices' ledger entries: verify, cross-check, store or reject.

Every training reply carries the device's new ledger entries (signed, hash-chained),
which ``shared/protocol.py`` reads off the message as JSON texts. Before the server
uses an update it checks that the entries verify against the
device's registered key, continue the chain it already holds, describe the
mechanism the server asked for (noise, clipping, steps, accountant, and the
sampling rate Opacus derives from the reported record count), claim the epsilon
that mechanism really gives, and include this task's release. An update whose
entries fail is rejected and the rejection recorded (``server/privacy_store.py``).

This module only verifies and keeps the device's signed evidence; what the server
makes of it (its own spending rows, each device's epsilon, asking devices for their
ledgers) is ``server/spending.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from server.privacy_store import PrivacyStore
from shared.config import FedrecConfig
from shared.privacy.accounting import SkellamRelease, record_epsilon
from shared.privacy.evaluation import EVALUATION_MECHANISM, num_tiers, sensitivity
from shared.privacy.ledger import SKELLAM_MECHANISM, ChainProblem, LedgerEntry, entry_from_json, record_histories
from shared.privacy.user_level import RenyiFilter
from shared.training import opacus_sample_rate

# Claimed and recomputed epsilon come from the same Opacus routine here, so they agree to
# rounding; the audit's independent recomputation (dp-accounting) uses a looser tolerance.
_CLAIM_RTOL = 1e-9


@dataclass(frozen=True)
class IntakeResult:
    """Whether a reply's ledger entries were accepted, and why not."""

    accepted: bool
    problems: tuple[str, ...]
    entries: tuple[LedgerEntry, ...]


class LedgerIntake:
    """Verifies and stores the ledger entries devices report.

    Parameters
    ----------
    cfg
        The run's configuration (what the server asked devices to do).
    store
        The server's privacy store (device keys, verified entries, rejections).
    """

    def __init__(self, cfg: FedrecConfig, store: PrivacyStore) -> None:
        self.cfg = cfg
        self.store = store
        self.enabled = cfg.privacy.dp or cfg.privacy.user_dp
        # This run's label (unique: it carries a random nonce). A device's ledger spans its
        # whole life, so entries of earlier runs arrive too: they are verified and priced by
        # their own parameters, but only this run's entries must match what this run asked.
        self.run_label = ""
        # With secure aggregation: the release every secure task makes (the federation sets it,
        # from the same public plan the devices follow).
        self.secure_release: SkellamRelease | None = None

    def register(self, device_id: int, public_key: str | None) -> None:
        """Register a device's key at discovery, as the config's ``device-keys`` policy allows."""
        known = self.store.public_key(device_id)
        if self.cfg.privacy.device_keys == "registered":
            if known is None:
                raise PermissionError(f"device {device_id} has no registered key (device-keys = registered)")
            if public_key is not None and public_key != known:
                raise PermissionError(f"device {device_id} presented a key that is not the registered one")
            return
        if public_key is None:
            raise ValueError(f"device {device_id} did not present a public key")
        self.store.register_key(device_id, public_key)

    def head_seq(self, device_id: int) -> int:
        """The last ledger seq the server holds for ``device_id`` (-1: none)."""
        head = self.store.head(device_id)
        return -1 if head is None else head.seq

    def _expected(self, entry: LedgerEntry) -> list[str]:
        """Problems with an entry's mechanism parameters or claim (empty: as asked)."""
        p, problems = self.cfg.privacy, []

        def want(**asked: object) -> None:
            # Keyword names are LedgerEntry fields: each is compared with what the server asked.
            for name, expected in asked.items():
                claimed = getattr(entry, name)
                if isinstance(expected, float) and isinstance(claimed, float):
                    if math.isclose(expected, claimed, rel_tol=0.0, abs_tol=0.0):
                        continue
                elif expected == claimed:
                    continue
                problems.append(f"entry {entry.seq}: {name} is {claimed!r}, the server asked for {expected!r}")

        want(delta=p.delta)
        if entry.unit == "record" and entry.mechanism == EVALUATION_MECHANISM:
            want(
                noise_multiplier=self.cfg.eval.eval_noise_multiplier,
                clip_norm=sensitivity(num_tiers(self.cfg.eval.activity_tiers)),
                accountant=p.accountant,
                sample_rate=1.0,
                steps=1,
            )
        elif entry.unit == "record" and entry.mechanism == SKELLAM_MECHANISM:
            if self.secure_release is None:
                problems.append(f"entry {entry.seq}: a secure-sum release in a run without secure aggregation")
            else:
                r = self.secure_release
                want(
                    noise_multiplier=r.noise_multiplier,
                    sample_rate=r.sample_rate,
                    steps=r.steps,
                    clip_norm=r.l2_sensitivity,
                    accountant="rdp",
                )
        elif entry.unit == "record":
            want(
                mechanism="subsampled-gaussian",
                noise_multiplier=p.noise_multiplier,
                clip_norm=p.clip_norm,
                accountant=p.accountant,
                steps=self.cfg.train.local_steps,
                # Public: the same for every device (a rate of batch / N would reveal N).
                sample_rate=opacus_sample_rate(self.cfg.train),
            )
        elif entry.unit == "user":
            want(
                mechanism="gaussian-server-noise",
                noise_multiplier=p.user_noise_multiplier,
                clip_norm=p.user_clip_norm,
            )
        else:
            problems.append(f"entry {entry.seq}: unknown privacy unit {entry.unit!r}")
        return problems

    def _claims(self, stored: Sequence[LedgerEntry], new: Sequence[LedgerEntry]) -> list[str]:
        """Each new entry's cumulative epsilon must be what its unit's accountant gives.

        A device's ledger spans runs with other settings, so an entry is priced by what
        it names: a record entry by its own accountant (RDP here; the audit recomputes
        PRV claims), a user entry only if it belongs to this run, whose filter the
        server knows (earlier runs' user entries count towards the total, as on the device).
        """
        problems: list[str] = []
        history, skellam = record_histories(stored)
        users = sum(1 for e in stored if e.unit == "user")
        p = self.cfg.privacy
        for e in new:
            if e.unit == "record":
                gaussian_new, skellam_new = record_histories([e])
                history.extend(gaussian_new)
                skellam.extend(skellam_new)
                if e.accountant != "rdp":
                    continue
                truth = record_epsilon(history, skellam, e.delta)
            elif e.unit == "user":
                users += 1
                if e.run != self.run_label:
                    continue
                f = RenyiFilter(p.user_noise_multiplier, p.delta, p.user_epsilon_budget)
                for _ in range(users):
                    f.charge(0, 1.0)
                truth = f.epsilon(0)
            else:
                continue
            if not math.isclose(e.epsilon, truth, rel_tol=_CLAIM_RTOL, abs_tol=1e-12):
                problems.append(f"entry {e.seq}: claims epsilon {e.epsilon!r}, its mechanism gives {truth!r}")
        return problems

    def check(
        self, device_id: int, task_id: int | None, texts: Sequence[str], *, evaluation: bool = False
    ) -> IntakeResult:
        """Verify a reply's new entries (JSON texts); store them if and only if they all pass.

        ``task_id`` None (a late reply, a ledger query) skips the check that this task's
        release is present. ``evaluation``: the reply is a private evaluation, whose noisy
        vector is a new release, so a new evaluation entry of this run must be among them.
        """
        if not self.enabled:
            return IntakeResult(True, (), ())
        try:
            entries = [entry_from_json(text) for text in texts]
        except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            return self.unreadable(device_id, task_id, str(exc))
        # Entries the server already holds (a reply racing a lost task's, or an evaluation reply that
        # brought this task's entry first) are dropped if identical; they still show the task's release.
        carried = entries
        stored = self.store.entries(device_id)  # read once: duplicates and claims both need it
        if stored:
            known = {e.seq: e for e in stored}
            fresh = []
            for e in entries:
                if e.seq in known:
                    if known[e.seq] != e:
                        return self._reject(device_id, task_id, [f"entry {e.seq} differs from the one stored"], entries)
                    continue
                fresh.append(e)
            # A duplicate counts as this task's release only as the server stored it (verified).
            carried = [known.get(e.seq, e) for e in carried]
            entries = fresh
        problems = [f"entry {e.seq}: reported for device {e.device_id}" for e in entries if e.device_id != device_id]
        if task_id is not None:
            training_mechanism = "subsampled-gaussian" if self.secure_release is None else SKELLAM_MECHANISM
            units = {
                e.unit
                for e in carried
                if e.task_id == task_id
                and e.run == self.run_label
                # a training release of the run's mechanism (not an evaluation's entry)
                and (e.unit != "record" or e.mechanism == training_mechanism)
            }
            wanted = ({"record"} if self.cfg.privacy.dp else set()) | ({"user"} if self.cfg.privacy.user_dp else set())
            if not wanted <= units:
                problems.append(f"no ledger entry for task {task_id} (units {sorted(wanted - units)} missing)")
        if evaluation and not any(
            e.mechanism == EVALUATION_MECHANISM and e.unit == "record" and e.run == self.run_label for e in entries
        ):
            problems.append("no new ledger entry for the private evaluation's release")
        for e in entries:
            if e.run == self.run_label:
                problems.extend(self._expected(e))
        if not problems:
            problems.extend(self._claims(stored, entries))
        if problems:
            return self._reject(device_id, task_id, problems, entries)
        chain = self.store.accept(entries)
        if chain:
            return self._reject(device_id, task_id, [p.detail for p in chain], entries, chain)
        return IntakeResult(True, (), tuple(entries))

    def unreadable(self, device_id: int, task_id: int | None, problem: str) -> IntakeResult:
        """Record that a reply's ledger could not be read at all (a rejection, like any other)."""
        return self._reject(device_id, task_id, [f"unreadable ledger: {problem}"], ())

    def _reject(
        self,
        device_id: int,
        task_id: int | None,
        problems: list[str],
        entries: Sequence[LedgerEntry],
        chain: Sequence[ChainProblem] = (),
    ) -> IntakeResult:
        if chain:
            self.store.reject(device_id, task_id if task_id is not None else -1, list(chain))
        else:
            seq = entries[0].seq if entries else None
            self.store.reject(
                device_id,
                task_id if task_id is not None else -1,
                [ChainProblem("mismatch", device_id, seq, None, text) for text in problems],
            )
        return IntakeResult(False, tuple(problems), tuple(entries))
