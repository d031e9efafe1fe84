"""Moves fedrec's messages over a Flower Grid with non-blocking push/pull.

Flower has no asynchronous strategy, so fedrec drives the Grid itself: one
message per push (the simulation Grid silently shortens the id list on failure),
non-blocking pulls, and every wait bounded by a wall-clock timeout so a lost
device never hangs the server. Replies arrive in any real-time order; the
scheduler decides the order in which they count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared.records import get_int

log = logging.getLogger("fedrec.server")


class GridError(RuntimeError):
    """The federation is not in a state the server can work with."""


@dataclass
class _Pending:
    device_id: int
    sent_at: float


class GridDriver:
    """Sends to devices by device id and collects replies by message id.

    Parameters
    ----------
    grid
        The Flower Grid of this run.
    wall_timeout
        Real seconds after which an unanswered message is given up.
    poll_interval
        Real seconds before the first re-pull when nothing has arrived; it doubles on
        every empty pull up to ``max_poll_interval`` (each pull scans the link state,
        and on a 2-core machine busy polling takes CPU from the devices it waits for).
    on_late_reply
        Called with ``(device_id, reply)`` for a reply that arrives after its task was
        given up (:meth:`discard`). The device still trained and spent privacy; the
        server must still record that spending even though it ignores the update.
    """

    def __init__(
        self, grid: Grid, wall_timeout: float, poll_interval: float = 0.005, max_poll_interval: float = 0.2,
        on_late_reply: Callable[[int, Message], None] | None = None,
    ) -> None:
        self.on_late_reply = on_late_reply
        self.grid = grid
        self.wall_timeout = wall_timeout
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self._idle_polls = 0
        self.node_of: dict[int, int] = {}
        self.public_keys: dict[int, str] = {}  # as each device presented it at discovery
        self._pending: dict[str, _Pending] = {}
        self._arrived: dict[str, tuple[int, Message]] = {}
        self._device_msg: dict[int, str] = {}
        self._discarded: set[str] = set()

    # -- discovery ---------------------------------------------------------------
    def discover(self, expected: int, timeout: float) -> dict[int, int]:
        """Wait for ``expected`` nodes and learn each node's device id; returns device -> node."""
        deadline = time.monotonic() + timeout
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected:
                break
            time.sleep(0.2)
        if len(nodes) < expected:
            raise GridError(f"only {len(nodes)} of {expected} devices connected within {timeout:.0f} s")
        ids = {}
        for node in nodes:
            mid = self._push(Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY))
            self._pending[mid] = _Pending(-1, time.monotonic())  # device id not known yet
            ids[mid] = node
        for mid, node in ids.items():
            reply = self.wait(mid)
            if reply is None or reply.has_error():
                raise GridError(f"node {node} did not answer the device-id query")
            status = reply.content.config_records["status"]
            device = get_int(status, "device-id")
            if device in self.node_of:
                raise GridError(f"two nodes claim device id {device}")
            self.node_of[device] = node
            if "public-key" in status:
                self.public_keys[device] = str(status["public-key"])
        return dict(self.node_of)

    # -- sending -------------------------------------------------------------------
    def _push(self, message: Message) -> str:
        ids = [i for i in self.grid.push_messages([message]) if i]
        if len(ids) != 1:
            raise GridError(f"could not push a message to node {message.metadata.dst_node_id}")
        return ids[0]

    def send(self, device_id: int, content: RecordDict, message_type: str) -> str:
        """Send to a device once its previous message (if any) has been answered.

        Waiting here keeps one message per device in flight, so a device's state is
        never updated by two tasks at once (a timed-out task may still be running).
        """
        previous = self._device_msg.get(device_id)
        while previous is not None and previous in self._pending:
            # Wait for it to arrive without consuming it: its owner will collect it.
            if not self._pull():
                self._backoff()
        mid = self._push(
            Message(content, dst_node_id=self.node_of[device_id], message_type=message_type,
                    ttl=self.wall_timeout)
        )
        self._pending[mid] = _Pending(device_id, time.monotonic())
        self._device_msg[device_id] = mid
        return mid

    def _backoff(self) -> None:
        """Sleep after an empty pull, longer the longer nothing has arrived."""
        self._idle_polls += 1
        time.sleep(min(self.max_poll_interval, self.poll_interval * 2 ** min(self._idle_polls - 1, 10)))

    # -- receiving -----------------------------------------------------------------
    def _pull(self) -> int:
        if not self._pending:
            return 0
        got = 0
        for reply in self.grid.pull_messages(list(self._pending)):
            mid = reply.metadata.reply_to_message_id
            pending = self._pending.pop(mid, None)
            if pending is None:
                continue
            if mid in self._discarded:
                self._discarded.discard(mid)
                if self.on_late_reply is not None:
                    self.on_late_reply(pending.device_id, reply)
            else:
                self._arrived[mid] = (pending.device_id, reply)
            if self._device_msg.get(pending.device_id) == mid:
                del self._device_msg[pending.device_id]
            got += 1
        if got:
            self._idle_polls = 0
        now = time.monotonic()
        for mid, pending in list(self._pending.items()):
            if now - pending.sent_at > self.wall_timeout + 5.0:
                self._discarded.discard(mid)
                # Flower should have answered with a TTL error by now; give up on it.
                log.warning("message to device %d unanswered after %.0f s", pending.device_id, now - pending.sent_at)
                del self._pending[mid]
                if self._device_msg.get(pending.device_id) == mid:
                    del self._device_msg[pending.device_id]
        return got

    def wait(self, mid: str) -> Message | None:
        """Block until the reply to ``mid`` arrives (or is given up: returns None)."""
        while True:
            if mid in self._arrived:
                return self._arrived.pop(mid)[1]
            if mid not in self._pending:
                return None
            if not self._pull():
                self._backoff()

    def discard(self, mid: str) -> None:
        """Forget the reply to ``mid`` whenever it comes (a task already resolved as lost)."""
        early = self._arrived.pop(mid, None)
        if early is not None:
            if self.on_late_reply is not None:
                self.on_late_reply(early[0], early[1])
        elif mid in self._pending:
            self._discarded.add(mid)

    def drain(self) -> None:
        """Wait for every outstanding message (so devices' state is settled)."""
        while self._pending:
            if not self._pull():
                self._backoff()
        self._arrived.clear()
