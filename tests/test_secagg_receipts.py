"""SecAgg+ contribution receipts: what each device keeps of its update reproduces the round's aggregate.

In process (``LocalGrid``), the devices run the real SecAgg+ client (``client/secagg_client.py``)
with an encrypted store each: every contributor keeps a receipt (plain delta, ``num_examples``,
the protocol's settings) in its own store, and ``sum n_i d_i / sum n_i`` over the receipts equals
the unmasked aggregate within :func:`server.secagg.quantization_error_bound`.
``tests/test_deployment.py`` makes the same check with real SuperNodes and a real SuperLink.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Scalar

from client.device import Device, DeviceState, TrainReply
from client.device_store import DeviceDataStore
from client.receipts import ContributionReceipt
from client.secagg_client import Commit, is_secagg_message, secagg_train
from client.store_keys import create_key_file, key_from_file
from server.secagg import quantization_error_bound, run_secagg_round
from shared.config import parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.models.factory import build_model
from simulations.local_grid import LocalGrid

NUM_DEVICES = 3
CLIP = 8.0
QRANGE = 2**22
MAX_WEIGHT = 100.0


def plain_mean(receipts: list[ContributionReceipt]) -> tuple[dict[str, torch.Tensor], float]:
    """``sum n_i d_i / sum n_i`` in float64, and ``max |d_i|`` over every receipt."""
    total = sum(r.num_examples for r in receipts)
    keys = list(receipts[0].delta)
    mean = {k: torch.stack([r.num_examples * r.delta[k].double() for r in receipts]).sum(0) / total for k in keys}
    peak = max(float(r.delta[k].abs().max()) for r in receipts for k in keys)
    return mean, peak


def test_receipts_reproduce_the_secagg_aggregate(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "dataset": "synthetic", "synthetic-users": NUM_DEVICES + 1, "synthetic-items": 60,
            "synthetic-interactions": 30, "cache-dir": str(tmp_path / "cache"), "output-dir": str(tmp_path / "out"),
            "embedding-dim": 8, "mlp-layers": "8", "num-negatives": 4, "local-steps": 3, "batch-size": 8,
            "noise-multiplier": 1.0, "epsilon-budget": 50.0,
        }
    )  # fmt: skip
    info = prepare_partitions(cfg.data)
    nodes: dict[int, dict[str, bool | float | int | str]] = {}
    for index in range(NUM_DEVICES):
        key_file = tmp_path / f"device-{index}.key"
        create_key_file(key_file)
        path = tmp_path / f"device-{index}.db"
        DeviceDataStore(path, index, key_from_file(key_file)).close()
        nodes[index] = {"store": str(path), "key-file": str(key_file), "device-id": index}

    def factory(context: Context) -> tuple[Device, Commit]:
        index = int(context.node_config["device-id"])
        device = Device(cfg, load_device(info.path, index), info.num_items, DeviceState())

        def commit(reply: TrainReply, config: Mapping[str, Scalar]) -> None:
            pass

        return device, commit

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # Each virtual device is a deployed one: its node config names its own encrypted store.
        context.node_config.update(nodes[int(context.node_config["partition-id"])])
        assert is_secagg_message(msg)
        return secagg_train(msg, context, factory)

    model = build_model(cfg.model, info.num_items, 1, seed=5)
    params = {k: v.detach().clone() for k, v in model.global_state().items()}
    result = run_secagg_round(
        LocalGrid(app, NUM_DEVICES), list(range(1, NUM_DEVICES + 1)), params, {"run": "receipts#1", "version": 4},
        num_shares=NUM_DEVICES, reconstruction_threshold=2, clipping_range=CLIP, quantization_range=QRANGE,
        timeout=None, max_weight=MAX_WEIGHT, per_node_config={n: {"task-seed": 100 + n} for n in range(1, 4)},
    )  # fmt: skip
    assert result.contributors == (1, 2, 3)

    receipts = []
    for index, node in nodes.items():
        with DeviceDataStore(str(node["store"]), index, key_from_file(str(node["key-file"]))) as store:
            (receipt,) = store.contribution_receipts()
        assert (receipt.run, receipt.version, receipt.task_id) == ("receipts#1", 4, 100 + index + 1)
        assert (receipt.clipping_range, receipt.quantization_range, receipt.max_weight) == (CLIP, QRANGE, MAX_WEIGHT)
        assert receipt.clipped is False
        assert set(receipt.delta) == set(params)
        receipts.append(receipt)
    assert sum(r.num_examples for r in receipts) == result.num_examples

    mean, peak = plain_mean(receipts)
    bound = quantization_error_bound(
        [r.num_examples for r in receipts], peak, clipping_range=CLIP, quantization_range=QRANGE, max_weight=MAX_WEIGHT
    )
    error = max(float((result.delta[k].double() - mean[k]).abs().max()) for k in params)
    print(f"secagg vs receipts' plain mean: max abs error {error:.3g}, bound {bound:.3g}")
    assert error <= bound, (error, bound)
    assert max(float(v.abs().max()) for v in mean.values()) > 10 * bound  # a real mean, not ~0
