"""The pending-node message scan delivers exactly what Flower's own per-node scan delivers.

Both loops run against a real Flower in-memory link state set up the way
``flwr.simulation.run_simulation`` sets it up, with messages pushed through Flower's own
InMemoryGrid.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from queue import Queue
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # type: ignore[attr-defined]
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from simulations import message_scan

FLOWER_SCAN = vce_api.add_messages_to_queue


@pytest.fixture(autouse=True)
def _restore_flower_scan() -> Any:
    yield
    vce_api.add_messages_to_queue = FLOWER_SCAN


def _link_state(num_nodes: int) -> tuple[Any, dict[int, int], InMemoryGrid]:
    """A link state, node mapping and grid as run_simulation builds them."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    mapping = vce_api._register_nodes(num_nodes=num_nodes, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, mapping, grid


def _push(grid: InMemoryGrid, destinations: list[int]) -> list[str]:
    messages = [
        Message(RecordDict({"c": ConfigRecord({"k": i})}), dst_node_id=node, message_type="train")
        for i, node in enumerate(destinations)
    ]
    return list(grid.push_messages(messages))


def _drain(
    scan: Callable[..., None], state: Any, mapping: dict[int, int], expected: int, timeout: float = 10.0
) -> list[str]:
    """Run ``scan`` in a thread until ``expected`` messages came out (or ``timeout`` passed)."""
    queue: Queue[Any] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=scan, args=(state, queue, mapping, stop))
    thread.start()
    deadline = time.monotonic() + timeout
    while queue.qsize() < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.25)  # two more ticks: nothing else may come out
    stop.set()
    thread.join()
    out = []
    while not queue.empty():
        out.append(queue.get().metadata.message_id)
    return out


@pytest.mark.parametrize("scan", [FLOWER_SCAN, message_scan.add_pending_messages_to_queue])
def test_both_scans_deliver_every_pending_message_once_one_per_node_per_tick(scan: Callable[..., None]) -> None:
    state, mapping, grid = _link_state(num_nodes=50)
    nodes = list(mapping)
    # Two messages for node 3, one each for three others; most nodes have none.
    ids = _push(grid, [nodes[3], nodes[3], nodes[10], nodes[20], nodes[49]])
    assert len(ids) == 5
    delivered = _drain(scan, state, mapping, expected=5)
    assert sorted(delivered) == sorted(ids)
    assert message_scan.pending_nodes(state) == set()
    # Delivered messages are marked as such, so a second scan finds nothing new.
    assert _drain(scan, state, mapping, expected=1, timeout=0.5) == []


def test_pending_nodes_reads_undelivered_destinations_only() -> None:
    state, mapping, grid = _link_state(num_nodes=5)
    nodes = list(mapping)
    _push(grid, [nodes[1], nodes[4]])
    assert message_scan.pending_nodes(state) == {nodes[1], nodes[4]}
    state.get_message_ins(node_id=nodes[1], limit=1)
    assert message_scan.pending_nodes(state) == {nodes[4]}


def test_pending_nodes_says_it_cannot_tell_on_another_state() -> None:
    assert message_scan.pending_nodes(object()) is None


def test_install_replaces_flowers_loop_with_the_same_signature() -> None:
    import inspect

    assert list(inspect.signature(FLOWER_SCAN).parameters) == list(
        inspect.signature(message_scan.add_pending_messages_to_queue).parameters
    )
    assert message_scan.install() is True
    assert vce_api.add_messages_to_queue is message_scan.add_pending_messages_to_queue
    assert message_scan.install() is True  # idempotent
    assert vce_api.add_messages_to_queue is message_scan.add_pending_messages_to_queue


def test_install_keeps_flowers_loop_on_another_release(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with caplog.at_level(logging.WARNING, logger="fedrec.simulate"):
        assert message_scan.install() is False
    assert vce_api.add_messages_to_queue is FLOWER_SCAN
    (record,) = [r for r in caplog.records if r.name == "fedrec.simulate"]
    assert record.levelno == logging.WARNING and "1.43.0" in record.getMessage() and "1.42.x" in record.getMessage()
