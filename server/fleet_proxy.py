"""The device-facing address: a TLS reverse proxy that serves Flower's Fleet API and nothing else.

Flower 1.42's SuperLink serves three APIs on its one HTTPS port (``flwr/superlink/main.py``):
``/v1/fleet/*`` for SuperNodes, ``/v1/control/*`` for the ``flwr`` CLI (register and unregister
SuperNode keys, list runs, read logs, start and stop runs -- with no account authentication in
the open-source build) and ``/v1/runtime/*`` for the ServerApp process (unauthenticated in
subprocess isolation). None of them can be bound apart. So ``unheard-superlink`` binds the SuperLink
to loopback and puts this proxy on the address devices dial: it forwards exactly the twelve Fleet
calls a SuperNode makes (``POST``, exact path, no query, no encoded path tricks) to the SuperLink
over TLS, and answers everything else -- Control, Runtime, ``/docs``, ``/health`` -- with 403.
Device authentication is untouched: the SuperNode's signing headers pass through and the
SuperLink checks them against its allow-list, which only the operator's loopback ``flwr`` can
change. Threat model and network layout: docs/deploy.md.

    python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --certs DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import httpx
import uvicorn

from fl.deploy.flower import console_logging

log = logging.getLogger("server.fleet_proxy")  # also when run as __main__

FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
"""What a Flower 1.42 SuperNode calls (``flwr/supernode/fleet_http_client.py``), all ``POST``."""
REFUSED = b'{"detail":"Only the Fleet API is served on this address"}'
_HOP_BY_HOP = {"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
               "trailer", "content-length"}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed(scope: dict[str, Any]) -> bool:
    """Whether an HTTP request is one of the Fleet calls (exact path, POST, nothing appended)."""
    path = scope.get("path", "")
    raw = scope.get("raw_path") or path.encode()
    return (scope.get("method") == "POST" and path in FLEET_PATHS and raw == path.encode()
            and not scope.get("query_string"))


class FleetOnlyProxy:
    """An ASGI app forwarding :data:`FLEET_PATHS` to ``upstream`` (``https://HOST:PORT``), 403 otherwise."""

    def __init__(self, upstream: str, root_cert: Path) -> None:
        self.upstream = upstream
        self.root_cert = root_cert
        self.client: Optional[httpx.AsyncClient] = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            context = ssl.create_default_context(cafile=str(self.root_cert))
            self.client = httpx.AsyncClient(base_url=self.upstream, verify=context, timeout=300.0)
        return self.client

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if not allowed(scope):
            log.warning("refused %s %r from %s", scope.get("method"), scope.get("raw_path", b"")[:120],
                        (scope.get("client") or ("?",))[0])
            await _respond(send, 403, REFUSED, [(b"content-type", b"application/json")])
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        try:
            reply = await self._client().post(scope["path"], content=body, headers=headers)
        except httpx.HTTPError as err:
            log.warning("the SuperLink at %s did not answer: %s", self.upstream, err)
            await _respond(send, 502, json.dumps({"detail": "SuperLink unavailable"}).encode(),
                           [(b"content-type", b"application/json")])
            return
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()
               if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"]
        await _respond(send, reply.status_code, reply.content, out)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(listen: str, upstream: str, certs: Path) -> None:
    """Serve the proxy on ``listen`` (HOST:PORT) with the SuperLink's certificate from ``certs``."""
    host, port = listen.rsplit(":", 1)
    app = FleetOnlyProxy(f"https://{upstream}", certs / "ca.crt")
    uvicorn.run(app, host=host, port=int(port), ssl_certfile=str(certs / "server.crt"),
                ssl_keyfile=str(certs / "server.key"), proxy_headers=False, server_header=False,
                log_level="warning", workers=1)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.fleet_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT devices connect to")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the SuperLink (loopback)")
    parser.add_argument("--certs", type=Path, required=True, help="folder with ca.crt, server.crt, server.key")
    args = parser.parse_args(argv)
    console_logging()
    log.info("serving the Fleet API only on %s (SuperLink at %s)", args.listen, args.upstream)
    serve(args.listen, args.upstream, args.certs.resolve())


if __name__ == "__main__":
    main()
