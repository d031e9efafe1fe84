"""What one device does with a task, independent of Flower.

A device holds its own interactions, its personal model state (the user embedding,
which never leaves it) and its privacy accountant. Given a global model it either
trains and returns only a delta of the *global* parameters plus metrics, or refuses
because the round would exceed its budget, or evaluates and returns only metrics.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from client.secure_training import SecureContribution, TooManyRecords, secure_contribution
from shared.config import FedrecConfig
from shared.data.types import DeviceData
from shared.metrics import RankResult, full_ranking, sampled_ranking, top_k
from shared.models.base import Recommender, UserContext
from shared.models.factory import build_model
from shared.privacy.accounting import BudgetExhausted, DeviceAccountant, SkellamRelease
from shared.privacy.evaluation import MetricVector, activity_tier, evaluation_release, num_tiers, privatize
from shared.privacy.user_level import RenyiFilter, choose_order, clip_update
from shared.secure_sum.layout import VectorLayout
from shared.secure_sum.release import SecureReleasePlan
from shared.seeding import EVAL_SAMPLING, MODEL_INIT, device_seed
from shared.training import plan_release, train_locally


@dataclass
class DeviceState:
    """Everything a device keeps between tasks (on the device only)."""

    accountant_history: list[tuple[float, float, int]] = field(default_factory=list)
    skellam_history: list[tuple[float, float, int, float]] = field(default_factory=list)  # secure-sum releases
    personal: dict[str, torch.Tensor] = field(default_factory=dict)
    tasks_done: int = 0
    user_contributions: int = 0  # updates sent under user-level DP (each charged at full weight)


@dataclass(frozen=True)
class TrainReply:
    """A successful training task's reply: the global-parameter delta and metrics."""

    delta: dict[str, torch.Tensor]
    loss: float
    steps: int
    epsilon: float
    sample_rate: float
    user_epsilon: float | None = None  # user-level, conservative (full weight per update sent)


@dataclass(frozen=True)
class RefusalReply:
    """The device refused a task that would take it past its budget."""

    epsilon_spent: float
    epsilon_would_reach: float
    reason: str


@dataclass(frozen=True)
class EvalReply:
    """On-device evaluation of one global model version: metrics, and optionally the top-k list."""

    full: RankResult
    sampled: RankResult
    top_items: np.ndarray
    tier: int  # activity tier under the public bounds (never the record count itself)


@dataclass(frozen=True)
class PrivateEvalReply:
    """A private evaluation: the noisy metric vector and the cumulative epsilon after it."""

    values: np.ndarray
    epsilon: float


class Device:
    """One device's runtime: its data, its state, and the model code."""

    def __init__(
        self,
        cfg: FedrecConfig,
        data: DeviceData,
        num_items: int,
        state: DeviceState,
        run_user_budget: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.num_items = num_items
        self.state = state
        # The run's own user-level budget, which fixes the Rényi order its filter uses
        # (server and intake alike); the device's policy may enforce a lower budget.
        self.run_user_budget = cfg.privacy.user_epsilon_budget if run_user_budget is None else run_user_budget

    def _model(self, global_params: dict[str, torch.Tensor]) -> Recommender:
        # The device's model has a user table of one row: its own user.
        model = build_model(
            self.cfg.model, self.num_items, 1, seed=device_seed(self.cfg.seed, self.data.device_id, MODEL_INIT)
        )
        local = model.local_parameter_names()
        unexpected = set(global_params) & local
        if unexpected:
            raise ValueError(f"global model must not carry personal parameters: {sorted(unexpected)}")
        missing = set(model.global_state()) - set(global_params)
        if missing:
            raise ValueError(f"global model is missing parameters: {sorted(missing)}")
        state = {**global_params, **self.state.personal}
        model.load_state_dict(state, strict=False)
        return model

    def _accountant(self) -> DeviceAccountant:
        p = self.cfg.privacy
        return DeviceAccountant(
            p.accountant, p.delta, p.epsilon_budget, self.state.accountant_history, self.state.skellam_history
        )

    def _user_filter(self) -> RenyiFilter | None:
        """The device's own, conservative view of its user-level spending (None without user DP).

        The server charges each device the staleness weight (<= 1) of updates it actually
        applied; the device cannot know which, so it charges full weight for every update
        it sends and refuses once that would exceed its budget. Its figure is therefore
        an upper bound of the server's.
        """
        p = self.cfg.privacy
        if not p.user_dp:
            return None
        # Same order as the server's filter, so that the ε the device signs is the one the
        # server recomputes; its own (possibly lower) budget is enforced at that order.
        order = choose_order(p.user_noise_multiplier, self.run_user_budget, p.delta)
        user_filter = RenyiFilter(p.user_noise_multiplier, p.delta, p.user_epsilon_budget, order=order)
        for _ in range(self.state.user_contributions):
            user_filter.charge(0, 1.0)
        return user_filter

    def epsilon(self) -> float:
        """Cumulative record-level epsilon spent so far (0 with DP off)."""
        return self._accountant().epsilon() if self.cfg.privacy.dp else 0.0

    def _training_seed(self, task_seed: int) -> int:
        """Seed of batch sampling, negatives and DP noise for one task.

        Derived from values the server knows (run seed, device id, task id) only in
        simulation with ``reproducible-noise``: a server that can regenerate the
        noise can subtract it, which voids the DP guarantee. Otherwise it comes from
        the operating system's entropy and is never stored or sent.
        """
        if self.cfg.privacy.dp and not self.cfg.privacy.reproducible_noise:
            return secrets.randbits(62)
        return device_seed(self.cfg.seed, self.data.device_id, f"train-{task_seed}")

    def train(self, global_params: dict[str, torch.Tensor], task_seed: int) -> TrainReply | RefusalReply:
        """Train on the device's own records; refuse if the budget would be exceeded."""
        model = self._model(global_params)
        records = model.build_records(self.data.train_items, 0)
        accountant = self._accountant() if self.cfg.privacy.dp else None
        if accountant is not None:
            release = plan_release(self.cfg.train, self.cfg.privacy)
            try:
                accountant.check(release)
            except BudgetExhausted as exc:
                return RefusalReply(exc.spent, exc.would_reach, str(exc))
        user_filter = self._user_filter()
        if user_filter is not None and not user_filter.admits(0, 1.0):
            spent = user_filter.epsilon(0)
            return RefusalReply(
                self.epsilon(),
                spent,
                f"user-level privacy budget exhausted: {self.state.user_contributions} updates sent, "
                f"epsilon {spent:.4f}; one more would exceed {self.cfg.privacy.user_epsilon_budget:g}",
            )
        result = train_locally(
            model, records, self.cfg.train, self.cfg.privacy, accountant, seed=self._training_seed(task_seed)
        )
        trained = model.state_dict()
        delta = {k: (trained[k] - v).detach().clone() for k, v in global_params.items()}
        user_epsilon = None
        if user_filter is not None:
            # User-level sensitivity: the whole update is bounded here (and again by the server).
            delta, _norm = clip_update(delta, self.cfg.privacy.user_clip_norm)
            user_filter.charge(0, 1.0)
            user_epsilon = user_filter.epsilon(0)
            self.state.user_contributions += 1
        local = model.local_parameter_names()
        self.state.personal = {k: trained[k].detach().clone() for k in local}
        if accountant is not None:
            self.state.accountant_history = accountant.history
        self.state.tasks_done += 1
        return TrainReply(
            delta=delta,
            loss=result.mean_loss,
            steps=result.steps,
            epsilon=result.epsilon,
            sample_rate=result.sample_rate,
            user_epsilon=user_epsilon,
        )

    def secure_contribution(
        self, global_params: dict[str, torch.Tensor], plan: SecureReleasePlan, rotation_seed: bytes
    ) -> SecureContribution | RefusalReply:
        """This device's noisy encoded gradient sum for a secure task, or a refusal.

        Refused, spending nothing, when the release would take the device past its budget or
        it holds more records than the secure sum's public bound. The release is charged
        when the masked vector is sent (its ledger entry goes with it).
        """
        accountant = self._accountant()
        try:
            accountant.check_skellam(plan.release)
        except BudgetExhausted as exc:
            return RefusalReply(exc.spent, exc.would_reach, str(exc))
        model = self._model(global_params)
        records = model.build_records(self.data.train_items, 0)
        try:
            return secure_contribution(model, records, plan, VectorLayout.of(global_params), rotation_seed)
        except TooManyRecords as exc:
            return RefusalReply(accountant.epsilon(), accountant.epsilon(), f"device: {exc}")

    def check_secure_release(self, release: SkellamRelease) -> float:
        """The epsilon a secure-sum release would reach; :class:`BudgetExhausted` past the budget."""
        return self._accountant().check_skellam(release)

    def _personalize(self, model: Recommender, history: np.ndarray) -> None:
        """Fit the personal parameters to the current global model, for ranking only.

        A device ranks with a user embedding fitted (all records, items frozen) to the
        global model it just received, rather than the one it kept from its last
        training task, which was fitted to an older global model. The fitted copy is
        used for this ranking and thrown away: it never feeds a release, so it needs no
        DP, and it never leaves the device.
        """
        steps = self.cfg.eval.personalize_steps
        local = model.local_parameter_names()
        if steps == 0 or not local:
            return
        mine = [p for name, p in model.named_parameters() if name in local]
        for name, p in model.named_parameters():
            p.requires_grad_(name in local)
        records = model.build_records(history, 0)
        generator = torch.Generator().manual_seed(device_seed(self.cfg.seed, self.data.device_id, "personalize"))
        optimizer = torch.optim.Adam(mine, lr=self.cfg.eval.personalize_learning_rate)
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            model.loss(records, generator).backward()
            optimizer.step()

    def evaluate(self, global_params: dict[str, torch.Tensor], split: str, top_k_size: int) -> EvalReply:
        """Rank the catalogue with the global model plus personal state.

        ``split="valid"`` ranks the validation item given the training history;
        ``split="test"`` ranks the test item given training history plus the validation
        item (leave-one-out protocol). Items the user already has are excluded.
        """
        if split not in ("valid", "test"):
            raise ValueError(f"unknown split {split!r}")
        model = self._model(global_params)
        model.eval()
        history = self.data.train_items
        target = self.data.valid_item
        if split == "test":
            history = np.append(history, self.data.valid_item)
            target = self.data.test_item
        self._personalize(model, history)
        model.eval()
        with torch.no_grad():
            ctx = UserContext(0, torch.as_tensor(history, dtype=torch.long))
            scores = model.score_all(ctx).double().numpy()
        k = self.cfg.eval.top_k
        rng = np.random.default_rng(device_seed(self.cfg.seed, self.data.device_id, EVAL_SAMPLING))
        full = full_ranking(scores, target, history, k=k)
        sampled = sampled_ranking(scores, target, history, rng, num_negatives=self.cfg.eval.sampled_negatives, k=k)
        tier = activity_tier(len(self.data.train_items), self.cfg.eval.activity_tiers)
        return EvalReply(full, sampled, top_k(scores, history, top_k_size), tier)

    def evaluate_privately(
        self, global_params: dict[str, torch.Tensor], split: str, noise_seed: int | None = None
    ) -> PrivateEvalReply | RefusalReply:
        """Evaluate, then release only the noisy metric vector (``shared/privacy/evaluation.py``).

        The release is charged to the device's record-level accountant like a DP-SGD task,
        and refused, spending nothing, if it would pass the budget. ``noise_seed`` None (a
        real device) draws the noise from the OS CSPRNG.
        """
        e = self.cfg.eval
        release = evaluation_release(e.eval_noise_multiplier)
        accountant = self._accountant()
        try:
            accountant.check(release)
        except BudgetExhausted as exc:
            return RefusalReply(exc.spent, exc.would_reach, str(exc))
        result = self.evaluate(global_params, split, 0)
        metrics = MetricVector(result.full.hit, result.full.ndcg, result.sampled.hit, result.sampled.ndcg, result.tier)
        seed = secrets.randbits(128) if noise_seed is None else noise_seed
        values = privatize(metrics, num_tiers(e.activity_tiers), e.eval_noise_multiplier, np.random.default_rng(seed))
        accountant.spend(release)
        self.state.accountant_history = accountant.history
        return PrivateEvalReply(values, accountant.epsilon())
