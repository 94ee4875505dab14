"""`unheard-superlink`: a Flower SuperLink with TLS and SuperNode authentication, and its allow-list.

* ``unheard-superlink start --certs DIR --state DIR [--allow DIR]`` starts ``flower-superlink``
  with the CA/server certificate in ``--certs`` (``ca.crt``, ``server.crt``, ``server.key``; see
  ``unheard-certs ca``), SuperNode authentication on, runtime dependency installation off and
  its database in the state folder; then registers every ``*.pub`` in ``--allow`` (SuperNode
  public keys, OpenSSH format). Only registered SuperNodes may connect. Runs in the foreground.
* ``unheard-superlink allow --state DIR KEY.pub`` / ``revoke --state DIR NODE_ID`` / ``list
  --state DIR`` manage the allow-list of a running SuperLink.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from fl.deploy.flower import CONNECTION, flower_env, flwr, tool, wait_for_tls, write_connection

log = logging.getLogger(__name__)


def _home(state: Path) -> Path:
    return state / "flwr-home"


def _flwr(state: Path, *args: str) -> subprocess.CompletedProcess:
    return flwr(_home(state), *args)


def allow(state: Path, key: Path) -> bool:
    """Register a SuperNode public key; True if registered now or already."""
    proc = _flwr(state, "supernode", "register", str(key), CONNECTION)
    if proc.returncode == 0:
        log.info("allowed %s: %s", key.name, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "ok")
        return True
    if "already in use" in proc.stdout + proc.stderr:
        log.info("%s is already allowed", key.name)
        return True
    log.error("could not allow %s: %s", key, (proc.stdout + proc.stderr).strip()[-500:])
    return False


def start(certs: Path, state: Path, allow_dir: Optional[Path], host: str, port: int) -> int:
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (certs / name).is_file():
            log.error("missing %s in %s (make development ones with `unheard-certs ca %s`)", name, certs, certs)
            return 2
    state.mkdir(parents=True, exist_ok=True)
    address = f"{host}:{port}"
    write_connection(_home(state), address, certs / "ca.crt")
    cmd = [tool("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
           "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
           "--enable-supernode-auth", "--disable-runtime-dependency-installation",
           "--database", str(state / "superlink.db"), "--host", host, "--port", str(port)]
    superlink = subprocess.Popen(cmd, env=flower_env(_home(state)), cwd=state)
    signal.signal(signal.SIGTERM, lambda *_: superlink.terminate())
    try:
        wait_for_tls(address, certs / "ca.crt", timeout=60)
        keys = sorted(allow_dir.glob("*.pub")) if allow_dir else []
        allowed = sum(allow(state, k) for k in keys)
        log.info("SuperLink ready at %s (TLS, SuperNode authentication on): %d of %d device keys allowed",
                 address, allowed, len(keys))
        return superlink.wait()
    except (TimeoutError, KeyboardInterrupt) as err:
        log.error("%s", err or "interrupted")
        superlink.terminate()
        superlink.wait(timeout=30)
        return 1


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="unheard-superlink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start the SuperLink (foreground)")
    p.add_argument("--certs", type=Path, required=True, help="folder with ca.crt, server.crt, server.key")
    p.add_argument("--state", type=Path, required=True, help="folder for the SuperLink's database and CLI config")
    p.add_argument("--allow", type=Path, help="folder of device public keys (*.pub) to register")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9093)
    a = sub.add_parser("allow", help="register a device public key")
    a.add_argument("--state", type=Path, required=True)
    a.add_argument("key", type=Path)
    r = sub.add_parser("revoke", help="unregister a device by node id (see `list`)")
    r.add_argument("--state", type=Path, required=True)
    r.add_argument("node_id")
    listing = sub.add_parser("list", help="registered devices and their status")
    listing.add_argument("--state", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "start":
        sys.exit(start(args.certs, args.state, args.allow, args.host, args.port))
    if args.command == "allow":
        sys.exit(0 if allow(args.state, args.key) else 1)
    proc = (_flwr(args.state, "supernode", "unregister", args.node_id, CONNECTION) if args.command == "revoke"
            else _flwr(args.state, "supernode", "list", CONNECTION))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
