"""fedrec's ClientApp: Flower glue around :class:`client.device.Device`.

Every message it reads and every reply it sends goes through ``shared/protocol.py``,
which holds the message table (also in docs/architecture.md): a ``train-task`` is
answered with a ``train-update`` (and the device's new ledger entries) or a
``train-refusal``, an ``evaluate-task`` with an ``evaluate-result`` or
``evaluate-declined``, a query with the device's ``identity`` (and, for a
``ledger-query``, its ledger entries). SecAgg+ rounds go to ``client/secagg_client.py``.

What the device spent is in its signed ledger (``shared/privacy/ledger_store.py``),
from which its accountant is rebuilt at every task. ``context.state`` (the node's own
state; in simulation Flower keeps one per virtual device) keeps only the simulated
device's user embedding and its count of tasks done; neither is ever put into a reply.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import secure_sum_app
from client.device import Device, DeviceState, EvalReply, RefusalReply, TrainReply
from client.node_config import deployed_device, device_index, open_node_store, store_path
from client.policy import DevicePolicy, PolicyViolation
from client.secagg_client import Commit, is_secagg_message, secagg_train
from client.task_lock import exclusive_task
from client.wire_log import wire_log_mods
from shared.config import FedrecConfig, parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.privacy.evaluation import EVALUATION_MECHANISM, EVALUATION_TASK_ID, num_tiers, sensitivity
from shared.privacy.ledger import entry_to_json, record_histories
from shared.privacy.ledger_store import DeviceLedgerStore
from shared.protocol import (
    EvaluateDeclined,
    EvaluatePrivate,
    EvaluateResult,
    EvaluateTask,
    Identity,
    Ledger,
    LedgerQuery,
    SecAggFitConfig,
    SecureDeclined,
    TrainRefusal,
    TrainTask,
    TrainUpdate,
    build_evaluate_declined,
    build_evaluate_private,
    build_evaluate_result,
    build_identity,
    build_secure_reply,
    build_train_refusal,
    build_train_update,
    parse_evaluate_task,
    parse_query,
    parse_train_task,
)
from shared.seeding import device_seed
from shared.typed_fields import get_int

_STATE_KEY = "fedrec-device"
_DAY_S = 86_400.0
_PERSONAL_KEY = "fedrec-personal"


def _load_state(context: Context) -> DeviceState:
    """A simulated device's state between tasks (its accountant comes from its ledger, in :func:`_device`)."""
    state = DeviceState()
    if _STATE_KEY in context.state.config_records:
        # Only read where the ledger has no record-level entry (DP off), as a SecAgg+
        # task's seed when the round names none.
        state.tasks_done = get_int(context.state.config_records[_STATE_KEY], "tasks-done")
    if _PERSONAL_KEY in context.state.array_records:
        state.personal = dict(context.state.array_records[_PERSONAL_KEY].to_torch_state_dict())
    return state


def _save_state(context: Context, state: DeviceState) -> None:
    personal_store = open_node_store(context.node_config)
    if personal_store is not None and state.personal:
        with personal_store:
            personal_store.save_personal(state.personal)  # encrypted at rest, like the raw data
    _save_context_state(context, state)


def _save_context_state(context: Context, state: DeviceState) -> None:
    context.state.config_records[_STATE_KEY] = ConfigRecord({"tasks-done": state.tasks_done})
    if state.personal:
        context.state.array_records[_PERSONAL_KEY] = ArrayRecord(state.personal)


def _open_store(cfg: FedrecConfig, context: Context) -> DeviceLedgerStore:
    path = store_path(cfg, context.node_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    return DeviceLedgerStore(path, device_id=device_index(context.node_config))


def _device(
    cfg: FedrecConfig, context: Context, store: DeviceLedgerStore, run_user_budget: float | None = None
) -> Device:
    deployed = deployed_device(context.node_config)
    if deployed is not None:
        # A real device: its own encrypted store, which survives restarts of the process.
        data, num_items = deployed.data, deployed.num_items
        state = DeviceState(personal=deployed.personal)
    else:
        info = prepare_partitions(cfg.data)
        data, num_items = load_device(info.path, device_index(context.node_config)), info.num_items
        state = _load_state(context)
    # The signed ledger is the only record of what this device has spent: the accountant
    # is rebuilt from it at every task, so it survives restarts of the device process.
    entries = store.entries()
    state.accountant_history, state.skellam_history = record_histories(entries)
    state.user_contributions = sum(1 for e in entries if e.unit == "user")
    state.tasks_done = sum(1 for e in entries if e.unit == "record") or state.tasks_done
    return Device(cfg, data, num_items, state, run_user_budget)


def _record_releases(
    store: DeviceLedgerStore, cfg: FedrecConfig, reply: TrainReply, *, run: str, version: int, task_id: int
) -> None:
    """Append this task's releases to the device's signed ledger (before anything is sent)."""
    p = cfg.privacy
    common: dict[str, Any] = dict(run=run, version=version, task_id=task_id, delta=p.delta, timestamp=time.time())
    if p.dp:
        store.append(
            unit="record",
            mechanism="subsampled-gaussian",
            noise_multiplier=p.noise_multiplier,
            sample_rate=reply.sample_rate,
            steps=reply.steps,
            clip_norm=p.clip_norm,
            accountant=p.accountant,
            epsilon=reply.epsilon,
            **common,
        )
    if p.user_dp and reply.user_epsilon is not None:
        store.append(
            unit="user",
            mechanism="gaussian-server-noise",
            noise_multiplier=p.user_noise_multiplier,
            sample_rate=1.0,
            steps=1,
            clip_norm=p.user_clip_norm,
            accountant="rdp-filter",
            epsilon=reply.user_epsilon,
            **common,
        )


def _ledger(store: DeviceLedgerStore, head: int) -> Ledger:
    """The entries the server has not seen yet (it sends the last seq it holds)."""
    return Ledger(tuple(entry_to_json(e) for e in store.entries(after_seq=head)))


def _secagg_device(cfg: FedrecConfig, context: Context) -> tuple[Device, Commit]:
    """A device for a SecAgg+ task and the commit that records its releases and saves its state."""
    store = _open_store(cfg, context)
    try:
        device = _device(cfg, context, store)
    finally:
        store.close()

    def commit(reply: TrainReply, config: SecAggFitConfig) -> None:
        version, task_id = config.release_ids()  # ProtocolError (a dropout) if the round names none
        ledger = _open_store(cfg, context)
        try:
            _record_releases(ledger, cfg, reply, run=config.run, version=version, task_id=task_id)
        finally:
            ledger.close()
        _save_state(context, device.state)

    return device, commit


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose config is the defaults, then ``context.run_config``, then ``overrides``.

    ``overrides`` exists for in-process simulation, where Flower leaves
    ``run_config`` empty; with ``flwr run`` it is None.
    """
    fixed = dict(overrides or {})
    app = ClientApp(mods=wire_log_mods())  # inert unless $FEDREC_WIRE_LOG is set

    def run_and_device_config(context: Context) -> tuple[FedrecConfig, FedrecConfig, DevicePolicy | None]:
        """The run's config, the config this device trains under, and its policy (None: simulated)."""
        run = parse_config({**dict(context.run_config), **fixed})
        policy = DevicePolicy.from_node_config(context.node_config)
        # A deployed device's own limits win over the run config (client/policy.py).
        return run, (policy.apply(run) if policy is not None else run), policy

    def config_of(context: Context) -> FedrecConfig:
        return run_and_device_config(context)[1]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            run_cfg, cfg, _policy = run_and_device_config(context)
        except PolicyViolation as exc:
            if is_secagg_message(msg):
                raise  # Flower's SecAgg+ flow reports a raising client as a failure
            # The device's own policy forbids this run: nothing is trained or spent.
            refusal = TrainRefusal(reason=str(exc), epsilon=0.0, dp_delta=0.0)
            return Message(build_train_refusal(refusal), reply_to=msg)
        # From reading what the device has spent to recording what this task spends, no other
        # task of the same device may run: both could pass the budget check (client/task_lock.py).
        with exclusive_task(store_path(cfg, context.node_config)):
            if is_secagg_message(msg):
                # Synchronous secure aggregation runs Flower's legacy SecAgg+ flow (server/secagg.py).
                return secagg_train(msg, context, lambda ctx: _secagg_device(config_of(ctx), ctx))
            task = parse_train_task(msg)
            store = _open_store(cfg, context)
            try:
                return _train(cfg, msg, context, store, task, run_cfg.privacy.user_epsilon_budget)
            finally:
                store.close()

    def _train(
        cfg: FedrecConfig,
        msg: Message,
        context: Context,
        store: DeviceLedgerStore,
        task: TrainTask,
        run_user_budget: float,
    ) -> Message:
        device = _device(cfg, context, store, run_user_budget)
        reply = device.train(dict(task.model.to_torch_state_dict()), task.task_seed)
        if isinstance(reply, RefusalReply):
            refusal = TrainRefusal(
                reason=reply.reason,
                epsilon=reply.epsilon_spent,
                dp_delta=cfg.privacy.delta,
                epsilon_would_reach=reply.epsilon_would_reach,
            )
            return Message(build_train_refusal(refusal), reply_to=msg)
        _record_releases(store, cfg, reply, run=task.run, version=task.version, task_id=task.task_seed)
        _save_state(context, device.state)
        update = TrainUpdate(
            delta=ArrayRecord(reply.delta),
            steps=reply.steps,
            epsilon=reply.epsilon,
            dp_delta=cfg.privacy.delta if cfg.privacy.dp else 0.0,
            # The mean training loss is a function of the records that DP-SGD does not
            # privatise; with DP on it stays on the device.
            loss=None if cfg.privacy.dp else reply.loss,
        )
        return Message(build_train_update(update, _ledger(store, task.ledger_head)), reply_to=msg)

    def _secure_round(msg: Message, context: Context, round_name: str) -> Message:
        """One round of fedrec's secure sum (``client/secure_sum_app.py``), one task at a time."""
        try:
            _run_cfg, cfg, _policy = run_and_device_config(context)
        except PolicyViolation as exc:
            return Message(build_secure_reply(SecureDeclined(str(exc))), reply_to=msg)
        with exclusive_task(store_path(cfg, context.node_config)):
            store = _open_store(cfg, context)
            try:
                if round_name == "train":
                    return secure_sum_app.secure_train(cfg, msg, context, store, _device(cfg, context, store))
                if round_name == "shares":
                    return secure_sum_app.secure_shares(msg, context, store)
                if round_name == "mask":
                    return secure_sum_app.secure_mask(cfg, msg, context, store, _device(cfg, context, store))
                return secure_sum_app.secure_unmask(msg, context, store)
            finally:
                store.close()

    @app.train("secure_train")
    def secure_train(msg: Message, context: Context) -> Message:
        return _secure_round(msg, context, "train")

    @app.train("secure_shares")
    def secure_shares(msg: Message, context: Context) -> Message:
        return _secure_round(msg, context, "shares")

    @app.train("secure_mask")
    def secure_mask(msg: Message, context: Context) -> Message:
        return _secure_round(msg, context, "mask")

    @app.train("secure_unmask")
    def secure_unmask(msg: Message, context: Context) -> Message:
        return _secure_round(msg, context, "unmask")

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _run_cfg, cfg, policy = run_and_device_config(context)
        task = parse_evaluate_task(msg)
        # Counting and recording the answer are one step per device, like a training task's budget.
        with exclusive_task(store_path(cfg, context.node_config)):
            store = _open_store(cfg, context)
            try:
                if policy is not None:
                    answered = store.evaluations_since(time.time() - _DAY_S)
                    if answered >= policy.max_evaluations_per_day:
                        reason = (
                            f"device policy: {answered} evaluations answered in the last 24 hours "
                            f"(max-evaluations-per-day = {policy.max_evaluations_per_day})"
                        )
                        return Message(build_evaluate_declined(EvaluateDeclined(reason)), reply_to=msg)
                if cfg.eval.evaluation == "exact" and policy is not None:
                    # Exact per-device metrics name the held-out item's rank: simulation only.
                    reason = "device: exact evaluation is for simulation only; this device answers only private ones"
                    return Message(build_evaluate_declined(EvaluateDeclined(reason)), reply_to=msg)
                if policy is not None:
                    store.record_evaluation(run=task.run, version=task.version, split=task.split)
                device = _device(cfg, context, store)  # its ledger gives the epsilon it reports
                if cfg.eval.evaluation == "private":
                    return _evaluate_privately(cfg, msg, store, device, task)
            finally:
                store.close()
        result: EvalReply = device.evaluate(dict(task.model.to_torch_state_dict()), task.split, cfg.eval.top_k)
        send_top_k = task.export_top_k  # only a simulated device gets here (a deployed one declined)
        answer = EvaluateResult(
            hit=result.full.hit,
            ndcg=result.full.ndcg,
            sampled_hit=result.sampled.hit,
            sampled_ndcg=result.sampled.ndcg,
            epsilon=device.epsilon(),
            top_k=tuple(int(i) for i in result.top_items) if send_top_k else None,
            tier=result.tier,
        )
        return Message(build_evaluate_result(answer), reply_to=msg)

    def _evaluate_privately(
        cfg: FedrecConfig, msg: Message, store: DeviceLedgerStore, device: Device, task: EvaluateTask
    ) -> Message:
        """Release the noisy metric vector, its cost signed into the ledger before anything is sent."""
        noise_seed = None
        if cfg.privacy.reproducible_noise:
            # Simulation's nominal mode (the run is labelled so): the server could redo this noise.
            noise_seed = device_seed(cfg.seed, device.data.device_id, f"eval-{task.version}-{task.split}")
        reply = device.evaluate_privately(dict(task.model.to_torch_state_dict()), task.split, noise_seed)
        if isinstance(reply, RefusalReply):
            return Message(build_evaluate_declined(EvaluateDeclined(reply.reason)), reply_to=msg)
        store.append(
            run=task.run,
            version=task.version,
            task_id=EVALUATION_TASK_ID,
            unit="record",
            mechanism=EVALUATION_MECHANISM,
            noise_multiplier=cfg.eval.eval_noise_multiplier,
            sample_rate=1.0,
            steps=1,
            clip_norm=sensitivity(num_tiers(cfg.eval.activity_tiers)),
            accountant=cfg.privacy.accountant,
            epsilon=reply.epsilon,
            delta=cfg.privacy.delta,
            timestamp=time.time(),
        )
        answer = EvaluatePrivate(
            values=tuple(float(v) for v in reply.values), epsilon=reply.epsilon, dp_delta=cfg.privacy.delta
        )
        return Message(build_evaluate_private(answer, _ledger(store, task.ledger_head)), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        asked = parse_query(msg)
        store = _open_store(config_of(context), context)
        try:
            public_key = store.identity().public_key  # created on first use, kept on the device
            identity = Identity(device_index(context.node_config), public_key)
            # A ledger query asks for the entries the server lacks (after a SecAgg+ round,
            # whose legacy replies cannot carry them, or at the end of the run).
            ledger = _ledger(store, asked.ledger_head) if isinstance(asked, LedgerQuery) else None
        finally:
            store.close()
        return Message(build_identity(identity, ledger), reply_to=msg)

    return app


app = build_client_app()
