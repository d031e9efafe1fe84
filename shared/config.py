"""fedrec's configuration: one flat, kebab-case key space parsed once into frozen dataclasses.

The defaults below are the single source of truth. ``pyproject.toml``'s
``[tool.flwr.app.config]`` mirrors them (a test keeps the two identical), and a
run overrides any key (``flwr run . --run-config "k=v"`` or ``fedrec simulate
--set k=v``). Every value is validated here so that a wrong key or value fails
before any training starts, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class DataConfig:
    """Which interactions the fleet holds and how they are split per device."""

    dataset: str = "ml-100k"
    data_path: str = ""
    cache_dir: str = ""
    max_devices: int = 0
    # Exact duplicate interactions (same user, item and timestamp: a file concatenated with
    # itself) would put test items into training and halve each device's sampling rate.
    duplicates: str = "drop"
    synthetic_users: int = 1000
    synthetic_items: int = 2000
    synthetic_interactions: int = 50
    synthetic_seed: int = 0
    # Deployment: the server reads no data. It waits for this many devices (ids 0..n-1)
    # and builds the model for a catalogue of deploy-items items. 0: simulation.
    deploy_devices: int = 0
    deploy_items: int = 0

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, ("ml-100k", "grouplens", "synthetic"))
        _choice("duplicates", self.duplicates, ("drop", "refuse"))
        _at_least("deploy-devices", self.deploy_devices, 0)
        _at_least("deploy-items", self.deploy_items, 0)
        if self.deploy_devices and self.deploy_items < 2:
            raise ConfigError("deploy-items: required (the catalogue size, >= 2) when deploy-devices > 0")
        if self.dataset == "grouplens" and not self.data_path:
            raise ConfigError("data-path: required when dataset = 'grouplens' (a GroupLens folder or ratings file)")
        _at_least("max-devices", self.max_devices, 0)
        _at_least("synthetic-users", self.synthetic_users, 1)
        _at_least("synthetic-items", self.synthetic_items, 2)
        _at_least("synthetic-interactions", self.synthetic_interactions, 5)


@dataclass(frozen=True)
class ModelConfig:
    """The recommender ("the large model") and its size."""

    name: str = "ncf"
    embedding_dim: int = 64
    mlp_layers: tuple[int, ...] = (64,)
    num_negatives: int = 32
    max_seq_len: int = 50
    num_blocks: int = 2
    num_heads: int = 2
    dropout: float = 0.0
    init: str = "xavier"
    user_init: str = "zero"

    def __post_init__(self) -> None:
        _choice("model", self.name, ("ncf", "sasrec"))
        _choice("user-init", self.user_init, ("zero", "random"))
        _at_least("embedding-dim", self.embedding_dim, 1)
        for width in self.mlp_layers:
            if width < 1:
                raise ConfigError(f"mlp-layers: every width must be >= 1, got {width}")
        _at_least("num-negatives", self.num_negatives, 1)
        _at_least("max-seq-len", self.max_seq_len, 2)
        _at_least("num-blocks", self.num_blocks, 1)
        _at_least("num-heads", self.num_heads, 1)
        if self.embedding_dim % self.num_heads:
            raise ConfigError(
                f"num-heads: embedding-dim ({self.embedding_dim}) must be divisible by num-heads ({self.num_heads})"
            )
        _in_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _choice("init", self.init, ("xavier", "normal"))


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a device."""

    local_steps: int = 10
    # With DP: the public divisor of each step's noisy gradient sum (Opacus's expected batch
    # size), never a count of the device's records. Without DP: the minibatch size.
    batch_size: int = 8
    # Poisson sampling rate of DP-SGD: the same public value on every device, so neither the
    # rate nor the epsilon a device reports depends on how many records it holds.
    sample_rate: float = 0.125
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.05
    l1: float = 0.0

    def __post_init__(self) -> None:
        _at_least("local-steps", self.local_steps, 1)
        _at_least("batch-size", self.batch_size, 1)
        _in_range("sample-rate", self.sample_rate, 0.0, 1.0, lo_open=True)
        batches = 1.0 / self.sample_rate
        if abs(batches - round(batches)) > 1e-9 * batches:
            # Opacus draws int(1 / rate) Poisson batches per pass and charges 1 / that count.
            raise ConfigError(
                f"sample-rate: 1 / sample-rate must be a whole number (e.g. 0.125 = 1/8), got {self.sample_rate}"
            )
        _choice("optimizer", self.optimizer, ("sgd", "adam"))
        _positive("learning-rate", self.learning_rate)
        _in_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _in_range("weight-decay", self.weight_decay, 0.0, math.inf)
        _in_range("l1", self.l1, 0.0, math.inf)


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP-SGD on each device (Opacus) and each device's lifetime budget."""

    dp: bool = True
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 8.0
    accountant: str = "rdp"
    # How Opacus clips per-record gradients: "ghost" never materialises them (much faster
    # for large item tables), "hooks" does; "auto" uses ghost where the model supports it.
    clipping_mode: str = "auto"
    # Seed DP noise and Poisson sampling from the run seed (simulation only): whoever
    # knows the seed can subtract the noise, so real devices must draw from OS entropy.
    reproducible_noise: bool = False
    # User-level DP (a device's whole history): devices clip whole updates, the server
    # adds Gaussian noise to each buffer, a Renyi filter accounts each device.
    user_dp: bool = False
    user_clip_norm: float = 1.0
    user_noise_multiplier: float = 1.0
    user_epsilon_budget: float = 8.0
    # Where each device keeps its local store (identity key, privacy ledger);
    # empty: <output-dir>/devices (simulation). A deployed device sets its own.
    device_store_dir: str = ""
    # "first-use": the server registers a device's key the first time it sees it
    # (simulation); "registered": only keys registered beforehand are accepted.
    device_keys: str = "first-use"
    # With device-keys = "registered": the database (SQLAlchemy URL or SQLite path) where
    # `fedrec server register-device` registered the devices' ledger keys.
    key_registry: str = ""

    def __post_init__(self) -> None:
        _positive("noise-multiplier", self.noise_multiplier)
        _positive("clip-norm", self.clip_norm)
        _in_range("delta", self.delta, 0.0, 1.0, lo_open=True, hi_open=True)
        _positive("epsilon-budget", self.epsilon_budget)
        _choice("accountant", self.accountant, ("rdp", "prv"))
        _choice("clipping-mode", self.clipping_mode, ("auto", "hooks", "ghost"))
        _positive("user-clip-norm", self.user_clip_norm)
        _positive("user-noise-multiplier", self.user_noise_multiplier)
        _positive("user-epsilon-budget", self.user_epsilon_budget)
        _choice("device-keys", self.device_keys, ("first-use", "registered"))
        if self.device_keys == "registered" and not self.key_registry:
            raise ConfigError("key-registry: required when device-keys = 'registered' (the server's key database)")


@dataclass(frozen=True)
class AggregationConfig:
    """Server-side aggregation: FedBuff (async) or FedAvg (sync) on one engine."""

    mode: str = "async"
    concurrency: int = 100
    buffer_size: int = 50
    staleness_exponent: float = 0.5
    max_staleness: int = 40
    server_optimizer: str = "sgd"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    num_versions: int = 100
    max_sim_seconds: float = 0.0
    task_timeout: float = 900.0
    wall_timeout: float = 600.0
    max_device_failures: int = 3
    # Largest L2 norm of an accepted update; 0 derives it from the public training settings
    # (server/update_checks.py).
    max_update_norm: float = 0.0
    # Messages at the Flower Grid at once in simulation (0 = no limit); deployed runs send all.
    max_in_flight: int = 16
    # The server learns only noisy sums (docs/secure-aggregation.md): fedrec's own protocol, sync
    # and async; "flower-secagg+" is Flower's legacy SecAgg+ (sync only, 32-bit mask seeds).
    secure_aggregation: bool = False
    secure_aggregation_protocol: str = "fedrec"
    secure_sum_bits: int = 32
    secure_sum_scale: float = 16384.0
    secure_sum_min_contributors: int = 10
    secure_sum_cohort_size: int = 0
    secure_sum_neighbours: int = 0
    secure_sum_max_records: int = 8192
    secagg_clipping_range: float = 8.0

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("async", "sync"))
        _choice("secure-aggregation-protocol", self.secure_aggregation_protocol, ("fedrec", "flower-secagg+"))
        if self.secure_aggregation and self.secure_aggregation_protocol == "flower-secagg+" and self.mode != "sync":
            raise ConfigError(
                "secure-aggregation: Flower's SecAgg+ needs a fixed cohort per aggregate, so it runs only with "
                "mode = 'sync' (fedrec's own protocol runs in both modes)"
            )
        _positive("secagg-clipping-range", self.secagg_clipping_range)
        _in_range("secure-sum-bits", self.secure_sum_bits, 8, 62)
        _positive("secure-sum-scale", self.secure_sum_scale)
        _at_least("secure-sum-min-contributors", self.secure_sum_min_contributors, 2)
        _at_least("secure-sum-cohort-size", self.secure_sum_cohort_size, 0)
        _at_least("secure-sum-neighbours", self.secure_sum_neighbours, 0)
        if self.secure_sum_neighbours % 2:
            raise ConfigError(f"secure-sum-neighbours: must be even (0 = automatic), got {self.secure_sum_neighbours}")
        _at_least("secure-sum-max-records", self.secure_sum_max_records, 1)
        _at_least("concurrency", self.concurrency, 1)
        _at_least("buffer-size", self.buffer_size, 1)
        if self.mode == "async" and self.buffer_size > self.concurrency:
            raise ConfigError(
                f"buffer-size: {self.buffer_size} exceeds concurrency {self.concurrency}; the buffer could never fill"
            )
        _in_range("staleness-exponent", self.staleness_exponent, 0.0, math.inf)
        _at_least("max-staleness", self.max_staleness, 0)
        _choice("server-optimizer", self.server_optimizer, ("sgd", "adam"))
        _positive("server-learning-rate", self.server_learning_rate)
        _in_range("server-momentum", self.server_momentum, 0.0, 1.0, hi_open=True)
        _at_least("num-versions", self.num_versions, 1)
        _in_range("max-update-norm", self.max_update_norm, 0.0, math.inf)
        _in_range("max-sim-seconds", self.max_sim_seconds, 0.0, math.inf)
        _positive("task-timeout", self.task_timeout)
        _positive("wall-timeout", self.wall_timeout)
        _at_least("max-device-failures", self.max_device_failures, 1)
        _at_least("max-in-flight", self.max_in_flight, 0)


@dataclass(frozen=True)
class FleetConfig:
    """The simulated fleet: long-tailed device speeds, availability and drop-outs (see docs/architecture.md)."""

    step_seconds: float = 0.5
    speed_sigma: float = 1.0
    latency_seconds: float = 2.0
    availability_mean: float = 0.8
    dropout_rate: float = 0.02

    def __post_init__(self) -> None:
        _positive("step-seconds", self.step_seconds)
        _in_range("speed-sigma", self.speed_sigma, 0.0, 5.0)
        _in_range("latency-seconds", self.latency_seconds, 0.0, math.inf)
        _in_range("availability-mean", self.availability_mean, 0.0, 1.0, lo_open=True)
        _in_range("dropout-rate", self.dropout_rate, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class EvalConfig:
    """On-device evaluation of global models."""

    eval_every: int = 20
    eval_devices: int = 200
    top_k: int = 10
    sampled_negatives: int = 100
    # private: each device releases only a noisy metric vector (Gaussian, charged to its ledger);
    # exact: per-device metrics (simulation research only; deployed devices refuse it).
    evaluation: str = "private"
    eval_noise_multiplier: float = 5.0
    # Public bounds (training records) between activity tiers: metrics are reported per tier,
    # so the gap between light and heavy users shows. Empty: one tier.
    activity_tiers: tuple[int, ...] = ()
    export_top_k: str = "none"
    personalize_steps: int = 0
    personalize_learning_rate: float = 0.05

    def __post_init__(self) -> None:
        _at_least("eval-every", self.eval_every, 1)
        _at_least("eval-devices", self.eval_devices, 0)
        _at_least("top-k", self.top_k, 1)
        _at_least("sampled-negatives", self.sampled_negatives, 1)
        _choice("evaluation", self.evaluation, ("private", "exact"))
        _positive("eval-noise-multiplier", self.eval_noise_multiplier)
        if any(b < 1 for b in self.activity_tiers) or list(self.activity_tiers) != sorted(set(self.activity_tiers)):
            raise ConfigError(f"activity-tiers: must be increasing positive integers, got {self.activity_tiers}")
        _choice("export-top-k", self.export_top_k, ("csv", "parquet", "none"))
        if self.evaluation == "private" and self.export_top_k != "none":
            raise ConfigError(
                f"export-top-k: {self.export_top_k!r} needs evaluation = 'exact' (a private evaluation "
                "sends no item list); set export-top-k = 'none'"
            )
        _at_least("personalize-steps", self.personalize_steps, 0)
        _positive("personalize-learning-rate", self.personalize_learning_rate)


@dataclass(frozen=True)
class FedrecConfig:
    """Everything a run needs; built once by :func:`parse_config`."""

    seed: int = 42
    output_dir: str = "runs/default"
    # A run refuses a non-empty output directory; overwrite removes only fedrec's own files there.
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.eval.evaluation == "private" and not self.privacy.dp:
            raise ConfigError(
                "evaluation: 'private' needs dp = true (with DP off no reply is private); use evaluation = 'exact'"
            )
        if not self.output_dir.strip():
            raise ConfigError("output-dir: must name a directory (an empty value would write into the current one)")
        if self.aggregation.secure_aggregation and self.privacy.user_dp:
            raise ConfigError(
                "secure-aggregation: not with user-dp (user-level DP clips each update on the server, "
                "which secure aggregation hides from it)"
            )
        agg = self.aggregation
        if agg.secure_aggregation and agg.secure_aggregation_protocol == "fedrec":
            if not self.privacy.dp:
                raise ConfigError("secure-aggregation: fedrec's secure sum is a DP mechanism; it needs dp = true")
            if self.privacy.accountant != "rdp":
                raise ConfigError("accountant: secure-sum (Skellam) releases are accounted with 'rdp' only")
            if self.privacy.reproducible_noise:
                raise ConfigError(
                    "reproducible-noise: fedrec's secure sum draws its noise and keys from the OS only; set it false"
                )
            if agg.mode == "async" and agg.buffer_size < agg.secure_sum_min_contributors:
                raise ConfigError(
                    f"secure-sum-min-contributors: {agg.secure_sum_min_contributors} exceeds buffer-size "
                    f"{agg.buffer_size}; a cohort's sum closes at buffer-size devices, so none could be unmasked"
                )
            cohort = agg.secure_sum_cohort_size or agg.concurrency
            if agg.mode == "async" and agg.secure_sum_cohort_size and agg.secure_sum_cohort_size < agg.buffer_size:
                raise ConfigError(
                    f"secure-sum-cohort-size: {agg.secure_sum_cohort_size} is below buffer-size {agg.buffer_size}; "
                    "a cohort's sum closes when buffer-size of its devices have trained"
                )
            if cohort < agg.secure_sum_min_contributors:
                raise ConfigError(
                    f"secure-sum-min-contributors: {agg.secure_sum_min_contributors} exceeds the cohort "
                    f"({cohort} devices: concurrency or secure-sum-cohort-size); no sum could be unmasked"
                )
        if self.privacy.clipping_mode == "ghost" and self.model.name == "sasrec":
            raise ConfigError("clipping-mode: 'ghost' is not supported for model 'sasrec'; use 'hooks' or 'auto'")


# Keys an earlier release had, with why they went (a config naming one gets this reason).
REMOVED_KEYS: dict[str, str] = {
    "example-weighting": "a device's record count is private; every update now has the same public weight",
    "secagg-max-weight": "SecAgg+ weights are public and equal (1 per device)",
}

# Keys whose dataclass field name differs from the flat key.
_RENAMED = {("model", "name"): "model"}
_SECTIONS: tuple[tuple[str, type], ...] = (
    ("data", DataConfig),
    ("model", ModelConfig),
    ("train", TrainConfig),
    ("privacy", PrivacyConfig),
    ("aggregation", AggregationConfig),
    ("fleet", FleetConfig),
    ("eval", EvalConfig),
)
_TOP_LEVEL = ("seed", "output-dir", "overwrite")


def _flat_key(section: str, name: str) -> str:
    return _RENAMED.get((section, name), _key(name))


def _to_flat(value: Any) -> bool | int | float | str:
    # Flower's run config holds only scalars, so tuples travel as "a,b,c".
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value  # type: ignore[no-any-return]


def default_flat_config() -> dict[str, bool | int | float | str]:
    """Every key with its default, flat and kebab-case, as in ``[tool.flwr.app.config]``."""
    return to_flat(FedrecConfig())


def to_flat(cfg: FedrecConfig) -> dict[str, bool | int | float | str]:
    """The resolved configuration as flat kebab-case keys (for summaries and messages)."""
    flat: dict[str, bool | int | float | str] = {
        "seed": cfg.seed,
        "output-dir": cfg.output_dir,
        "overwrite": cfg.overwrite,
    }
    for section, _cls in _SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            flat[_flat_key(section, f.name)] = _to_flat(getattr(obj, f.name))
    return flat


def _coerce(key: str, raw: Any, default: Any) -> Any:
    """Convert ``raw`` to the type of ``default``, or raise ConfigError naming ``key``."""
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
                return raw.lower() in ("true", "1", "yes")
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            raise ValueError("expected true or false")
        if isinstance(default, int):
            if isinstance(raw, bool):
                raise ValueError("expected an integer, got a boolean")
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError("expected an integer")
                return int(raw)
            return int(raw)
        if isinstance(default, float):
            if isinstance(raw, bool):
                raise ValueError("expected a number, got a boolean")
            value = float(raw)
            if math.isnan(value):
                raise ValueError("expected a number, got NaN")
            return value
        if isinstance(default, tuple):
            if isinstance(raw, (list, tuple)):
                return tuple(int(v) for v in raw)
            text = str(raw).strip()
            return tuple(int(part) for part in text.split(",") if part.strip()) if text else ()
        if isinstance(default, str):
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            return raw
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: invalid value {raw!r} ({exc})") from None
    raise ConfigError(f"{key}: unsupported type {type(raw).__name__}")


def parse_config(overrides: Mapping[str, Any] | None = None) -> FedrecConfig:
    """Build a validated :class:`FedrecConfig` from flat kebab-case overrides.

    Parameters
    ----------
    overrides
        Flat keys such as ``{"mode": "sync", "buffer-size": 20}``, typically a Flower
        ``context.run_config``. Keys not given keep their defaults.

    Raises
    ------
    ConfigError
        For an unknown key (with the closest known key suggested) or an invalid value.
    """
    overrides = dict(overrides or {})
    for key, why in REMOVED_KEYS.items():
        if key in overrides:
            raise ConfigError(f"{key}: no longer a configuration key ({why})")
    defaults = FedrecConfig()
    known = set(default_flat_config())
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError("unknown configuration key(s): " + ", ".join(hints))

    top: dict[str, Any] = {}
    for key in _TOP_LEVEL:
        name = key.replace("-", "_")
        if key in overrides:
            top[name] = _coerce(key, overrides[key], getattr(defaults, name))
    if "seed" in top and top["seed"] < 0:
        raise ConfigError(f"seed: must be >= 0, got {top['seed']}")

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS:
        base = getattr(defaults, section)
        kwargs = {}
        for f in fields(cls):
            key = _flat_key(section, f.name)
            if key in overrides:
                kwargs[f.name] = _coerce(key, overrides[key], getattr(base, f.name))
        sections[section] = dataclasses.replace(base, **kwargs) if kwargs else base
    return FedrecConfig(**top, **sections)


def parse_stored_config(flat: Mapping[str, Any]) -> FedrecConfig:
    """The config a run database or summary recorded, possibly by an earlier release.

    Keys that release had and this one removed are dropped (:data:`REMOVED_KEYS`), and a
    config from before ``evaluation`` existed ran exact evaluation, which is what it meant.

    Raises
    ------
    ConfigError
        As :func:`parse_config`, for what remains.
    """
    kept = {k: v for k, v in flat.items() if k not in REMOVED_KEYS}
    kept.setdefault("evaluation", "exact")
    return parse_config(kept)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{key}: must be a positive finite number, got {value}")


def _in_range(key: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above or math.isnan(value):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ConfigError(f"{key}: must be in {left}{lo}, {hi}{right}, got {value}")


def parse_set_pairs(pairs: Sequence[str] | None, option: str = "--set") -> dict[str, str]:
    """``KEY=VALUE`` command-line strings into a mapping (values stay strings: :func:`parse_config` types them).

    The one parser behind every ``--set`` (and ``--policy``) option. Surrounding quotes are removed,
    so ``--set "output-dir='runs/x'"`` (Flower's ``--run-config`` style) works too.
    """
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip().strip("'\"")
    return out
