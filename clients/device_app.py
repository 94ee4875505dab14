"""The ClientApp that a deployed SuperNode (``unheard-device``) runs for every message.

Training and privacy settings come from the run's config (``fl/runconfig.py``), so every device
in a run uses the policy the launcher composed; the device's recordings and state folder come
from its own node config (``clients/local.py``). A device may also carry its own, stricter
budget: ``--node-config max-epsilon=...`` caps its sample-level epsilon whatever the run asks.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.client_app import DeviceSettings, make_client_app
from clients.local import LocalDevice
from fl import runconfig
from fl.deploy.flower import console_logging
from fl.model import build_recognizer

MAX_EPSILON = "max-epsilon"
AUDIT_DIR = "audit-dir"


@lru_cache(maxsize=4)
def _app_for(config_json: str, max_epsilon: Optional[float], audit_dir: Optional[str]) -> ClientApp:
    cfg, _ = runconfig.from_run_config({runconfig.CONFIG_KEY: config_json})
    if cfg.privacy.reproducible:
        raise PermissionError("this run asks for privacy.reproducible=true (noise derived from the config seed): "
                              "a deployed device never trains with it")
    sample = cfg.privacy.sample
    if sample is not None and max_epsilon is not None:
        own = max_epsilon if sample.max_epsilon is None else min(max_epsilon, sample.max_epsilon)
        sample = replace(sample, max_epsilon=own)
    fed = cfg.federation
    settings = DeviceSettings(cfg.model, cfg.train, sample, cfg.privacy.user, cfg.seed, fed.threads_per_client)
    recognizer = build_recognizer(cfg.model, cfg.train.trainable)
    store = LocalDevice(recognizer, cfg.data.test_fraction, cfg.data.max_seconds, cfg.seed)
    return make_client_app(settings, store, audit_dir, recognizer)


class DeployedClientApp(ClientApp):
    """A ClientApp built per run from the run config, then handling the message as usual."""

    def __call__(self, message: Message, context: Context) -> Message:
        node = context.node_config
        limit = float(node[MAX_EPSILON]) if MAX_EPSILON in node else None
        audit = str(node[AUDIT_DIR]) if AUDIT_DIR in node else None
        inner = _app_for(str(context.run_config[runconfig.CONFIG_KEY]), limit, audit)
        return inner(message, context)


console_logging()  # after the imports: Opacus has configured the root logger by now
app = DeployedClientApp()
