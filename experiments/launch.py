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

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.simulate import CONF_DIR, print_summary
from fl import runconfig
from fl.config import Config, register_configs, validate
from fl.data.prepare import DataNotFound, prepare_server_data
from fl.data.text import CharTokenizer
from fl.deploy.flower import CONNECTION, flwr, toml_string, write_connection
from fl.pretrain import pretrain_seed
from server import checkpoint
from server.results import RESULTS, SUMMARY

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parent.parent
register_configs()


def write_run_config(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k} = {toml_string(v)}\n" for k, v in values.items()), encoding="ascii")
    return path


def _status(home: Path, run_id: str) -> str:
    proc = flwr(home, "list", CONNECTION, "--run-id", run_id, "--format", "json")
    if proc.returncode != 0:
        return "unknown"
    runs = json.loads(proc.stdout).get("runs") or [{}]
    return str(runs[0].get("status", "unknown"))


def submit(cfg: Config, out_dir: Path, resolved: dict) -> str:
    """Prepare the server's inputs, start the run; returns its Flower run id."""
    if not cfg.deploy.root_cert or not Path(cfg.deploy.root_cert).is_file():
        raise FileNotFoundError(f"deploy.root_cert={cfg.deploy.root_cert}: the SuperLink's CA certificate is needed")
    if cfg.privacy.reproducible:
        raise ValueError("privacy.reproducible=true derives every DP secret from the config seed: it protects "
                         "against no one holding the config, so a deployment refuses it (simulations only)")
    checkpoint.check_out_dir(out_dir, resolved, cfg.resume)
    tokenizer = CharTokenizer()
    data = prepare_server_data(cfg.data, tokenizer, cfg.model.n_mels, cfg.seed)
    seed = pretrain_seed(cfg.model, cfg.pretrain, data.public_train, data.public_dev, tokenizer,
                         Path(cfg.data.cache_dir) / "models", cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(data.held_out, out_dir / "eval.pt")
    home = out_dir / "flwr-home"
    write_connection(home, cfg.deploy.superlink, Path(cfg.deploy.root_cert))
    values = runconfig.to_run_config(resolved, **{
        runconfig.INITIAL_WEIGHTS: str(seed.path), runconfig.EVAL_EXAMPLES: str(out_dir / "eval.pt"),
        runconfig.OUT_DIR: str(out_dir.resolve())})
    toml = write_run_config(out_dir / "run_config.toml", values)
    proc = flwr(home, "run", str(APP_DIR), CONNECTION, "--run-config", str(toml), "--format", "json")
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run failed: {(proc.stdout + proc.stderr).strip()[-2000:]}")
    run_id = str(json.loads(proc.stdout)["run-id"])
    log.info("started run %s on %s; results in %s", run_id, cfg.deploy.superlink, out_dir)
    return run_id


def wait(cfg: Config, out_dir: Path, run_id: str) -> str:
    """Poll until the run finishes (logging each new round); returns Flower's final status."""
    home, deadline, seen = out_dir / "flwr-home", time.monotonic() + cfg.deploy.timeout, 0
    while time.monotonic() < deadline:
        status = _status(home, run_id)
        results = out_dir / RESULTS
        rows = results.read_text().splitlines() if results.exists() else []
        for line in rows[seen:]:
            row = json.loads(line)
            log.info("round %d: WER %.3f, eps sample %s, eps user %s (models) %s (server)", row["round"],
                     row["wer"], row["epsilon_sample"], row["epsilon_user"], row["epsilon_user_server"])
        seen = len(rows)
        if status.startswith("finished"):
            return status
        time.sleep(3)
    flwr(home, "stop", run_id, CONNECTION)
    return "timed out (stopped)"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        run_id = submit(cfg, out_dir, OmegaConf.to_container(dcfg, resolve=True))  # type: ignore[arg-type]
    except (ValueError, DataNotFound, FileNotFoundError, RuntimeError) as err:
        log.error("%s", err)
        sys.exit(2)
    status = wait(cfg, out_dir, run_id)
    if status != "finished:completed" or not (out_dir / SUMMARY).exists():
        logs = flwr(out_dir / "flwr-home", "log", run_id, CONNECTION, "--show")
        log.error("run %s ended %s; its log:\n%s", run_id, status, logs.stdout[-5000:])
        sys.exit(1)
    print_summary(json.loads((out_dir / SUMMARY).read_text()), out_dir)


if __name__ == "__main__":
    main()
