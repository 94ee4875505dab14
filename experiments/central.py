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
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from experiments.inputs import Inputs, build_inputs, run_audit
from experiments.simulate import CONF_DIR, run_checked
from fl.config import Config, register_configs
from fl.data.features import Example
from fl.model import Recognizer, build_recognizer
from fl.train import evaluate, evaluation_devices, plain_round
from server.results import write_summary

log = logging.getLogger(__name__)
register_configs()


def central_steps(cfg: Config) -> int:
    """The configured steps, or as many as the federated run's devices take in all."""
    fed = cfg.federation
    if cfg.central.steps is not None:
        return cfg.central.steps
    return fed.rounds * fed.clients_per_round * cfg.train.local_steps


def device_tests(cfg: Config, inputs: Inputs) -> list[Example]:
    """The test splits a simulation of this config scores its final model on (``simulation_eval``'s devices)."""
    devices = list(inputs.devices.values())  # in partition-id order, as the fleet is written
    chosen = evaluation_devices(range(len(devices)), cfg.federation.eval_devices, cfg.seed, cfg.federation.rounds)
    return [e for pid in chosen for e in devices[pid].test]


def _scores(recognizer: Recognizer, model: nn.Module, inputs: Inputs, tests: list[Example]
            ) -> dict[str, Optional[float]]:
    """Held-out and device-test scores; the device ones are None if the devices hold no test recordings
    (each recording is test independently, so a small device may have none)."""
    held = evaluate(recognizer, model, inputs.data.held_out)
    dev = evaluate(recognizer, model, tests) if tests else None
    return {"wer": held.wer, "cer": held.cer, "raw_wer": held.raw_wer, "loss": held.loss, "loops_cut": held.loops_cut,
            "device_wer": dev.wer if dev else None, "device_cer": dev.cer if dev else None,
            "device_raw_wer": dev.raw_wer if dev else None}


def run(cfg: Config, out_dir: Path, resolved: dict) -> dict:
    """Fine-tune the seed on the pooled device data; returns the summary it wrote to ``out_dir``."""
    started = time.perf_counter()
    inputs = build_inputs(cfg, out_dir)
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, cfg.device)
    model = recognizer.module_from(inputs.seed.state_dict)
    tests = device_tests(cfg, inputs)
    seed_scores = _scores(recognizer, model, inputs, tests)
    steps = central_steps(cfg)
    pooled = [e for d in inputs.devices.values() for e in d.train if e.text is not None]  # the transcribed ones
    if not pooled:
        raise ValueError("unheard-central fine-tunes on the devices' transcripts, and none has one "
                         "(data.drop_transcripts=true, or an unlabelled corpus)")
    log.info("central fine-tune: %d steps on %d pooled utterances", steps, len(pooled))
    torch.manual_seed(cfg.seed)
    plain_round(model, recognizer, pooled, replace(cfg.train, local_steps=steps), cfg.seed)
    summary = {
        "kind": "central", "config": resolved, "seed_model": seed_scores,
        "final": _scores(recognizer, model, inputs, tests), "rounds": 0, "steps": steps,
        "stopped_early": None, "seconds": time.perf_counter() - started, "privacy": {"sample": None, "user": None},
    }
    write_summary(out_dir, summary)
    summary["audit"] = run_audit(cfg, inputs, recognizer.shared(model), set(inputs.devices), out_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    run_checked(dcfg, run)


if __name__ == "__main__":
    main()
