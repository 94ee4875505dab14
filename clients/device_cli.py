"""`unheard-device`: serve unheard's ClientApp from this device, over its own recordings.

    unheard-device --superlink HOST:PORT --data DIR --state DIR --root-cert ca.crt --auth-key KEY

checks the data folder (a Kaldi data dir, or recordings with transcripts beside them), then
becomes a Flower SuperNode (``flower-supernode``, same process id) that connects over TLS,
authenticates with the device's private key (OpenSSH ECDSA; ``unheard-certs device``) and runs
``clients/device_app.py`` for each message. Recordings never leave the device: only model
updates (clipped and noised as the run's privacy settings say) and the scalar metrics the
outbound guard allows do. The privacy ledgers and round
history live in ``--state`` and survive restarts.

The device sets its own floor: every train request is checked, before training, against this
device's policy -- not the server's word -- and declined with a fixed reason code if it asks for
less noise than ``--min-sample-z`` / ``--min-user-z``, a user-level placement not in
``--allow-user-noise`` or a sample-level one not in ``--allow-sample-noise`` (for both, ``central``
-- the clipped update or gradient sum sent in clear to a server you trust -- is refused unless
listed), or would take the device past ``--max-epsilon`` (sample-level) or ``--max-server-epsilon``
(what servers learn from its user-level releases), over every run (``clients/policy.py``). The
defaults are safe; anything weaker is the operator's explicit choice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

from clients.device_app import (
    ALLOW_SAMPLE_NOISE,
    ALLOW_USER_NOISE,
    AUDIT_DIR,
    DEVICE,
    MAX_EPSILON,
    MAX_SERVER_EPSILON,
    MIN_SAMPLE_Z,
    MIN_USER_Z,
    NO_BUDGET,
    PRIVACY_DELTA,
)
from clients.local import DATA_DIR, STATE_DIR, corpus_kind
from clients.state import DeviceState
from fl.config import SAMPLE_NOISE_PLACEMENTS, USER_NOISE_PLACEMENTS, DevicePolicy, resolve_device
from fl.data.readers import CorpusError, read_corpus
from fl.deploy.flower import console_logging, flower_env, toml_string, tool

log = logging.getLogger(__name__)


def policy_of(args: argparse.Namespace) -> DevicePolicy:
    """The device's policy as its flags say (raises ``ValueError`` for one that cannot apply)."""
    policy = DevicePolicy(min_sample_z=args.min_sample_z, min_user_z=args.min_user_z,
                          allowed_user_noise=list(args.allow_user_noise),
                          allowed_sample_noise=list(args.allow_sample_noise), max_sample_epsilon=args.max_epsilon,
                          max_server_epsilon=args.max_server_epsilon, delta=args.privacy_delta)
    policy.check()
    return policy


def _toml_budget(value: Optional[float]) -> str:
    return toml_string(NO_BUDGET) if value is None else repr(float(value))


def policy_node_config(policy: DevicePolicy) -> list[str]:
    """The policy as ``--node-config`` entries (every field: ``clients/device_app.py`` reads them back)."""
    return [f"{MIN_SAMPLE_Z}={float(policy.min_sample_z)!r}", f"{MIN_USER_Z}={float(policy.min_user_z)!r}",
            f"{ALLOW_USER_NOISE}={toml_string(','.join(policy.allowed_user_noise))}",
            f"{ALLOW_SAMPLE_NOISE}={toml_string(','.join(policy.allowed_sample_noise))}",
            f"{MAX_EPSILON}={_toml_budget(policy.max_sample_epsilon)}",
            f"{MAX_SERVER_EPSILON}={_toml_budget(policy.max_server_epsilon)}",
            f"{PRIVACY_DELTA}={float(policy.delta)!r}"]


def supernode_command(args: argparse.Namespace) -> list[str]:
    node_config = [f"{DATA_DIR}={toml_string(str(args.data.resolve()))}",
                   f"{STATE_DIR}={toml_string(str(args.state.resolve()))}", f"{DEVICE}={toml_string(args.device)}",
                   *policy_node_config(policy_of(args))]
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


def _budget_text(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:g}"


def policy_lines(policy: Optional[dict]) -> list[str]:
    """The device's policy as ``status`` shows it (as ``unheard-device`` last started it)."""
    d = DevicePolicy()
    if policy is None:
        return [f"policy        not recorded (unheard-device writes it at start; its defaults: z >= "
                f"{d.min_sample_z:g} sample, {d.min_user_z:g} user; user noise {','.join(d.allowed_user_noise)}; "
                f"sample noise {','.join(d.allowed_sample_noise)}; "
                f"budgets {_budget_text(d.max_sample_epsilon)} sample, {_budget_text(d.max_server_epsilon)} server)"]
    sample_noise = policy.get("allowed_sample_noise", d.allowed_sample_noise)  # absent from an older record
    return [f"policy        noise multiplier >= {policy['min_sample_z']:g} (DP-SGD), >= {policy['min_user_z']:g} "
            f"(user-level); user-level noise: {', '.join(policy['allowed_user_noise']) or 'none'}; "
            f"sample-level noise: {', '.join(sample_noise) or 'none'}",
            f"budgets       sample-level {_budget_text(policy['max_sample_epsilon'])}, server-facing "
            f"{_budget_text(policy['max_server_epsilon'])} (at delta {policy['delta']:g}, every run)"]


def show_status(state: Path) -> int:
    """``unheard-device status --state DIR``: this device's own privacy figures and policy, for its owner."""
    if not state.is_dir():
        log.error("%s: no such state folder", state)
        return 2
    info = DeviceState(state).status()
    eps = "-" if info["epsilon"] is None else f"{info['epsilon']:.3f} at delta {info['delta']:g} ({info['accountant']})"
    server = "-" if info["server_epsilon"] is None else (
        f"{info['server_epsilon']:.3f} at delta {info['server_delta']:g} ({info['server_accountant']})")
    clear = info["clear_updates"]
    last = info["last_round"]
    lines = [f"device state  {info['state']}", f"device key    {info['device_key']}",
             f"rounds        {info['rounds_trained']} trained"
             + (f", last: round {last['round']} ({last['steps']} steps)" if last else ""),
             f"DP-SGD steps  {info['dp_sgd_steps']}", f"epsilon       {eps}  (sample-level, every run so far)",
             f"server eps    {server}  (user-level, what servers learned: {info['server_releases']} noised "
             f"release(s), every run so far)"]
    if clear:
        lines.append(f"clear         {clear} clipped update(s) sent in clear to servers trusted with central noise "
                     "(no guarantee against them)")
    lines += policy_lines(info["policy"])
    declined = info["last_declined"]
    if declined:
        budget = declined.get("max_epsilon")
        code = declined.get("code")
        lines.append(f"declined      round {declined['declined_round']}: {declined['reason']}"
                     + (f" (budget {budget})" if budget is not None else "")
                     + (f" [code {code}]" if code is not None else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _budget(text: str) -> Optional[float]:
    if text.strip().lower() in (NO_BUDGET, "inf"):
        return None
    return float(text)


def _placements(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A flag's parser for comma-separated placements, each one of ``choices``."""
    def parse(text: str) -> list[str]:
        out = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in out if p not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not among {tuple(choices)}")
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    """``unheard-device``'s flags (its privacy policy's defaults are ``fl.config.DevicePolicy``'s)."""
    parser = argparse.ArgumentParser(prog="unheard-device", description=__doc__.splitlines()[0],
                                     epilog="`unheard-device status --state DIR` shows this device's ledgers and "
                                            "policy.")
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--data", type=Path, required=True, help="this device's recordings")
    parser.add_argument("--state", type=Path, required=True, help="folder for the ledger, history and caches")
    parser.add_argument("--root-cert", type=Path, required=True, help="CA certificate the SuperLink's is signed by")
    parser.add_argument("--auth-key", type=Path, required=True, help="this device's private key (OpenSSH)")
    parser.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's ClientApp API")
    d = DevicePolicy()
    group = parser.add_argument_group("this device's privacy policy (checked before every round; the defaults "
                                     "are safe, anything weaker is your explicit choice)")
    group.add_argument("--min-sample-z", type=float, default=d.min_sample_z,
                       help="lowest DP-SGD noise multiplier accepted (default %(default)s)")
    group.add_argument("--min-user-z", type=float, default=d.min_user_z,
                       help="lowest user-level noise multiplier accepted for local/distributed noise "
                            "(default %(default)s)")
    group.add_argument("--allow-user-noise", type=_placements(USER_NOISE_PLACEMENTS),
                       default=list(d.allowed_user_noise),
                       help="user-level noise placements accepted, comma-separated, of "
                            f"{','.join(USER_NOISE_PLACEMENTS)} (default {','.join(d.allowed_user_noise)}; "
                            "central sends the clipped update in clear to a server you trust)")
    group.add_argument("--allow-sample-noise", type=_placements(SAMPLE_NOISE_PLACEMENTS),
                       default=list(d.allowed_sample_noise),
                       help="sample-level (DP-SGD) noise placements accepted, comma-separated, of "
                            f"{','.join(SAMPLE_NOISE_PLACEMENTS)} (default {','.join(d.allowed_sample_noise)}; "
                            "central sends the clipped gradient sum in clear to a server you trust)")
    group.add_argument("--max-epsilon", type=_budget, default=d.max_sample_epsilon,
                       help="this device's sample-level budget over every run, or none (default %(default)s)")
    group.add_argument("--max-server-epsilon", type=_budget, default=d.max_server_epsilon,
                       help="budget of what servers learn from this device's user-level releases over every "
                            "run, or none (default %(default)s)")
    group.add_argument("--privacy-delta", type=float, default=d.delta,
                       help="the delta both budgets are stated at (default %(default)s)")
    parser.add_argument("--max-wait-time", type=float, help="give up if the SuperLink stays unreachable this long")
    parser.add_argument("--audit-dir", type=Path, help="log the shape of every reply this device sends here")
    parser.add_argument("--device", default="auto",
                        help="where this device's models run: auto (its GPU if torch sees one, else the CPU), cpu, "
                             "cuda or cuda:N (default %(default)s; the run's own device setting never applies here)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        status = argparse.ArgumentParser(prog="unheard-device status", description="this device's privacy figures")
        status.add_argument("--state", type=Path, required=True, help="the device's state folder")
        console_logging()
        sys.exit(show_status(status.parse_args(argv[1:]).state))
    args = build_parser().parse_args(argv)
    console_logging()
    try:
        policy = policy_of(args)
        log.info("models run on %s (--device %s)", resolve_device(args.device), args.device)
    except ValueError as err:
        log.error("%s", err)
        sys.exit(2)
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
    DeviceState(args.state).record_policy(asdict(policy))
    log.info("privacy policy: %s", " | ".join(line.split(maxsplit=1)[1] for line in policy_lines(asdict(policy))))
    env = flower_env(args.state / "flwr-home")
    cmd = supernode_command(args)
    log.info("starting SuperNode: %s", " ".join(cmd))
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
