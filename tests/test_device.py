"""The device: cumulative accounting, refusal by budget, and what its messages carry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import build_client_app
from client.device import Device, DeviceState, RefusalReply, TrainReply
from shared.config import parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.models.factory import build_model
from shared.privacy.accounting import DeviceAccountant, Release
from shared.training import plan_release, train_locally


@pytest.fixture()
def overrides(tmp_path: Path) -> dict[str, object]:
    return {
        "dataset": "synthetic",
        "synthetic-users": 6,
        "synthetic-items": 60,
        "synthetic-interactions": 30,
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "out"),
        "embedding-dim": 8,
        "mlp-layers": "8",
        "num-negatives": 4,
        "local-steps": 4,
        "batch-size": 8,
        "noise-multiplier": 1.0,
        "epsilon-budget": 50.0,
    }


def _device(overrides: dict[str, object], index: int = 0, **extra: object) -> Device:
    cfg = parse_config({**overrides, **{k.replace("_", "-"): v for k, v in extra.items()}})
    info = prepare_partitions(cfg.data)
    return Device(cfg, load_device(info.path, index), info.num_items, DeviceState())


def _global(device: Device) -> dict[str, torch.Tensor]:
    model = build_model(device.cfg.model, device.num_items, 1, seed=123)
    return {k: v.clone() for k, v in model.global_state().items()}


def test_accountant_resumed_across_rounds_equals_one_continuous_accountant(overrides: dict[str, object]) -> None:
    device = _device(overrides)
    params = _global(device)
    rounds = 5
    for r in range(rounds):
        reply = device.train(params, task_seed=r)
        assert isinstance(reply, TrainReply)
    steps = device.cfg.train.local_steps
    release = plan_release(device.cfg.train, device.cfg.privacy)
    continuous = DeviceAccountant("rdp", device.cfg.privacy.delta, 1e9)
    for _ in range(rounds * steps):
        continuous.opacus.step(noise_multiplier=release.noise_multiplier, sample_rate=release.sample_rate)
    assert device.epsilon() == continuous.epsilon()
    # A fresh accountant per round (the trap) would report only one round's epsilon.
    one_round = DeviceAccountant("rdp", device.cfg.privacy.delta, 1e9)
    one_round.opacus.history = [(release.noise_multiplier, release.sample_rate, steps)]
    assert one_round.epsilon() < device.epsilon()


def test_training_charges_the_persistent_accountant_through_opacus(overrides: dict[str, object]) -> None:
    cfg = parse_config(overrides)
    info = prepare_partitions(cfg.data)
    data = load_device(info.path, 1)
    model = build_model(cfg.model, info.num_items, 1, seed=0)
    records = model.build_records(data.train_items, 0)
    acc = DeviceAccountant("rdp", 1e-5, 100.0)
    result = train_locally(model, records, cfg.train, cfg.privacy, acc, seed=0)
    assert result.steps == cfg.train.local_steps
    assert acc.history == [(cfg.privacy.noise_multiplier, result.sample_rate, cfg.train.local_steps)]
    # Same module can be made private again (hooks were removed).
    train_locally(model, records, cfg.train, cfg.privacy, acc, seed=1)
    assert acc.history[0][2] == 2 * cfg.train.local_steps


def test_device_refuses_the_round_that_would_exceed_its_budget(overrides: dict[str, object]) -> None:
    probe = _device(overrides)
    release = plan_release(probe.cfg.train, probe.cfg.privacy)
    acc = DeviceAccountant("rdp", 1e-5, 1e9)
    eps_after = []
    for n in range(1, 4):
        eps_after.append(acc.epsilon_if(Release(release.noise_multiplier, release.sample_rate, n * release.steps)))
    # Budget allows exactly two rounds.
    budget = (eps_after[1] + eps_after[2]) / 2
    device = _device(overrides, epsilon_budget=budget)
    params = _global(device)
    assert isinstance(device.train(params, 0), TrainReply)
    assert isinstance(device.train(params, 1), TrainReply)
    spent = device.epsilon()
    history = list(device.state.accountant_history)
    personal = {k: v.clone() for k, v in device.state.personal.items()}
    refusal = device.train(params, 2)
    assert isinstance(refusal, RefusalReply)
    assert refusal.epsilon_would_reach > budget >= spent
    assert "budget" in refusal.reason
    # Refusing spends nothing and changes nothing.
    assert device.state.accountant_history == history
    assert device.epsilon() == spent
    for k, v in personal.items():
        torch.testing.assert_close(device.state.personal[k], v)


def test_dp_off_spends_nothing(overrides: dict[str, object]) -> None:
    device = _device(overrides, dp=False, evaluation="exact")
    reply = device.train(_global(device), 0)
    assert isinstance(reply, TrainReply)
    assert reply.epsilon == 0.0
    assert device.state.accountant_history == []


def _all_floats(content: RecordDict) -> list[torch.Tensor]:
    out = []
    for record in content.array_records.values():
        out.extend(torch.as_tensor(a.numpy()).flatten() for a in record.values())
    for record in content.metric_records.values():
        out.append(torch.tensor([float(v) for v in record.values() if isinstance(v, (int, float))]))
    return out


def test_client_messages_never_carry_the_user_embedding(overrides: dict[str, object]) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    app = build_client_app(overrides)
    cfg = parse_config(overrides)
    info = prepare_partitions(cfg.data)
    model = build_model(cfg.model, info.num_items, 1, seed=5)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    outgoing: list[Message] = []
    for step, kind in enumerate([MessageType.TRAIN, MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY]):
        conf = {"version": step, "task-seed": step, "split": "valid", "export-top-k": False}
        msg = Message(
            RecordDict({"global": ArrayRecord(model.global_state()), "config": ConfigRecord(conf)}),
            dst_node_id=7,
            message_type=kind,
        )
        outgoing.append(app(msg, context))
    personal = context.state.array_records["fedrec-personal"].to_torch_state_dict()
    assert set(personal) == {"user_embedding.weight"}
    user_vec = personal["user_embedding.weight"].flatten()
    for reply in outgoing:
        assert not reply.has_error(), reply.error if reply.has_error() else None
        for record in reply.content.array_records.values():
            assert not any("user" in key for key in record)
        flat = torch.cat([t.float() for t in _all_floats(reply.content)]) if _all_floats(reply.content) else None
        if flat is None:
            continue
        # No coordinate of the personal embedding appears anywhere in what is sent.
        for value in user_vec.tolist():
            assert not torch.isclose(flat, torch.tensor(value), atol=0, rtol=0).any()
    train_reply = outgoing[0].content
    assert set(train_reply.array_records) == {"delta"}
    assert set(train_reply.array_records["delta"]) == set(model.global_state())


def test_planned_sample_rate_is_exactly_what_opacus_charges_and_never_depends_on_the_record_count() -> None:
    """The budget check must predict Opacus's rate bit for bit, and the rate must be public."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    from shared.config import TrainConfig
    from shared.training import opacus_sample_rate

    for batches in range(1, 201):
        train = TrainConfig(sample_rate=1.0 / batches)
        planned = opacus_sample_rate(train)
        for n in (1, 7, 50, 737):
            # What train_locally builds, and what PrivacyEngine.make_private rebuilds and charges.
            loader = DPDataLoader(TensorDataset(torch.zeros(n)), sample_rate=1.0 / round(1.0 / train.sample_rate))
            charged = 1 / len(DPDataLoader.from_data_loader(loader))
            assert planned == charged, (batches, n)


@pytest.mark.parametrize("reproducible", [True, False])
def test_dp_noise_is_reproducible_only_when_asked(overrides: dict[str, object], reproducible: bool) -> None:
    """By default the noise must not be derivable from what the server knows (seed, device, task)."""
    deltas = []
    for _ in range(2):
        device = _device(overrides, reproducible_noise=reproducible)
        reply = device.train(_global(device), task_seed=0)
        assert isinstance(reply, TrainReply)
        deltas.append(reply.delta)
    same = all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    assert same is reproducible


def _train_reply(overrides: dict[str, object]) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    app = build_client_app(overrides)
    info = prepare_partitions(parse_config(overrides).data)
    model = build_model(parse_config(overrides).model, info.num_items, 1, seed=5)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    msg = Message(
        RecordDict(
            {"global": ArrayRecord(model.global_state()), "config": ConfigRecord({"version": 0, "task-seed": 0})}
        ),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    return app(msg, context)


def test_training_reply_carries_no_loss_under_dp(overrides: dict[str, object]) -> None:
    """The mean loss is computed from the records outside DP-SGD: it stays on the device."""
    private = _train_reply(overrides).content.metric_records["metrics"]
    assert "loss" not in private and private["epsilon"] > 0
    assert "loss" in _train_reply({**overrides, "dp": False, "evaluation": "exact"}).content.metric_records["metrics"]


def test_the_accountant_is_rebuilt_from_the_ledger_and_not_kept_in_context_state(overrides: dict[str, object]) -> None:
    """context.state keeps the personal embedding and the task count; what was spent is the ledger's."""
    from shared.protocol import TRAIN_TASK, TrainTask, TrainUpdate, build_train_task, parse_train_reply

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    app = build_client_app(overrides)
    cfg = parse_config(overrides)
    model = build_model(cfg.model, prepare_partitions(cfg.data).num_items, 1, seed=5)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    epsilons = []
    for seed in range(2):
        task = TrainTask(ArrayRecord(model.global_state()), version=0, task_seed=seed)
        reply = parse_train_reply(
            app(Message(build_train_task(task), dst_node_id=7, message_type=TRAIN_TASK.message_type), context)
        )
        assert isinstance(reply, TrainUpdate)
        epsilons.append(reply.epsilon)
        assert {name: dict(rec) for name, rec in context.state.config_records.items()} == {
            "fedrec-device": {"tasks-done": seed + 1}
        }
        assert set(context.state.array_records) == {"fedrec-personal"}
    assert 0 < epsilons[0] < epsilons[1]  # the second task composed on the first, from the ledger


def _train_with(
    mode: str, overrides: dict[str, object], records_from: int, seed: int
) -> tuple[dict[str, torch.Tensor], list[tuple[float, float, int]], int]:
    cfg = parse_config({**overrides, "clipping-mode": mode, "local-steps": 12, "batch-size": 2, "sample-rate": 1 / 16})
    info = prepare_partitions(cfg.data)
    data = load_device(info.path, records_from)
    model = build_model(cfg.model, info.num_items, 1, seed=0)
    records = model.build_records(data.train_items, 0)
    acc = DeviceAccountant("rdp", 1e-5, 1e9)
    result = train_locally(model, records, cfg.train, cfg.privacy, acc, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, list(acc.history), result.steps


def test_ghost_clipping_gives_the_hooks_update_with_the_same_noise(
    overrides: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ghost clipping (NCF's default) is a faster route to the same private step, empty batches included.

    With the same seeds both modes sample the same Poisson batches, the same negatives and
    the same noise, so the trained parameters agree to float rounding; the accountant is
    charged the same steps. Batch 2 on a small device makes some Poisson batches empty.
    """
    import shared.training

    sizes: list[int] = []
    real_step = shared.training._ghost_step

    def counting_step(*args: Any) -> torch.Tensor:
        sizes.append(int(args[3][0].shape[0]))
        return real_step(*args)

    monkeypatch.setattr(shared.training, "_ghost_step", counting_step)
    initial = build_model(parse_config(overrides).model, 60, 1, seed=0).state_dict()
    for seed in (0, 1, 2):
        hooks, hooks_history, _ = _train_with("hooks", overrides, 0, seed)
        ghost, ghost_history, _ = _train_with("ghost", overrides, 0, seed)
        assert ghost_history == hooks_history and hooks_history[0][2] == 12
        for name, value in hooks.items():
            assert torch.allclose(ghost[name], value, atol=1e-5, rtol=1e-4), (seed, name)
        assert any(not torch.allclose(hooks[k], initial[k]) for k in initial)  # training moved the model
    assert len(sizes) == 36 and 0 in sizes and max(sizes) > 0  # empty and non-empty batches both ran


def test_a_noise_only_step_is_taken_for_an_empty_poisson_batch_in_ghost_mode(overrides: dict[str, object]) -> None:
    """An empty batch must still add noise and be charged (skipping it would void the accounting)."""
    from shared.training import _ghost_step

    cfg = parse_config({**overrides, "clipping-mode": "ghost"})
    model = build_model(cfg.model, 60, 1, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros((0, 1), dtype=torch.long))
    loss = _ghost_step(model, model, torch.optim.SGD(params, lr=0.1), empty, torch.Generator().manual_seed(0), params)
    assert float(loss) == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in params)


def test_ghost_clipping_is_refused_for_a_model_without_it(overrides: dict[str, object]) -> None:
    from shared.training import uses_ghost_clipping

    cfg = parse_config({**overrides, "model": "sasrec", "max-seq-len": 4, "num-heads": 1})
    model = build_model(cfg.model, 60, 1, seed=0)
    # parse_config refuses this combination; the training guard holds for a config built another way.
    with pytest.raises(ValueError, match="clipping-mode"):
        uses_ghost_clipping(model, replace(cfg.privacy, clipping_mode="ghost"), 8)
    assert not uses_ghost_clipping(model, parse_config({**overrides, "model": "sasrec"}).privacy, 10_000)
    ncf = build_model(parse_config(overrides).model, 20_000, 1, seed=0)
    auto = parse_config(overrides).privacy
    assert uses_ghost_clipping(ncf, auto, 8)  # large catalogue: ghost
    assert not uses_ghost_clipping(ncf, auto, 1)  # 20,000 < 40,000: hooks
    assert not uses_ghost_clipping(ncf, parse_config({**overrides, "clipping-mode": "hooks"}).privacy, 8)
