"""Moves fedrec's messages over a Flower Grid with non-blocking push/pull.

Flower has no asynchronous strategy, so fedrec drives the Grid itself: one
message per push (the simulation Grid silently shortens the id list on failure),
non-blocking pulls, and every wait bounded by a wall-clock timeout so a lost
device never hangs the server. Replies arrive in any real-time order; the
scheduler decides the order in which they count.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server.stop import check_stop
from shared.protocol import DISCOVERY, ProtocolError, build_discovery, parse_identity

log = logging.getLogger("fedrec.server")


class GridError(RuntimeError):
    """The federation is not in a state the server can work with."""


@dataclass
class _Pending:
    device_id: int
    sent_at: float
    timeout: float  # real seconds before the message is given up


@dataclass(order=True)
class _Deferred:
    """A message accepted by :meth:`GridDriver.send` but not pushed to the Grid yet."""

    priority: tuple[float, int]
    handle: str = field(compare=False)
    device_id: int = field(compare=False)
    message: Message = field(compare=False)
    timeout: float = field(compare=False)


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
    max_in_flight
        At most this many messages are pushed to the Grid and not yet answered; the
        rest wait here, in ``priority`` order (:meth:`send`), and are pushed as replies
        come in. ``None`` pushes every message at once, which real deployments want
        (each device is its own machine). In simulation a window is much faster:
        Flower's simulation engine scans every stored message for every node ten
        times a second, so 100 messages in flight for 943 nodes kept one of two cores
        busy doing nothing else, while only a few devices can run at once anyway.
        Which device computes when does not change any result: each device runs its
        own messages one at a time, and the scheduler orders replies by virtual time.
    """

    def __init__(
        self,
        grid: Grid,
        wall_timeout: float,
        poll_interval: float = 0.005,
        max_poll_interval: float = 0.2,
        on_late_reply: Callable[[int, Message], None] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 or None, got {max_in_flight}")
        self.max_in_flight = max_in_flight
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
        # Deferred messages: a heap in priority order, plus, per device, the messages
        # that must wait for that device's earlier message (one in flight per device).
        self._deferred: list[_Deferred] = []
        self._blocked: dict[int, deque[_Deferred]] = {}
        self._mid_of: dict[str, str] = {}  # handle -> Grid message id, once pushed
        self._discard_on_push: set[str] = set()
        self._queued: set[str] = set()  # handles deferred or parked, not pushed yet
        self._handles = itertools.count()

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
        replies: dict[int, Message | None] = {}
        to_ask = deque(nodes)
        asked: dict[str, int] = {}
        window = self.max_in_flight or len(nodes)
        while to_ask or asked:
            while to_ask and len(asked) < window:
                node = to_ask.popleft()
                mid = self._push(Message(build_discovery(), dst_node_id=node, message_type=DISCOVERY.message_type))
                self._pending[mid] = _Pending(-1, time.monotonic(), self.wall_timeout)  # device id not known yet
                asked[mid] = node
            if not self._pull():
                self._backoff()
            for mid in [m for m in asked if m in self._arrived or m not in self._pending]:
                arrived = self._arrived.pop(mid, None)
                replies[asked.pop(mid)] = None if arrived is None else arrived[1]
        for node in nodes:
            reply = replies[node]
            if reply is None or reply.has_error():
                raise GridError(f"node {node} did not answer the device-id query")
            try:
                identity = parse_identity(reply)
            except ProtocolError as exc:
                raise GridError(f"node {node} answered the device-id query with {exc}") from exc
            device = identity.device_id
            if device in self.node_of:
                raise GridError(f"two nodes claim device id {device}")
            self.node_of[device] = node
            if identity.public_key is not None:
                self.public_keys[device] = identity.public_key
        return dict(self.node_of)

    # -- sending -------------------------------------------------------------------
    def _push(self, message: Message) -> str:
        ids = [i for i in self.grid.push_messages([message]) if i]
        if len(ids) != 1:
            raise GridError(f"could not push a message to node {message.metadata.dst_node_id}")
        return ids[0]

    def send(
        self,
        device_id: int,
        content: RecordDict,
        message_type: str,
        priority: float = float("inf"),
        timeout: float | None = None,
    ) -> str:
        """Queue a message to a device and return its handle (for :meth:`wait` / :meth:`discard`).

        The message is pushed once the window has room (lowest ``priority`` first, then
        sending order) and the device's previous message, if any, has been answered:
        one message per device in flight, so a device's state is never updated by two
        tasks at once (a timed-out task may still be running). Training tasks use their
        virtual finish time as priority, which is the order the server waits for them.
        ``timeout`` (default: the driver's ``wall_timeout``) bounds this message's wait.
        """
        number = next(self._handles)
        handle = f"fedrec-{number}"
        timeout = self.wall_timeout if timeout is None else timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        message = Message(content, dst_node_id=self.node_of[device_id], message_type=message_type, ttl=timeout)
        heapq.heappush(self._deferred, _Deferred((priority, number), handle, device_id, message, timeout))
        self._queued.add(handle)
        self._top_up()
        return handle

    def _device_busy(self, device_id: int) -> bool:
        previous = self._device_msg.get(device_id)
        return (previous is not None and previous in self._pending) or bool(self._blocked.get(device_id))

    def _push_deferred(self, item: _Deferred) -> None:
        mid = self._push(item.message)
        self._queued.discard(item.handle)
        self._pending[mid] = _Pending(item.device_id, time.monotonic(), item.timeout)
        self._device_msg[item.device_id] = mid
        self._mid_of[item.handle] = mid
        if item.handle in self._discard_on_push:
            self._discard_on_push.discard(item.handle)
            self._discarded.add(mid)

    def _release_next(self) -> bool:
        """Move the highest-priority deferred message on: push it, or park it behind its device."""
        if not self._deferred:
            return False
        item = heapq.heappop(self._deferred)
        if self._device_busy(item.device_id):
            self._blocked.setdefault(item.device_id, deque()).append(item)
        else:
            self._push_deferred(item)
        return True

    def _room(self) -> bool:
        return self.max_in_flight is None or len(self._pending) < self.max_in_flight

    def _top_up(self) -> None:
        """Push deferred messages while the window has room."""
        while self._room() and self._release_next():
            pass

    def _unblock(self, device_id: int) -> None:
        """The device's message was answered: push the next message parked behind it."""
        queue = self._blocked.get(device_id)
        if queue:
            self._push_deferred(queue.popleft())
            if not queue:
                del self._blocked[device_id]

    def _ensure_pushed(self, handle: str) -> None:
        """Release deferred messages in priority order until ``handle`` is pushed or parked."""
        while handle in self._queued and handle not in self._mid_of and self._release_next():
            pass

    def _backoff(self) -> None:
        """Sleep after an empty pull, longer the longer nothing has arrived."""
        check_stop()
        self._idle_polls += 1
        time.sleep(min(self.max_poll_interval, self.poll_interval * 2 ** min(self._idle_polls - 1, 10)))

    # -- receiving -----------------------------------------------------------------
    def _pull(self) -> int:
        if not self._pending:
            return 0
        got = 0
        # A list first: handling a reply may push the next message (a Grid call).
        for reply in list(self.grid.pull_messages(list(self._pending))):
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
                self._unblock(pending.device_id)
            got += 1
        if got:
            self._idle_polls = 0
        now = time.monotonic()
        for mid, pending in list(self._pending.items()):
            if now - pending.sent_at > pending.timeout + 5.0:
                self._discarded.discard(mid)
                # Flower should have answered with a TTL error by now; give up on it.
                log.warning("message to device %d unanswered after %.0f s", pending.device_id, now - pending.sent_at)
                del self._pending[mid]
                if self._device_msg.get(pending.device_id) == mid:
                    del self._device_msg[pending.device_id]
                    self._unblock(pending.device_id)
        self._top_up()
        return got

    def wait(self, handle: str) -> Message | None:
        """Block until the reply to ``handle`` arrives (or is given up: returns None)."""
        self._ensure_pushed(handle)
        while True:
            check_stop()
            mid = self._mid_of.get(handle)
            if mid is not None:
                if mid in self._arrived:
                    del self._mid_of[handle]
                    return self._arrived.pop(mid)[1]
                if mid not in self._pending:
                    del self._mid_of[handle]
                    return None
            elif handle not in self._queued:
                return None  # unknown, or already collected
            if not self._pull():
                self._backoff()

    def discard(self, handle: str) -> None:
        """Forget the reply to ``handle`` whenever it comes (a task already resolved as lost).

        A message not pushed yet is still pushed in its turn: the device trains and
        spends privacy as it would have, and its reply goes to ``on_late_reply``.
        """
        mid = self._mid_of.pop(handle, None)
        if mid is None:
            self._discard_on_push.add(handle)
            return
        early = self._arrived.pop(mid, None)
        if early is not None:
            if self.on_late_reply is not None:
                self.on_late_reply(early[0], early[1])
        elif mid in self._pending:
            self._discarded.add(mid)

    def drain(self) -> None:
        """Push every deferred message and wait for every outstanding one (devices' state settles)."""
        while self._pending or self._deferred or self._blocked:
            self._top_up()
            if not self._pull():
                self._backoff()
        self._arrived.clear()
        self._mid_of.clear()
