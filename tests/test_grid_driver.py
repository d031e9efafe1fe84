"""The server's message window over a Flower Grid: bounded, ordered, one message per device, lossless."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from server.grid_driver import GridDriver
from server.run_store import RunStore
from shared.typed_fields import get_int
from simulations.local_grid import LocalGrid
from simulations.runner import simulate


def _echo_app(seen: list[tuple[int, int]]) -> ClientApp:
    """A ClientApp answering queries with its device id, recording (device, n) in arrival order."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        device = int(context.node_config["partition-id"])
        conf = msg.content.config_records.get("config")
        n = get_int(conf, "n") if conf is not None else -1
        if n >= 0:
            seen.append((device, n))
        return Message(RecordDict({"status": ConfigRecord({"device-id": device, "n": n})}), reply_to=msg)

    return app


class _RecordingGrid(LocalGrid):
    """The in-process Grid, recording what is pushed and how many pushed messages await a pull."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.pushed: list[int] = []
        self.max_outstanding = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            conf = msg.content.config_records.get("config")
            if conf is not None:
                self.pushed.append(get_int(conf, "n"))
        ids = super().push_messages(messages)
        self.max_outstanding = max(self.max_outstanding, len(self._queued))
        return ids


def _content(n: int) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"n": n})})


def _driver(grid: LocalGrid, window: int | None, **kwargs: Any) -> GridDriver:
    driver = GridDriver(grid, wall_timeout=30.0, poll_interval=0.001, max_in_flight=window, **kwargs)
    driver.discover(len(list(grid.get_node_ids())), timeout=10.0)
    return driver


def test_the_window_bounds_pushed_messages_and_releases_them_by_priority() -> None:
    seen: list[tuple[int, int]] = []
    grid = _RecordingGrid(_echo_app(seen), 6)
    driver = _driver(grid, window=2)
    assert grid.max_outstanding <= 2  # discovery is windowed too
    priorities = {0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0, 5: 0.0}
    handles = {n: driver.send(n, _content(n), MessageType.QUERY, priority=p) for n, p in priorities.items()}
    # The first two fill the window in sending order; the rest wait, lowest priority first.
    assert grid.pushed == [0, 1]
    for n in (0, 1, 5, 4, 3, 2):
        reply = driver.wait(handles[n])
        assert reply is not None and get_int(reply.content.config_records["status"], "n") == n
    assert grid.pushed == [0, 1, 5, 4, 3, 2]
    assert grid.max_outstanding <= 2
    assert driver.wait(handles[0]) is None  # already collected


def test_a_device_gets_its_messages_one_at_a_time_in_sending_order() -> None:
    seen: list[tuple[int, int]] = []
    grid = _RecordingGrid(_echo_app(seen), 2)
    driver = _driver(grid, window=None)
    first = driver.send(0, _content(1), MessageType.QUERY, priority=9.0)
    second = driver.send(0, _content(2), MessageType.QUERY, priority=0.0)  # must not overtake
    other = driver.send(1, _content(3), MessageType.QUERY)
    assert grid.pushed == [1, 3]  # device 0's second message waits for its first reply
    reply = driver.wait(second)
    assert reply is not None and get_int(reply.content.config_records["status"], "n") == 2
    assert [n for d, n in seen if d == 0] == [1, 2]
    assert driver.wait(first) is not None and driver.wait(other) is not None


def test_a_discarded_message_not_yet_pushed_still_reaches_its_device() -> None:
    """A lost task still trains on the device: its reply must reach the late-reply hook."""
    seen: list[tuple[int, int]] = []
    late: list[tuple[int, int]] = []
    grid = _RecordingGrid(_echo_app(seen), 3)

    def on_late(device: int, reply: Message) -> None:
        late.append((device, get_int(reply.content.config_records["status"], "n")))

    driver = _driver(grid, window=1, on_late_reply=on_late)
    kept = driver.send(0, _content(10), MessageType.QUERY, priority=0.0)
    dropped = driver.send(1, _content(11), MessageType.QUERY, priority=1.0)
    assert grid.pushed == [10]
    driver.discard(dropped)
    assert driver.wait(kept) is not None
    driver.drain()
    assert (1, 11) in seen
    assert late == [(1, 11)]


def _run(tmp: Path, name: str, window: int) -> tuple[dict[str, Any], dict[int, float]]:
    overrides = {
        "dataset": "synthetic",
        "synthetic-users": 10,
        "synthetic-items": 60,
        "synthetic-interactions": 30,
        "cache-dir": str(tmp / "cache"),
        "embedding-dim": 8,
        "mlp-layers": "8",
        "num-negatives": 4,
        "local-steps": 3,
        "batch-size": 4,
        "concurrency": 6,
        "buffer-size": 3,
        "num-versions": 5,
        "eval-every": 2,
        "eval-devices": 5,
        "output-dir": str(tmp / name),
        "epsilon-budget": 30.0,
        "dropout-rate": 0.3,
        "max-in-flight": window,
    }
    summary = json.loads(json.dumps(simulate(overrides, backend="local")))
    for key in ("time", "outputs"):
        summary.pop(key)
    for key in ("output-dir", "max-in-flight"):
        summary["config"].pop(key)
    store = RunStore(f"sqlite:///{tmp / name / 'fedrec.db'}")
    try:
        spending = store.device_epsilons(store.run_ids()[-1])
    finally:
        store.close()
    return summary, spending


def test_the_window_changes_no_number_of_a_run(tmp_path: Path) -> None:
    """Same config with one message at a time and with all at once: identical results and spending."""
    narrow, narrow_spent = _run(tmp_path, "narrow", 1)
    wide, wide_spent = _run(tmp_path, "wide", 0)
    assert narrow["aggregation"]["tasks-dropped"] > 0  # lost tasks (discarded messages) are exercised
    assert narrow == wide
    assert narrow_spent == wide_spent and len(narrow_spent) > 0
