"""Everything a device sends in a private task is covered by its DP guarantee (issue 12).

Each reply of a device with a privacy policy (the deployment mode: a ``store`` in its node
config) to a training task and to a private evaluation is captured as sent, and checked for a
record count, a sampling rate derived from the record count, a per-device metric and an item list.
Two devices with very different numbers of records must send replies that differ only in their
DP-noised values.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from shared.config import parse_config
from shared.data.partition import history_lengths, load_device, prepare_partitions
from shared.models.factory import build_model
from shared.privacy.ledger import entry_from_json
from shared.training import opacus_sample_rate


@pytest.fixture()
def overrides(tmp_path: Path) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "synthetic-users": 30,
        "synthetic-items": 60,
        "synthetic-interactions": 25,
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "out"),
        "embedding-dim": 4,
        "mlp-layers": "4",
        "num-negatives": 2,
        "local-steps": 3,
        "batch-size": 4,
        "sample-rate": 0.25,
        "activity-tiers": "15,30",
    }


def _send(overrides: dict[str, Any], node: dict[str, Any], kind: str, conf: dict[str, Any]) -> Message:
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


def _numbers(content: RecordDict) -> list[float]:
    """Every scalar a reply carries outside its arrays, ledger texts and the public step count."""
    out: list[float] = []
    for record in content.metric_records.values():
        for key, value in record.items():
            if key != "steps":  # public: local-steps, checked on its own
                out.extend(value if isinstance(value, list) else [value])
    for config in content.config_records.values():
        for value in config.values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append(float(v))
    return out


def _ledger(content: RecordDict) -> list[dict[str, Any]]:
    """The reply's ledger entries, as the server reads them (every field the device signed)."""
    return [asdict(entry_from_json(text)) for text in content.config_records["ledger"]["entries"]]


def test_a_private_task_and_evaluation_send_no_count_rate_metric_or_item_list(
    overrides: dict[str, Any], tmp_path: Path
) -> None:
    cfg = parse_config(overrides)
    info = prepare_partitions(cfg.data)
    lengths = history_lengths(info)
    light, heavy = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[heavy] >= 2 * lengths[light]  # the two devices' record counts differ a lot
    sent: dict[int, list[RecordDict]] = {}
    for device in (light, heavy):
        node = {"store": str(tmp_path / f"dev-{device}.db"), "partition-id": device}
        train = _send(overrides, node, MessageType.TRAIN, {"version": 0, "task-seed": 7, "run": "r"})
        evaluate = _send(overrides, node, MessageType.EVALUATE, {"split": "valid", "version": 0, "run": "r"})
        sent[device] = [train.content, evaluate.content]

    for device, (train, evaluate) in sent.items():
        data = load_device(info.path, device)
        n = len(data.train_items)
        history = {int(i) for i in data.train_items} | {data.valid_item, data.test_item}
        # The train update: the delta, steps, cumulative epsilon and delta, and ledger entries.
        assert train.config_records["status"]["status"] == "ok"
        assert set(train.metric_records["metrics"]) == {"steps", "epsilon", "delta"}
        assert train.metric_records["metrics"]["steps"] == cfg.train.local_steps
        assert set(train.array_records) == {"delta"}
        # The private evaluation: the noisy vector, epsilon and delta; no exact metric, no list.
        assert evaluate.config_records["status"]["status"] == "private"
        assert set(evaluate.metric_records["metrics"]) == {"noisy-sums", "epsilon", "delta"}
        assert "top-k" not in evaluate.config_records and not evaluate.array_records
        noisy = evaluate.metric_records["metrics"]["noisy-sums"]
        assert isinstance(noisy, list) and len(noisy) == 3 * 5  # three tiers, five coordinates each
        # Noise: no coordinate is an exact metric (a hit, a count, or an NDCG of 1/log2(rank + 2)).
        exact_values = np.array([0.0, 1.0, *(1.0 / np.log2(r + 2) for r in range(cfg.eval.top_k))])
        assert not any(np.isclose(v, exact_values, atol=1e-9).any() for v in noisy)
        for content in (train, evaluate):
            numbers = _numbers(content)
            # No record count, and no rate derived from one.
            assert float(n) not in numbers and cfg.train.batch_size / n not in numbers
            for entry in _ledger(content):
                assert entry["sample_rate"] in (opacus_sample_rate(cfg.train), 1.0), entry
                assert not {"num_examples", "items", "records"} & set(entry)
            # No item list: no integer list anywhere, and no history item among the config values.
            for config in content.config_records.values():
                for value in config.values():
                    assert not (isinstance(value, list) and value and isinstance(value[0], int)), value
    # The two devices' replies differ only in DP-noised values: the same keys, the same public
    # mechanism in their ledgers, the same epsilon.
    (light_train, light_eval), (heavy_train, heavy_eval) = sent[light], sent[heavy]
    assert light_train.metric_records["metrics"]["epsilon"] == heavy_train.metric_records["metrics"]["epsilon"]
    assert light_eval.metric_records["metrics"]["epsilon"] == heavy_eval.metric_records["metrics"]["epsilon"]
    public = ("unit", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "epsilon")
    light_ledger = [{k: e[k] for k in public} for e in _ledger(light_eval)]
    heavy_ledger = [{k: e[k] for k in public} for e in _ledger(heavy_eval)]
    assert light_ledger == heavy_ledger and len(light_ledger) == 2  # training, then the evaluation
    assert light_ledger[1]["mechanism"] == "gaussian-evaluation" and light_ledger[1]["sample_rate"] == 1.0
    # No history item id appears as a number in any reply.
    for device, contents in sent.items():
        data = load_device(info.path, device)
        history = {int(i) for i in data.train_items} | {data.valid_item, data.test_item}
        assert not history & {int(v) for c in contents for v in _numbers(c) if float(v).is_integer() and v > 10}


def test_private_evaluation_noise_is_fresh_on_every_answer(overrides: dict[str, Any], tmp_path: Path) -> None:
    node = {"store": str(tmp_path / "dev.db"), "partition-id": 2}
    conf = {"split": "valid", "version": 0, "run": "r"}
    first = _send(overrides, node, MessageType.EVALUATE, conf).content.metric_records["metrics"]["noisy-sums"]
    second = _send(overrides, node, MessageType.EVALUATE, conf).content.metric_records["metrics"]["noisy-sums"]
    assert first != second  # same model, same data: only the CSPRNG-seeded noise differs


def test_the_secure_rounds_send_no_count_rate_metric_or_item_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every reply of every device in a whole secure-sum run (in-process), captured as sent."""
    from client.wire_log import ENV_VAR, read_wire_log
    from simulations.runner import simulate

    wire = tmp_path / "wire.jsonl"
    monkeypatch.setenv(ENV_VAR, str(wire))
    overrides = {
        "dataset": "synthetic", "synthetic-users": 12, "synthetic-items": 60, "synthetic-interactions": 25,
        "cache-dir": str(tmp_path / "cache"), "output-dir": str(tmp_path / "out"),
        "embedding-dim": 4, "mlp-layers": "4", "num-negatives": 2, "local-steps": 3, "batch-size": 4,
        "concurrency": 12, "buffer-size": 4, "num-versions": 2, "eval-every": 2, "eval-devices": 4,
        "secure-aggregation": True, "secure-sum-min-contributors": 3, "secure-sum-cohort-size": 6,
        "dropout-rate": 0.0, "epsilon-budget": 40.0,
    }  # fmt: skip
    simulate(overrides, backend="local")
    cfg = parse_config(overrides)
    info = prepare_partitions(cfg.data)
    lengths = history_lengths(info)
    replies = [r for r in read_wire_log(wire) if r.content is not None]
    secure = [r for r in replies if r.content.config_records.get("status", {}).get("status") in  # type: ignore[union-attr]
              ("advertised", "shared", "masked", "unmasked")]  # fmt: skip
    kinds = {str(r.content.config_records["status"]["status"]) for r in secure}  # type: ignore[union-attr]
    assert kinds == {"advertised", "shared", "masked", "unmasked"}, kinds
    shapes: dict[str, set[tuple[str, ...]]] = {}
    vector_bytes = set()
    for reply in secure:
        content = reply.content
        assert content is not None and reply.device_id is not None
        n = int(lengths[reply.device_id])
        kind = str(content.config_records["status"]["status"])
        # The same records and keys from every device, whatever its record count.
        keys = tuple(sorted(f"{name}.{key}" for name, rec in content.config_records.items() for key in rec))
        shapes.setdefault(kind, set()).add(keys)
        assert not content.metric_records and not content.array_records, kind
        numbers = _numbers(content)
        assert float(n) not in numbers and cfg.train.batch_size / n not in numbers, (kind, n)
        if kind == "masked":
            vector_bytes.add(len(bytes(content.config_records["secure-sum"]["masked-vector"])))  # type: ignore[arg-type]
            for entry in _ledger(content):
                assert entry["sample_rate"] == opacus_sample_rate(cfg.train), entry
                assert not {"num_examples", "items", "records"} & set(entry)
        # Integer lists only where the protocol names devices (share recipients, seed owners).
        for config in content.config_records.values():
            for key, value in config.items():
                if isinstance(value, list) and value and isinstance(value[0], int):
                    assert key in ("recipients", "seed-owners", "mask-owners"), (kind, key)
                    assert set(value) <= set(range(info.num_devices)), (kind, key, value)
    assert all(len(variants) == 1 for variants in shapes.values()), shapes
    assert len(vector_bytes) == 1  # the masked vector's length is public: the padded model size
    assert len({int(lengths[r.device_id]) for r in secure if r.device_id is not None}) > 1
