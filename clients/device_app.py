"""The ClientApp that a deployed SuperNode (``unheard-device``) runs for every message.

Training settings and the mechanisms come from the run's config (``fl/runconfig.py``), so every
device in a run uses what the launcher composed; the device's recordings and state folder come
from its own node config (``clients/local.py``), and so does its **privacy policy**
(:func:`policy_from_node_config`): the noise floors, allowed placements and budgets every request
is checked against before training (``clients/policy.py``). The run config's ``privacy.device``
(a simulation's devices' policy) is ignored here: no server sets a deployed device's floor. Every
key missing from the node config takes ``fl.config.DevicePolicy``'s safe default; ``unheard-device``
sets them all from its flags.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from functools import lru_cache
from typing import Any, Mapping, Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.client_app import DeviceSettings, make_client_app
from clients.guard import coded_errors
from clients.local import LocalDevice
from fl import runconfig
from fl.config import DevicePolicy, resolve_device
from fl.deploy.flower import console_logging
from fl.model import build_recognizer

AUDIT_DIR = "audit-dir"
# the device's own privacy policy (fl.config.DevicePolicy), one node-config key per field
MAX_EPSILON = "max-epsilon"  # max_sample_epsilon
MAX_SERVER_EPSILON = "max-server-epsilon"
MIN_SAMPLE_Z = "min-sample-z"
MIN_USER_Z = "min-user-z"
ALLOW_USER_NOISE = "allow-user-noise"  # placements, comma-separated
ALLOW_SAMPLE_NOISE = "allow-sample-noise"  # placements, comma-separated
PRIVACY_DELTA = "privacy-delta"
DEVICE = "device"
"""Node-config key: where this device's models run (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default
``auto``, its own GPU if it has one, else its CPU). The device's choice, never the run's ``device``."""
NO_BUDGET = "none"
"""A budget's value for "no budget" (``inf`` works too)."""


def _budget(node: Mapping[str, Any], key: str, default: Optional[float]) -> Optional[float]:
    if key not in node:
        return default
    value = node[key]
    if isinstance(value, str) and value.strip().lower() in (NO_BUDGET, "inf", "infinity"):
        return None
    number = float(value)
    return None if math.isinf(number) else number


def _placements(node: Mapping[str, Any], key: str, default: list[str]) -> list[str]:
    if key not in node:
        return list(default)
    return [p.strip() for p in str(node[key]).split(",") if p.strip()]


def policy_from_node_config(node: Mapping[str, Any]) -> DevicePolicy:
    """The device's own policy from its node config; every missing key takes the safe default.

    Raises ``ValueError`` for one that cannot apply (the device then trains in no run)."""
    d = DevicePolicy()
    policy = DevicePolicy(
        min_sample_z=float(node.get(MIN_SAMPLE_Z, d.min_sample_z)),
        min_user_z=float(node.get(MIN_USER_Z, d.min_user_z)),
        allowed_user_noise=_placements(node, ALLOW_USER_NOISE, d.allowed_user_noise),
        allowed_sample_noise=_placements(node, ALLOW_SAMPLE_NOISE, d.allowed_sample_noise),
        max_sample_epsilon=_budget(node, MAX_EPSILON, d.max_sample_epsilon),
        max_server_epsilon=_budget(node, MAX_SERVER_EPSILON, d.max_server_epsilon),
        delta=float(node.get(PRIVACY_DELTA, d.delta)))
    policy.check()
    return policy


def device_from_node_config(node: Mapping[str, Any]) -> str:
    """The device's own ``device`` from its node config (``auto`` when unset), checked on this machine.

    Raises ``ValueError`` for a malformed spec or hardware this machine lacks."""
    spec = str(node.get(DEVICE, "auto"))
    resolve_device(spec)
    return spec


@lru_cache(maxsize=4)
def _app_for(config_json: str, policy_json: str, audit_dir: Optional[str], device: str) -> ClientApp:
    # the run's device is the server's: this device runs on its own hardware, so it is not checked here
    cfg, _ = runconfig.from_run_config({runconfig.CONFIG_KEY: config_json}, hardware=False)
    if cfg.privacy.reproducible:
        raise PermissionError("this run asks for privacy.reproducible=true (noise derived from the config seed): "
                              "a deployed device never trains with it")
    policy = DevicePolicy(**json.loads(policy_json))  # the device's own, never the run config's privacy.device
    fed = cfg.federation
    settings = DeviceSettings(cfg.model, cfg.train, cfg.privacy.sample, cfg.privacy.user, cfg.seed,
                              fed.threads_per_client, policy=policy, device=device)
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, device)
    store = LocalDevice(recognizer, cfg.data.test_fraction, cfg.data.max_seconds)
    return make_client_app(settings, store, audit_dir, recognizer)


class DeployedClientApp(ClientApp):
    """A ClientApp built per run from the run config, then handling the message as usual.

    A failure to build it leaves as a fixed error code too (``clients.guard.coded_errors``), never as
    Flower's free-text reason."""

    def __call__(self, message: Message, context: Context) -> Message:
        def handle() -> Message:
            node = context.node_config
            policy = json.dumps(asdict(policy_from_node_config(node)), sort_keys=True)
            audit = str(node[AUDIT_DIR]) if AUDIT_DIR in node else None
            inner = _app_for(str(context.run_config[runconfig.CONFIG_KEY]), policy, audit,
                             device_from_node_config(node))
            return inner(message, context)

        return coded_errors(message, handle)


console_logging()  # after the imports: Opacus has configured the root logger by now
app = DeployedClientApp()
