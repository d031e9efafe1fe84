"""Opt-in record of every message a device sends, for inspecting what leaves the device.

A Flower ClientApp *mod* (see ``ClientApp(mods=...)``): when the environment variable
``FEDREC_WIRE_LOG`` names a file, each reply the ClientApp returns is appended to it
as one JSON line::

    {"message_type": "train", "device_id": 0, "time": 1761000000.0,
     "error": null, "content": "<base64 of the RecordDict's protobuf>"}

``content`` is the reply's :class:`flwr.app.RecordDict` serialized with Flower's own
serde (``recorddict_to_proto``), i.e. every array, metric and config value the
SuperNode then sends to the SuperLink; :func:`read_wire_log` turns it back into
RecordDicts, which ``shared/protocol.py``'s parsers read like any message. ``error``
is Flower's error (its ``code`` and ``reason``) for an error reply. Without the
variable the mod is a pass-through, so it costs nothing in production.
``tests/test_deployment.py`` sets it on each SuperNode of a loopback deployment and
checks that no reply carries raw interactions, item id lists or the personal embedding.

The file is opened in append mode for a single ``write`` per message; a file per
device avoids interleaving between processes.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from flwr.app import Context, Message, RecordDict

from client.node_config import device_index

__all__ = ["ENV_VAR", "WireRecord", "read_wire_log", "wire_log_mod", "wire_log_mods"]

ENV_VAR: Final = "FEDREC_WIRE_LOG"


def _device_id(context: Context) -> int | None:
    """The node's device id, or None when its node config names none (the log still gets the reply)."""
    try:
        return device_index(context.node_config)
    except (KeyError, ValueError):
        return None


def wire_log_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Run the ClientApp, then append its reply to ``$FEDREC_WIRE_LOG`` (if set)."""
    reply = call_next(msg, context)
    target = os.environ.get(ENV_VAR)
    if not target:
        return reply
    from flwr.common.serde import recorddict_to_proto

    content = None
    if reply.has_content():
        content = base64.b64encode(recorddict_to_proto(reply.content).SerializeToString()).decode("ascii")
    error = None
    if reply.has_error():
        error = {"code": int(reply.error.code), "reason": str(reply.error.reason)}
    line = json.dumps(
        {
            "message_type": str(msg.metadata.message_type),
            "device_id": _device_id(context),
            "time": time.time(),
            "error": error,
            "content": content,
        }
    )
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)
    return reply


def wire_log_mods() -> list[Any]:
    """The mods list for ``ClientApp(mods=...)``: always the (inert unless enabled) wire log."""
    return [wire_log_mod]


class WireRecord:
    """One logged reply: its message type, device, raw serialized bytes and RecordDict."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.message_type: str = raw["message_type"]
        self.device_id: int | None = raw["device_id"]
        self.time: float = float(raw["time"])
        self.error: dict[str, Any] | None = raw["error"]
        self.raw: bytes = b"" if raw["content"] is None else base64.b64decode(raw["content"])
        self._content: RecordDict | None = None

    @property
    def content(self) -> RecordDict | None:
        """The reply's RecordDict, deserialized with Flower's serde (None for an error reply)."""
        if not self.raw:
            return None
        if self._content is None:
            from flwr.common.serde import recorddict_from_proto
            from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

            proto = ProtoRecordDict()
            proto.ParseFromString(self.raw)
            self._content = recorddict_from_proto(proto)
        return self._content


def read_wire_log(path: Path | str) -> list[WireRecord]:
    """Every reply logged in ``path``, in order (an absent file: none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [WireRecord(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
