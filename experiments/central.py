"""`unheard-central`: the centralised non-private fine-tune, the upper bound of every curve.

Same Hydra config, data, seed model and canaries as ``unheard-simulate``, but all devices'
training utterances are pooled on one machine and fine-tuned without DP -- what a provider that
collects (and listens to) users' recordings could reach. It writes ``summary.json`` (with
``"kind": "central"``) and ``audit.json`` like a federated run, so the collector puts it beside them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from experiments.inputs import Inputs, build_inputs, run_audit
from experiments.simulate import CONF_DIR, run_checked
from fl.config import Config, register_configs
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC
from fl.train import evaluate, plain_round
from server.results import write_summary

log = logging.getLogger(__name__)
register_configs()


def central_steps(cfg: Config) -> int:
    """The configured steps, or as many as the federated run's devices take in all."""
    fed = cfg.federation
    if cfg.central.steps is not None:
        return cfg.central.steps
    return fed.rounds * fed.clients_per_round * cfg.train.local_steps


def _scores(model: ConformerCTC, inputs: Inputs, tokenizer: CharTokenizer, n_mels: int) -> dict[str, float]:
    held = evaluate(model, inputs.data.held_out, tokenizer, n_mels)
    dev = evaluate(model, [e for d in inputs.devices.values() for e in d.test], tokenizer, n_mels)
    return {"wer": held.wer, "cer": held.cer, "loss": held.loss, "device_wer": dev.wer, "device_cer": dev.cer}


def run(cfg: Config, out_dir: Path, resolved: dict) -> dict:
    """Fine-tune the seed on the pooled device data; returns the summary it wrote to ``out_dir``."""
    started = time.perf_counter()
    inputs = build_inputs(cfg, out_dir)
    tokenizer = CharTokenizer()
    model = ConformerCTC(cfg.model, tokenizer.vocab_size)
    model.load_state_dict(inputs.seed.state_dict)
    seed_scores = _scores(model, inputs, tokenizer, cfg.model.n_mels)
    steps = central_steps(cfg)
    pooled = [e for d in inputs.devices.values() for e in d.train]
    log.info("central fine-tune: %d steps on %d pooled utterances", steps, len(pooled))
    torch.manual_seed(cfg.seed)
    plain_round(model, pooled, replace(cfg.train, local_steps=steps), tokenizer.blank, cfg.model.n_mels, cfg.seed)
    summary = {
        "kind": "central", "config": resolved, "seed_model": seed_scores,
        "final": _scores(model, inputs, tokenizer, cfg.model.n_mels), "rounds": 0, "steps": steps,
        "stopped_early": None, "seconds": time.perf_counter() - started, "privacy": {"sample": None, "user": None},
    }
    write_summary(out_dir, summary)
    summary["audit"] = run_audit(cfg, inputs, model.state_dict(), set(inputs.devices), out_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    run_checked(dcfg, run)


if __name__ == "__main__":
    main()
