"""`unheard-superlink`: a Flower SuperLink whose device-facing address serves devices only.

* ``unheard-superlink start --certs DIR --state DIR [--allow DIR]`` starts ``flower-superlink``
  bound to **loopback** (``127.0.0.1:--control-port``: its Control and Runtime APIs, which the
  open-source SuperLink serves without account authentication, are reachable only from this host),
  and in front of it, on ``--host:--port`` where devices connect, the Fleet-only TLS proxy of
  ``server/fleet_proxy.py``. TLS (certificate, key and CA from ``--certs``: see ``unheard-certs
  ca``), SuperNode authentication on, runtime dependency installation off, the database in the
  state folder. Then it registers every ``*.pub`` in ``--allow`` (SuperNode public keys, OpenSSH
  format) that was never revoked. Only registered SuperNodes may connect. Runs in the foreground;
  if either child exits, it says so at once, with the child's own error above.
* The state folder is canonical: the certificate folder remembers which state folder its
  SuperLink uses (``certs/superlink-state``), and a start against another (or emptied) state
  folder is refused -- it would open an empty database and re-admit every key in ``--allow`` --
  unless ``--new-state`` says to start over.
* ``allow --state DIR KEY.pub`` / ``revoke --state DIR NODE_ID`` / ``list --state DIR`` / ``status
  --state DIR`` manage and show a running SuperLink (over loopback). Revocations persist in the
  state folder (``allowed.json``); Flower keeps a revoked public key reserved for good, so a revoked
  device comes back only with a new key pair.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from fl.deploy.flower import CONNECTION, console_logging, flower_env, flwr, tool, wait_for_tls, write_connection

log = logging.getLogger(__name__)

STATE_MARKER = "superlink-state"
"""The file in the certificate folder naming the SuperLink's canonical state folder."""
ALLOWED = "allowed.json"


def _home(state: Path) -> Path:
    return state / "flwr-home"


def _flwr(state: Path, *args: str) -> subprocess.CompletedProcess:
    return flwr(_home(state), *args)


def _fingerprint(key: Path) -> str:
    parts = key.read_text().split()
    return hashlib.sha256(" ".join(parts[:2]).encode()).hexdigest()[:16]


def _allowed(state: Path) -> dict[str, Any]:
    path = state / ALLOWED
    return json.loads(path.read_text()) if path.exists() else {"keys": {}}


def _save_allowed(state: Path, record: dict[str, Any]) -> None:
    tmp = state / (ALLOWED + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(state / ALLOWED)


def allow(state: Path, key: Path) -> bool:
    """Register a SuperNode public key; True if registered now or already (never a revoked one)."""
    record = _allowed(state)
    entry = record["keys"].get(_fingerprint(key), {})
    if entry.get("revoked"):
        log.error("%s was revoked (node %s): Flower keeps a revoked key reserved for good, so this device comes back "
                  "only with a new key pair (`unheard-certs device`), which you then allow", key.name, entry["node"])
        return False
    proc = _flwr(state, "supernode", "register", str(key), CONNECTION, "--format", "json")
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        try:
            node = json.loads(proc.stdout).get("node-id")
        except json.JSONDecodeError:
            node = None
        record["keys"][_fingerprint(key)] = {"name": key.name, "node": node, "revoked": False}
        _save_allowed(state, record)
        log.info("allowed %s (node %s)", key.name, node)
        return True
    if "already in use" in out:
        log.info("%s is already allowed", key.name)
        return True
    log.error("could not allow %s: %s", key, out.strip()[-500:])
    return False


def revoke(state: Path, node_id: str) -> bool:
    proc = _flwr(state, "supernode", "unregister", node_id, CONNECTION)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        log.error("could not revoke node %s: %s", node_id, (proc.stdout + proc.stderr).strip()[-500:])
        return False
    record = _allowed(state)
    for entry in record["keys"].values():
        if str(entry.get("node")) == str(node_id):
            entry["revoked"] = True
    _save_allowed(state, record)
    log.info("revoked node %s: it is refused from now on, also after a restart", node_id)
    return True


def _check_canonical(certs: Path, state: Path, new_state: bool) -> Optional[str]:
    """Why starting on ``state`` must be refused (None if it may start); records ``state`` as canonical."""
    marker = certs / STATE_MARKER
    known = Path(marker.read_text().strip()) if marker.exists() else None
    has_db = (state / "superlink.db").exists()
    if not new_state and known is not None and (known != state or not has_db):
        why = f"is {known}" if known != state else f"{state} has lost its database"
        return (f"the SuperLink of {certs} keeps its allow-list and revocations in its state folder, which {why}: "
                f"start with --state {known}, or pass --new-state to start over with an empty allow-list "
                "(every key in --allow is admitted again, revoked ones included)")
    marker.write_text(str(state) + "\n")
    return None


def _wait_ready(children: dict[str, subprocess.Popen], address: str, ca: Path, timeout: float) -> Optional[str]:
    """Wait until ``address`` answers TLS; the name of a child that exited first, else None."""
    deadline = time.monotonic() + timeout
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                return name
        try:
            wait_for_tls(address, ca, timeout=1)
            return None
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def start(certs: Path, state: Path, allow_dir: Optional[Path], host: str, port: int, control_port: int,
          new_state: bool = False) -> int:
    certs, state = certs.resolve(), state.resolve()
    allow_dir = allow_dir.resolve() if allow_dir else None
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (certs / name).is_file():
            log.error("missing %s in %s (make development ones with `unheard-certs ca %s`)", name, certs, certs)
            return 2
    if allow_dir is not None and not allow_dir.is_dir():
        log.error("--allow %s is not a folder of device public keys", allow_dir)
        return 2
    state.mkdir(parents=True, exist_ok=True)
    refused = _check_canonical(certs, state, new_state)
    if refused:
        log.error("%s", refused)
        return 2
    control = f"127.0.0.1:{control_port}"
    write_connection(_home(state), control, certs / "ca.crt")
    superlink_cmd = [
        tool("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
        str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--database", str(state / "superlink.db"),
        "--host", "127.0.0.1", "--port", str(control_port)]
    proxy_cmd = [sys.executable, "-m", "server.fleet_proxy", "--listen", f"{host}:{port}", "--upstream", control,
                 "--certs", str(certs)]
    env = flower_env(_home(state))
    children = {"flower-superlink": subprocess.Popen(superlink_cmd, env=env, cwd=state)}
    children["fleet proxy"] = subprocess.Popen(proxy_cmd, env=env, cwd=Path(__file__).resolve().parent.parent)

    def stop(*_: Any) -> None:
        for child in children.values():
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        for address in (control, f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else f"{host}:{port}"):
            died = _wait_ready(children, address, certs / "ca.crt", timeout=60)
            if died:
                log.error("%s exited with code %s before it was ready (its own error is above)", died,
                          children[died].returncode)
                stop()
                return 1
        record = _allowed(state)
        revoked = {fp for fp, e in record["keys"].items() if e.get("revoked")}
        keys = sorted(allow_dir.glob("*.pub")) if allow_dir else []
        skipped = [k for k in keys if _fingerprint(k) in revoked]
        for k in skipped:
            log.warning("not allowing %s: it was revoked", k.name)
        allowed = sum(allow(state, k) for k in keys if k not in skipped)
        log.info("SuperLink ready: devices connect to %s:%d (Fleet API only, TLS, SuperNode authentication on); "
                 "operator commands use %s (loopback): %d of %d device keys allowed", host, port, control, allowed,
                 len(keys))
        while all(child.poll() is None for child in children.values()):
            time.sleep(1.0)
        died = next(name for name, child in children.items() if child.poll() is not None)
        log.error("%s exited with code %s; stopping", died, children[died].returncode)
        stop()
        return 1
    except (TimeoutError, KeyboardInterrupt) as err:
        log.error("%s", err or "interrupted")
        stop()
        return 1
    finally:
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def status(state: Path) -> int:
    """The runs and the devices of a running SuperLink (its own view: ``flwr ls`` and ``flwr supernode ls``)."""
    runs = _flwr(state, "ls", CONNECTION)
    nodes = _flwr(state, "supernode", "ls", CONNECTION, "--verbose")
    sys.stdout.write("Runs\n" + runs.stdout + "\nDevices (online, offline, registered; last change)\n" + nodes.stdout)
    sys.stderr.write(runs.stderr + nodes.stderr)
    record = _allowed(state)["keys"]
    if record:
        sys.stdout.write("\nKeys allowed through unheard-superlink\n" + "".join(
            f"  {e['name']}: node {e['node']}{' (revoked)' if e.get('revoked') else ''}\n" for e in record.values()))
    return max(runs.returncode, nodes.returncode)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="unheard-superlink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start the SuperLink and its Fleet-only proxy (foreground)")
    p.add_argument("--certs", type=Path, required=True, help="folder with ca.crt, server.crt, server.key")
    p.add_argument("--state", type=Path, required=True, help="folder for the SuperLink's database and CLI config")
    p.add_argument("--allow", type=Path, help="folder of device public keys (*.pub) to register")
    p.add_argument("--host", default="0.0.0.0", help="address devices connect to (Fleet API only)")
    p.add_argument("--port", type=int, default=9093, help="port devices connect to")
    p.add_argument("--control-port", type=int, default=9095,
                   help="loopback port of the SuperLink itself (operator commands, unheard-launch)")
    p.add_argument("--new-state", action="store_true", help="start over in a new state folder (empty allow-list)")
    for name, text in (("allow", "register a device public key"), ("revoke", "refuse a device from now on"),
                       ("list", "registered devices and their status"), ("status", "runs, devices online, last seen")):
        a = sub.add_parser(name, help=text)
        a.add_argument("--state", type=Path, required=True)
        if name == "allow":
            a.add_argument("key", type=Path)
        elif name == "revoke":
            a.add_argument("node_id")
    args = parser.parse_args(argv)
    console_logging()
    if args.command == "start":
        sys.exit(start(args.certs, args.state, args.allow, args.host, args.port, args.control_port, args.new_state))
    state = args.state.resolve()
    if not (_home(state) / "config.toml").exists():
        log.error("%s is not the state folder of a started SuperLink", state)
        sys.exit(2)
    if args.command == "allow":
        sys.exit(0 if allow(state, args.key) else 1)
    if args.command == "revoke":
        sys.exit(0 if revoke(state, args.node_id) else 1)
    if args.command == "status":
        sys.exit(status(state))
    proc = _flwr(state, "supernode", "ls", CONNECTION, "--verbose")
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
