"""Tests for the results database (real SQLite files) and its plots."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.schema import CreateTable

from server.plots import plot_accuracy_vs_time, plot_comparison, plot_epsilon_distribution
from server.run_store import (
    FLUSH_EVERY,
    TABLES,
    EvalRecord,
    PrivacyRecord,
    RunStore,
    TaskRecord,
    VersionRecord,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # Nested on purpose: the store must create the parent directories.
    return tmp_path / "nested" / "dir" / "run.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[RunStore]:
    with RunStore(_url(db_path)) as opened:
        yield opened


def _task(task_id: int, device_id: int = 0, status: str = "accepted") -> TaskRecord:
    accepted = status == "accepted"
    return TaskRecord(
        task_id=task_id,
        device_id=device_id,
        base_version=task_id // 2,
        dispatched_at=1.5 * task_id,
        finished_at=1.5 * task_id + 0.25,
        status=status,
        staleness=1 if accepted else None,
        applied_version=task_id // 2 + 1 if accepted else None,
        loss=0.125 * task_id if accepted else None,
    )


def _version(version: int) -> VersionRecord:
    return VersionRecord(
        version=version,
        sim_time=10.0 * version,
        wall_time=0.5 * version,
        num_updates=4,
        mean_staleness=1.25,
        max_staleness=3,
    )


def _eval(version: int, split: str = "valid", coverage: float | None = 0.4) -> EvalRecord:
    return EvalRecord(
        version=version,
        sim_time=10.0 * version,
        wall_time=0.5 * version,
        split=split,
        users=100,
        hr=0.1 + 0.01 * version,
        ndcg=0.05 + 0.01 * version,
        sampled_hr=0.5 + 0.01 * version,
        sampled_ndcg=0.3 + 0.01 * version,
        coverage=coverage,
        k=10,
    )


def _privacy(device_id: int, task_id: int, epsilon: float, status: str = "spent") -> PrivacyRecord:
    return PrivacyRecord(
        device_id=device_id,
        task_id=task_id,
        version=task_id,
        epsilon=epsilon,
        delta=1e-5,
        noise_multiplier=1.1,
        sample_rate=0.02,
        steps=50,
        clip_norm=1.0,
        accountant="rdp",
        status=status,
    )


# ----------------------------------------------------------------------- round trips


def test_run_metadata_round_trips_with_utc_timestamps(store: RunStore) -> None:
    config = {"dataset": "ml-100k", "epsilon-budget": float("inf"), "layers": [64, 32]}

    run_id = store.start_run("baseline", seed=7, config=config)
    unfinished = store.run_info(run_id)
    store.finish_run(run_id, {"final-ndcg": 0.25, "devices": 3})
    finished = store.run_info(run_id)

    assert unfinished.name == "baseline"
    assert unfinished.seed == 7
    # Non-finite floats are stored as strings: strict JSON backends reject Infinity.
    assert unfinished.config == {"dataset": "ml-100k", "epsilon-budget": "inf", "layers": [64, 32]}
    assert unfinished.summary is None
    assert unfinished.finished_at is None
    assert store.run_summary(run_id) == {"final-ndcg": 0.25, "devices": 3}
    assert finished.started_at.tzinfo == UTC
    assert finished.finished_at is not None
    assert finished.finished_at.tzinfo == UTC
    assert finished.finished_at >= finished.started_at


def test_every_record_type_round_trips(store: RunStore) -> None:
    run_id = store.start_run("r", seed=0, config={})
    tasks = [_task(0), _task(1, device_id=3, status="rejected-stale"), _task(2, device_id=4, status="refused")]
    versions = [_version(1), _version(2)]
    evals = [_eval(1), _eval(2, split="test", coverage=None)]
    privacy = [_privacy(3, 1, 0.5), _privacy(4, 2, 0.7, status="refused")]

    # Added out of order to check the readers' ordering.
    for record in reversed(tasks):
        store.add_task(run_id, record)
    for version_record in reversed(versions):
        store.add_version(run_id, version_record)
    for eval_record in reversed(evals):
        store.add_evaluation(run_id, eval_record)
    for privacy_record in privacy:
        store.add_privacy(run_id, privacy_record)

    assert store.tasks(run_id) == tasks
    assert store.versions(run_id) == versions
    assert store.evaluations(run_id) == evals
    assert store.evaluations(run_id, split="test") == [evals[1]]
    assert store.privacy_records(run_id) == privacy
    assert store.privacy_records(run_id, device_id=4) == [privacy[1]]


def test_device_epsilons_takes_latest_spent_row_and_ignores_refused(store: RunStore) -> None:
    run_id = store.start_run("dp", seed=0, config={})
    rows = [
        _privacy(1, 0, 0.4),
        _privacy(2, 1, 0.3),
        _privacy(1, 2, 0.9),
        _privacy(1, 3, 5.0, status="refused"),  # would exceed the budget: not spent
        _privacy(2, 4, 0.6),
        _privacy(3, 5, 2.0, status="refused"),  # never released anything
    ]
    for row in rows:
        store.add_privacy(run_id, row)

    epsilons = store.device_epsilons(run_id)

    assert epsilons == {1: 0.9, 2: 0.6}


# ------------------------------------------------------------------------- buffering


def test_rows_are_buffered_until_flush(db_path: Path) -> None:
    writer = RunStore(_url(db_path))
    reader = RunStore(_url(db_path))
    run_id = writer.start_run("buffered", seed=0, config={})
    writer.add_task(run_id, _task(0))
    writer.add_version(run_id, _version(1))

    before = reader.tasks(run_id), reader.versions(run_id)
    writer.flush()
    after = reader.tasks(run_id), reader.versions(run_id)

    assert before == ([], [])
    assert after == ([_task(0)], [_version(1)])
    writer.close()
    reader.close()


def test_close_flushes_and_a_new_store_reads_everything_back(db_path: Path) -> None:
    with RunStore(_url(db_path)) as writer:
        run_id = writer.start_run("persisted", seed=3, config={"a": 1})
        for task_id in range(10):
            writer.add_task(run_id, _task(task_id))
        writer.add_evaluation(run_id, _eval(1))
        writer.add_privacy(run_id, _privacy(0, 0, 0.2))

    with RunStore(_url(db_path)) as reopened:
        assert reopened.run_ids() == [run_id]
        assert reopened.tasks(run_id) == [_task(i) for i in range(10)]
        assert reopened.evaluations(run_id) == [_eval(1)]
        assert reopened.device_epsilons(run_id) == {0: 0.2}
        assert reopened.run_summary(run_id) is None


def test_buffer_is_flushed_automatically_when_full(db_path: Path) -> None:
    with RunStore(_url(db_path)) as writer, RunStore(_url(db_path)) as reader:
        run_id = writer.start_run("auto", seed=0, config={})
        for task_id in range(FLUSH_EVERY - 1):
            writer.add_task(run_id, _task(task_id))
        not_yet = len(reader.tasks(run_id))
        writer.add_task(run_id, _task(FLUSH_EVERY - 1))
        flushed = len(reader.tasks(run_id))

    assert not_yet == 0
    assert flushed == FLUSH_EVERY


def test_thousands_of_rows_are_cheap(store: RunStore) -> None:
    run_id = store.start_run("bulk", seed=0, config={})
    tasks = [_task(i, device_id=i % 50) for i in range(2000)]
    privacy = [_privacy(i % 50, i, 0.001 * i) for i in range(2000)]

    start = time.perf_counter()
    for task, release in zip(tasks, privacy, strict=True):
        store.add_task(run_id, task)
        store.add_privacy(run_id, release)
    store.flush()
    elapsed = time.perf_counter() - start

    assert elapsed < 1.0, f"4000 buffered rows took {elapsed:.2f}s"
    assert len(store.tasks(run_id)) == 2000


# ----------------------------------------------------------------- isolation, errors


def test_two_runs_in_one_database_are_kept_apart(store: RunStore) -> None:
    first = store.start_run("first", seed=1, config={"mode": "async"})
    second = store.start_run("second", seed=2, config={"mode": "sync"})
    store.add_task(first, _task(0, device_id=1))
    store.add_task(second, _task(0, device_id=2))
    store.add_privacy(first, _privacy(1, 0, 0.5))
    store.add_privacy(second, _privacy(1, 0, 0.8))
    store.add_evaluation(second, _eval(1))
    store.finish_run(first, {"run": "first"})

    assert store.run_ids() == [first, second]
    assert store.tasks(first) == [_task(0, device_id=1)]
    assert store.tasks(second) == [_task(0, device_id=2)]
    assert store.device_epsilons(first) == {1: 0.5}
    assert store.device_epsilons(second) == {1: 0.8}
    assert store.evaluations(first) == []
    assert store.run_summary(first) == {"run": "first"}
    assert store.run_summary(second) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: _task(0, status="ok"),
        lambda: _privacy(0, 0, 0.1, status="pending"),
        lambda: _eval(0, split="train"),
    ],
    ids=["task-status", "privacy-status", "eval-split"],
)
def test_invalid_status_or_split_is_rejected(make: object) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        make()  # type: ignore[operator]


def test_unknown_run_id_raises_key_error(store: RunStore) -> None:
    store.start_run("only", seed=0, config={})

    with pytest.raises(KeyError, match="unknown run_id 99"):
        store.add_task(99, _task(0))
    with pytest.raises(KeyError):
        store.evaluations(99)
    with pytest.raises(KeyError):
        store.finish_run(99, {})
    with pytest.raises(KeyError):
        store.run_summary(99)


def test_non_json_config_is_rejected(store: RunStore) -> None:
    with pytest.raises(TypeError, match=r"config\.bad"):
        store.start_run("bad", seed=0, config={"bad": object()})


@pytest.mark.parametrize("dialect", [postgresql.dialect(), mysql.dialect()], ids=["postgresql", "mysql"])
def test_schema_compiles_for_other_backends(dialect: object) -> None:
    ddl = [str(CreateTable(row.__table__).compile(dialect=dialect)) for row in TABLES]  # type: ignore[arg-type]

    assert len(ddl) == 6
    assert any("ck_tasks_status" in statement for statement in ddl)
    assert any("fk_privacy_spending_run_id_runs" in statement for statement in ddl)


# ----------------------------------------------------------------------------- plots


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def test_accuracy_plot_writes_png(tmp_path: Path) -> None:
    evals = [_eval(v) for v in range(1, 6)] + [_eval(v, split="test") for v in (2, 5)]

    out = plot_accuracy_vs_time(evals, tmp_path / "figs" / "acc.png", title="run 1")

    assert out == tmp_path / "figs" / "acc.png"
    _assert_png(out)


def test_epsilon_plot_writes_png(tmp_path: Path) -> None:
    epsilons = [0.5, 0.9, 1.2, 1.2, 2.0, float("inf")]

    out = plot_epsilon_distribution(epsilons, tmp_path / "eps.png", budget=2.0, delta=1e-5)

    _assert_png(out)


def test_comparison_plot_writes_png(tmp_path: Path) -> None:
    curves = {"async": [(0.0, 0.0), (20.0, 0.2), (10.0, 0.1)], "sync": [(0.0, 0.0), (40.0, 0.2)]}

    out = plot_comparison(curves, tmp_path / "cmp.png", ylabel="NDCG@10", target=0.15)

    _assert_png(out)


def test_plots_with_empty_input_show_no_data_instead_of_failing(tmp_path: Path) -> None:
    outputs = [
        plot_accuracy_vs_time([], tmp_path / "acc.png"),
        plot_epsilon_distribution([], tmp_path / "eps.png", budget=None, delta=1e-5),
        plot_comparison({}, tmp_path / "cmp.png", ylabel="NDCG@10"),
        plot_comparison({"async": []}, tmp_path / "cmp_empty_curve.png", ylabel="NDCG@10", target=0.1),
    ]

    for out in outputs:
        _assert_png(out)
