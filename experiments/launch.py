"""`unheard-launch`: submit a training run to a running SuperLink, from the same Hydra configs.

    unheard-launch deploy.superlink=HOST:PORT deploy.root_cert=certs/ca.crt [any conf/ override]

Composes and validates the config exactly as ``unheard-simulate`` does, prepares what the server
holds (the seed model, pretrained on public data only, and the evaluation set), bundles this
project as a Flower app and starts it with ``flwr run``; the whole config travels as one run-config
value (``fl/runconfig.py``). Run it on the SuperLink's machine: the ServerApp writes
``results.jsonl``, ``summary.json`` and checkpoints into this command's Hydra run dir, which is
polled for progress until the run finishes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.live import Live
from rich.table import Table

from experiments.simulate import CONF_DIR, print_summary
from fl import runconfig
from fl.config import Config, register_configs, validate
from fl.data.prepare import DataNotFound, prepare_server_data
from fl.deploy.flower import CONNECTION, flwr, toml_string, write_connection
from fl.model import build_recognizer
from fl.pretrain import pretrain_seed
from server import checkpoint
from server.results import RESULTS, SUMMARY, read_private_rounds
from server.server_app import PROGRESS

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parent.parent
register_configs()
RUN_RECORD = "run.json"


def write_run_config(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k} = {toml_string(v)}\n" for k, v in values.items()), encoding="ascii")
    return path


def _status(home: Path, run_id: str) -> str:
    proc = flwr(home, "list", CONNECTION, "--run-id", run_id, "--format", "json")
    if proc.returncode != 0:
        return "unknown"
    runs = json.loads(proc.stdout).get("runs") or [{}]
    return str(runs[0].get("status", "unknown"))


def online_devices(home: Path) -> int:
    """Devices connected to the SuperLink now; raises ``ConnectionError`` if it cannot be reached."""
    proc = flwr(home, "supernode", "ls", CONNECTION, "--format", "json")
    try:
        nodes = json.loads(proc.stdout).get("nodes", []) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        nodes = None
    if nodes is None:
        raise ConnectionError((proc.stdout + proc.stderr).strip()[-800:] or f"flwr exited with {proc.returncode}")
    return sum(1 for n in nodes if n.get("status") == "online")


def wait_for_devices(cfg: Config, home: Path) -> int:
    """Check the SuperLink connection, then wait (saying "n of m devices connected") until the run can start.

    User-level DP needs ``clients_per_round`` devices; otherwise one is enough to start. Raises
    ``ConnectionError`` (unreachable) or ``TimeoutError`` (too few devices within round_timeout)."""
    wanted = cfg.federation.clients_per_round if cfg.privacy.user is not None else 1
    deadline, said = time.monotonic() + cfg.federation.round_timeout, -1
    while True:
        online = online_devices(home)
        if online != said:
            log.info("%d of %d devices connected", online, wanted)
            said = online
        if online >= wanted:
            return online
        if time.monotonic() > deadline:
            raise TimeoutError(f"{online} of the {wanted} devices this run needs connected within "
                               f"federation.round_timeout={cfg.federation.round_timeout:g} s: a cohort of "
                               f"{cfg.federation.clients_per_round} cannot exceed the population")
        time.sleep(2.0)


class RunFolder:
    """The launcher's hold on its Hydra run folder: a lock (one launcher per folder) and ``run.json``
    (which SuperLink run writes here), so a resume never starts a second ServerApp beside a live one."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.record = out_dir / RUN_RECORD
        self.lock = open(out_dir / ".launch.lock", "a")

    def acquire(self) -> None:
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another unheard-launch is attached to {self.out_dir}") from None

    def previous_run(self) -> Optional[str]:
        return json.loads(self.record.read_text())["run_id"] if self.record.exists() else None

    def started(self, run_id: str, superlink: str) -> None:
        self.record.write_text(json.dumps({"run_id": run_id, "superlink": superlink}))


def prepare(cfg: Config, out_dir: Path, resolved: dict) -> tuple[Path, dict[str, str]]:
    """Check the config, the folder and the SuperLink (before any data work), then the seed model and
    evaluation set; returns the flwr home and the run config."""
    if not cfg.deploy.root_cert or not Path(cfg.deploy.root_cert).is_file():
        raise FileNotFoundError(f"deploy.root_cert={cfg.deploy.root_cert}: the SuperLink's CA certificate is needed")
    if cfg.privacy.reproducible:
        raise ValueError("privacy.reproducible=true derives every DP secret from the config seed: it protects "
                         "against no one holding the config, so a deployment refuses it (simulations only)")
    checkpoint.check_out_dir(out_dir, resolved, cfg.resume)
    home = out_dir / "flwr-home"
    write_connection(home, cfg.deploy.superlink, Path(cfg.deploy.root_cert))
    try:
        wait_for_devices(cfg, home)
    except ConnectionError as err:
        raise ConnectionError(f"cannot reach the SuperLink's operator address deploy.superlink="
                              f"{cfg.deploy.superlink} (unheard-superlink start --control-port, on its host): "
                              f"{err}") from None
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, cfg.device)
    data = prepare_server_data(cfg.data, recognizer, cfg.seed)
    seed = pretrain_seed(recognizer, cfg.model, cfg.pretrain, data.public_train, data.public_dev,
                         Path(cfg.data.cache_dir) / "models", cfg.seed)
    torch.save(data.held_out, out_dir / "eval.pt")
    return home, runconfig.to_run_config(resolved, **{
        runconfig.INITIAL_WEIGHTS: str(seed.path), runconfig.EVAL_EXAMPLES: str(out_dir / "eval.pt"),
        runconfig.OUT_DIR: str(out_dir.resolve())})


def submit(cfg: Config, out_dir: Path, home: Path, values: dict[str, str]) -> str:
    """Start the run on the SuperLink; returns its Flower run id."""
    toml = write_run_config(out_dir / "run_config.toml", values)
    proc = flwr(home, "run", str(APP_DIR), CONNECTION, "--run-config", str(toml), "--format", "json")
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run failed: {(proc.stdout + proc.stderr).strip()[-2000:]}")
    try:
        run_id = str(json.loads(proc.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError):
        raise RuntimeError(f"flwr run gave no run id: {(proc.stdout + proc.stderr).strip()[-2000:]}") from None
    log.info("started run %s on %s; results in %s", run_id, cfg.deploy.superlink, out_dir)
    return run_id


def _view(out_dir: Path, rounds: int, run_id: str) -> Table:
    """The live view: round progress, what the server is doing, devices, epsilon so far.

    Under privacy ``progress.json`` and ``results.jsonl`` say the expected cohort only; the round's
    realised counts come from the server's private folder, this operator's own (when readable)."""
    progress = json.loads((out_dir / PROGRESS).read_text()) if (out_dir / PROGRESS).exists() else {}
    rows = [json.loads(x) for x in (out_dir / RESULTS).read_text().splitlines()] if (out_dir / RESULTS).exists() else []
    last = rows[-1] if rows else {}
    done = max(0, last.get("round", 0))
    table = Table(title=f"unheard run {run_id}", show_header=False, box=None)
    table.add_row("rounds", f"{'█' * done}{'░' * max(0, rounds - done)} {done}/{rounds}")
    phase = progress.get("phase", "starting")
    asked = progress.get("cohort", progress.get("expected_cohort", 0))
    asked_text = f"{asked} devices asked" if "cohort" in progress else f"{asked} devices expected"
    if phase == "waiting for devices":
        phase += f": {progress.get('connected', 0)} of {progress.get('wanted', '?')} connected"
    elif phase == "training":
        phase += f" round {progress['round']}: {asked_text}, waiting for replies"
    elif phase == "round done":
        realised = next((r for r in reversed(read_private_rounds(out_dir)) if r["round"] == progress["round"]), None)
        if "replies" in progress:
            phase += (f" {progress['round']}: {progress.get('replies', 0)} of {asked} replied, "
                      f"{progress.get('failures', 0)} failed, {progress.get('rejected', 0)} rejected")
        elif realised is not None:  # the private figures, on the experimenter's own console only
            phase += (f" {progress['round']} ({asked_text}; private: {realised['clients']} updates, "
                      f"{realised['declined']} declined, {realised['failures']} failed, "
                      f"{realised['rejected']} rejected)")
        else:
            phase += f" {progress['round']} ({asked_text})"
    table.add_row("server", phase)
    table.add_row("devices", str(progress.get("connected", "-")))
    if last:
        eps = [f"sample {last['epsilon_sample']:.3g}" if last.get("epsilon_sample") is not None else None,
               f"user (models) {last['epsilon_user']:.3g}" if last.get("epsilon_user") is not None else None,
               f"user (server) {last['epsilon_user_server']:.3g}" if last.get("epsilon_user_server") is not None
               else None]
        table.add_row("epsilon", ", ".join(e for e in eps if e) or "no privacy")
        table.add_row("held-out WER", f"{100 * last['wer']:.1f}%")
    return table


def wait(cfg: Config, out_dir: Path, run_id: str) -> str:
    """Show the run live until it finishes; returns Flower's final status."""
    home, deadline = out_dir / "flwr-home", time.monotonic() + cfg.deploy.timeout
    with Live(_view(out_dir, cfg.federation.rounds, run_id), console=Console(stderr=True),
              refresh_per_second=1, transient=False) as live:
        while time.monotonic() < deadline:
            status = _status(home, run_id)
            live.update(_view(out_dir, cfg.federation.rounds, run_id))
            if status.startswith("finished"):
                return status
            time.sleep(2)
    flwr(home, "stop", run_id, CONNECTION)
    return "timed out (stopped)"


USAGE = """unheard-launch: submit a training run to a running SuperLink, from the same Hydra configs.

  unheard-launch deploy.superlink=127.0.0.1:9095 deploy.root_cert=certs/ca.crt [overrides]

Run it on the SuperLink's host: deploy.superlink is the SuperLink's operator address (its loopback
--control-port), deploy.root_cert the CA that signed its certificate. Any `unheard-simulate`
override applies (privacy=both, federation.rounds=20, ...). It checks the connection and waits until
enough devices are connected ("n of m devices connected"), prepares the seed model and evaluation
set, starts the run and shows it live; results land in its Hydra run dir (hydra.run.dir=...).
Ctrl-C stops the run on the SuperLink; `resume=true hydra.run.dir=<folder>` continues it.
Config groups and keys: `unheard-simulate --help`; privacy: docs/privacy.md; set-up: docs/deploy.md.
"""


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    folder = RunFolder(out_dir)
    try:
        validate(cfg)
        folder.acquire()
        previous = folder.previous_run()
        if cfg.resume and previous is not None:
            status = _status(out_dir / "flwr-home", previous)
            if not status.startswith("finished") and status != "unknown":
                raise RuntimeError(f"run {previous} of this folder is still {status} on the SuperLink: stop it "
                                   f"(flwr stop {previous}) or let it finish before resuming")
        home, values = prepare(cfg, out_dir, resolved)  # type: ignore[arg-type]
        run_id = submit(cfg, out_dir, home, values)
        folder.started(run_id, cfg.deploy.superlink)
    except (ValueError, DataNotFound, FileNotFoundError, RuntimeError, ConnectionError, TimeoutError) as err:
        log.error("%s", err)
        if not (out_dir / RESULTS).exists() and not checkpoint.state_path(out_dir).exists():
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing of a run is in it: leave no half-made folder
        sys.exit(2)

    def stop(*_: object) -> None:
        flwr(home, "stop", run_id, CONNECTION)
        log.error("stopped run %s on the SuperLink; continue it with: unheard-launch resume=true hydra.run.dir=%s "
                  "(and the same overrides)", run_id, out_dir)
        sys.exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    status = wait(cfg, out_dir, run_id)
    if status != "finished:completed" or not (out_dir / SUMMARY).exists():
        logs = flwr(home, "log", run_id, CONNECTION, "--show")
        log.error("run %s ended %s; its log:\n%s", run_id, status, logs.stdout[-5000:])
        sys.exit(1)
    print_summary(json.loads((out_dir / SUMMARY).read_text()), out_dir)


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.stdout.write(USAGE)
        return
    _hydra_main()


if __name__ == "__main__":
    main()
