"""Contribution receipts: what this device fed into each SecAgg+ round, kept encrypted on the device.

One job: the receipts' content, format and retention. Under secure aggregation
(SecAgg+) the server only ever sees the sum of a cohort's updates, so nobody but the
device can later show its owner what it contributed. Each time the device feeds an
update into a SecAgg+ round (``client/secagg_client.py``), it keeps a receipt
(:meth:`ContributionReceipts.add_contribution_receipt`): the run, model version and
task, its number of examples, the plain (DP-noised) delta exactly as it went into the
masking (before weighting and quantization) and the protocol's clipping and
quantization settings. A receipt never leaves the device and adds nothing to what is
sent; only the :data:`RECEIPTS_KEPT` most recent are kept, so the store does not grow
with every round. The owner reads them with
:meth:`ContributionReceipts.contribution_receipts`.

Where they are kept: :class:`ContributionReceipts` is mixed into the device's encrypted
store (:class:`client.device_store.DeviceDataStore`), which seals each receipt like the
interactions (AES-256-GCM, bound to its row name ``receipt/<10-digit number>``) and
supplies the numbered-series storage this class is written against.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["RECEIPTS_KEPT", "ContributionReceipt", "ContributionReceipts", "SealedEntry"]

RECEIPTS_KEPT: Final = 3  # SecAgg+ contribution receipts kept (the most recent)

_RECEIPT_SERIES: Final = "receipt/"  # the store's row names: this prefix + the receipt's number
_RECEIPT_FORMAT: Final = "fedrec-contribution-receipt/v1"


@dataclass(frozen=True)
class ContributionReceipt:
    """What this device fed into one SecAgg+ round; kept encrypted on the device, never sent.

    SecAgg+ hides each device's update from the server, so only the device can tell its
    owner what it contributed: this is that record. ``delta`` is the plain update (after
    the device's own DP noise) before the protocol weights it by ``num_examples /
    max_weight``, clips it to ``clipping_range`` and quantizes it to ``quantization_range``
    levels; those settings, as the protocol gave them to the device, are kept too (None
    when unknown). ``clipped`` says whether the weighted update exceeded the clipping range.
    """

    seq: int  # this device's receipt number, increasing
    run: str  # the run label the server sent (as in the ledger entries)
    version: int  # the global model version the update was computed on
    task_id: int
    num_examples: int
    delta: dict[str, torch.Tensor]
    created_at: float  # Unix seconds
    clipping_range: float | None = None
    quantization_range: int | None = None
    modulus_range: int | None = None
    max_weight: float | None = None
    clipped: bool | None = None


class SealedEntry(NamedTuple):
    """One decrypted entry of a numbered series in the encrypted store."""

    seq: int
    name: str  # the store's row name
    plaintext: bytes


class ContributionReceipts:
    """The contribution-receipt methods of the device's encrypted store (a mixin).

    The store that mixes this in provides the storage, all encrypted:
    ``_append_sealed`` (append to a numbered series, dropping its oldest entries),
    ``_sealed_series`` (read a series back, oldest first) and ``_damaged`` (the store's
    error for a record that decrypts but is not what it should be).
    """

    path: Path

    # ------------------------------------------------ storage, provided by the store

    def _append_sealed(self, series: str, plaintext: bytes, keep: int) -> int:
        """Seal ``plaintext`` as the next entry of ``series``, keep the ``keep`` most recent; its number."""
        raise NotImplementedError

    def _sealed_series(self, series: str) -> list[SealedEntry]:
        """Every entry of ``series``, decrypted, oldest first."""
        raise NotImplementedError

    def _damaged(self, detail: str) -> Exception:
        """The store's error for a record that authenticates but cannot be read."""
        raise NotImplementedError

    # ------------------------------------------------------------------- receipts

    def add_contribution_receipt(
        self,
        *,
        run: str,
        version: int,
        task_id: int,
        num_examples: int,
        delta: Mapping[str, torch.Tensor],
        clipping_range: float | None = None,
        quantization_range: int | None = None,
        modulus_range: int | None = None,
        max_weight: float | None = None,
        clipped: bool | None = None,
        keep: int = RECEIPTS_KEPT,
    ) -> ContributionReceipt:
        """Keep a receipt of a SecAgg+ contribution (encrypted), dropping all but the ``keep`` most recent.

        Called by the device before its masked update leaves it (``client/secagg_client.py``).
        See :class:`ContributionReceipt` for the fields.

        Returns
        -------
        ContributionReceipt
            The receipt as kept, with its number.

        Raises
        ------
        ValueError
            If ``keep < 1`` or ``num_examples < 0``.
        client.device_store.ConcurrentWriteError
            If another process added a receipt at the same time (retry).
        """
        import torch  # lazily: the device CLI's --help must not pay for importing torch

        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if num_examples < 0:
            raise ValueError(f"num_examples must be non-negative, got {num_examples}")
        fields: dict[str, Any] = {
            "run": str(run),
            "version": int(version),
            "task_id": int(task_id),
            "num_examples": int(num_examples),
            "created_at": time.time(),
            "clipping_range": None if clipping_range is None else float(clipping_range),
            "quantization_range": None if quantization_range is None else int(quantization_range),
            "modulus_range": None if modulus_range is None else int(modulus_range),
            "max_weight": None if max_weight is None else float(max_weight),
            "clipped": None if clipped is None else bool(clipped),
        }
        tensors = {str(k): v.detach().cpu().clone() for k, v in delta.items()}
        buffer = io.BytesIO()
        torch.save({"format": _RECEIPT_FORMAT, **fields, "delta": tensors}, buffer)
        seq = self._append_sealed(_RECEIPT_SERIES, buffer.getvalue(), keep)
        return ContributionReceipt(seq=seq, delta=tensors, **fields)

    def contribution_receipts(self) -> list[ContributionReceipt]:
        """This device's kept SecAgg+ contribution receipts, oldest first (at most :data:`RECEIPTS_KEPT`).

        Returns
        -------
        list of ContributionReceipt
            Oldest first; empty if none was kept.

        Raises
        ------
        client.device_store.StoreCorruptError
            If a receipt does not authenticate (damaged or tampered with).
        """
        entries = self._sealed_series(_RECEIPT_SERIES)
        if not entries:
            return []
        import torch

        receipts = []
        for entry in entries:
            data = torch.load(io.BytesIO(entry.plaintext), weights_only=True)
            if not isinstance(data, dict) or data.get("format") != _RECEIPT_FORMAT:
                raise self._damaged(f"receipt {entry.name!r} has an unknown format")
            data.pop("format")
            receipts.append(ContributionReceipt(seq=entry.seq, **data))
        return receipts
