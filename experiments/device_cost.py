"""`python -m experiments.device_cost`: what one device's process costs in a real deployment.

Starts a loopback deployment (TLS, authentication) with one device holding one speechocean762
speaker's recordings (or, without the corpus, embedded synthetic ones), launches ``rounds`` rounds
of DP-SGD with the default model, and watches every ``flwr-clientapp`` process the SuperNode
starts (one per message): its peak resident memory (VmHWM) and lifetime. Prints a JSON report
(also written to ``--out``): the figures behind docs/deploy.md's Raspberry-Pi-class guidance.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from experiments.loopback import Loopback
from fl.deploy.certs import make_ca_and_server, make_device_key
from fl.deploy.flower import console_logging
from server.results import read_private_rounds

log = logging.getLogger(__name__)
SPEECHOCEAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "speechocean762" / "train"


def _clientapp_processes() -> dict[int, int]:
    """pid -> peak RSS (kB) of every running flwr-clientapp process."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"flwr-clientapp" not in (proc / "cmdline").read_bytes():
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    found[int(proc.name)] = int(line.split()[1])
        except OSError:
            continue
    return found


class Watcher(threading.Thread):
    """Samples flwr-clientapp processes every 0.2 s: peak RSS and lifetime of each."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[int, int] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.monotonic()
            for pid, hwm in _clientapp_processes().items():
                self.peak[pid] = max(hwm, self.peak.get(pid, 0))
                self.first.setdefault(pid, now)
                self.last[pid] = now
            time.sleep(0.2)


def _speaker_folder(target: Path) -> None:
    """One speechocean762 training speaker's 20 recordings as clip + transcript pairs."""
    text = dict(line.split(maxsplit=1) for line in (SPEECHOCEAN / "text").read_text().splitlines() if line.strip())
    wav = dict(line.split(maxsplit=1) for line in (SPEECHOCEAN / "wav.scp").read_text().splitlines() if line.strip())
    first = sorted((SPEECHOCEAN / "spk2utt").read_text().splitlines())[0].split()
    target.mkdir(parents=True)
    for uid in first[1:]:
        (target / f"{uid}.ogg").symlink_to(SPEECHOCEAN.parent / wav[uid].strip())
        (target / f"{uid}.txt").write_text(text[uid])


def measure(rounds: int, root: Path) -> dict:
    certs, keys = root / "certs", root / "keys"
    make_ca_and_server(certs)
    make_device_key(keys, "device")
    _speaker_folder(root / "data" / "device")
    fleet = Loopback(root)
    watcher = Watcher()
    try:
        fleet.superlink(certs, keys)
        # 2 rounds of 8 DP-SGD steps at z 0.8 reach epsilon 12.2: past a device's default budget of 10, so
        # the measured device opts into a larger one (unheard-device --max-epsilon)
        fleet.device("device", keys / "device", certs / "ca.crt", "--max-epsilon", "50")
        fleet.wait_for("device", "SuperNode ID")
        watcher.start()
        started = time.monotonic()
        proc = fleet.launch(certs / "ca.crt", root / "run", f"federation.rounds={rounds}",
                            "federation.clients_per_round=1", "federation.sampling=fixed",
                            "federation.device_eval_every=0", "data.eval_utterances=20")
        wall = time.monotonic() - started
    finally:
        watcher.done.set()
        fleet.stop_all()
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    rows = read_private_rounds(root / "run")  # round wall times: private under DP (the server's private folder)
    config = json.loads((root / "run" / "summary.json").read_text())["config"]
    shared = torch.load(root / "run" / "checkpoints" / "round-000.pt", weights_only=False)["state_dict"]
    lifetimes = [watcher.last[p] - watcher.first[p] for p in watcher.peak]
    return {
        "model": config["model"]["kind"] + (f" ({config['model']['path']})" if config["model"]["path"] else ""),
        "shared_values": sum(v.numel() for v in shared.values()),
        "privacy": config["privacy"]["name"], "rounds": rounds,
        "clientapp_processes": len(watcher.peak),
        "peak_rss_mb": round(max(watcher.peak.values()) / 1024, 1) if watcher.peak else None,
        "clientapp_seconds_max": round(max(lifetimes), 1) if lifetimes else None,
        "round_seconds": [round(r["seconds"], 1) for r in rows[1:]],
        "launch_wall_seconds": round(wall, 1),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("device_cost.json"))
    args = parser.parse_args(argv)
    console_logging()
    if not SPEECHOCEAN.is_dir():
        raise SystemExit(f"{SPEECHOCEAN} not found: the measurement uses one speechocean762 speaker's recordings")
    with tempfile.TemporaryDirectory() as tmp:
        report = measure(args.rounds, Path(tmp))
    args.out.write_text(json.dumps(report, indent=1))
    log.info("device cost: %s", json.dumps(report))


if __name__ == "__main__":
    main()
