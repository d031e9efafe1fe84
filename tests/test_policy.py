"""A deployed device's own privacy policy beats the server's run config."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from client.policy import DevicePolicy, PolicyViolation
from shared.config import parse_config
from shared.data.partition import prepare_partitions
from shared.models.factory import build_model


@pytest.fixture()
def overrides(tmp_path: Path) -> dict[str, object]:
    return {
        "dataset": "synthetic",
        "synthetic-users": 4,
        "synthetic-items": 40,
        "synthetic-interactions": 20,
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "out"),
        "embedding-dim": 4,
        "mlp-layers": "4",
        "num-negatives": 2,
        "local-steps": 2,
        "batch-size": 4,
    }


def _send(overrides: dict[str, object], node: dict[str, object], kind: str, conf: dict[str, object]) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = parse_config(overrides)
    model = build_model(cfg.model, prepare_partitions(cfg.data).num_items, 1, seed=3)
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    msg = Message(
        RecordDict({"global": ArrayRecord(model.global_state()), "config": ConfigRecord(conf)}),
        dst_node_id=5,
        message_type=kind,
    )
    return build_client_app(overrides)(msg, context)


def _train(overrides: dict[str, object], node: dict[str, object]) -> Message:
    return _send(overrides, node, MessageType.TRAIN, {"version": 0, "task-seed": 0})


@pytest.mark.parametrize(
    ("asked", "why"),
    [
        ({"dp": False, "evaluation": "exact"}, "dp = false"),
        ({"reproducible-noise": True}, "reproducible-noise"),
        ({"noise-multiplier": 0.1}, "noise-multiplier"),
        ({"delta": 1e-3}, "delta"),
    ],
)
def test_a_deployed_device_refuses_a_run_that_asks_for_less_privacy(
    overrides: dict[str, object], tmp_path: Path, asked: dict[str, object], why: str
) -> None:
    node = {"store": str(tmp_path / "dev.db"), "partition-id": 1}
    reply = _train({**overrides, **asked}, node)
    status = reply.content.config_records["status"]
    assert status["status"] == "refused" and why in str(status["reason"])
    assert "delta" not in reply.content.array_records  # nothing was trained or sent
    # The same request is the experiment's business on a simulated device.
    simulated = _train({**overrides, **asked, "epsilon-budget": 1e9}, {"partition-id": 1})
    assert simulated.content.config_records["status"]["status"] == "ok"


def test_the_devices_budget_caps_the_run_budget() -> None:
    cfg = parse_config({"epsilon-budget": 50.0, "user-epsilon-budget": 40.0})
    capped = DevicePolicy(max_epsilon=3.0, max_user_epsilon=2.0).apply(cfg)
    assert capped.privacy.epsilon_budget == 3.0 and capped.privacy.user_epsilon_budget == 2.0
    assert DevicePolicy().apply(parse_config({"epsilon-budget": 1.0})).privacy.epsilon_budget == 1.0
    with pytest.raises(PolicyViolation, match="max-epsilon|unreadable"):
        DevicePolicy.from_node_config({"store": "x", "max-epsilon": "lots"})


def test_a_deployed_device_declines_exact_evaluation_and_never_sends_a_top_k_list(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    conf = {"split": "valid", "export-top-k": True, "version": 0}
    node = {"store": str(tmp_path / "dev.db"), "partition-id": 1}
    exact = {**overrides, "evaluation": "exact", "export-top-k": "csv"}
    declined = _send(exact, node, MessageType.EVALUATE, conf).content
    assert declined.config_records["status"]["status"] == "declined"
    assert "simulation only" in str(declined.config_records["status"]["reason"])
    assert "top-k" not in declined.config_records and "metrics" not in declined.metric_records
    # A private evaluation answers with the noisy vector only, whatever the task asks.
    private = _send(overrides, node, MessageType.EVALUATE, conf).content
    assert private.config_records["status"]["status"] == "private" and "top-k" not in private.config_records
    assert set(private.metric_records["metrics"]) == {"noisy-sums", "epsilon", "delta"}
    # The same exact request is the experiment's business on a simulated device.
    simulated = _send(exact, {"partition-id": 1}, MessageType.EVALUATE, conf).content
    assert "top-k" in simulated.config_records and "ndcg" in simulated.metric_records["metrics"]


def test_a_deployed_device_answers_at_most_its_evaluations_per_day_and_declines_the_rest(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    import time

    from shared.privacy.ledger_store import DeviceLedgerStore

    conf = {"split": "valid", "export-top-k": False, "version": 3, "run": "r1"}
    node = {"store": str(tmp_path / "dev.db"), "partition-id": 1, "max-evaluations-per-day": "2"}
    for _ in range(2):
        answered = _send(overrides, node, MessageType.EVALUATE, conf).content
        assert "noisy-sums" in answered.metric_records["metrics"]
    declined = _send(overrides, node, MessageType.EVALUATE, conf).content
    assert "metrics" not in declined.metric_records  # no metric leaves the device
    status = declined.config_records["status"]
    assert status["status"] == "declined"
    assert "max-evaluations-per-day = 2" in str(status["reason"])
    # Training is not limited by it.
    assert _train(overrides, node).content.config_records["status"]["status"] == "ok"
    # The window slides: answers older than 24 hours no longer count.
    with DeviceLedgerStore(tmp_path / "dev.db") as store:
        assert store.evaluations_since(time.time() - 86_400) == 2
        assert store.evaluations_since(time.time() + 1) == 0
    # A simulated device (no store in its node config) has no such policy.
    simulated = {"partition-id": 1}
    for _ in range(3):
        assert "metrics" in _send(overrides, simulated, MessageType.EVALUATE, conf).content.metric_records


@pytest.mark.parametrize("value", ["-1", "2.5", "many"])
def test_an_unreadable_evaluation_limit_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(PolicyViolation, match="max-evaluations-per-day|unreadable"):
        DevicePolicy.from_node_config({"store": "x", "max-evaluations-per-day": value})
    assert DevicePolicy.from_node_config({"store": "x"}).max_evaluations_per_day == 24  # type: ignore[union-attr]
