"""The wire contract between the server and devices: every message, its records and keys.

This module is the only place that spells a key that crosses the wire. Both sides
describe a message as a frozen dataclass and call this module's ``build_*`` function
(dataclass in, Flower :class:`~flwr.app.RecordDict` out) or ``parse_*`` function (a
RecordDict or :class:`~flwr.app.Message` in, dataclass out). A message that is
malformed or incomplete raises :class:`ProtocolError`, which names the message kind
and the key at fault.

Message kinds (:data:`MESSAGES` lists each with its direction and keys;
docs/architecture.md shows the same table, and ``tests/test_protocol.py`` fails when
the two disagree):

* ``train-task`` -> ``train-update`` (with the device's new ``ledger`` entries) or
  ``train-refusal``;
* ``evaluate-task`` -> ``evaluate-result`` or ``evaluate-declined``;
* ``discovery`` -> ``identity``, and ``ledger-query`` -> ``ledger-reply`` (Flower
  ``query`` messages);
* ``secagg-fit-config``: the keys fedrec adds to the legacy ``FitIns`` config of
  Flower's SecAgg+ flow, whose stages are otherwise Flower's own.

Record names are parameters (:class:`RecordNames`, default :data:`RECORDS`), as
Flower's strategies take ``arrayrecord_key`` and ``configrecord_key``; keys inside a
record are fixed by :data:`MESSAGES`. Parsers ignore records and keys they do not
know, so either side may add one without breaking the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Final, Literal, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Scalar

__all__ = [
    "DISCOVERY",
    "Direction",
    "Discovery",
    "EVALUATE_DECLINED",
    "EVALUATE_PRIVATE",
    "EVALUATE_RESULT",
    "EVALUATE_TASK",
    "EvaluateDeclined",
    "EvaluatePrivate",
    "EvaluateResult",
    "EvaluateTask",
    "IDENTITY",
    "Identity",
    "Key",
    "LEDGER_QUERY",
    "LEDGER_REPLY",
    "Ledger",
    "LedgerQuery",
    "MESSAGES",
    "MessageSpec",
    "PUBLIC_WEIGHT",
    "PartSpec",
    "ProtocolError",
    "RECORDS",
    "RecordNames",
    "RecordSpec",
    "SECAGG_FIT_CONFIG",
    "SECURE_ADVERTISEMENT",
    "SECURE_DECLINED",
    "SECURE_DELIVERY",
    "SECURE_MASKED",
    "SECURE_ROSTER",
    "SECURE_SHARES",
    "SECURE_TRAIN_TASK",
    "SECURE_UNMASK",
    "SECURE_UNMASK_REPLY",
    "SecAggFitConfig",
    "SecureAdvertisement",
    "SecureDeclined",
    "SecureDelivery",
    "SecureMasked",
    "SecureReply",
    "SecureRoster",
    "SecureShares",
    "SecureTrainTask",
    "SecureUnmask",
    "SecureUnmaskReply",
    "TRAIN_REFUSAL",
    "TRAIN_TASK",
    "TRAIN_UPDATE",
    "TrainRefusal",
    "TrainTask",
    "TrainUpdate",
    "build_discovery",
    "build_evaluate_declined",
    "build_evaluate_private",
    "build_evaluate_result",
    "build_evaluate_task",
    "build_identity",
    "build_ledger_query",
    "build_secagg_fit_config",
    "build_secure_delivery",
    "build_secure_reply",
    "build_secure_roster",
    "build_secure_train_task",
    "build_secure_unmask",
    "build_train_refusal",
    "build_train_task",
    "build_train_update",
    "parse_evaluate_reply",
    "parse_evaluate_task",
    "parse_identity",
    "parse_ledger",
    "parse_query",
    "parse_secagg_fit_config",
    "parse_secure_delivery",
    "parse_secure_reply",
    "parse_secure_roster",
    "parse_secure_train_task",
    "parse_secure_unmask",
    "parse_train_reply",
    "parse_train_task",
    "secagg_round_config",
    "secure_reply_kind",
    "secagg_task_config",
    "wire_keys",
    "with_param_keys",
]


class ProtocolError(ValueError):
    """A message does not follow the protocol.

    Parameters
    ----------
    kind
        The message kind being read or written (e.g. ``"train-update"``).
    key
        The record name or key at fault.
    detail
        What is wrong with it.
    """

    def __init__(self, kind: str, key: str, detail: str) -> None:
        super().__init__(f"{kind} message, key {key!r}: {detail}")
        self.kind = kind
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class RecordNames:
    """The names of fedrec's records inside a message's RecordDict.

    Every build and parse function takes them as ``names`` (default :data:`RECORDS`);
    both sides of a federation must use the same.
    """

    model: str = "global"  # ArrayRecord: the global parameters a task carries
    config: str = "config"  # ConfigRecord: a task's settings
    update: str = "delta"  # ArrayRecord: a trained delta of the global parameters
    metrics: str = "metrics"  # MetricRecord: a reply's numbers
    status: str = "status"  # ConfigRecord: how a device answered, or who it is
    ledger: str = "ledger"  # ConfigRecord: the device's new signed ledger entries
    top_k: str = "top-k"  # ConfigRecord: a device's top-k list, when asked for
    secure: str = "secure-sum"  # ConfigRecord: one round of the secure sum (keys, shares, masked vector)


RECORDS: Final = RecordNames()


# ---------------------------------------------------------------------------- the registry

ValueType = Literal[
    "int", "float", "str", "bool", "bytes", "int-list", "float-list", "str-list", "bytes-list", "json-str-list"
]
RecordType = Literal["array", "config", "metric", "legacy-config"]


class Direction(Enum):
    """Who sends a message (the values are how docs/architecture.md writes them)."""

    TO_DEVICE = "server → device"
    TO_SERVER = "device → server"


@dataclass(frozen=True)
class Key:
    """One key of a record.

    Attributes
    ----------
    name
        The key on the wire.
    attr
        The dataclass field it fills ("" for a key with a fixed value).
    type
        How the value is checked and encoded (``json-str-list``: a list of text sent
        as one JSON string, for legacy configs that hold scalars only).
    optional
        Absent on the wire means the field's default (None: "not sent").
    fixed
        A value the record always carries (a status): it selects the message kind.
    """

    name: str
    attr: str
    type: ValueType
    optional: bool = False
    fixed: str | None = None


@dataclass(frozen=True)
class RecordSpec:
    """One record of a message: its name (a :class:`RecordNames` role), type and keys.

    An ``array`` record is carried whole in the dataclass field ``attr``. An
    ``optional`` record is sent only when one of its fields is set. A
    ``legacy-config`` record is a Flower legacy config (``FitIns.config``), named
    ``label`` since Flower, not fedrec, places it.
    """

    role: str
    type: RecordType
    keys: tuple[Key, ...] = ()
    attr: str = ""
    optional: bool = False
    label: str = ""

    def name(self, names: RecordNames = RECORDS) -> str:
        """The record's name in a RecordDict under ``names``."""
        return self.label or str(getattr(names, self.role))


@dataclass(frozen=True)
class PartSpec:
    """A dataclass and the records it maps to; a message is one part or a few."""

    cls: type
    records: tuple[RecordSpec, ...]


@dataclass(frozen=True)
class MessageSpec:
    """One message kind: its Flower message type, direction and parts."""

    kind: str
    message_type: str
    direction: Direction
    parts: tuple[PartSpec, ...]

    @property
    def records(self) -> tuple[RecordSpec, ...]:
        """Every record the message carries, in the order it is built."""
        return tuple(r for part in self.parts for r in part.records)


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class TrainTask:
    """``train-task``: train on ``model`` (the global parameters) and send back a delta.

    ``ledger_head`` is the last ledger seq the server holds for the device, so the reply
    carries only newer entries; ``run`` labels the releases the device signs.
    """

    model: ArrayRecord
    version: int
    task_seed: int
    run: str = ""
    ledger_head: int = -1


@dataclass(frozen=True)
class TrainUpdate:
    """``train-update``: the delta of the global parameters and what the release cost.

    ``epsilon`` is the device's cumulative epsilon at ``dp_delta``; ``loss`` is sent
    only with DP off (it is computed from records DP-SGD does not privatise).
    """

    delta: ArrayRecord
    steps: int
    epsilon: float
    dp_delta: float
    loss: float | None = None


@dataclass(frozen=True)
class TrainRefusal:
    """``train-refusal``: the task would exceed the device's budget or break its policy."""

    reason: str
    epsilon: float
    dp_delta: float
    epsilon_would_reach: float | None = None


@dataclass(frozen=True)
class Ledger:
    """The device's signed ledger entries the server lacks (JSON texts, in seq order).

    Carried by ``train-update`` and ``ledger-reply``; read with :func:`parse_ledger`,
    apart from the rest of the reply, because the server's intake turns a ledger it
    cannot read into a recorded rejection rather than a malformed reply.
    """

    entries: tuple[str, ...]


@dataclass(frozen=True)
class EvaluateTask:
    """``evaluate-task``: rank ``model`` on the device's ``split`` (``valid`` or ``test``)."""

    model: ArrayRecord
    split: str
    version: int
    export_top_k: bool = False
    run: str = ""
    ledger_head: int = -1


@dataclass(frozen=True)
class EvaluateResult:
    """``evaluate-result``: exact hit and NDCG under both protocols, epsilon spent, maybe the top-k.

    Exact and per device: simulation only (``evaluation = "exact"``); a deployed device
    never sends one. ``tier`` is the device's activity tier under the public bounds.
    """

    hit: float
    ndcg: float
    sampled_hit: float
    sampled_ndcg: float
    epsilon: float
    top_k: tuple[int, ...] | None = None
    tier: int | None = None


@dataclass(frozen=True)
class EvaluatePrivate:
    """``evaluate-private``: the device's noisy metric vector (``shared/privacy/evaluation.py``).

    ``values`` holds one slot per activity tier, each the device's metrics plus Gaussian
    noise; the release is on the device's ledger (carried beside it, like a train update's).
    """

    values: tuple[float, ...]
    epsilon: float
    dp_delta: float


@dataclass(frozen=True)
class EvaluateDeclined:
    """``evaluate-declined``: the device's policy answers no more evaluations for now."""

    reason: str


@dataclass(frozen=True)
class Discovery:
    """``discovery``: who are you? (an empty query)."""


@dataclass(frozen=True)
class LedgerQuery:
    """``ledger-query``: send the ledger entries after ``ledger_head``."""

    ledger_head: int


@dataclass(frozen=True)
class Identity:
    """``identity``: the device's id and its Ed25519 ledger public key."""

    device_id: int
    public_key: str | None = None


@dataclass(frozen=True)
class SecAggFitConfig:
    """``secagg-fit-config``: what fedrec adds to the legacy ``FitIns`` config of a SecAgg+ round.

    ``param_keys`` names the legacy Parameters list (which has no names), in order.
    """

    param_keys: tuple[str, ...]
    run: str = ""
    version: int | None = None
    task_seed: int | None = None

    def release_ids(self) -> tuple[int, int]:
        """The ``(version, task id)`` a release is recorded under in the device's ledger.

        Raises
        ------
        ProtocolError
            If the round's config lacks either.
        """
        if self.version is None:
            raise ProtocolError(SECAGG_FIT_CONFIG.kind, _key_of(_SECAGG_PART, "version"), "missing")
        if self.task_seed is None:
            raise ProtocolError(SECAGG_FIT_CONFIG.kind, _key_of(_SECAGG_PART, "task_seed"), "missing")
        return self.version, self.task_seed


@dataclass(frozen=True)
class SecureTrainTask:
    """``secure-train-task``: train on ``model`` for a secure sum, and advertise keys for its session.

    The session fields are ``shared.secure_sum.rounds.SessionParams``: every later round is
    bound to their digest.
    """

    model: ArrayRecord
    version: int
    task_seed: int
    session_id: bytes
    cohort: tuple[int, ...]
    length: int
    bits: int
    neighbours: int
    threshold: int
    min_contributors: int
    run: str = ""
    ledger_head: int = -1


@dataclass(frozen=True)
class SecureAdvertisement:
    """``secure-advertisement``: the device's two fresh public keys and seed commitment, signed."""

    share_public: bytes
    mask_public: bytes
    seed_commitment: bytes
    signature: str


@dataclass(frozen=True)
class SecureDeclined:
    """``secure-declined``: the device will not go on with this session (why, in words)."""

    reason: str


@dataclass(frozen=True)
class SecureRoster:
    """``secure-roster``: every advertisement of the session, each with its device's ledger key."""

    session_id: bytes
    roster: tuple[int, ...]
    share_publics: tuple[bytes, ...]
    mask_publics: tuple[bytes, ...]
    seed_commitments: tuple[bytes, ...]
    signatures: tuple[str, ...]
    ledger_keys: tuple[str, ...]


@dataclass(frozen=True)
class SecureShares:
    """``secure-shares``: the device's encrypted seed shares, one per neighbour."""

    recipients: tuple[int, ...]
    nonces: tuple[bytes, ...]
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class SecureDelivery:
    """``secure-delivery``: the encrypted shares addressed to the device; mask and send your vector."""

    session_id: bytes
    senders: tuple[int, ...]
    nonces: tuple[bytes, ...]
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class SecureMasked:
    """``secure-masked``: the masked vector (little-endian words of 4 bytes, or 8 above 32 bits)."""

    vector: bytes


@dataclass(frozen=True)
class SecureUnmask:
    """``secure-unmask``: who survived and who dropped; answered once."""

    session_id: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class SecureUnmaskReply:
    """``secure-unmask-reply``: shares of survivors' self-mask seeds and of dropouts' mask seeds."""

    seed_owners: tuple[int, ...]
    seed_shares: tuple[bytes, ...]
    mask_owners: tuple[int, ...]
    mask_shares: tuple[bytes, ...]


# The weight every update carries (the legacy SecAgg+ FitRes's num_examples included): the
# same public value for each device, since a record count would tell neighbouring data apart.
PUBLIC_WEIGHT: Final = 1

_MODEL = RecordSpec("model", "array", attr="model")

_TRAIN_TASK_PART = PartSpec(
    TrainTask,
    (
        _MODEL,
        RecordSpec(
            "config",
            "config",
            (
                Key("version", "version", "int"),
                Key("task-seed", "task_seed", "int"),
                Key("run", "run", "str", optional=True),
                Key("ledger-head", "ledger_head", "int", optional=True),
            ),
        ),
    ),
)
_TRAIN_UPDATE_PART = PartSpec(
    TrainUpdate,
    (
        RecordSpec("update", "array", attr="delta"),
        RecordSpec(
            "metrics",
            "metric",
            (
                Key("steps", "steps", "int"),
                Key("epsilon", "epsilon", "float"),
                Key("delta", "dp_delta", "float"),
                Key("loss", "loss", "float", optional=True),
            ),
        ),
        RecordSpec("status", "config", (Key("status", "", "str", fixed="ok"),)),
    ),
)
_TRAIN_REFUSAL_PART = PartSpec(
    TrainRefusal,
    (
        RecordSpec("status", "config", (Key("status", "", "str", fixed="refused"), Key("reason", "reason", "str"))),
        RecordSpec(
            "metrics",
            "metric",
            (
                Key("epsilon", "epsilon", "float"),
                Key("delta", "dp_delta", "float"),
                Key("epsilon-would-reach", "epsilon_would_reach", "float", optional=True),
            ),
        ),
    ),
)
_LEDGER_PART = PartSpec(Ledger, (RecordSpec("ledger", "config", (Key("entries", "entries", "str-list"),)),))
_EVALUATE_TASK_PART = PartSpec(
    EvaluateTask,
    (
        _MODEL,
        RecordSpec(
            "config",
            "config",
            (
                Key("split", "split", "str"),
                Key("version", "version", "int"),
                Key("export-top-k", "export_top_k", "bool", optional=True),
                Key("run", "run", "str", optional=True),
                Key("ledger-head", "ledger_head", "int", optional=True),
            ),
        ),
    ),
)
_EVALUATE_RESULT_PART = PartSpec(
    EvaluateResult,
    (
        RecordSpec(
            "metrics",
            "metric",
            (
                Key("hit", "hit", "float"),
                Key("ndcg", "ndcg", "float"),
                Key("sampled-hit", "sampled_hit", "float"),
                Key("sampled-ndcg", "sampled_ndcg", "float"),
                Key("epsilon", "epsilon", "float"),
                Key("tier", "tier", "int", optional=True),
            ),
        ),
        RecordSpec("top_k", "config", (Key("items", "top_k", "int-list"),), optional=True),
    ),
)
_EVALUATE_PRIVATE_PART = PartSpec(
    EvaluatePrivate,
    (
        RecordSpec("status", "config", (Key("status", "", "str", fixed="private"),)),
        RecordSpec(
            "metrics",
            "metric",
            (
                Key("noisy-sums", "values", "float-list"),
                Key("epsilon", "epsilon", "float"),
                Key("delta", "dp_delta", "float"),
            ),
        ),
    ),
)
_EVALUATE_DECLINED_PART = PartSpec(
    EvaluateDeclined,
    (RecordSpec("status", "config", (Key("status", "", "str", fixed="declined"), Key("reason", "reason", "str"))),),
)
_DISCOVERY_PART = PartSpec(Discovery, ())
_LEDGER_QUERY_PART = PartSpec(
    LedgerQuery, (RecordSpec("config", "config", (Key("ledger-head", "ledger_head", "int"),)),)
)
_IDENTITY_PART = PartSpec(
    Identity,
    (
        RecordSpec(
            "status",
            "config",
            (Key("device-id", "device_id", "int"), Key("public-key", "public_key", "str", optional=True)),
        ),
    ),
)
_SECAGG_PART = PartSpec(
    SecAggFitConfig,
    (
        RecordSpec(
            "fit_config",
            "legacy-config",
            (
                Key("fedrec-param-keys", "param_keys", "json-str-list"),
                Key("run", "run", "str", optional=True),
                Key("version", "version", "int", optional=True),
                Key("task-seed", "task_seed", "int", optional=True),
            ),
            label="FitIns.config",
        ),
    ),
)

_SESSION = Key("session-id", "session_id", "bytes")
_SECURE_TRAIN_TASK_PART = PartSpec(
    SecureTrainTask,
    (
        _MODEL,
        RecordSpec(
            "config",
            "config",
            (
                Key("version", "version", "int"),
                Key("task-seed", "task_seed", "int"),
                Key("run", "run", "str", optional=True),
                Key("ledger-head", "ledger_head", "int", optional=True),
            ),
        ),
        RecordSpec(
            "secure",
            "config",
            (
                _SESSION,
                Key("cohort", "cohort", "int-list"),
                Key("vector-length", "length", "int"),
                Key("modulus-bits", "bits", "int"),
                Key("neighbours", "neighbours", "int"),
                Key("threshold", "threshold", "int"),
                Key("min-contributors", "min_contributors", "int"),
            ),
        ),
    ),
)
_SECURE_ADVERTISEMENT_PART = PartSpec(
    SecureAdvertisement,
    (
        RecordSpec("status", "config", (Key("status", "", "str", fixed="advertised"),)),
        RecordSpec(
            "secure",
            "config",
            (
                Key("share-public", "share_public", "bytes"),
                Key("mask-public", "mask_public", "bytes"),
                Key("seed-commitment", "seed_commitment", "bytes"),
                Key("advert-signature", "signature", "str"),
            ),
        ),
    ),
)
_SECURE_DECLINED_PART = PartSpec(
    SecureDeclined,
    (RecordSpec("status", "config", (Key("status", "", "str", fixed="declined"), Key("reason", "reason", "str"))),),
)
_SECURE_ROSTER_PART = PartSpec(
    SecureRoster,
    (
        RecordSpec(
            "secure",
            "config",
            (
                _SESSION,
                Key("roster", "roster", "int-list"),
                Key("share-publics", "share_publics", "bytes-list"),
                Key("mask-publics", "mask_publics", "bytes-list"),
                Key("seed-commitments", "seed_commitments", "bytes-list"),
                Key("signatures", "signatures", "str-list"),
                Key("ledger-keys", "ledger_keys", "str-list"),
            ),
        ),
    ),
)
_SECURE_SHARES_PART = PartSpec(
    SecureShares,
    (
        RecordSpec("status", "config", (Key("status", "", "str", fixed="shared"),)),
        RecordSpec(
            "secure",
            "config",
            (
                Key("recipients", "recipients", "int-list"),
                Key("nonces", "nonces", "bytes-list"),
                Key("ciphertexts", "ciphertexts", "bytes-list"),
            ),
        ),
    ),
)
_SECURE_DELIVERY_PART = PartSpec(
    SecureDelivery,
    (
        RecordSpec(
            "secure",
            "config",
            (
                _SESSION,
                Key("senders", "senders", "int-list"),
                Key("nonces", "nonces", "bytes-list"),
                Key("ciphertexts", "ciphertexts", "bytes-list"),
            ),
        ),
    ),
)
_SECURE_MASKED_PART = PartSpec(
    SecureMasked,
    (
        RecordSpec("status", "config", (Key("status", "", "str", fixed="masked"),)),
        RecordSpec("secure", "config", (Key("masked-vector", "vector", "bytes"),)),
    ),
)
_SECURE_UNMASK_PART = PartSpec(
    SecureUnmask,
    (
        RecordSpec(
            "secure",
            "config",
            (_SESSION, Key("survivors", "survivors", "int-list"), Key("dropouts", "dropped", "int-list")),
        ),
    ),
)
_SECURE_UNMASK_REPLY_PART = PartSpec(
    SecureUnmaskReply,
    (
        RecordSpec("status", "config", (Key("status", "", "str", fixed="unmasked"),)),
        RecordSpec(
            "secure",
            "config",
            (
                Key("seed-owners", "seed_owners", "int-list"),
                Key("seed-shares", "seed_shares", "bytes-list"),
                Key("mask-owners", "mask_owners", "int-list"),
                Key("mask-shares", "mask_shares", "bytes-list"),
            ),
        ),
    ),
)

_TRAIN, _EVALUATE, _QUERY = MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY
_DOWN, _UP = Direction.TO_DEVICE, Direction.TO_SERVER

TRAIN_TASK: Final = MessageSpec("train-task", _TRAIN, _DOWN, (_TRAIN_TASK_PART,))
TRAIN_UPDATE: Final = MessageSpec("train-update", _TRAIN, _UP, (_TRAIN_UPDATE_PART, _LEDGER_PART))
TRAIN_REFUSAL: Final = MessageSpec("train-refusal", _TRAIN, _UP, (_TRAIN_REFUSAL_PART,))
EVALUATE_TASK: Final = MessageSpec("evaluate-task", _EVALUATE, _DOWN, (_EVALUATE_TASK_PART,))
EVALUATE_RESULT: Final = MessageSpec("evaluate-result", _EVALUATE, _UP, (_EVALUATE_RESULT_PART,))
EVALUATE_DECLINED: Final = MessageSpec("evaluate-declined", _EVALUATE, _UP, (_EVALUATE_DECLINED_PART,))
EVALUATE_PRIVATE: Final = MessageSpec("evaluate-private", _EVALUATE, _UP, (_EVALUATE_PRIVATE_PART, _LEDGER_PART))
DISCOVERY: Final = MessageSpec("discovery", _QUERY, _DOWN, (_DISCOVERY_PART,))
IDENTITY: Final = MessageSpec("identity", _QUERY, _UP, (_IDENTITY_PART,))
LEDGER_QUERY: Final = MessageSpec("ledger-query", _QUERY, _DOWN, (_LEDGER_QUERY_PART,))
LEDGER_REPLY: Final = MessageSpec("ledger-reply", _QUERY, _UP, (_IDENTITY_PART, _LEDGER_PART))
# Legacy SecAgg+ (server/secagg.py, client/secagg_client.py): the fit stage is a Flower
# ``train`` message whose FitIns config carries these keys besides Flower's own.
SECAGG_FIT_CONFIG: Final = MessageSpec("secagg-fit-config", _TRAIN, _DOWN, (_SECAGG_PART,))
# fedrec's secure sum (client/secure_sum_device.py, server/secure_sum_server.py): four rounds,
# each a ``train`` message with its own action, answered by one reply or ``secure-declined``.
SECURE_TRAIN_TASK: Final = MessageSpec("secure-train-task", "train.secure_train", _DOWN, (_SECURE_TRAIN_TASK_PART,))
SECURE_ADVERTISEMENT: Final = MessageSpec("secure-advertisement", _TRAIN, _UP, (_SECURE_ADVERTISEMENT_PART,))
SECURE_DECLINED: Final = MessageSpec("secure-declined", _TRAIN, _UP, (_SECURE_DECLINED_PART,))
SECURE_ROSTER: Final = MessageSpec("secure-roster", "train.secure_shares", _DOWN, (_SECURE_ROSTER_PART,))
SECURE_SHARES: Final = MessageSpec("secure-shares", _TRAIN, _UP, (_SECURE_SHARES_PART,))
SECURE_DELIVERY: Final = MessageSpec("secure-delivery", "train.secure_mask", _DOWN, (_SECURE_DELIVERY_PART,))
SECURE_MASKED: Final = MessageSpec("secure-masked", _TRAIN, _UP, (_SECURE_MASKED_PART, _LEDGER_PART))
SECURE_UNMASK: Final = MessageSpec("secure-unmask", "train.secure_unmask", _DOWN, (_SECURE_UNMASK_PART,))
SECURE_UNMASK_REPLY: Final = MessageSpec("secure-unmask-reply", _TRAIN, _UP, (_SECURE_UNMASK_REPLY_PART,))

MESSAGES: Final[tuple[MessageSpec, ...]] = (
    TRAIN_TASK,
    TRAIN_UPDATE,
    TRAIN_REFUSAL,
    EVALUATE_TASK,
    EVALUATE_RESULT,
    EVALUATE_DECLINED,
    EVALUATE_PRIVATE,
    DISCOVERY,
    IDENTITY,
    LEDGER_QUERY,
    LEDGER_REPLY,
    SECAGG_FIT_CONFIG,
    SECURE_TRAIN_TASK,
    SECURE_ADVERTISEMENT,
    SECURE_DECLINED,
    SECURE_ROSTER,
    SECURE_SHARES,
    SECURE_DELIVERY,
    SECURE_MASKED,
    SECURE_UNMASK,
    SECURE_UNMASK_REPLY,
)


def wire_keys(names: RecordNames = RECORDS) -> frozenset[str]:
    """Every record name and key fedrec puts on the wire (not Flower's own, nor labels)."""
    found: set[str] = set()
    for spec in MESSAGES:
        for record in spec.records:
            if not record.label:
                found.add(record.name(names))
            found.update(k.name for k in record.keys)
    return frozenset(found)


def _key_of(part: PartSpec, attr: str) -> str:
    """The wire key that fills ``attr`` of ``part``'s dataclass."""
    for record in part.records:
        for key in record.keys:
            if key.attr == attr:
                return key.name
    raise KeyError(attr)


# ---------------------------------------------------------------------------- encoding


def _encode(kind: str, key: Key, value: Any) -> Any:
    """``value`` as the wire holds it; a wrong type is the sender's bug and raises."""
    try:
        if key.type == "int":
            if isinstance(value, bool):
                raise TypeError("a bool is not an integer")
            return int(value)
        if key.type == "float":
            if isinstance(value, bool):
                raise TypeError("a bool is not a number")
            return float(value)
        if key.type == "str":
            if not isinstance(value, str):
                raise TypeError(f"expected text, got {type(value).__name__}")
            return value
        if key.type == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"expected a bool, got {type(value).__name__}")
            return value
        if key.type == "bytes":
            if not isinstance(value, bytes):
                raise TypeError(f"expected bytes, got {type(value).__name__}")
            return value
        if key.type == "bytes-list":
            if not all(isinstance(v, bytes) for v in value):
                raise TypeError("expected a list of bytes")
            return list(value)
        if key.type == "int-list":
            return [int(v) for v in value]
        if key.type == "float-list":
            out = [float(v) for v in value]
            if not all(math.isfinite(v) for v in out):
                raise ValueError("non-finite value")
            return out
        if key.type == "str-list":
            return [str(v) for v in value]
        return json.dumps([str(v) for v in value])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(kind, key.name, f"cannot send {value!r}: {exc}") from exc


def _decode(kind: str, key: Key, value: object) -> Any:
    """A received value, checked against ``key.type``."""

    def bad(expected: str) -> ProtocolError:
        return ProtocolError(kind, key.name, f"expected {expected}, got {value!r}")

    if key.type == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("an integer")
        if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
            raise bad("an integer")
        return int(value)
    if key.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if key.type == "str":
        if not isinstance(value, str):
            raise bad("text")
        return value
    if key.type == "bool":
        if not isinstance(value, bool):
            raise bad("a bool")
        return value
    if key.type == "bytes":
        if not isinstance(value, bytes):
            raise bad("bytes")
        return value
    if key.type == "bytes-list":
        if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
            raise bad("a list of bytes")
        return tuple(value)
    if key.type == "int-list":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad("a list of integers")
        return tuple(int(v) for v in value)
    if key.type == "float-list":
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise bad("a list of finite numbers")
        return tuple(float(v) for v in value)
    if key.type == "str-list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of text")
        return tuple(value)
    if not isinstance(value, str):
        raise bad("a JSON list of text")
    try:
        items = json.loads(value)
    except json.JSONDecodeError as exc:
        raise bad("a JSON list of text") from exc
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise bad("a JSON list of text")
    return tuple(items)


def _record_values(kind: str, record: RecordSpec, message: object) -> dict[str, Any]:
    """The keys and values of a config or metric record, from ``message``'s fields."""
    values: dict[str, Any] = {}
    for key in record.keys:
        if key.fixed is not None:
            values[key.name] = key.fixed
            continue
        value = getattr(message, key.attr)
        if value is None:
            if not key.optional:
                raise ProtocolError(kind, key.name, "required, but the message has none")
            continue
        values[key.name] = _encode(kind, key, value)
    return values


def _build(spec: MessageSpec, parts: Sequence[object], names: RecordNames) -> RecordDict:
    """A RecordDict of ``parts``, one dataclass per part of ``spec`` (None: part not sent)."""
    content = RecordDict()
    for part, message in zip(spec.parts, parts, strict=True):
        if message is None:
            continue
        if not isinstance(message, part.cls):
            raise TypeError(f"{spec.kind}: expected {part.cls.__name__}, got {type(message).__name__}")
        for record in part.records:
            name = record.name(names)
            if record.optional and all(getattr(message, k.attr) is None for k in record.keys if k.fixed is None):
                continue  # an optional record none of whose fields is set is not sent
            if record.type == "array":
                value = getattr(message, record.attr)
                if not isinstance(value, ArrayRecord):
                    raise ProtocolError(spec.kind, name, f"expected an ArrayRecord, got {type(value).__name__}")
                content[name] = value  # shared, not copied: one model record serves many messages
                continue
            values = _record_values(spec.kind, record, message)
            content[name] = MetricRecord(values) if record.type == "metric" else ConfigRecord(values)
    return content


def _content(source: Message | RecordDict, kind: str) -> RecordDict:
    """The RecordDict of ``source``; an error reply or an empty message is not one."""
    if isinstance(source, RecordDict):
        return source
    if source.has_error():
        raise ProtocolError(
            kind, "(content)", f"an error reply ({source.error.code}: {source.error.reason}), not content"
        )
    if not source.has_content():
        raise ProtocolError(kind, "(content)", "no content")
    return source.content


def _find_record(content: RecordDict, record: RecordSpec, kind: str, names: RecordNames) -> Any:
    """The record ``record`` describes, or None when absent (the caller decides if that is allowed)."""
    name = record.name(names)
    views: dict[str, Any] = {
        "array": content.array_records,
        "config": content.config_records,
        "metric": content.metric_records,
    }
    found = views[record.type].get(name)
    if found is None and name in content:
        other = type(content[name]).__name__
        raise ProtocolError(kind, name, f"expected a {record.type} record, got a {other}")
    return found


_T = TypeVar("_T")


def _parse_part(part: PartSpec, cls: type[_T], content: RecordDict, kind: str, names: RecordNames) -> _T:
    """Fill ``part``'s dataclass from ``content``; ProtocolError for anything missing or mistyped."""
    kwargs: dict[str, Any] = {}
    for record in part.records:
        name = record.name(names)
        found = _find_record(content, record, kind, names)
        if found is None:
            if record.optional:
                continue
            raise ProtocolError(kind, name, f"missing {record.type} record")
        if record.type == "array":
            kwargs[record.attr] = found
            continue
        for key in record.keys:
            if key.name not in found:
                if key.optional:
                    continue
                raise ProtocolError(kind, key.name, f"missing from the {name!r} record")
            value = _decode(kind, key, found[key.name])
            if key.fixed is not None:
                if value != key.fixed:
                    raise ProtocolError(kind, key.name, f"expected {key.fixed!r}, got {value!r}")
                continue
            kwargs[key.attr] = value
    return cls(**kwargs)


def _status_key(spec: MessageSpec) -> tuple[RecordSpec, Key]:
    """The record and key whose fixed value marks a reply as ``spec``."""
    for record in spec.records:
        for key in record.keys:
            if key.fixed is not None:
                return record, key
    raise ValueError(f"{spec.kind} has no status")


def _variant(
    content: RecordDict, variants: Sequence[MessageSpec], label: str, names: RecordNames
) -> MessageSpec | None:
    """Which of ``variants`` a reply is, by its status value; None when it has no status record."""
    record, key = _status_key(variants[0])
    found = _find_record(content, record, label, names)
    if found is None:
        return None
    if key.name not in found:
        raise ProtocolError(label, key.name, f"missing from the {record.name(names)!r} record")
    value = _decode(label, key, found[key.name])
    for spec in variants:
        if _status_key(spec)[1].fixed == value:
            return spec
    raise ProtocolError(label, key.name, f"unknown status {value!r}")


# ---------------------------------------------------------------------------- train


def build_train_task(task: TrainTask, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``train-task`` message (the model record is shared, not copied)."""
    return _build(TRAIN_TASK, (task,), names)


def parse_train_task(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> TrainTask:
    """Read a ``train-task``.

    Raises
    ------
    ProtocolError
        If a record or key is missing or has the wrong type.
    """
    return _parse_part(_TRAIN_TASK_PART, TrainTask, _content(source, TRAIN_TASK.kind), TRAIN_TASK.kind, names)


def build_train_update(update: TrainUpdate, ledger: Ledger, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``train-update`` reply: the update and the device's new ledger entries."""
    return _build(TRAIN_UPDATE, (update, ledger), names)


def build_train_refusal(refusal: TrainRefusal, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``train-refusal`` reply."""
    return _build(TRAIN_REFUSAL, (refusal,), names)


def parse_train_reply(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> TrainUpdate | TrainRefusal:
    """Read a reply to a ``train-task``: an update or a refusal, by its status.

    The ledger entries an update carries are read by :func:`parse_ledger`.

    Raises
    ------
    ProtocolError
        If the reply is an error, has no or an unknown status, or lacks a key.
    """
    label = f"{TRAIN_UPDATE.kind}/{TRAIN_REFUSAL.kind}"
    content = _content(source, label)
    spec = _variant(content, (TRAIN_UPDATE, TRAIN_REFUSAL), label, names)
    if spec is None:
        raise ProtocolError(label, names.status, "missing config record")
    if spec is TRAIN_UPDATE:
        return _parse_part(_TRAIN_UPDATE_PART, TrainUpdate, content, spec.kind, names)
    return _parse_part(_TRAIN_REFUSAL_PART, TrainRefusal, content, spec.kind, names)


def parse_ledger(
    source: Message | RecordDict, *, kind: str = TRAIN_UPDATE.kind, names: RecordNames = RECORDS
) -> Ledger:
    """Read the ledger entries of a ``train-update`` or ``ledger-reply`` (``kind`` names which).

    Raises
    ------
    ProtocolError
        If the ledger record is missing or its entries are not a list of text.
    """
    return _parse_part(_LEDGER_PART, Ledger, _content(source, kind), kind, names)


# ---------------------------------------------------------------------------- evaluate


def build_evaluate_task(task: EvaluateTask, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of an ``evaluate-task`` message (the model record is shared, not copied)."""
    return _build(EVALUATE_TASK, (task,), names)


def parse_evaluate_task(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> EvaluateTask:
    """Read an ``evaluate-task``.

    Raises
    ------
    ProtocolError
        If a record or key is missing or has the wrong type.
    """
    kind = EVALUATE_TASK.kind
    return _parse_part(_EVALUATE_TASK_PART, EvaluateTask, _content(source, kind), kind, names)


def build_evaluate_result(result: EvaluateResult, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of an ``evaluate-result`` reply (the top-k record only when ``top_k`` is set)."""
    return _build(EVALUATE_RESULT, (result,), names)


def build_evaluate_declined(declined: EvaluateDeclined, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of an ``evaluate-declined`` reply."""
    return _build(EVALUATE_DECLINED, (declined,), names)


def build_evaluate_private(result: EvaluatePrivate, ledger: Ledger, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of an ``evaluate-private`` reply: the noisy vector and the device's new ledger entries."""
    return _build(EVALUATE_PRIVATE, (result, ledger), names)


def parse_evaluate_reply(
    source: Message | RecordDict, *, names: RecordNames = RECORDS
) -> EvaluateResult | EvaluatePrivate | EvaluateDeclined:
    """Read a reply to an ``evaluate-task``: an exact or private result, or a refusal (by its status).

    The ledger entries a private result carries are read by :func:`parse_ledger`.

    Raises
    ------
    ProtocolError
        If the reply is an error, has an unknown status, or lacks a key.
    """
    label = f"{EVALUATE_RESULT.kind}/{EVALUATE_PRIVATE.kind}/{EVALUATE_DECLINED.kind}"
    content = _content(source, label)
    spec = _variant(content, (EVALUATE_DECLINED, EVALUATE_PRIVATE), label, names)
    if spec is None:
        return _parse_part(_EVALUATE_RESULT_PART, EvaluateResult, content, EVALUATE_RESULT.kind, names)
    if spec is EVALUATE_PRIVATE:
        return _parse_part(_EVALUATE_PRIVATE_PART, EvaluatePrivate, content, spec.kind, names)
    return _parse_part(_EVALUATE_DECLINED_PART, EvaluateDeclined, content, EVALUATE_DECLINED.kind, names)


# ---------------------------------------------------------------------------- query


def build_discovery(*, names: RecordNames = RECORDS) -> RecordDict:
    """The (empty) content of a ``discovery`` query."""
    return _build(DISCOVERY, (Discovery(),), names)


def build_ledger_query(query: LedgerQuery, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``ledger-query``."""
    return _build(LEDGER_QUERY, (query,), names)


def parse_query(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> Discovery | LedgerQuery:
    """Read a query: a ``ledger-query`` when it names a ledger head, else a ``discovery``.

    Raises
    ------
    ProtocolError
        If the ledger head has the wrong type.
    """
    content = _content(source, LEDGER_QUERY.kind)
    config = _find_record(content, _LEDGER_QUERY_PART.records[0], LEDGER_QUERY.kind, names)
    if config is None or _key_of(_LEDGER_QUERY_PART, "ledger_head") not in config:
        return Discovery()
    return _parse_part(_LEDGER_QUERY_PART, LedgerQuery, content, LEDGER_QUERY.kind, names)


def build_identity(identity: Identity, ledger: Ledger | None = None, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a query's reply: ``identity``, or ``ledger-reply`` when ``ledger`` is given."""
    if ledger is None:
        return _build(IDENTITY, (identity,), names)
    return _build(LEDGER_REPLY, (identity, ledger), names)


def parse_identity(
    source: Message | RecordDict, *, kind: str = IDENTITY.kind, names: RecordNames = RECORDS
) -> Identity:
    """Read the identity an ``identity`` or ``ledger-reply`` carries (``kind`` names which).

    A ``ledger-reply``'s entries are read by :func:`parse_ledger`.

    Raises
    ------
    ProtocolError
        If the status record or the device id is missing or mistyped.
    """
    return _parse_part(_IDENTITY_PART, Identity, _content(source, kind), kind, names)


# ---------------------------------------------------------------------------- SecAgg+


def build_secagg_fit_config(config: SecAggFitConfig) -> dict[str, Scalar]:
    """The fedrec keys of a SecAgg+ round's legacy ``FitIns`` config."""
    return dict(_record_values(SECAGG_FIT_CONFIG.kind, _SECAGG_PART.records[0], config))


def _secagg_values(**attrs: Any) -> dict[str, Scalar]:
    """The FitIns config keys and values for the given :class:`SecAggFitConfig` fields."""
    record = _SECAGG_PART.records[0]
    return {k.name: _encode(SECAGG_FIT_CONFIG.kind, k, attrs[k.attr]) for k in record.keys if k.attr in attrs}


def secagg_round_config(run: str, version: int) -> dict[str, Scalar]:
    """The part of a SecAgg+ fit config every device of the round gets (run label, model version)."""
    return _secagg_values(run=run, version=version)


def secagg_task_config(task_seed: int) -> dict[str, Scalar]:
    """The part of a SecAgg+ fit config one device gets: its task's seed (the task id)."""
    return _secagg_values(task_seed=task_seed)


def with_param_keys(config: Mapping[str, Scalar], param_keys: Sequence[str]) -> dict[str, Scalar]:
    """``config`` plus the parameter names of the round's legacy Parameters list, in order.

    Raises
    ------
    ProtocolError
        If ``config`` already sets the key (it is reserved for this).
    """
    name = _key_of(_SECAGG_PART, "param_keys")
    if name in config:
        raise ProtocolError(SECAGG_FIT_CONFIG.kind, name, "reserved: set from the global parameters")
    return {**dict(config), **_secagg_values(param_keys=param_keys)}


def parse_secagg_fit_config(config: Mapping[str, Scalar]) -> SecAggFitConfig:
    """Read fedrec's keys from a SecAgg+ round's legacy ``FitIns`` config (Flower's are ignored).

    Raises
    ------
    ProtocolError
        If the parameter names are missing, or a key has the wrong type.
    """
    kind, record = SECAGG_FIT_CONFIG.kind, _SECAGG_PART.records[0]
    kwargs: dict[str, Any] = {}
    for key in record.keys:
        if key.name not in config:
            if key.optional:
                continue
            raise ProtocolError(kind, key.name, "missing from the FitIns config")
        kwargs[key.attr] = _decode(kind, key, config[key.name])
    return SecAggFitConfig(**kwargs)


# ---------------------------------------------------------------------------- secure sum


def build_secure_train_task(task: SecureTrainTask, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``secure-train-task`` message."""
    return _build(SECURE_TRAIN_TASK, (task,), names)


def parse_secure_train_task(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> SecureTrainTask:
    """Read a ``secure-train-task``.

    Raises
    ------
    ProtocolError
        If a record or key is missing or has the wrong type.
    """
    kind = SECURE_TRAIN_TASK.kind
    return _parse_part(_SECURE_TRAIN_TASK_PART, SecureTrainTask, _content(source, kind), kind, names)


def build_secure_roster(roster: SecureRoster, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``secure-roster`` message."""
    return _build(SECURE_ROSTER, (roster,), names)


def parse_secure_roster(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> SecureRoster:
    """Read a ``secure-roster`` (ProtocolError if malformed)."""
    kind = SECURE_ROSTER.kind
    return _parse_part(_SECURE_ROSTER_PART, SecureRoster, _content(source, kind), kind, names)


def build_secure_delivery(delivery: SecureDelivery, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``secure-delivery`` message."""
    return _build(SECURE_DELIVERY, (delivery,), names)


def parse_secure_delivery(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> SecureDelivery:
    """Read a ``secure-delivery`` (ProtocolError if malformed)."""
    kind = SECURE_DELIVERY.kind
    return _parse_part(_SECURE_DELIVERY_PART, SecureDelivery, _content(source, kind), kind, names)


def build_secure_unmask(unmask: SecureUnmask, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a ``secure-unmask`` message."""
    return _build(SECURE_UNMASK, (unmask,), names)


def parse_secure_unmask(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> SecureUnmask:
    """Read a ``secure-unmask`` (ProtocolError if malformed)."""
    kind = SECURE_UNMASK.kind
    return _parse_part(_SECURE_UNMASK_PART, SecureUnmask, _content(source, kind), kind, names)


def secure_reply_kind(source: Message | RecordDict, *, names: RecordNames = RECORDS) -> str | None:
    """The kind of a device's secure-sum round reply (None: not one), read from its status alone.

    For a reply that arrives after the server stopped waiting: only a ``secure-masked`` one
    carries a release (its ledger), the others spent nothing.
    """
    try:
        content = _content(source, "secure reply")
    except ProtocolError:
        return None
    variants = (SECURE_ADVERTISEMENT, SECURE_SHARES, SECURE_MASKED, SECURE_UNMASK_REPLY, SECURE_DECLINED)
    try:
        spec = _variant(content, variants, "secure reply", names)
    except ProtocolError:
        return None
    return None if spec is None else spec.kind


SecureReply = SecureAdvertisement | SecureShares | SecureMasked | SecureUnmaskReply | SecureDeclined | TrainRefusal
_SECURE_REPLIES: Final[dict[str, tuple[PartSpec, type]]] = {
    SECURE_ADVERTISEMENT.kind: (_SECURE_ADVERTISEMENT_PART, SecureAdvertisement),
    SECURE_SHARES.kind: (_SECURE_SHARES_PART, SecureShares),
    SECURE_MASKED.kind: (_SECURE_MASKED_PART, SecureMasked),
    SECURE_UNMASK_REPLY.kind: (_SECURE_UNMASK_REPLY_PART, SecureUnmaskReply),
    SECURE_DECLINED.kind: (_SECURE_DECLINED_PART, SecureDeclined),
    TRAIN_REFUSAL.kind: (_TRAIN_REFUSAL_PART, TrainRefusal),
}


def build_secure_reply(reply: SecureReply, ledger: Ledger | None = None, *, names: RecordNames = RECORDS) -> RecordDict:
    """The content of a device's reply in a secure-sum round (a masked vector carries its ledger)."""
    if isinstance(reply, SecureMasked):
        if ledger is None:
            raise ProtocolError(SECURE_MASKED.kind, names.ledger, "a masked vector carries the device's ledger")
        return _build(SECURE_MASKED, (reply, ledger), names)
    spec = {
        SecureAdvertisement: SECURE_ADVERTISEMENT,
        SecureShares: SECURE_SHARES,
        SecureUnmaskReply: SECURE_UNMASK_REPLY,
        SecureDeclined: SECURE_DECLINED,
        TrainRefusal: TRAIN_REFUSAL,
    }[type(reply)]
    return _build(spec, (reply,), names)


def parse_secure_reply(
    source: Message | RecordDict, expected: MessageSpec, *, names: RecordNames = RECORDS
) -> SecureReply:
    """Read a device's reply in a secure-sum round: ``expected``, ``secure-declined`` or (rounds 1 and 3) a refusal.

    The ledger a ``secure-masked`` reply carries is read by :func:`parse_ledger`.

    Raises
    ------
    ProtocolError
        If the reply is an error, of another kind, or malformed.
    """
    # A device refuses for its budget where it checks it: before training and before masking.
    refusable = expected is SECURE_ADVERTISEMENT or expected is SECURE_MASKED
    variants = [expected, SECURE_DECLINED] + ([TRAIN_REFUSAL] if refusable else [])
    label = "/".join(v.kind for v in variants)
    content = _content(source, label)
    spec = _variant(content, variants, label, names)
    if spec is None:
        raise ProtocolError(label, names.status, "missing config record")
    part, cls = _SECURE_REPLIES[spec.kind]
    return _parse_part(part, cls, content, spec.kind, names)


def _check_registry() -> None:
    """Every key of every part fills a field of its dataclass, and every field is filled."""
    for spec in MESSAGES:
        for part in spec.parts:
            attrs = {f.name for f in fields(part.cls)}
            filled = {r.attr for r in part.records if r.type == "array"}
            filled |= {k.attr for r in part.records for k in r.keys if k.fixed is None}
            if filled != attrs:
                raise AssertionError(
                    f"{spec.kind}: {part.cls.__name__} fields {sorted(attrs)} vs keys {sorted(filled)}"
                )


_check_registry()
