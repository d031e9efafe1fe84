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

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import Device, DeviceState, EvalReply, RefusalReply
from shared.config import FedrecConfig, parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.records import get_int

_STATE_KEY = "fedrec-device"
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


def _device(cfg: FedrecConfig, context: Context) -> Device:
    info = prepare_partitions(cfg.data)
    data = load_device(info.path, _device_index(context))
    return Device(cfg, data, info.num_items, _load_state(context))


def _global_params(msg: Message) -> dict[str, torch.Tensor]:
    return dict(msg.content.array_records["global"].to_torch_state_dict())


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose config is the defaults, then ``context.run_config``, then ``overrides``.

    ``overrides`` exists for in-process simulation, where Flower leaves
    ``run_config`` empty; with ``flwr run`` it is None.
    """
    fixed = dict(overrides or {})
    app = ClientApp()

    def config_of(context: Context) -> FedrecConfig:
        return parse_config({**dict(context.run_config), **fixed})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        device = _device(cfg, context)
        task_seed = get_int(msg.content.config_records["config"], "task-seed")
        reply = device.train(_global_params(msg), task_seed)
        if isinstance(reply, RefusalReply):
            content = RecordDict(
                {
                    "status": ConfigRecord({"status": "refused", "reason": reply.reason}),
                    "metrics": MetricRecord(
                        {"epsilon": reply.epsilon_spent, "delta": cfg.privacy.delta,
                         "epsilon-would-reach": reply.epsilon_would_reach}
                    ),
                }
            )
            return Message(content, reply_to=msg)
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
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        device = _device(cfg, context)
        conf = msg.content.config_records["config"]
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
        if bool(conf.get("export-top-k", False)):
            records["top-k"] = ConfigRecord({"items": [int(i) for i in result.top_items]})
        return Message(RecordDict(records), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict({"status": ConfigRecord({"device-id": _device_index(context)})}), reply_to=msg
        )

    return app


app = build_client_app()
