"""The wire protocol (shared/protocol.py): round trips, strict parsing, one home per key, the docs table."""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from shared import protocol as p

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "client", "shared", "simulations")

MODEL = ArrayRecord({"item_embedding.weight": torch.arange(6.0).reshape(3, 2)})
DELTA = ArrayRecord({"item_embedding.weight": torch.full((3, 2), 0.5)})
LEDGER = p.Ledger(('{"seq": 0}', '{"seq": 1}'))
IDENTITY = p.Identity(device_id=4, public_key="key-4")

# One example per kind with every optional field set (so every key is on the wire), the
# function that builds its content, and the one that reads it back (a list of parts).
Build = Callable[[p.RecordNames], RecordDict]
Parse = Callable[[RecordDict, p.RecordNames], list[object]]
EXAMPLES: dict[str, tuple[list[object], Build, Parse]] = {
    "train-task": (
        [p.TrainTask(MODEL, version=3, task_seed=17, run="run#1-ab", ledger_head=5)],
        lambda n: p.build_train_task(p.TrainTask(MODEL, 3, 17, "run#1-ab", 5), names=n),
        lambda c, n: [p.parse_train_task(c, names=n)],
    ),
    "train-update": (
        [p.TrainUpdate(DELTA, 3, 1.25, 1e-5, loss=0.69), LEDGER],
        lambda n: p.build_train_update(p.TrainUpdate(DELTA, 3, 1.25, 1e-5, loss=0.69), LEDGER, names=n),
        lambda c, n: [p.parse_train_reply(c, names=n), p.parse_ledger(c, names=n)],
    ),
    "train-refusal": (
        [p.TrainRefusal("budget", 7.5, 1e-5, epsilon_would_reach=8.5)],
        lambda n: p.build_train_refusal(p.TrainRefusal("budget", 7.5, 1e-5, 8.5), names=n),
        lambda c, n: [p.parse_train_reply(c, names=n)],
    ),
    "evaluate-task": (
        [p.EvaluateTask(MODEL, "test", 9, export_top_k=True, run="run#1-ab", ledger_head=4)],
        lambda n: p.build_evaluate_task(p.EvaluateTask(MODEL, "test", 9, True, "run#1-ab", 4), names=n),
        lambda c, n: [p.parse_evaluate_task(c, names=n)],
    ),
    "evaluate-result": (
        [p.EvaluateResult(1.0, 0.5, 1.0, 0.63, 2.5, top_k=(4, 8, 15), tier=2)],
        lambda n: p.build_evaluate_result(p.EvaluateResult(1.0, 0.5, 1.0, 0.63, 2.5, (4, 8, 15), 2), names=n),
        lambda c, n: [p.parse_evaluate_reply(c, names=n)],
    ),
    "evaluate-private": (
        [p.EvaluatePrivate((0.3, -1.2, 4.0, 0.0, 1.5), 2.5, 1e-5), LEDGER],
        lambda n: p.build_evaluate_private(p.EvaluatePrivate((0.3, -1.2, 4.0, 0.0, 1.5), 2.5, 1e-5), LEDGER, names=n),
        lambda c, n: [p.parse_evaluate_reply(c, names=n), p.parse_ledger(c, kind="evaluate-private", names=n)],
    ),
    "evaluate-declined": (
        [p.EvaluateDeclined("max-evaluations-per-day = 2")],
        lambda n: p.build_evaluate_declined(p.EvaluateDeclined("max-evaluations-per-day = 2"), names=n),
        lambda c, n: [p.parse_evaluate_reply(c, names=n)],
    ),
    "discovery": (
        [p.Discovery()],
        lambda n: p.build_discovery(names=n),
        lambda c, n: [p.parse_query(c, names=n)],
    ),
    "identity": (
        [IDENTITY],
        lambda n: p.build_identity(IDENTITY, names=n),
        lambda c, n: [p.parse_identity(c, names=n)],
    ),
    "ledger-query": (
        [p.LedgerQuery(6)],
        lambda n: p.build_ledger_query(p.LedgerQuery(6), names=n),
        lambda c, n: [p.parse_query(c, names=n)],
    ),
    "ledger-reply": (
        [IDENTITY, LEDGER],
        lambda n: p.build_identity(IDENTITY, LEDGER, names=n),
        lambda c, n: [
            p.parse_identity(c, kind="ledger-reply", names=n),
            p.parse_ledger(c, kind="ledger-reply", names=n),
        ],
    ),
}
SECURE_TASK = p.SecureTrainTask(MODEL, 3, 17, b"s" * 16, (1, 4, 9), 64, 32, 2, 2, 2, run="run#1-ab", ledger_head=5)
SECURE_ADVERT = p.SecureAdvertisement(b"a" * 32, b"b" * 32, b"c" * 32, "sig")
SECURE_ROSTER = p.SecureRoster(b"s" * 16, (1, 4), (b"a", b"b"), (b"c", b"d"), (b"e", b"f"), ("s1", "s2"), ("k1", "k2"))
SECURE_SHARES = p.SecureShares((4, 9), (b"n" * 12, b"m" * 12), (b"x", b"y"))
SECURE_DELIVERY = p.SecureDelivery(b"s" * 16, (4, 9), (b"n" * 12, b"m" * 12), (b"x", b"y"))
SECURE_MASKED = p.SecureMasked(b"\x01\x00\x00\x00" * 4)
SECURE_UNMASK = p.SecureUnmask(b"s" * 16, (1, 4), (9,))
SECURE_UNMASK_REPLY = p.SecureUnmaskReply((4,), (b"q" * 17,), (9,), (b"r" * 17,))
EXAMPLES.update(
    {
        "secure-train-task": (
            [SECURE_TASK],
            lambda n: p.build_secure_train_task(SECURE_TASK, names=n),
            lambda c, n: [p.parse_secure_train_task(c, names=n)],
        ),
        "secure-advertisement": (
            [SECURE_ADVERT],
            lambda n: p.build_secure_reply(SECURE_ADVERT, names=n),
            lambda c, n: [p.parse_secure_reply(c, p.SECURE_ADVERTISEMENT, names=n)],
        ),
        "secure-declined": (
            [p.SecureDeclined("bad share")],
            lambda n: p.build_secure_reply(p.SecureDeclined("bad share"), names=n),
            lambda c, n: [p.parse_secure_reply(c, p.SECURE_SHARES, names=n)],
        ),
        "secure-roster": (
            [SECURE_ROSTER],
            lambda n: p.build_secure_roster(SECURE_ROSTER, names=n),
            lambda c, n: [p.parse_secure_roster(c, names=n)],
        ),
        "secure-shares": (
            [SECURE_SHARES],
            lambda n: p.build_secure_reply(SECURE_SHARES, names=n),
            lambda c, n: [p.parse_secure_reply(c, p.SECURE_SHARES, names=n)],
        ),
        "secure-delivery": (
            [SECURE_DELIVERY],
            lambda n: p.build_secure_delivery(SECURE_DELIVERY, names=n),
            lambda c, n: [p.parse_secure_delivery(c, names=n)],
        ),
        "secure-masked": (
            [SECURE_MASKED, LEDGER],
            lambda n: p.build_secure_reply(SECURE_MASKED, LEDGER, names=n),
            lambda c, n: [
                p.parse_secure_reply(c, p.SECURE_MASKED, names=n),
                p.parse_ledger(c, kind="secure-masked", names=n),
            ],
        ),
        "secure-unmask": (
            [SECURE_UNMASK],
            lambda n: p.build_secure_unmask(SECURE_UNMASK, names=n),
            lambda c, n: [p.parse_secure_unmask(c, names=n)],
        ),
        "secure-unmask-reply": (
            [SECURE_UNMASK_REPLY],
            lambda n: p.build_secure_reply(SECURE_UNMASK_REPLY, names=n),
            lambda c, n: [p.parse_secure_reply(c, p.SECURE_UNMASK_REPLY, names=n)],
        ),
    }
)
SECAGG = p.SecAggFitConfig(("a.weight", "b.bias"), run="run#1-ab", version=2, task_seed=40)
RECORD_KINDS = [spec for spec in p.MESSAGES if spec.kind in EXAMPLES]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Flower stamps a new Message with the running task's identity (as a ClientApp's would have).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def test_every_message_kind_has_an_example_here() -> None:
    assert {s.kind for s in p.MESSAGES} == set(EXAMPLES) | {p.SECAGG_FIT_CONFIG.kind}


@pytest.mark.parametrize("spec", RECORD_KINDS, ids=lambda s: s.kind)
def test_every_message_kind_round_trips_with_exactly_its_registered_keys(spec: p.MessageSpec) -> None:
    parts, build, parse = EXAMPLES[spec.kind]
    content = build(p.RECORDS)
    assert parse(content, p.RECORDS) == parts
    # A Message works as well as its RecordDict.
    message = Message(content, dst_node_id=1, message_type=spec.message_type)
    assert parse(message, p.RECORDS) == parts  # type: ignore[arg-type]
    expected = {r.name(): {k.name for k in r.keys} for r in spec.records}
    on_wire = {name: set(record) for name, record in content.items()}
    for record in spec.records:
        if record.type == "array":
            on_wire[record.name()] = set()  # an array record is the parameters, named by the model
    assert on_wire == expected
    kinds = {"array": content.array_records, "config": content.config_records, "metric": content.metric_records}
    for record in spec.records:
        assert record.name() in kinds[record.type], (spec.kind, record.name())


def test_optional_keys_and_records_stay_off_the_wire_when_unset() -> None:
    update = p.build_train_update(p.TrainUpdate(DELTA, 3, 1.25, 1e-5), LEDGER)
    assert "loss" not in update.metric_records["metrics"]
    assert p.parse_train_reply(update) == p.TrainUpdate(DELTA, 3, 1.25, 1e-5, loss=None)
    result = p.build_evaluate_result(p.EvaluateResult(1.0, 0.5, 1.0, 0.63, 2.5))
    assert set(result) == {"metrics"}
    assert p.parse_evaluate_reply(result) == p.EvaluateResult(1.0, 0.5, 1.0, 0.63, 2.5, top_k=None)
    minimal = RecordDict({"global": MODEL, "config": ConfigRecord({"version": 0, "task-seed": 3})})
    assert p.parse_train_task(minimal) == p.TrainTask(MODEL, 0, 3, run="", ledger_head=-1)
    assert p.parse_identity(RecordDict({"status": ConfigRecord({"device-id": 2})})) == p.Identity(2, None)
    # Records and keys a side does not know are ignored (a query carrying a model is still a discovery).
    assert p.parse_query(minimal) == p.Discovery()


def test_record_names_are_parameters_like_flowers_strategies() -> None:
    names = p.RecordNames(model="weights", config="task", update="update", metrics="numbers", ledger="receipts")
    for spec in RECORD_KINDS:
        parts, build, parse = EXAMPLES[spec.kind]
        content = build(names)
        assert parse(content, names) == parts
        assert set(content) == {r.name(names) for r in spec.records}
    task = p.build_train_task(p.TrainTask(MODEL, 1, 2), names=names)
    assert set(task) == {"weights", "task"}
    with pytest.raises(p.ProtocolError, match="'global'"):
        p.parse_train_task(task)  # the default names do not find them


def test_the_secagg_fit_config_round_trips_and_its_parts_compose() -> None:
    built = p.build_secagg_fit_config(SECAGG)
    assert p.parse_secagg_fit_config(built) == SECAGG
    assert set(built) == {k.name for r in p.SECAGG_FIT_CONFIG.records for k in r.keys}
    composed = p.with_param_keys(
        {**p.secagg_round_config("run#1-ab", 2), **p.secagg_task_config(40)}, ["a.weight", "b.bias"]
    )
    assert composed == built
    # Flower's own keys in the same config are ignored; fedrec's optional ones may be absent.
    assert p.parse_secagg_fit_config({**p.with_param_keys({}, ["w"]), "flower-key": 1.0}) == p.SecAggFitConfig(("w",))
    with pytest.raises(p.ProtocolError, match="secagg-fit-config.*reserved"):
        p.with_param_keys(built, ["w"])
    with pytest.raises(p.ProtocolError, match="secagg-fit-config message, key 'version'"):
        p.SecAggFitConfig(("w",), task_seed=1).release_ids()
    assert SECAGG.release_ids() == (2, 40)


def _required(spec: p.MessageSpec) -> list[tuple[p.RecordSpec, p.Key | None]]:
    """Every required record (key None) and every required key of a present record."""
    out: list[tuple[p.RecordSpec, p.Key | None]] = []
    for record in spec.records:
        if not record.optional:
            out.append((record, None))
        out.extend((record, key) for key in record.keys if not key.optional)
    return out


def _cases() -> list[tuple[str, p.RecordSpec, p.Key | None]]:
    # A query without a ledger head is a discovery, not a malformed ledger query (tested below).
    return [(s.kind, record, key) for s in RECORD_KINDS if s is not p.LEDGER_QUERY for record, key in _required(s)]


# Without its status record an evaluation reply reads as a result, which then lacks its metrics.
_READS_AS = {
    ("evaluate-declined", "status", "record"): ("evaluate-result", "metrics"),
    ("evaluate-private", "status", "record"): ("evaluate-result", "hit"),
}


def _reparse(kind: str, content: RecordDict) -> None:
    EXAMPLES[kind][2](content, p.RECORDS)


@pytest.mark.parametrize(
    ("kind", "record", "key"), _cases(), ids=lambda v: v if isinstance(v, str) else getattr(v, "name", None)
)
def test_a_missing_record_or_key_raises_one_error_naming_kind_and_key(
    kind: str, record: p.RecordSpec, key: p.Key | None
) -> None:
    content = EXAMPLES[kind][1](p.RECORDS)
    name = record.name()
    if key is None:
        del content[name]
        missing = name
    else:
        del content[name][key.name]
        missing = key.name
    kind, missing = _READS_AS.get((kind, missing, "record" if key is None else "key"), (kind, missing))
    with pytest.raises(p.ProtocolError) as caught:
        _reparse(kind, content)
    error = caught.value
    assert isinstance(error, ValueError)  # callers that catch ValueError keep working
    assert error.key == missing and repr(missing) in str(error)
    # The kind is named: the kind itself, or both candidates while the status is not yet known.
    assert kind in error.kind.split("/") and error.kind in str(error)


@pytest.mark.parametrize(
    ("kind", "record", "key"),
    [c for c in _cases() if c[2] is not None and c[2].fixed is None],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "name", None),
)
def test_a_mistyped_value_raises_one_error_naming_kind_and_key(kind: str, record: p.RecordSpec, key: p.Key) -> None:
    content = EXAMPLES[kind][1](p.RECORDS)
    wrong: dict[str, Any] = {
        "int": 1.5,
        "float": "1.0",
        "str": 3,
        "bool": 1,
        "int-list": ["4"],
        "str-list": [1],
        "bytes": "text",
        "bytes-list": ["text"],
    }
    target = content[record.name()]
    if isinstance(target, MetricRecord):
        # A metric record holds numbers or lists of them: the other of the two is the wrong type.
        target[key.name] = 1.0 if key.type == "float-list" else [1.0, 2.0]
    else:
        target[key.name] = wrong[key.type]
    with pytest.raises(p.ProtocolError) as caught:
        _reparse(kind, content)
    assert caught.value.key == key.name and kind in caught.value.kind.split("/")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.5, True, "3"])
def test_integers_must_be_integers(value: object) -> None:
    content = RecordDict({"global": MODEL, "config": ConfigRecord({"version": value, "task-seed": 1})})
    with pytest.raises(p.ProtocolError, match="train-task message, key 'version'"):
        p.parse_train_task(content)


def test_a_query_without_a_ledger_head_is_a_discovery() -> None:
    assert p.parse_query(RecordDict({"config": ConfigRecord({"split": "valid"})})) == p.Discovery()
    with pytest.raises(p.ProtocolError, match="ledger-query message, key 'ledger-head'"):
        p.parse_query(RecordDict({"config": ConfigRecord({"ledger-head": "3"})}))


def test_replies_are_told_apart_by_their_status_and_an_unknown_one_is_refused() -> None:
    update = p.build_train_update(p.TrainUpdate(DELTA, 3, 1.25, 1e-5), LEDGER)
    update.config_records["status"] = ConfigRecord({"status": "maybe"})
    with pytest.raises(p.ProtocolError, match="train-update/train-refusal message, key 'status': unknown"):
        p.parse_train_reply(update)
    declined = p.build_evaluate_declined(p.EvaluateDeclined("no"))
    declined.config_records["status"] = ConfigRecord({"status": "later"})
    with pytest.raises(p.ProtocolError, match="key 'status': unknown status 'later'"):
        p.parse_evaluate_reply(declined)
    with pytest.raises(p.ProtocolError, match="key 'status'"):
        p.parse_train_reply(RecordDict({"metrics": MetricRecord({"epsilon": 1.0})}))


def test_a_record_of_the_wrong_type_is_named() -> None:
    content = p.build_train_task(p.TrainTask(MODEL, 1, 2))
    content["config"] = MetricRecord({"version": 1, "task-seed": 2})
    with pytest.raises(p.ProtocolError, match="train-task message, key 'config': expected a config record"):
        p.parse_train_task(content)


def test_an_error_reply_is_not_content() -> None:
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=2, dst_node_id=0, reply_to_message_id="m", group_id="", created_at=0.0,
        ttl=10.0, message_type=MessageType.TRAIN,
    )  # fmt: skip
    reply = Message(metadata=metadata, error=Error(code=0, reason="device crashed"))
    with pytest.raises(p.ProtocolError, match="device crashed"):
        p.parse_train_reply(reply)


def test_sending_a_wrong_type_fails_on_the_sending_side() -> None:
    with pytest.raises(p.ProtocolError, match="train-task message, key 'run'"):
        p.build_train_task(p.TrainTask(MODEL, 1, 2, run=5))  # type: ignore[arg-type]
    with pytest.raises(p.ProtocolError, match="evaluate-task message, key 'export-top-k'"):
        p.build_evaluate_task(p.EvaluateTask(MODEL, "valid", 1, export_top_k="yes"))  # type: ignore[arg-type]
    with pytest.raises(p.ProtocolError, match="key 'global'"):
        p.build_train_task(p.TrainTask({"w": torch.zeros(1)}, 1, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- one home per key

# Literals equal to a wire key that mean something else in their module (module -> literals).
# A wire key must be spelled in shared/protocol.py only; these are other vocabularies that
# happen to share a word with it. Each entry must still occur (a stale one fails below).
ELSEWHERE: dict[str, frozenset[str]] = {
    # The run configuration's own keys (pyproject.toml [tool.flwr.app.config], --set).
    "shared/config.py": frozenset({"delta", "top-k", "export-top-k"}),
    # A run-config key; the summary's and the audit report's fields.
    "simulations/canary_audit.py": frozenset({"export-top-k", "config", "delta"}),
    # Field names of file formats: a signed ledger entry, the Renyi filter's saved state, the
    # partition files, a SecAgg+ contribution receipt, global_model.pt, summary.json, the audit report.
    "shared/privacy/ledger.py": frozenset({"delta", "epsilon", "steps"}),
    "shared/privacy/user_level.py": frozenset({"delta", "version"}),
    "shared/data/partition.py": frozenset({"items", "split", "version"}),
    "client/receipts.py": frozenset({"delta", "run", "version"}),
    "client/cli_device.py": frozenset({"version"}),
    "server/reporting.py": frozenset({"config", "delta", "split", "top-k", "version"}),
    "server/audit/report.py": frozenset({"delta", "run"}),  # a finding's device column: "run" for the whole run
    # The ledger entry fields a spending row copies; the summary's config section.
    "server/audit/checks.py": frozenset({"delta", "epsilon", "steps"}),
    "server/audit/source.py": frozenset({"config"}),
    # An argument's name in the Skellam accountant's error messages.
    "shared/privacy/skellam.py": frozenset({"epsilon"}),
    "simulations/cli.py": frozenset({"config", "delta"}),  # the `fedrec simulate config` command; summary field
    "simulations/runner.py": frozenset({"export-top-k"}),  # the run-config key, set for simulations
    # Run-config keys that share a wire key's spelling, named in the keys' help text.
    "simulations/config_help.py": frozenset({"delta", "top-k", "export-top-k"}),
    # Database columns of the run store.
    "server/run_store.py": frozenset({"config", "split", "status", "version"}),
    # The `flwr supernode list` JSON field, and a table header naming it.
    "server/device_registry.py": frozenset({"status"}),
    "server/cli_deploy.py": frozenset({"status"}),
    # Flower's node config key that names the device (the identity reply reports it under the same name).
    "client/node_config.py": frozenset({"device-id"}),
    # Flower's Error fields, in the wire log's own JSON.
    "client/wire_log.py": frozenset({"reason"}),
}


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _literal_homes() -> dict[str, dict[str, list[int]]]:
    """module -> wire key -> lines, for every wire key spelled as a string literal outside the protocol."""
    keys = p.wire_keys()
    found: dict[str, dict[str, list[int]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            if module == "shared/protocol.py":
                continue
            for line, value in _string_literals(path):
                if value in keys:
                    found.setdefault(module, {}).setdefault(value, []).append(line)
    return found


def test_every_wire_key_is_spelled_in_the_protocol_module_only() -> None:
    strays = [
        f"{module}:{lines[0]} spells {key!r}"
        for module, by_key in _literal_homes().items()
        for key, lines in by_key.items()
        if key not in ELSEWHERE.get(module, frozenset())
    ]
    assert not strays, "wire keys belong to shared/protocol.py (use its build/parse functions): " + "; ".join(strays)


def test_the_allowlist_of_other_meanings_stays_minimal() -> None:
    homes = _literal_homes()
    stale = [
        f"{m}: {sorted(lits - set(homes.get(m, {})))}" for m, lits in ELSEWHERE.items() if lits - set(homes.get(m, {}))
    ]
    assert not stale, "remove these entries from ELSEWHERE (the literal is gone): " + "; ".join(stale)
    assert not set(ELSEWHERE) & {"server/federation.py", "client/app.py", "server/grid_driver.py", "server/spending.py"}


# ---------------------------------------------------------------------- the docs table

_RECORD = re.compile(r"^`(?P<name>[^`]+)`(?P<opt>\?)? \((?P<type>[a-z ]+)\)(?:: (?P<keys>.+))?$")
_KEY = re.compile(r"^`(?P<name>[^`]+)`(?P<opt>\?)?(?: = `(?P<fixed>[^`]+)`)?$")
_TYPES = {"arrays": "array", "config": "config", "metrics": "metric", "legacy config": "legacy-config"}


def _docs_table() -> dict[str, tuple[str, str, list[tuple[str, bool, str, list[tuple[str, bool, str | None]]]]]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## What crosses the wire, and what never does", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        kind, message_type, direction, records = cells[0].strip("`"), cells[1].strip("`"), cells[2], cells[3]
        parsed = []
        for chunk in [] if records == "—" else records.split("; "):
            match = _RECORD.match(chunk)
            assert match, f"{kind}: cannot read record {chunk!r}"
            keys = []
            for key_text in (match["keys"] or "").split(", ") if match["keys"] else []:
                key = _KEY.match(key_text)
                assert key, f"{kind}: cannot read key {key_text!r}"
                keys.append((key["name"], bool(key["opt"]), key["fixed"]))
            parsed.append((match["name"], bool(match["opt"]), _TYPES[match["type"]], keys))
        assert kind not in table, f"{kind} listed twice"
        table[kind] = (message_type, direction, parsed)
    return table


def test_the_architecture_docs_show_the_protocols_message_table() -> None:
    table = _docs_table()
    registry = {
        spec.kind: (
            str(spec.message_type),
            spec.direction.value,
            [(r.name(), r.optional, r.type, [(k.name, k.optional, k.fixed) for k in r.keys]) for r in spec.records],
        )
        for spec in p.MESSAGES
    }
    assert list(table) == list(registry), "the docs table lists other message kinds, or another order"
    for kind, row in registry.items():
        assert table[kind] == row, f"docs/architecture.md disagrees with shared/protocol.py on {kind}"


def test_the_registry_is_consistent() -> None:
    for spec in p.MESSAGES:
        assert spec.direction in p.Direction
        for part in spec.parts:
            assert dataclasses.is_dataclass(part.cls) and part.cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert len({s.kind for s in p.MESSAGES}) == len(p.MESSAGES)
    assert "FitIns.config" not in p.wire_keys()  # a label of Flower's record, not a key of fedrec's
