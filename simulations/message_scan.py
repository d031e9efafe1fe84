"""A message scan for Flower's simulation engine that visits only nodes with pending messages.

Flower 1.42's simulation runtime moves messages from its link state to the backend with
``vce_api.add_messages_to_queue``: ten times a second it calls
``InMemoryLinkState.get_message_ins(node_id, limit=1)`` for *every* simulated node, and each call
walks the whole message store, re-checking every stored message's expiry and federation
membership. With 943 devices that scan alone kept one of the two cores of the reference machine
70 to 85% busy (py-spy; docs/results.md), competing with the devices' DP-SGD.

:func:`install` replaces that loop with one that first takes a snapshot of which nodes have an
undelivered message (one pass over the store, under the store's lock) and then calls Flower's own
``get_message_ins`` for those nodes only, in the same node order, so delivery, expiry checks and the
"delivered" marking stay Flower's. A node without pending messages would have got an empty list from
Flower's call; skipping the call changes nothing but the CPU time. It is installed only for the
Flower version it was written against and only on the in-memory link state; anything else keeps
Flower's loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from queue import Queue
from typing import Any

log = logging.getLogger("fedrec.simulate")

# The loop below mirrors vce_api.add_messages_to_queue of these releases (checked by a test).
SUPPORTED_FLWR = ("1.42.",)


def pending_nodes(state: Any) -> set[int] | None:
    """Node ids with at least one undelivered message in ``state``, or None if it cannot tell.

    None means ``state`` is not Flower's in-memory link state (no ``message_ins_store``), so the
    caller must fall back to asking every node.
    """
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        messages = list(store.values())
    return {m.metadata.dst_node_id for m in messages if m.metadata.delivered_at == ""}


def add_pending_messages_to_queue(
    state: Any,
    queue: Queue[Any],
    nodes_mapping: Mapping[int, int],
    f_stop: threading.Event,
) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue`` that asks only nodes with pending messages."""
    while not f_stop.is_set():
        pending = pending_nodes(state)
        for node_id in nodes_mapping.keys():
            if pending is not None and node_id not in pending:
                continue
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def install() -> bool:
    """Use :func:`add_pending_messages_to_queue` in Flower's simulation runtime of this process.

    Call before ``flwr.simulation.run_simulation`` (the runtime looks the function up when it starts
    its extractor thread). Returns whether it was installed; on a Flower release it was not written
    for it logs why and leaves Flower's loop in place. Idempotent.
    """
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    version = getattr(flwr, "__version__", "")
    if not version.startswith(SUPPORTED_FLWR):
        log.warning(
            "flwr %s: fedrec's message scan was written for flwr %s; keeping Flower's own per-node scan "
            "(correct, but it keeps a core busy with large fleets)",
            version,
            "/".join(v + "x" for v in SUPPORTED_FLWR),
        )
        return False
    current: Callable[..., None] = vce_api.add_messages_to_queue
    if current is not add_pending_messages_to_queue:
        vce_api.add_messages_to_queue = add_pending_messages_to_queue  # type: ignore[assignment]
    return True
