"""What every experiment entry point builds first: data, the seed model, canaries, and the audit.

Shared by ``unheard-simulate`` (federated) and ``unheard-central`` (the centralised upper bound),
so both see exactly the same devices, evaluation speakers, seed model and planted canaries.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from fl.audit.canaries import PREFIX as CANARY_PREFIX
from fl.audit.canaries import Canaries, make_canaries, plant
from fl.audit.report import canary_audit, membership_audit
from fl.config import Config
from fl.data.fleet import DeviceData
from fl.data.prepare import PreparedData, prepare_data
from fl.model import build_recognizer
from fl.pretrain import SeedModel, pretrain_seed
from server.checkpoint import private_path

log = logging.getLogger(__name__)
AUDIT = "audit.json"
AUDIT_LOSSES = "audit-losses.json"  # under the run's private/ folder


@dataclass
class Inputs:
    data: PreparedData
    devices: dict[str, DeviceData]  # with canaries planted, if any
    seed: SeedModel
    canaries: Optional[Canaries]
    canary_holders: dict[str, str]


def build_inputs(cfg: Config, out_dir: Path) -> Inputs:
    """Prepare data (writing ``problems.jsonl`` to ``out_dir``), pretrain or load the seed, plant canaries."""
    torch.manual_seed(cfg.seed)
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, cfg.device)
    data = prepare_data(cfg.data, recognizer, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "problems.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in data.problems))
    seed = pretrain_seed(recognizer, cfg.model, cfg.pretrain, data.public_train, data.public_dev,
                         Path(cfg.data.cache_dir) / "models", cfg.seed)
    devices, canaries, holders = data.devices, None, {}
    if cfg.audit.canaries:
        canaries = make_canaries(cfg.audit.canaries, cfg.audit.canary_references, cfg.audit.canary_words,
                                 recognizer, cfg.seed)
        devices, holders = plant(data.devices, canaries.planted, cfg.audit.canary_repeats, cfg.seed)
        log.info("planted %d canaries x %d copies in devices %s", len(holders), cfg.audit.canary_repeats,
                 sorted(holders.values()))
    return Inputs(data, devices, seed, canaries, holders)


def run_audit(cfg: Config, inputs: Inputs, weights: dict[str, torch.Tensor], trained: set[str],
              out_dir: Path) -> Optional[dict]:
    """Membership inference and canary exposure on the final ``weights``; the figures are written to
    ``audit.json``, the losses behind them to ``private/audit-losses.json`` (the experimenter's own)."""
    if not cfg.audit.membership and not cfg.audit.canaries:
        return None
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, cfg.device)
    model = recognizer.module_from(weights)
    report: dict = {"devices_trained": len(trained), "devices": len(inputs.devices)}
    losses: dict = {}
    if cfg.audit.membership:
        copies = {e.id for d in inputs.devices.values() for e in d.train if e.id.startswith(CANARY_PREFIX)}
        report["membership"], losses["membership"] = membership_audit(
            recognizer, model, inputs.devices, trained, inputs.data.held_out, cfg.audit.max_utterances, cfg.seed,
            exclude=copies)
    if inputs.canaries is not None:
        report["canaries"], losses["canaries"] = canary_audit(recognizer, model, inputs.canaries,
                                                              inputs.canary_holders, trained)
    (out_dir / AUDIT).write_text(json.dumps(report, indent=1))
    fd = os.open(private_path(out_dir) / AUDIT_LOSSES, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:  # owner-only, like the rest of private/
        f.write(json.dumps(losses))
    return report
