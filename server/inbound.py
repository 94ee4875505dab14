"""The inbound inventory: the shape of every reply that reaches the server, recorded at receipt.

With ``federation.audit_outbound=true`` the ServerApp talks to the devices through
:class:`InboundInventory`, a :class:`~flwr.serverapp.Grid` that hands every call to Flower's grid
and, before returning them, writes one JSON line per reply Flower delivered
(``send_and_receive`` and ``pull_messages``) to ``<run dir>/inbound/replies.jsonl``. Nothing of
the server has looked at a reply yet at that point: the round code's checks
(``server/rounds.py``), the start-of-run query (``server/devices.py``) and SecAgg+'s workflow
(``server/secure_round.py``) all receive through this grid, so every reply of theirs is in the
inventory, malformed, rejected and error replies included. A row::

    {"type": "train", "node": 123, "group": "1", "error": null,
     "records": ["arrays", "metrics"],
     "arrays": {"arrays": {"<name>": [shape], ...}},   # per ArrayRecord: array names and shapes
     "metrics": {"metrics": {"<key>": "float", ...}},  # per MetricRecord: key names, value types
     "configs": {},                                    # per ConfigRecord: key names, value types
     "lengths": {}}                                    # per Metric/ConfigRecord: each list value's length

``error``: ``{"code": c, "fixed_reason": b}`` for an error reply (``b``: its reason is the fixed
text of code ``c`` in ``fl.protocol.DEVICE_ERRORS``, all a device may say; Flower's own errors,
such as a reply lost in transit, have other reasons), with no records. A list value's type names
its elements' types (``list[bytes]``) and ``lengths`` its length. No value is ever written: no
update, metric, key or share.

Why here and not on the device: the device's outbound guard (``clients/guard.py``) decides what
leaves, so a log it kept would list only what it let through and would agree with its allow-list
whatever the guard did. This file is what the server actually got.

Under SecAgg+ (``server/secure_round.py``) the replies of all four stages are training replies,
recorded the same way. Setup, share-keys and unmask replies carry only the protocol's
ConfigRecord ``secaggplus_configs`` (``pk1``, ``pk2``: public keys; ``dsts``, ``ctxts``: encrypted
key shares and their recipients; ``nids``, ``shares``: the shares that unmask). The
collect-masked-vectors reply carries the masked, quantised update as ``masked_params``
(``list[bytes]``: the weight factor, then one entry per update array; recorded by type and count,
never decoded), the ArrayRecord ``fitres.parameters`` that Flower's device mod empties (no update
in clear), and the scalars sent in clear: ``fitres.metrics`` (a ConfigRecord: the echo),
``fitres.num_examples`` and ``fitres.status``. What the server decodes from the masked vectors
(the sum) is not a reply and is not in the inventory.

The rows say who answered which round and who failed: realised facts no epsilon covers. The folder
is the experimenter's, owner-only like ``private/`` (0700, the file 0600).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fl import protocol as P
from fl.privacy.randomness import private_dir

INBOUND, REPLIES = "inbound", "replies.jsonl"


def inventory_path(out_dir: Path) -> Path:
    """Where a run's inbound inventory is written."""
    return Path(out_dir) / INBOUND / REPLIES


def value_type(value: Any) -> str:
    """The type of a metric or config value as the inventory names it: ``int``, ``bytes``,
    ``list[float]`` (the element types of a list, ``|``-joined if mixed; ``list`` if empty)."""
    if isinstance(value, list):
        inner = "|".join(sorted({type(v).__name__ for v in value}))
        return f"list[{inner}]" if inner else "list"
    return type(value).__name__


def describe(reply: Message) -> dict[str, Any]:
    """One inventory row for ``reply``: its metadata, structure and value types, never a value."""
    meta = reply.metadata
    row: dict[str, Any] = {"type": meta.message_type, "node": int(meta.src_node_id), "group": meta.group_id,
                           "error": None, "records": [], "arrays": {}, "metrics": {}, "configs": {}, "lengths": {}}
    if reply.has_error():
        code = int(reply.error.code)
        row["error"] = {"code": code, "fixed_reason": reply.error.reason == P.DEVICE_ERRORS.get(code)}
    if not reply.has_content():
        return row
    content: RecordDict = reply.content
    row["records"] = sorted(content.keys())
    row["arrays"] = {name: {k: list(a.shape) for k, a in record.items()}
                     for name, record in content.array_records.items()}
    row["metrics"] = {name: {k: value_type(v) for k, v in record.items()}
                      for name, record in content.metric_records.items()}
    row["configs"] = {name: {k: value_type(v) for k, v in record.items()}
                      for name, record in content.config_records.items()}
    scalars = {**content.metric_records, **content.config_records}
    row["lengths"] = {name: lists for name, record in scalars.items()
                      if (lists := {k: len(v) for k, v in record.items() if isinstance(v, list)})}
    return row


def read_inventory(out_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's inbound inventory, in the order the server received the replies."""
    path = inventory_path(out_dir)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class InboundInventory(Grid):
    """Flower's ``grid``, with every reply it delivers described in ``<out_dir>/inbound/replies.jsonl``
    before the caller sees it (see the module doc)."""

    def __init__(self, grid: Grid, out_dir: Path) -> None:
        self._grid = grid
        self._path = private_dir(Path(out_dir) / INBOUND) / REPLIES

    def _record(self, replies: Iterable[Message]) -> list[Message]:
        received = list(replies)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            for reply in received:
                f.write(json.dumps(describe(reply)) + "\n")
        return received

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self._record(self._grid.send_and_receive(messages, timeout=timeout))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._record(self._grid.pull_messages(message_ids))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()
