"""`unheard-device`: serve unheard's ClientApp from this device, over its own recordings.

    unheard-device --superlink HOST:PORT --data DIR --state DIR --root-cert ca.crt --auth-key KEY

checks the data folder (a Kaldi data dir, or recordings with transcripts beside them), then
becomes a Flower SuperNode (``flower-supernode``, same process id) that connects over TLS,
authenticates with the device's private key (OpenSSH ECDSA; ``unheard-certs device``) and runs
``clients/device_app.py`` for each message. Recordings never leave the device: only model
updates (clipped and noised as the run's privacy settings say) and the scalar metrics the
outbound guard allows do. The privacy ledger and round
history live in ``--state`` and survive restarts; ``--max-epsilon`` is this device's own budget.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from clients.device_app import AUDIT_DIR, MAX_EPSILON
from clients.local import DATA_DIR, STATE_DIR, corpus_kind
from clients.state import DeviceState
from fl.data.readers import CorpusError, read_corpus
from fl.deploy.flower import console_logging, flower_env, toml_string, tool

log = logging.getLogger(__name__)


def supernode_command(args: argparse.Namespace) -> list[str]:
    node_config = [f"{DATA_DIR}={toml_string(str(args.data.resolve()))}",
                   f"{STATE_DIR}={toml_string(str(args.state.resolve()))}"]
    if args.max_epsilon is not None:
        node_config.append(f"{MAX_EPSILON}={float(args.max_epsilon)}")
    if args.audit_dir is not None:
        node_config.append(f"{AUDIT_DIR}={toml_string(str(args.audit_dir.resolve()))}")
    cmd = [tool("flower-supernode"), "--superlink", args.superlink, "--root-certificates", str(args.root_cert),
           "--auth-supernode-private-key", str(args.auth_key), "--node-config", " ".join(node_config),
           "--host", "127.0.0.1", "--port", str(args.port)]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    return cmd


def check_data(data: Path) -> int:
    """Read the data folder; log how many recordings are usable and, by kind, how many are skipped.

    The log names no recording, file or transcript (it may be collected); ``unheard-data validate``
    lists each problem for the device's owner. Returns the usable count."""
    result = read_corpus(corpus_kind(data), data)  # logs the skipped ones by kind (fl/data/readers.py)
    log.info("%d usable recordings, %d skipped (details: unheard-data validate DIR, on this device)",
             len(result.utterances), len(result.problems))
    return len(result.utterances)


def show_status(state: Path) -> int:
    """``unheard-device status --state DIR``: this device's own privacy figures, for its owner."""
    if not state.is_dir():
        log.error("%s: no such state folder", state)
        return 2
    info = DeviceState(state).status()
    eps = "-" if info["epsilon"] is None else f"{info['epsilon']:.3f} at delta {info['delta']:g} ({info['accountant']})"
    last = info["last_round"]
    lines = [f"device state  {info['state']}", f"device key    {info['device_key']}",
             f"rounds        {info['rounds_trained']} trained"
             + (f", last: round {last['round']} ({last['steps']} steps)" if last else ""),
             f"DP-SGD steps  {info['dp_sgd_steps']}", f"epsilon       {eps}  (sample-level, every run so far)"]
    declined = info["last_declined"]
    if declined:
        budget = declined.get("max_epsilon")
        lines.append(f"declined      round {declined['declined_round']}: {declined['reason']}"
                     + (f" (budget {budget})" if budget is not None else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        status = argparse.ArgumentParser(prog="unheard-device status", description="this device's privacy figures")
        status.add_argument("--state", type=Path, required=True, help="the device's state folder")
        console_logging()
        sys.exit(show_status(status.parse_args(argv[1:]).state))
    parser = argparse.ArgumentParser(prog="unheard-device", description=__doc__.splitlines()[0],
                                     epilog="`unheard-device status --state DIR` shows this device's own epsilon.")
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--data", type=Path, required=True, help="this device's recordings")
    parser.add_argument("--state", type=Path, required=True, help="folder for the ledger, history and caches")
    parser.add_argument("--root-cert", type=Path, required=True, help="CA certificate the SuperLink's is signed by")
    parser.add_argument("--auth-key", type=Path, required=True, help="this device's private key (OpenSSH)")
    parser.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's ClientApp API")
    parser.add_argument("--max-epsilon", type=float, help="this device's own sample-level budget")
    parser.add_argument("--max-wait-time", type=float, help="give up if the SuperLink stays unreachable this long")
    parser.add_argument("--audit-dir", type=Path, help="log the shape of every reply this device sends here")
    args = parser.parse_args(argv)
    console_logging()
    for what, path in (("--root-cert", args.root_cert), ("--auth-key", args.auth_key)):
        if not path.is_file():
            log.error("%s %s: no such file", what, path)
            sys.exit(2)
    try:
        usable = check_data(args.data)
    except CorpusError as err:
        log.error("%s", err)
        sys.exit(2)
    if usable < 2:
        log.warning("fewer than 2 usable recordings: this device will join but decline to train")
    args.state.mkdir(parents=True, exist_ok=True)
    env = flower_env(args.state / "flwr-home")
    cmd = supernode_command(args)
    log.info("starting SuperNode: %s", " ".join(cmd))
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
