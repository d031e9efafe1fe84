"""The ClientApp's four secure-sum rounds: Flower glue around :class:`client.secure_sum_device.SecureSumDevice`.

Round by round (``shared/protocol.py`` names the messages; docs/secure-aggregation.md the
construction):

1. ``secure-train-task``: check the budget, compute the noisy encoded gradient sum, and
   answer with a signed key advertisement (or a refusal);
2. ``secure-roster``: verify every advertisement against the registered ledger keys and
   send encrypted seed shares to the neighbours;
3. ``secure-delivery``: sign the release into the ledger, then send the masked vector
   with the ledger entries;
4. ``secure-unmask``: answer once with the shares the request may have.

Between rounds the session lives in ``context.state`` (the node's memory, never sent). Any
check that fails ends the session with a ``secure-declined`` reply, which the server
treats as a dropout.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from client.device import Device, RefusalReply
from client.node_config import device_index
from client.secure_sum_device import SecureSumDevice
from shared.config import FedrecConfig
from shared.privacy.accounting import BudgetExhausted
from shared.privacy.ledger import SKELLAM_MECHANISM, entry_to_json
from shared.privacy.ledger_store import DeviceLedgerStore
from shared.protocol import (
    Ledger,
    ProtocolError,
    SecureAdvertisement,
    SecureDeclined,
    SecureMasked,
    SecureShares,
    SecureUnmaskReply,
    TrainRefusal,
    build_secure_reply,
    parse_secure_delivery,
    parse_secure_roster,
    parse_secure_train_task,
    parse_secure_unmask,
)
from shared.secure_sum.layout import VectorLayout
from shared.secure_sum.release import SecureReleasePlan, plan_secure_release
from shared.secure_sum.rounds import (
    Advertisement,
    EncryptedShare,
    SecureSumError,
    SessionParams,
    UnmaskRequest,
)

_STATE_KEY = "fedrec-secure-sum"


def _reply(msg: Message, content: object, ledger: Ledger | None = None) -> Message:
    return Message(build_secure_reply(content, ledger), reply_to=msg)  # type: ignore[arg-type]


def _decline(msg: Message, context: Context, reason: str, session_id: bytes | None = None) -> Message:
    """Decline; the open session ends only if the message belongs to it (a stale one leaves it be)."""
    saved = context.state.config_records.get(_STATE_KEY)
    if saved is not None and (session_id is None or saved.get("kept-session-id") == session_id):
        context.state.config_records.pop(_STATE_KEY, None)
    return _reply(msg, SecureDeclined(reason))


def _session_id_of(parse: object, msg: Message) -> bytes | None:
    try:
        return parse(msg).session_id  # type: ignore[operator, no-any-return]
    except ProtocolError:
        return None


def _session_of(saved: ConfigRecord) -> SessionParams:
    cohort = saved["kept-cohort"]
    if not isinstance(cohort, list):
        raise SecureSumError("the saved session has no cohort")
    return SessionParams(
        session_id=bytes(saved["kept-session-id"]),  # type: ignore[arg-type]
        cohort=tuple(int(d) for d in cohort),
        length=int(saved["kept-length"]),  # type: ignore[arg-type]
        bits=int(saved["kept-bits"]),  # type: ignore[arg-type]
        neighbours=int(saved["kept-neighbours"]),  # type: ignore[arg-type]
        threshold=int(saved["kept-threshold"]),  # type: ignore[arg-type]
        min_contributors=int(saved["kept-min-contributors"]),  # type: ignore[arg-type]
    )


def _restore(context: Context, store: DeviceLedgerStore, session_id: bytes) -> tuple[ConfigRecord, SecureSumDevice]:
    saved = context.state.config_records.get(_STATE_KEY)
    if saved is None:
        raise SecureSumError("this device has no secure-sum session open")
    if saved.get("kept-session-id") != session_id:
        raise SecureSumError("the message belongs to another session than the one this device is in")
    params = _session_of(saved)
    device = SecureSumDevice.from_state(params, device_index(context.node_config), store.identity(), saved)
    return saved, device


def _save(context: Context, saved: ConfigRecord, device: SecureSumDevice) -> None:
    for key, value in device.to_state().items():
        saved[key] = value
    context.state.config_records[_STATE_KEY] = saved


def secure_train(
    cfg: FedrecConfig, msg: Message, context: Context, store: DeviceLedgerStore, device: Device
) -> Message:
    """Round 1: train (the noisy encoded gradient sum) and advertise keys, or refuse."""
    try:
        task = parse_secure_train_task(msg)
        params = SessionParams(
            task.session_id,
            tuple(task.cohort),
            task.length,
            task.bits,
            task.neighbours,
            task.threshold,
            task.min_contributors,
        )
        global_params = dict(task.model.to_torch_state_dict())
        dim = VectorLayout.of(global_params).dim
        plan = plan_secure_release(cfg.aggregation, cfg.privacy, cfg.train, dim)
        _check_plan(params, plan)
        me = device_index(context.node_config)
        if me not in params.cohort:
            raise SecureSumError(f"device {me} is not in the session's cohort")
    except (ProtocolError, SecureSumError, ValueError) as exc:
        return _decline(msg, context, f"secure-train-task refused: {exc}")
    contribution = device.secure_contribution(global_params, plan, params.rotation_seed)
    if isinstance(contribution, RefusalReply):
        context.state.config_records.pop(_STATE_KEY, None)
        refusal = TrainRefusal(contribution.reason, contribution.epsilon_spent, cfg.privacy.delta)
        return Message(build_secure_reply(refusal), reply_to=msg)
    session = SecureSumDevice(params, me, store.identity())
    advert = session.advertise()
    saved = ConfigRecord(
        {
            "kept-session-id": params.session_id,
            "kept-cohort": list(params.cohort),
            "kept-length": params.length,
            "kept-bits": params.bits,
            "kept-neighbours": params.neighbours,
            "kept-threshold": params.threshold,
            "kept-min-contributors": params.min_contributors,
            "kept-version": task.version,
            "kept-task-id": task.task_seed,
            "kept-run": task.run,
            "kept-ledger-head": task.ledger_head,
            "kept-dim": dim,
            "kept-vector": contribution.vector.astype("<u8").tobytes(),
        }
    )
    _save(context, saved, session)
    device.state.tasks_done += 1
    return _reply(
        msg, SecureAdvertisement(advert.share_public, advert.mask_public, advert.seed_commitment, advert.signature)
    )


def _check_plan(params: SessionParams, plan: SecureReleasePlan) -> None:
    """The session the server asks for must be the one the device's own config plans."""
    if params.length != plan.encoding.padded_dim:
        raise SecureSumError(f"vector length {params.length}, the model needs {plan.encoding.padded_dim}")
    if params.bits != plan.encoding.bits:
        raise SecureSumError(f"modulus bits {params.bits}, this device's config says {plan.encoding.bits}")
    if params.min_contributors < plan.min_contributors:
        # Fewer contributors than the device's noise share is sized for would leave the sum under-noised.
        raise SecureSumError(
            f"min-contributors {params.min_contributors} is below the {plan.min_contributors} "
            "this device's noise share is sized for"
        )


def secure_shares(msg: Message, context: Context, store: DeviceLedgerStore) -> Message:
    """Round 2: verify the roster and send encrypted seed shares to the neighbours."""
    try:
        roster = parse_secure_roster(msg)
        saved, session = _restore(context, store, roster.session_id)
        columns = (
            roster.share_publics,
            roster.mask_publics,
            roster.seed_commitments,
            roster.signatures,
            roster.ledger_keys,
        )
        if any(len(c) != len(roster.roster) for c in columns):
            raise SecureSumError("the roster's columns have different lengths")
        adverts = [
            Advertisement(d, session.params.digest, share, mask, commit, signature)
            for d, share, mask, commit, signature in zip(
                roster.roster,
                roster.share_publics,
                roster.mask_publics,
                roster.seed_commitments,
                roster.signatures,
                strict=True,
            )
        ]
        shares = session.share_keys(adverts, dict(zip(roster.roster, roster.ledger_keys, strict=True)))
    except (ProtocolError, SecureSumError, ValueError) as exc:
        return _decline(msg, context, f"secure-roster refused: {exc}", _session_id_of(parse_secure_roster, msg))
    _save(context, saved, session)
    return _reply(
        msg,
        SecureShares(
            tuple(s.recipient for s in shares), tuple(s.nonce for s in shares), tuple(s.ciphertext for s in shares)
        ),
    )


def secure_mask(cfg: FedrecConfig, msg: Message, context: Context, store: DeviceLedgerStore, device: Device) -> Message:
    """Round 3: sign the release into the ledger, then send the masked vector with the new entries."""
    try:
        delivery = parse_secure_delivery(msg)
        saved, session = _restore(context, store, delivery.session_id)
        if not len(delivery.senders) == len(delivery.nonces) == len(delivery.ciphertexts):
            raise SecureSumError("the delivery's columns have different lengths")
        shares = [
            EncryptedShare(sender, session.device_id, nonce, ciphertext)
            for sender, nonce, ciphertext in zip(delivery.senders, delivery.nonces, delivery.ciphertexts, strict=True)
        ]
        if "kept-vector" not in saved:
            raise SecureSumError("this device has already sent its masked vector in this session")
        vector = np.frombuffer(bytes(saved["kept-vector"]), dtype="<u8").astype(np.uint64)  # type: ignore[arg-type]
        plan_release = plan_secure_release(
            cfg.aggregation,
            cfg.privacy,
            cfg.train,
            int(saved["kept-dim"]),  # type: ignore[arg-type]
        ).release
        # The budget again: another release (an evaluation) may have come since round 1.
        epsilon = device.check_secure_release(plan_release)
        masked = session.mask(vector, shares)
    except BudgetExhausted as exc:
        context.state.config_records.pop(_STATE_KEY, None)
        refusal = TrainRefusal(str(exc), exc.spent, cfg.privacy.delta, epsilon_would_reach=exc.would_reach)
        return Message(build_secure_reply(refusal), reply_to=msg)
    except (ProtocolError, SecureSumError, ValueError, KeyError) as exc:
        return _decline(msg, context, f"secure-delivery refused: {exc}", _session_id_of(parse_secure_delivery, msg))
    # Signed before anything is sent: the release is on the ledger even if the reply is lost.
    store.append(
        run=str(saved["kept-run"]),
        version=int(saved["kept-version"]),  # type: ignore[arg-type]
        task_id=int(saved["kept-task-id"]),  # type: ignore[arg-type]
        unit="record",
        mechanism=SKELLAM_MECHANISM,
        noise_multiplier=plan_release.noise_multiplier,
        sample_rate=plan_release.sample_rate,
        steps=plan_release.steps,
        clip_norm=plan_release.l2_sensitivity,
        accountant=cfg.privacy.accountant,
        epsilon=epsilon,
        delta=cfg.privacy.delta,
        timestamp=time.time(),
    )
    saved.pop("kept-vector", None)
    _save(context, saved, session)
    head = int(saved["kept-ledger-head"])  # type: ignore[arg-type]
    ledger = Ledger(tuple(entry_to_json(e) for e in store.entries(after_seq=head)))
    words = "<u4" if session.params.bits <= 32 else "<u8"
    return _reply(msg, SecureMasked(masked.vector.astype(words).tobytes()), ledger)


def secure_unmask(msg: Message, context: Context, store: DeviceLedgerStore) -> Message:
    """Round 4, once: the shares the server may have; the session then ends on this device."""
    try:
        request = parse_secure_unmask(msg)
        _saved, session = _restore(context, store, request.session_id)
        reply = session.unmask(UnmaskRequest(session.params.digest, tuple(request.survivors), tuple(request.dropped)))
    except (ProtocolError, SecureSumError, ValueError) as exc:
        return _decline(msg, context, f"secure-unmask refused: {exc}", _session_id_of(parse_secure_unmask, msg))
    context.state.config_records.pop(_STATE_KEY, None)
    seed_owners = tuple(sorted(reply.seed_shares))
    mask_owners = tuple(sorted(reply.mask_shares))
    return _reply(
        msg,
        SecureUnmaskReply(
            seed_owners,
            tuple(reply.seed_shares[d] for d in seed_owners),
            mask_owners,
            tuple(reply.mask_shares[d] for d in mask_owners),
        ),
    )
