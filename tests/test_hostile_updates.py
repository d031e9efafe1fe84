"""A device is not trusted to send what the protocol asks (issue 15, point 7).

* Each hostile update the issue reproduced (int64, bool, float16, float64 and complex
  tensors, finite values of 3e38, NaN, wrong shapes and names) is refused by the server's
  update check (``server/update_checks.py``), naming what is wrong.
* The size bound those checks apply is derived from public settings only, and honest
  devices stay inside it: real DP-SGD tasks on MovieLens-100K's heaviest users, with SGD,
  momentum and Adam.
* A fuzz test (Hypothesis) sends 10,000 generated malformed train and evaluation replies
  through the real intake of a real federation (``Federation._outcome`` and
  ``Federation.take_evaluation_reply``: parse, check, verify the ledger): none becomes an
  update or a counted metric; then the same federation trains to completion.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.scheduler import Failure, Refusal, Task, Update
from server.update_checks import adam_step_bound, state_norm, update_norm_bound, validate_update
from shared.config import parse_config
from shared.protocol import TrainUpdate

# ------------------------------------------------------------------- the update check


def _reference() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"items.weight": torch.randn(50, 8, generator=gen), "mlp.0.bias": torch.randn(8, generator=gen)}


def _update(delta: dict[str, Any]) -> TrainUpdate:
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in delta.items()})
    return TrainUpdate(delta=record, steps=10, epsilon=1.0, dp_delta=1e-5)


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("int64", {"items.weight": np.zeros((50, 8), np.int64), "mlp.0.bias": np.zeros(8, np.float32)}, "int64"),
    ("bool", {"items.weight": np.zeros((50, 8), bool), "mlp.0.bias": np.zeros(8, np.float32)}, "bool"),
    ("float16", {"items.weight": np.zeros((50, 8), np.float16), "mlp.0.bias": np.zeros(8, np.float32)}, "float16"),
    ("float64", {"items.weight": np.zeros((50, 8), np.float64), "mlp.0.bias": np.zeros(8, np.float32)}, "float64"),
    ("complex", {"items.weight": np.zeros((50, 8), np.complex64), "mlp.0.bias": np.zeros(8, np.float32)}, "complex"),
    ("3e38", {"items.weight": np.full((50, 8), 3e38, np.float32), "mlp.0.bias": np.zeros(8, np.float32)}, "norm"),
    ("nan", {"items.weight": np.full((50, 8), np.nan, np.float32), "mlp.0.bias": np.zeros(8, np.float32)}, "finite"),
    ("shape", {"items.weight": np.zeros((51, 8), np.float32), "mlp.0.bias": np.zeros(8, np.float32)}, "shape"),
    (
        "extra",
        {
            "items.weight": np.zeros((50, 8), np.float32),
            "mlp.0.bias": np.zeros(8, np.float32),
            "user.weight": np.zeros(8, np.float32),
        },
        "unexpected",
    ),  # fmt: skip
    ("missing", {"items.weight": np.zeros((50, 8), np.float32)}, "missing"),
]


@pytest.mark.parametrize(("name", "delta", "phrase"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_each_hostile_update_is_refused_naming_why(name: str, delta: dict[str, Any], phrase: str) -> None:
    cfg = parse_config({})
    reference = _reference()
    bound = update_norm_bound(cfg, sum(v.numel() for v in reference.values()), state_norm(reference))
    assert bound is not None and math.isfinite(bound)
    outcome = validate_update(_update(delta), reference, bound)
    assert isinstance(outcome, Failure), name
    assert phrase in outcome.reason, outcome.reason
    # The same shapes, float32 and small: accepted.
    honest = {k: np.full(tuple(v.shape), 1e-3, np.float32) for k, v in reference.items()}
    assert isinstance(validate_update(_update(honest), reference, bound), Update)


def test_the_bound_is_public_and_configurable() -> None:
    # SGD without DP: unclipped gradients have no bound, so only form is checked ...
    assert update_norm_bound(parse_config({"dp": False, "evaluation": "exact"}), 1000, 1.0) is None
    # ... unless one is set; Adam moves each coordinate at most lr * K per step, whatever the data.
    assert (
        update_norm_bound(parse_config({"dp": False, "evaluation": "exact", "max-update-norm": 5.0}), 1000, 1.0) == 5.0
    )
    adam = update_norm_bound(
        parse_config({"dp": False, "evaluation": "exact", "optimizer": "adam", "learning-rate": 0.01}), 10_000, 1.0
    )
    assert adam == pytest.approx(10 * 0.01 * adam_step_bound(10) * 100)
    assert adam_step_bound(1) == pytest.approx(1.0)  # first step: m_hat / sqrt(v_hat) = sign(g)
    assert 1.0 < adam_step_bound(10) < (1 - 0.9) / math.sqrt(1 - 0.999) * 1.5
    with pytest.raises(ValueError, match="max-update-norm"):
        parse_config({"max-update-norm": -1.0})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"momentum": 0.9, "learning-rate": 0.02}, {"optimizer": "adam", "learning-rate": 0.01}, {"l1": 0.01}],
    ids=["sgd", "momentum", "adam", "l1"],
)
def test_honest_dp_updates_stay_within_the_bound(overrides: dict[str, Any]) -> None:
    """Real DP-SGD tasks of the default model on MovieLens-100K's heaviest and lightest users."""
    from client.device import Device, DeviceState
    from shared.data.partition import history_lengths, load_device, prepare_partitions
    from shared.models.factory import build_model

    cfg = parse_config({**overrides, "reproducible-noise": False})
    info = prepare_partitions(cfg.data)
    lengths = history_lengths(info)
    order = np.argsort(lengths)
    model = build_model(cfg.model, info.num_items, 1, seed=cfg.seed)
    global_params = {k: v.detach().clone() for k, v in model.global_state().items()}
    dim = sum(v.numel() for v in global_params.values())
    bound = update_norm_bound(cfg, dim, state_norm(global_params))
    assert bound is not None
    ratios = []
    for device_id in [int(order[-1]), int(order[-2]), int(order[0])]:
        device = Device(cfg, load_device(info.path, device_id), info.num_items, DeviceState())
        reply = device.train(global_params, task_seed=1)
        norm = state_norm(reply.delta)  # type: ignore[union-attr]
        ratios.append(norm / bound)
    print(f"{overrides}: honest update norm / bound = {[f'{r:.3f}' for r in ratios]} (bound {bound:.4g})")
    assert max(ratios) < 1.0
    assert min(ratios) > 0.0


# ------------------------------------------------------------------- fuzzing the intake

FUZZ_EXAMPLES = 10_000


def _overrides(tmp: Path) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "synthetic-users": 6,
        "synthetic-items": 40,
        "synthetic-interactions": 20,
        "cache-dir": str(tmp / "cache"),
        "output-dir": str(tmp / "out"),
        "embedding-dim": 4,
        "mlp-layers": "4",
        "num-negatives": 2,
        "local-steps": 2,
        "batch-size": 4,
        "concurrency": 4,
        "buffer-size": 2,
        "num-versions": 3,
        "eval-every": 100,
        "evaluation": "private",
        "reproducible-noise": False,
        "epsilon-budget": 1000.0,
    }


class _Harness:
    """A real federation over the in-process grid, and one honest reply of each kind."""

    def __init__(self, tmp: Path) -> None:
        from client.app import build_client_app
        from server.federation import Federation
        from server.output_dir import claim_output_dir
        from server.privacy_store import PrivacyStore
        from server.run_store import RunStore
        from shared.data.partition import prepare_partitions
        from shared.models.factory import build_model
        from shared.protocol import EVALUATE_TASK, EvaluateTask, build_evaluate_task
        from simulations.local_grid import LocalGrid

        flat = _overrides(tmp)
        self.cfg = cfg = parse_config(flat)
        info = prepare_partitions(cfg.data)
        out = Path(cfg.output_dir)
        claim_output_dir(out, overwrite=False)
        model = build_model(cfg.model, info.num_items, 1, seed=cfg.seed)
        initial = {k: v.detach().clone() for k, v in model.global_state().items()}
        self.store = RunStore(f"sqlite:///{out / 'fedrec.db'}")
        self.privacy = PrivacyStore(f"sqlite:///{out / 'fedrec.db'}")
        grid = LocalGrid(build_client_app(flat), info.num_devices)
        self.fed = fed = Federation(
            grid, cfg, info.num_devices, info.num_items, initial, self.store, privacy_store=self.privacy
        )
        fed.driver.discover(info.num_devices, timeout=60.0)
        for device in range(info.num_devices):
            fed.intake.register(device, fed.driver.public_keys.get(device))
        self.device = 0
        self.task = Task(0.0, 0, 10_000, self.device, 0, 0.0, "")
        handle = fed._dispatch(self.task)
        reply = fed.driver.wait(handle)
        assert reply is not None and not reply.has_error()
        self.train_reply = reply
        content = build_evaluate_task(EvaluateTask(fed._model_record(), "valid", 0, False, fed.run_label, -1))
        handle = fed.driver.send(1, content, EVALUATE_TASK.message_type)
        eval_reply = fed.driver.wait(handle)
        assert eval_reply is not None and not eval_reply.has_error()
        self.eval_reply = eval_reply
        self.eval_length = len(num_slots(cfg))
        self.params_before = {k: v.clone() for k, v in fed.scheduler.params.items()}

    def close(self) -> None:
        self.store.close()
        self.privacy.close()


def num_slots(cfg: Any) -> list[int]:
    from shared.privacy.evaluation import SLOT_SIZE, num_tiers

    return list(range(num_tiers(cfg.eval.activity_tiers) * SLOT_SIZE))


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Any:
    h = _Harness(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.close()


def _instruction(kind: str) -> Message:
    return Message(RecordDict(), dst_node_id=1, message_type=kind)


def _mutate_array(array: Array, how: str, draw: Any) -> Array:
    values = array.numpy()
    if how == "dtype":
        dtype = draw(st.sampled_from([np.int64, np.int8, np.bool_, np.float16, np.float64, np.complex64, np.uint32]))
        return Array(values.astype(dtype))
    if how == "shape":
        extra = draw(st.integers(1, 3))
        return Array(np.zeros((*values.shape[:-1], values.shape[-1] + extra), np.float32))
    if how == "non-finite":
        out = values.copy().reshape(-1)
        out[draw(st.integers(0, out.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return Array(out.reshape(values.shape))
    if how == "huge":
        scale = draw(st.floats(1e6, 1e37))
        return Array(np.full(values.shape, scale, np.float32))
    # Bytes that claim the array's dtype and shape but do not fill it.
    cut = draw(st.integers(0, max(0, len(values.tobytes()) - 1)))
    return Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=values.tobytes()[:cut])


_LEDGER_MUTATIONS = ("ledger-garbage", "ledger-tamper", "ledger-empty")
_TRAIN_MUTATIONS = (
    *("dtype", "shape", "non-finite", "huge", "bytes", "drop-array", "extra-array"),
    *("drop-record", "status", "config-type", *_LEDGER_MUTATIONS),
)
_EVAL_MUTATIONS = ("values-length", "values-range", "values-type", "status", "drop-record", *_LEDGER_MUTATIONS)


def _mutate(content: RecordDict, how: str, draw: Any, array_record: str | None) -> RecordDict:
    """A copy of ``content`` broken in one way that no honest device produces."""
    out = copy.deepcopy(content)
    if array_record is not None and how in ("dtype", "shape", "non-finite", "huge", "bytes"):
        record = out.array_records[array_record]
        name = draw(st.sampled_from(sorted(record)))
        record[name] = _mutate_array(record[name], how, draw)
    elif how == "drop-array" and array_record is not None:
        record = out.array_records[array_record]
        del record[draw(st.sampled_from(sorted(record)))]
    elif how == "extra-array" and array_record is not None:
        out.array_records[array_record][draw(st.text(min_size=1, max_size=12))] = Array(np.zeros(3, np.float32))
    elif how == "drop-record":
        del out[draw(st.sampled_from(sorted(out)))]
    elif how == "status":
        config = next(r for r in out.config_records.values() if "status" in r)
        config["status"] = draw(st.text(max_size=20).filter(lambda s: s not in ("update", "private")))
    elif how == "config-type":
        name = draw(st.sampled_from(sorted(out.config_records)))
        record = out.config_records[name]
        key = draw(st.sampled_from(sorted(record)))
        record[key] = draw(st.sampled_from([[1, 2], b"\x00", -1, 1e308, "x", True]))
        if key in ("status",):
            record[key] = "no-such-status"
    elif how.startswith("values"):
        metrics = out.metric_records["metrics"]
        values = [float(v) for v in metrics["noisy-sums"]]  # type: ignore[union-attr]
        if how == "values-length":
            metrics["noisy-sums"] = values + [0.0] * draw(st.integers(1, 4))
        elif how == "values-range":
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([1e9, -1e12, 3e38]))
            metrics["noisy-sums"] = values
        else:
            metrics["noisy-sums"] = draw(st.floats(-1.0, 1.0))
    elif how.startswith("ledger"):
        ledger = out.config_records["ledger"]
        entries = [str(e) for e in ledger["entries"]]
        if how == "ledger-garbage":
            ledger["entries"] = [draw(st.text(max_size=60))]
        elif how == "ledger-empty":
            ledger["entries"] = []
        else:
            entry = json.loads(entries[-1])
            field = draw(st.sampled_from(["epsilon", "noise_multiplier", "sample_rate", "steps", "device_id", "seq"]))
            step = draw(st.sampled_from([1, 2, 0.5]))
            value = entry[field]
            if field == "device_id":
                entry[field] = 5
            elif isinstance(value, str):  # floats are kept as exact text in the signed entry
                entry[field] = (float.fromhex(value) + step).hex()
            else:
                entry[field] = value + (max(1, int(step)) if isinstance(value, int) else step)
            entries[-1] = json.dumps(entry)
            ledger["entries"] = entries
    return out


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_malformed_replies_are_never_taken_and_the_run_completes(harness: _Harness, data: st.DataObject) -> None:
    draw = data.draw
    fed = harness.fed
    if draw(st.booleans()):
        how = draw(st.sampled_from(_TRAIN_MUTATIONS))
        content = _mutate(harness.train_reply.content, how, draw, "delta")
        reply = Message(content, reply_to=_instruction("train"))
        outcome = fed._outcome(harness.task, reply)
        assert isinstance(outcome, Failure | Refusal), (how, outcome)
        assert not isinstance(outcome, Update)
    else:
        how = draw(st.sampled_from(_EVAL_MUTATIONS))
        content = _mutate(harness.eval_reply.content, how, draw, None)
        reply = Message(content, reply_to=_instruction("evaluate"))
        taken = fed.take_evaluation_reply(1, reply, harness.eval_length)
        assert not isinstance(taken, tuple), (how, "a malformed evaluation reply was counted")
    for key, value in fed.scheduler.params.items():
        assert torch.equal(value, harness.params_before[key])


def test_the_fuzzed_federation_still_trains_to_completion(harness: _Harness) -> None:
    """After the fuzz (module order), the same federation runs its whole training loop."""
    fed = harness.fed
    # The honest replies themselves are taken (the fuzz never broke the intake's state).
    assert isinstance(fed._outcome(harness.task, harness.train_reply), Update)
    assert isinstance(fed.take_evaluation_reply(1, harness.eval_reply, harness.eval_length), tuple)
    fed.train()
    fed.driver.drain()
    assert fed.scheduler.version == harness.cfg.aggregation.num_versions
    assert all(torch.isfinite(v).all() for v in fed.scheduler.params.values())
    assert any(not torch.equal(v, harness.params_before[k]) for k, v in fed.scheduler.params.items())
