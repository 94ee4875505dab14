"""The bridge between a Hydra-composed :class:`~fl.config.Config` and Flower's run config.

A deployed run carries the whole resolved config as one JSON string under :data:`CONFIG_KEY`, so
the ServerApp and every ClientApp rebuild exactly the typed config the launcher composed (and
validated) -- no key is copied by hand, and a device never runs with a half-updated config.
Server-side file paths (seed weights, evaluation set, output folder) travel under their own keys.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from omegaconf import OmegaConf

from fl.config import Config, validate

CONFIG_KEY = "unheard-config"
INITIAL_WEIGHTS = "unheard-initial-weights"
EVAL_EXAMPLES = "unheard-eval-examples"
OUT_DIR = "unheard-out-dir"


def to_run_config(resolved: Mapping[str, Any], **paths: str) -> dict[str, str]:
    """Flower run config for a resolved config dict plus server-side ``paths`` (keys above)."""
    return {CONFIG_KEY: json.dumps(resolved, sort_keys=True), **paths}


def from_run_config(run_config: Mapping[str, Any], hardware: bool = True) -> tuple[Config, dict[str, Any]]:
    """The typed, validated config of a run and its resolved dict (as the launcher composed it).

    ``hardware``: check ``device`` against this machine too (:func:`~fl.config.validate`); a device,
    which runs on its own hardware whatever the run's ``device`` says, passes False."""
    if CONFIG_KEY not in run_config:
        raise KeyError(f"run config has no {CONFIG_KEY!r}: start runs with unheard-launch, not bare flwr run")
    resolved = json.loads(str(run_config[CONFIG_KEY]))
    merged = OmegaConf.merge(OmegaConf.structured(Config), resolved)
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg, hardware)
    return cfg, resolved
