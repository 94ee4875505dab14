"""Two fixes to Flower's simulation engine (flwr 1.42) for large populations, applied by ``apply()``.

**Polling.** Flower's simulation engine polls every node for its next message ten times a second, and
``InMemoryLinkState.get_message_ins`` answers each poll by running a validity check (a clock
read and a federation lookup) on *every* stored message before it looks at the destination. A
sweep thus costs nodes x messages checks: with a population of 10,000 and a cohort of 50 the
driver spends a whole core on polling while the devices train, and a message to every node (the
start-of-run query, a full federated evaluation) takes tens of minutes.

:func:`poll_by_destination` replaces that method with one that skips other nodes' messages before
checking them. For the polled node's own messages it does exactly what Flower does (same check,
same order, same limit, same delivery mark); other nodes' messages are checked when those nodes
are polled, which happens in the same sweep. It applies to the simulation's in-memory state only
(a SuperLink keeps its state in SQLite, with indexed queries).

**Shipping the ClientApp.** The Ray backend passes the ClientApp factory (a closure holding the
ClientApp) as an argument of every actor call, so the driver pickles it by value for every
message -- about 8 ms with torch loaded, spent in cloudpickle's scan of ``sys.modules``.
:func:`share_client_app` puts it in Ray's object store once and passes the reference instead;
each actor call still receives the same factory.
"""

from __future__ import annotations

import inspect
import logging
from typing import Optional

from flwr.app import Message
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, now

log = logging.getLogger(__name__)

_EXPECTED = ["self", "node_id", "limit", "run_id"]


def _get_message_ins(self: InMemoryLinkState, node_id: int, limit: Optional[int], *,
                     run_id: Optional[int] = None) -> list[Message]:
    """Flower's ``get_message_ins``, looking only at the messages addressed to ``node_id``."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Message] = []
    with self.lock:
        for msg_id, stored in list(self.message_ins_store.items()):
            if stored.metadata.dst_node_id != node_id:
                continue
            self._check_stored_messages({msg_id})
            msg = self.message_ins_store.get(msg_id)
            if msg and (run_id is None or msg.metadata.run_id == run_id) and msg.metadata.delivered_at == "":
                found.append(msg)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg in found:
        msg.metadata.delivered_at = delivered_at
    return found


def poll_by_destination() -> bool:
    """Install :func:`_get_message_ins` (once); False, and Flower's own method kept, if its signature changed."""
    current = InMemoryLinkState.get_message_ins
    if current is _get_message_ins:
        return True
    if list(inspect.signature(current).parameters) != _EXPECTED:
        log.warning("flwr's InMemoryLinkState.get_message_ins changed; large simulations keep its full scans")
        return False
    InMemoryLinkState.get_message_ins = _get_message_ins  # type: ignore[method-assign]
    return True


_build = RayBackend.build


def _build_shared(self: RayBackend, app_fn) -> None:  # type: ignore[no-untyped-def]
    import ray

    _build(self, app_fn)
    self.app_fn = ray.put(app_fn)  # Ray resolves the reference to the factory in every actor call


def share_client_app() -> None:
    """Install :func:`_build_shared` (once)."""
    RayBackend.build = _build_shared  # type: ignore[method-assign]


def apply() -> None:
    poll_by_destination()
    share_client_app()
