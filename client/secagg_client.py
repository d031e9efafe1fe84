"""Secure aggregation (SecAgg+) for fedrec's synchronous mode: the device side.

Flower 1.42's SecAgg+ client is a legacy mod (``flwr.client.mod.secaggplus_mod``)
wrapped around a legacy ``NumPyClient``; all of that lives here, next to its
server half in ``server/secagg.py`` (which documents what SecAgg+ protects and
what it does not). fedrec's ``@app.train`` handler delegates every message for
which :func:`is_secagg_message` holds to :func:`secagg_train`.

A SecAgg+ round sends each device four ``train`` messages (setup, share keys,
collect masked vectors, unmask). Only the third trains: the mod hands it to the
``NumPyClient``, which runs :meth:`Device.train` on the global parameters and
returns the delta; the mod then weights, clips, quantizes and masks it, and the
reply carries only the masked vector. The protocol's own state (keys, shares)
is kept in ``context.state`` by the mod between the messages.

A device that refuses (privacy budget) or fails raises, which the runtime turns
into an error reply: for SecAgg+ that is a dropout, recovered from as long as
the reconstruction threshold still holds.

A deployed device (one with its own encrypted store) keeps a *contribution
receipt* of every update it feeds into the masking: the run, version and task,
its ``num_examples``, the plain delta and the protocol's clipping and
quantization settings (:class:`client.receipts.ContributionReceipt`). The
server only ever learns the cohort's sum, so this local record is the only way
for the device's owner to see what the device contributed; it is written before
the masked vector leaves the device, stays encrypted on it and is never sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from client.device import Device, RefusalReply, TrainReply
from client.node_config import open_node_store
from shared.protocol import PUBLIC_WEIGHT, SecAggFitConfig, parse_secagg_fit_config
from shared.typed_fields import get_float

log = logging.getLogger("fedrec.secagg")

# Called with the successful reply and fedrec's part of the round's config, *before* the
# masked vector leaves the device: record releases in the ledger, save the device state.
Commit = Callable[[TrainReply, SecAggFitConfig], None]
DeviceFactory = Callable[[Context], tuple[Device, Commit]]


class DeviceRefused(RuntimeError):
    """The device declined the SecAgg+ task (budget); the round sees it as a dropout."""


def is_secagg_message(msg: Message) -> bool:
    """Whether ``msg`` belongs to a legacy SecAgg+ round (any of its four stages).

    Every message of ``SecAggPlusWorkflow`` is a ``train`` message carrying the
    ``secaggplus_configs`` ConfigRecord (with the stage); the training stage adds
    the legacy ``fitins.parameters`` / ``fitins.config`` records. fedrec's own
    train messages carry ``global`` and ``config`` instead.
    """
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return False
    return RECORD_KEY_CONFIGS in msg.content.config_records


class _SecAggNumPyClient(NumPyClient):
    """Legacy client: global parameters in, fedrec delta and the public unit weight out."""

    def __init__(self, context: Context, device_factory: DeviceFactory) -> None:
        self._context = context
        self._factory = device_factory

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on the device and return its delta (same order as the incoming arrays)."""
        fit = parse_secagg_fit_config(config)
        keys = list(fit.param_keys)
        if len(keys) != len(parameters):
            raise ValueError(f"{len(parameters)} arrays for {len(keys)} parameter names")
        global_params = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, parameters, strict=True)}
        device, commit = self._factory(self._context)
        # The scheduler's task id seeds the task; without one, the device's own task
        # counter still gives every task a different seed.
        task_seed = fit.task_seed if fit.task_seed is not None else device.state.tasks_done
        reply = device.train(global_params, task_seed)
        if isinstance(reply, RefusalReply):
            raise DeviceRefused(reply.reason)
        commit(reply, fit)
        delta = [reply.delta[k].detach().cpu().numpy() for k in keys]
        clipped = self._warn_if_clipped(delta, PUBLIC_WEIGHT)
        self._keep_receipt(reply, keys, fit, clipped)
        # No metrics, and the legacy FitRes's num_examples (plaintext to the server) is the
        # same public weight for every device, never its record count.
        return delta, PUBLIC_WEIGHT, {}

    def _protocol_settings(self) -> dict[str, float]:
        """The SecAgg+ settings the setup stage gave this device (kept by the mod in ``context.state``)."""
        if RECORD_KEY_STATE not in self._context.state.config_records:
            return {}
        state = self._context.state.config_records[RECORD_KEY_STATE]
        names = ("max_weight", "clipping_range", "target_range", "mod_range")
        return {n: get_float(state, n) for n in names if n in state}

    def _warn_if_clipped(self, delta: NDArrays, num_examples: int) -> bool | None:
        """The mod clips ``n / max_weight * delta`` to the clipping range; only the device can see it.

        Returns whether it will (None when the protocol's settings are unknown).
        """
        settings = self._protocol_settings()
        max_weight = settings.get("max_weight", 0.0)
        clip = settings.get("clipping_range", 0.0)
        if max_weight <= 0 or clip <= 0:
            return None
        peak = max((float(np.abs(d).max()) for d in delta if d.size), default=0.0)
        if peak * num_examples / max_weight > clip:
            log.warning(
                "SecAgg+ will clip this update: |delta| %.4g x %d / max_weight %g exceeds clipping_range %g",
                peak,
                num_examples,
                max_weight,
                clip,
            )
            return True
        return False

    def _keep_receipt(self, reply: TrainReply, keys: list[str], fit: SecAggFitConfig, clipped: bool | None) -> None:
        """Keep a receipt of this contribution in a deployed device's encrypted store (module docstring).

        A simulated device has no store of its own and keeps none. A failure here fails
        the task (a dropout) rather than sending an update the owner cannot see.
        """
        store = open_node_store(self._context.node_config)
        if store is None:
            return
        settings = self._protocol_settings()
        with store:
            store.add_contribution_receipt(
                run=fit.run,
                version=fit.version if fit.version is not None else -1,
                task_id=fit.task_seed if fit.task_seed is not None else -1,
                num_examples=PUBLIC_WEIGHT,
                delta={k: reply.delta[k] for k in keys},
                clipping_range=settings.get("clipping_range"),
                quantization_range=int(settings["target_range"]) if "target_range" in settings else None,
                modulus_range=int(settings["mod_range"]) if "mod_range" in settings else None,
                max_weight=settings.get("max_weight"),
                clipped=clipped,
            )


def secagg_train(msg: Message, context: Context, device_factory: DeviceFactory) -> Message:
    """Handle one SecAgg+ message with Flower's ``secaggplus_mod`` around a fedrec device.

    ``device_factory(context)`` is called only for the training stage; it returns
    the device (loaded with its data and state) and a commit callback that the
    client calls with the successful ``TrainReply`` and the round's config before
    the masked update is produced (ledger entries, device state).
    """
    if not is_secagg_message(msg):
        raise ValueError("not a SecAgg+ message")

    # The mod pops the stage out of the incoming config record. Over a real transport
    # every node decodes its own copy; an in-process Grid may hand all nodes the same
    # RecordDict (the setup stage sends one to everyone), so work on a private copy.
    content = RecordDict(dict(msg.content.items()))
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(dict(msg.content.config_records[RECORD_KEY_CONFIGS]))
    msg.content = content

    def client_fn(ctx: Context) -> Client:
        return _SecAggNumPyClient(ctx, device_factory).to_client()

    # A fresh legacy app per message is cheap: the protocol's state lives in context.state.
    legacy = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])  # type: ignore[arg-type]
    return legacy(msg, context)


__all__ = ["Commit", "DeviceFactory", "DeviceRefused", "is_secagg_message", "secagg_train"]
