"""A Flower Grid that runs the ClientApp in this process, one Context per virtual device.

Flower's simulation runtime needs Ray, whose start-up and per-message costs
dominate short experiments. This Grid keeps Flower's message contract (ids,
replies, error replies for a raising ClientApp, per-node ``context.state``) but
executes each message when it is pulled, in this process. Because fedrec's
scheduler orders everything by virtual time and every random draw is seeded,
a run gives the same numbers on this Grid as on Ray (tests/test_simulation.py
checks it); benchmarks use it to compare many configurations quickly.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from server.stop import stop_requested

log = logging.getLogger("fedrec.simulate")

# Flower's error code for a ClientApp that raised (flwr.common.constant.ErrorCode).
_CLIENT_APP_RAISED_EXCEPTION = 2


class LocalGrid(Grid):
    """In-process Grid over ``num_nodes`` virtual devices (node ``i + 1`` is partition ``i``)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
        self._app = client_app
        self._run = Run.create_empty(run_id=1)
        # Messages may only be built inside a Flower task; this process is that task.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self._contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self._queued: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid API
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102 - Grid API
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102 - deprecated in Flower
        raise NotImplementedError("build Message objects directly")

    def get_node_ids(self) -> Iterable[int]:
        """Every virtual device is always online."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; each runs when its reply is pulled."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                continue  # like Flower's Grid: an undeliverable message gets no id
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self._queued[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp for every requested queued message and return the replies."""
        replies = []
        for mid in list(message_ids):
            if stop_requested():
                break  # Ctrl-C: the rest stay queued; the server's next wait stops the run
            msg = self._queued.pop(mid, None)
            if msg is None:
                continue
            context = self._contexts[msg.metadata.dst_node_id]
            try:
                reply = self._app(msg, context)
            except Exception as exc:  # noqa: BLE001 - a device's crash becomes an error reply, as in Flower
                log.warning("ClientApp raised on node %d: %s", msg.metadata.dst_node_id, exc)
                reply = Message(Error(_CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push then pull everything (in-process, so nothing is ever late)."""
        del timeout
        started = time.monotonic()
        ids = list(self.push_messages(messages))
        replies = list(self.pull_messages(ids))
        log.debug("send_and_receive of %d messages took %.2f s", len(ids), time.monotonic() - started)
        return replies
