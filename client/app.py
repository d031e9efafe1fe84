"""fedrec's ClientApp: Flower glue around :class:`client.device.Device`.

Message contract (see docs/architecture.md):

* ``train`` in: ``global`` (ArrayRecord, global parameters only), ``config``
  (ConfigRecord: ``version``, ``task-seed``). Out: ``delta`` (ArrayRecord),
  ``metrics`` (MetricRecord: num-examples, steps, epsilon, delta,
  sample-rate, and loss only with DP off), ``status`` (ConfigRecord: ``status`` = ok | refused).
* ``evaluate`` in: ``global``, ``config`` (``split``, ``export-top-k``). Out:
  ``metrics`` (hits and NDCG under both protocols) and, when asked, ``top-k``.
* ``query`` out: ``status`` with this device's ``device-id``.

The user embedding and the privacy accountant live in ``context.state`` (the
node's own state; in simulation Flower keeps one per virtual device) and are
never put into a reply.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Scalar

from client.device import Device, DeviceState, EvalReply, RefusalReply, TrainReply
from client.device_store import DeviceDataStore, device_data_from_node, key_from_node_config
from client.policy import DevicePolicy, PolicyViolation
from client.secagg_client import Commit, is_secagg_message, secagg_train
from client.task_lock import exclusive_task
from client.wire_log import wire_log_mods
from shared.config import FedrecConfig, parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.privacy.ledger import entry_to_json
from shared.privacy.ledger_store import DeviceLedgerStore
from shared.typed_fields import get_int

_STATE_KEY = "fedrec-device"
_DAY_S = 86_400.0
_PERSONAL_KEY = "fedrec-personal"


def _device_index(context: Context) -> int:
    for key in ("device-id", "partition-id"):
        if key in context.node_config:
            return get_int(context.node_config, key)
    raise KeyError("node config has neither 'device-id' nor 'partition-id'")


def _load_state(context: Context) -> DeviceState:
    state = DeviceState()
    if _STATE_KEY in context.state.config_records:
        rec = context.state.config_records[_STATE_KEY]
        sigmas: list[Any] = list(rec["acc-sigma"])  # type: ignore[arg-type]
        rates: list[Any] = list(rec["acc-rate"])  # type: ignore[arg-type]
        steps: list[Any] = list(rec["acc-steps"])  # type: ignore[arg-type]
        state.accountant_history = [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps, strict=True)]
        state.tasks_done = get_int(rec, "tasks-done")
    if _PERSONAL_KEY in context.state.array_records:
        state.personal = dict(context.state.array_records[_PERSONAL_KEY].to_torch_state_dict())
    return state


def _save_state(context: Context, state: DeviceState) -> None:
    personal_store = _personal_store(context)
    if personal_store is not None and state.personal:
        with personal_store:
            personal_store.save_personal(state.personal)  # encrypted at rest, like the raw data
    _save_context_state(context, state)


def _save_context_state(context: Context, state: DeviceState) -> None:
    hist = state.accountant_history
    context.state.config_records[_STATE_KEY] = ConfigRecord(
        {
            "acc-sigma": [float(h[0]) for h in hist],
            "acc-rate": [float(h[1]) for h in hist],
            "acc-steps": [int(h[2]) for h in hist],
            "tasks-done": state.tasks_done,
        }
    )
    if state.personal:
        context.state.array_records[_PERSONAL_KEY] = ArrayRecord(state.personal)


def _store_path(cfg: FedrecConfig, context: Context) -> Path:
    """This device's local store: the node config's ``store``, else one file per simulated device."""
    if "store" in context.node_config:
        return Path(str(context.node_config["store"]))
    root = Path(cfg.privacy.device_store_dir or Path(cfg.output_dir) / "devices")
    return root / f"device-{_device_index(context)}.db"


def _open_store(cfg: FedrecConfig, context: Context) -> DeviceLedgerStore:
    path = _store_path(cfg, context)
    path.parent.mkdir(parents=True, exist_ok=True)
    return DeviceLedgerStore(path, device_id=_device_index(context))


def _personal_store(context: Context) -> DeviceDataStore | None:
    """A deployed device's encrypted store (raw data and personal state); None in simulation."""
    node = context.node_config
    if "store" not in node or not ({"key-file", "passphrase-env"} & set(node)):
        return None
    path = Path(str(node["store"]))
    key = key_from_node_config(node, path)
    assert key is not None
    return DeviceDataStore(path, _device_index(context), key)


def _device(
    cfg: FedrecConfig, context: Context, store: DeviceLedgerStore | None = None, run_user_budget: float | None = None
) -> Device:
    deployed = device_data_from_node(cfg, context.node_config)
    if deployed is not None:
        # A real device: its own encrypted store, which survives restarts of the process.
        data, num_items = deployed
        state = DeviceState()
        personal_store = _personal_store(context)
        if personal_store is not None:
            with personal_store:
                state.personal = personal_store.load_personal()
    else:
        info = prepare_partitions(cfg.data)
        data, num_items = load_device(info.path, _device_index(context)), info.num_items
        state = _load_state(context)
    if store is not None:
        # The signed ledger is the source of truth for what this device has spent: the
        # accountant is rebuilt from it, so it survives restarts of the device process.
        entries = store.entries()
        state.accountant_history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.unit == "record"]
        state.user_contributions = sum(1 for e in entries if e.unit == "user")
        state.tasks_done = sum(1 for e in entries if e.unit == "record") or state.tasks_done
    return Device(cfg, data, num_items, state, run_user_budget)


def _record_releases(store: DeviceLedgerStore, cfg: FedrecConfig, reply: TrainReply, conf: ConfigRecord) -> None:
    """Append this task's releases to the device's signed ledger (before anything is sent)."""
    p = cfg.privacy
    common: dict[str, Any] = {
        "run": str(conf.get("run", "")),
        "version": get_int(conf, "version"),
        "task_id": get_int(conf, "task-seed"),
        "delta": p.delta,
        "timestamp": time.time(),
    }
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


def _ledger_record(store: DeviceLedgerStore, conf: ConfigRecord) -> ConfigRecord:
    """The entries the server has not seen yet (it sends the last seq it holds)."""
    known = get_int(conf, "ledger-head") if "ledger-head" in conf else -1
    return ConfigRecord({"entries": [entry_to_json(e) for e in store.entries(after_seq=known)]})


def _global_params(msg: Message) -> dict[str, torch.Tensor]:
    return dict(msg.content.array_records["global"].to_torch_state_dict())


def _secagg_device(cfg: FedrecConfig, context: Context) -> tuple[Device, Commit]:
    """A device for a SecAgg+ task and the commit that records its releases and saves its state."""
    store = _open_store(cfg, context)
    try:
        device = _device(cfg, context, store)
    finally:
        store.close()

    def commit(reply: TrainReply, config: Mapping[str, Scalar]) -> None:
        ledger = _open_store(cfg, context)
        try:
            _record_releases(ledger, cfg, reply, ConfigRecord(dict(config)))
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
            refusal = RecordDict(
                {
                    "status": ConfigRecord({"status": "refused", "reason": str(exc)}),
                    "metrics": MetricRecord({"epsilon": 0.0, "delta": 0.0}),
                }
            )
            return Message(refusal, reply_to=msg)
        # From reading what the device has spent to recording what this task spends, no other
        # task of the same device may run: both could pass the budget check (client/task_lock.py).
        with exclusive_task(_store_path(cfg, context)):
            if is_secagg_message(msg):
                # Synchronous secure aggregation runs Flower's legacy SecAgg+ flow (server/secagg.py).
                return secagg_train(msg, context, lambda ctx: _secagg_device(config_of(ctx), ctx))
            conf = msg.content.config_records["config"]
            store = _open_store(cfg, context)
            try:
                return _train(cfg, msg, context, store, conf, run_cfg.privacy.user_epsilon_budget)
            finally:
                store.close()

    def _train(
        cfg: FedrecConfig,
        msg: Message,
        context: Context,
        store: DeviceLedgerStore,
        conf: ConfigRecord,
        run_user_budget: float,
    ) -> Message:
        device = _device(cfg, context, store, run_user_budget)
        task_seed = get_int(conf, "task-seed")
        reply = device.train(_global_params(msg), task_seed)
        if isinstance(reply, RefusalReply):
            content = RecordDict(
                {
                    "status": ConfigRecord({"status": "refused", "reason": reply.reason}),
                    "metrics": MetricRecord(
                        {
                            "epsilon": reply.epsilon_spent,
                            "delta": cfg.privacy.delta,
                            "epsilon-would-reach": reply.epsilon_would_reach,
                        }
                    ),
                }
            )
            return Message(content, reply_to=msg)
        _record_releases(store, cfg, reply, conf)
        _save_state(context, device.state)
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": reply.num_examples,
            "steps": reply.steps,
            "epsilon": reply.epsilon,
            "delta": cfg.privacy.delta if cfg.privacy.dp else 0.0,
            "sample-rate": reply.sample_rate,
        }
        if not cfg.privacy.dp:
            # The mean training loss is a function of the records that DP-SGD does not
            # privatise; with DP on it stays on the device.
            metrics["loss"] = reply.loss
        content = RecordDict(
            {
                "delta": ArrayRecord(reply.delta),
                "metrics": MetricRecord(metrics),
                "status": ConfigRecord({"status": "ok"}),
                "ledger": _ledger_record(store, conf),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _run_cfg, cfg, policy = run_and_device_config(context)
        conf = msg.content.config_records["config"]
        # Counting and recording the answer are one step per device, like a training task's budget.
        with exclusive_task(_store_path(cfg, context)):
            store = _open_store(cfg, context)
            try:
                if policy is not None:
                    answered = store.evaluations_since(time.time() - _DAY_S)
                    if answered >= policy.max_evaluations_per_day:
                        reason = (
                            f"device policy: {answered} evaluations answered in the last 24 hours "
                            f"(max-evaluations-per-day = {policy.max_evaluations_per_day})"
                        )
                        declined = ConfigRecord({"status": "declined", "reason": reason})
                        return Message(RecordDict({"status": declined}), reply_to=msg)
                    store.record_evaluation(
                        run=str(conf.get("run", "")), version=get_int(conf, "version"), split=str(conf["split"])
                    )
                device = _device(cfg, context, store)  # its ledger gives the epsilon it reports
            finally:
                store.close()
        result: EvalReply = device.evaluate(_global_params(msg), str(conf["split"]), cfg.eval.top_k)
        records: dict[str, Any] = {
            "metrics": MetricRecord(
                {
                    "hit": result.full.hit,
                    "ndcg": result.full.ndcg,
                    "sampled-hit": result.sampled.hit,
                    "sampled-ndcg": result.sampled.ndcg,
                    "epsilon": device.epsilon(),
                }
            )
        }
        if bool(conf.get("export-top-k", False)) and (policy is None or policy.allow_top_k_export):
            records["top-k"] = ConfigRecord({"items": [int(i) for i in result.top_items]})
        return Message(RecordDict(records), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        store = _open_store(config_of(context), context)
        try:
            public_key = store.identity().public_key  # created on first use, kept on the device
            records: dict[str, Any] = {
                "status": ConfigRecord({"device-id": _device_index(context), "public-key": public_key})
            }
            conf = msg.content.config_records.get("config")
            if conf is not None and "ledger-head" in conf:
                # The server asks for the entries it lacks (after a SecAgg+ round, whose
                # legacy replies cannot carry them).
                records["ledger"] = _ledger_record(store, conf)
        finally:
            store.close()
        return Message(RecordDict(records), reply_to=msg)

    return app


app = build_client_app()
