"""SecAgg+ in synchronous mode: a real protocol round over in-process devices.

The round runs Flower's ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod``
(devices) over :class:`simulations.local_grid.LocalGrid`. With reproducible noise
each device's delta can be recomputed by a fresh device, so the securely
aggregated mean can be compared with the plain example-weighted mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Scalar, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.device import Device, DeviceState, TrainReply
from client.secagg_client import Commit, is_secagg_message, secagg_train
from server.secagg import SecAggError, quantization_error_bound, run_secagg_round
from shared.config import FedrecConfig, parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.models.factory import build_model
from shared.protocol import PUBLIC_WEIGHT, SecAggFitConfig, secagg_round_config, secagg_task_config
from simulations.local_grid import LocalGrid

NUM_DEVICES = 5
CLIP = 8.0
QRANGE = 2**22
MOD = 2**32


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> FedrecConfig:
    tmp = tmp_path_factory.mktemp("secagg")
    return parse_config(
        {
            "dataset": "synthetic",
            "synthetic-users": NUM_DEVICES + 1,
            "synthetic-items": 60,
            "synthetic-interactions": 30,
            "cache-dir": str(tmp / "cache"),
            "output-dir": str(tmp / "out"),
            "embedding-dim": 8,
            "mlp-layers": "8",
            "num-negatives": 4,
            "local-steps": 3,
            "batch-size": 8,
            "noise-multiplier": 1.0,
            "epsilon-budget": 50.0,
            "reproducible-noise": True,
        }
    )


def _fresh_device(cfg: FedrecConfig, index: int) -> Device:
    info = prepare_partitions(cfg.data)
    return Device(cfg, load_device(info.path, index), info.num_items, DeviceState())


def _global(cfg: FedrecConfig) -> dict[str, torch.Tensor]:
    info = prepare_partitions(cfg.data)
    model = build_model(cfg.model, info.num_items, 1, seed=123)
    return {k: v.detach().clone() for k, v in model.global_state().items()}


class _RecordingGrid(LocalGrid):
    """LocalGrid that keeps every reply the server pulled (what the server saw)."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.seen: list[Message] = []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        self.seen.extend(replies)
        return replies


def _client_app(cfg: FedrecConfig, committed: dict[int, TrainReply], drop: set[int]) -> ClientApp:
    app = ClientApp()

    def factory(context: Context) -> tuple[Device, Commit]:
        index = int(context.node_config["partition-id"])
        if index + 1 in drop:
            raise RuntimeError("device went offline")  # a dropout in the masked-vector stage
        device = _fresh_device(cfg, index)

        def commit(reply: TrainReply, config: SecAggFitConfig) -> None:
            committed[index + 1] = reply

        return device, commit

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # The dispatch client/app.py does before its own train path.
        if is_secagg_message(msg):
            return secagg_train(msg, context, factory)
        raise AssertionError("only SecAgg+ messages in this test")

    return app


def _seeds(nodes: Iterable[int]) -> dict[int, Mapping[str, Scalar]]:
    return {n: secagg_task_config(1000 + n) for n in nodes}


def _plain(cfg: FedrecConfig, params: dict[str, torch.Tensor], nodes: Iterable[int]) -> list[TrainReply]:
    replies = []
    for n in nodes:
        reply = _fresh_device(cfg, n - 1).train({k: v.clone() for k, v in params.items()}, 1000 + n)
        assert isinstance(reply, TrainReply)
        replies.append(reply)
    return replies


def _run(cfg: FedrecConfig, drop: set[int], max_weight: float) -> tuple[Any, _RecordingGrid, dict[int, TrainReply]]:
    committed: dict[int, TrainReply] = {}
    grid = _RecordingGrid(_client_app(cfg, committed, drop), NUM_DEVICES)
    params = _global(cfg)
    result = run_secagg_round(
        grid,
        list(range(1, NUM_DEVICES + 1)),
        params,
        secagg_round_config("secagg-test", 0),
        num_shares=NUM_DEVICES,
        reconstruction_threshold=3,
        clipping_range=CLIP,
        quantization_range=QRANGE,
        timeout=None,
        max_weight=max_weight,
        per_node_config=_seeds(range(1, NUM_DEVICES + 1)),
    )
    return result, grid, committed


def _check_against_plain(cfg: FedrecConfig, result: Any, nodes: list[int], max_weight: float) -> float:
    plain = _plain(cfg, _global(cfg), nodes)
    counts = [PUBLIC_WEIGHT for _ in plain]  # every device sends the same public weight
    assert result.num_examples == sum(counts)
    assert result.contributors == tuple(nodes)
    keys = list(plain[0].delta)
    total = sum(counts)
    expected = {k: torch.stack([PUBLIC_WEIGHT * r.delta[k].double() for r in plain]).sum(0) / total for k in keys}
    peak = max(float(r.delta[k].abs().max()) for r in plain for k in keys)
    # No clipping happened: every scaled coordinate n_i/W * |delta_i| stays inside the range.
    assert max(counts) / max_weight * peak <= CLIP
    # Bound (see quantization_error_bound): with Q = 2**22, c = 8, N devices and
    # rho_i = round(n_i/W * Q)/Q, |secagg - plain| <= N (4c + max|delta|) / (Q sum rho_i)
    # + 2**-23 max|delta|: < 2 quantization steps (2c/Q) per device from stochastic
    # rounding in float32, plus the rounding of the weights n_i/W to multiples of 1/Q.
    bound = quantization_error_bound(
        counts, peak, clipping_range=CLIP, quantization_range=QRANGE, max_weight=max_weight
    )
    assert set(result.delta) == set(keys)
    error = 0.0
    for k in keys:
        got = result.delta[k]
        assert got.shape == plain[0].delta[k].shape and got.dtype == plain[0].delta[k].dtype
        error = max(error, float((got.double() - expected[k]).abs().max()))
    print(f"secagg vs plain: max abs error {error:.3g}, bound {bound:.3g}")
    assert error <= bound, (error, bound)
    # The aggregate is a real weighted mean, not something trivially close to zero.
    assert max(float(expected[k].abs().max()) for k in keys) > 100 * bound
    return error


def test_secagg_round_equals_plain_weighted_mean_and_server_sees_only_masked(cfg: FedrecConfig) -> None:
    max_weight = float(PUBLIC_WEIGHT)  # every weight is the public 1: no device's record count is sent
    result, grid, committed = _run(cfg, drop=set(), max_weight=max_weight)
    nodes = list(range(1, NUM_DEVICES + 1))
    assert result.num_contributors == NUM_DEVICES and result.failures == 0
    _check_against_plain(cfg, result, nodes, max_weight)
    assert sorted(committed) == nodes  # each device committed its state/ledger before replying

    # What the server received in the masked-vector stage: no arrays in the clear, and
    # a vector that is not the device's quantized update (masks are uniform mod 2**32).
    masked = [
        m
        for m in grid.seen
        if not m.has_error() and Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]
    ]
    assert len(masked) == NUM_DEVICES
    keys = list(_global(cfg))
    for m in masked:
        assert all(len(rec) == 0 for rec in m.content.array_records.values())
        reply = committed[m.metadata.src_node_id]
        sent = cast(list[bytes], m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        vec = [bytes_to_ndarray(b) for b in sent]
        q_ratio = round(PUBLIC_WEIGHT / max_weight * QRANGE)
        for k, arr in zip(keys, vec[1:], strict=True):
            scaled = reply.delta[k].double().numpy() * (q_ratio / QRANGE)
            unmasked = np.floor((np.clip(scaled, -CLIP, CLIP) + CLIP) * QRANGE / (2 * CLIP))
            close = np.abs(arr.astype(np.float64) - unmasked) <= 2
            # Unmasked, every coordinate would be within 2 of this; masked, essentially none is.
            assert close.mean() < 0.01, k


def test_secagg_round_survives_a_dropout_and_fails_beyond_the_threshold(cfg: FedrecConfig) -> None:
    max_weight = float(PUBLIC_WEIGHT)
    result, _grid, _ = _run(cfg, drop={5}, max_weight=max_weight)
    assert result.num_contributors == NUM_DEVICES - 1 and result.failures >= 1
    _check_against_plain(cfg, result, [1, 2, 3, 4], max_weight)

    # Three of five gone: survivors have fewer than 3 live neighbours, the protocol halts.
    with pytest.raises(SecAggError, match="no aggregate"):
        _run(cfg, drop={3, 4, 5}, max_weight=max_weight)
