"""``privacy.reproducible=true``: what docs/privacy.md ("Exact reruns, explicitly") and docs/deploy.md promise.

Such a run derives every DP secret from the config seed, so its noise protects against no one who
holds the config. The server labels it so -- ``summary.json`` (``privacy.randomness``), every
``results.jsonl`` row (``randomness``) and the console -- and so do the curve tables built from it;
``unheard-launch`` refuses it before it reaches the SuperLink, and a deployed device refuses to
train in it whatever the server sends.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from omegaconf import OmegaConf

from clients import device_app
from clients.device_app import DeployedClientApp, policy_from_node_config
from clients.local import DATA_DIR, STATE_DIR
from experiments.collect import markdown_table, points_of, points_table, row_from_run
from experiments.loopback import held_port
from fl import protocol as P
from fl import runconfig
from fl.config import Config, SamplePrivacyConfig, UserPrivacyConfig
from fl.privacy.randomness import REPRODUCIBLE_LABEL
from server import checkpoint
from server.server_app import run_server
from tests.conftest import ROOT, train_message
from tests.test_device_policy import RecordingGrid, _server

NO_PROTECTION = "no protection against anyone holding the config"
"""What docs/privacy.md says every report of a reproducible run states."""
TABLE_LABEL = "(reproducible noise: no protection)"
"""The curve tables' mark on such a run's user-level epsilon (``experiments/collect.py``)."""


def _run_config(tmp_path: Path, reproducible: bool) -> dict[str, str]:
    """The run config a launcher sends: a small sample-level DP config, ``privacy.reproducible`` as given."""
    cfg = OmegaConf.structured(Config)
    cfg.data.cache_dir, cfg.model.d_model, cfg.model.layers = str(tmp_path), 32, 1
    cfg.privacy.name, cfg.privacy.sample = "sample", OmegaConf.structured(SamplePrivacyConfig)
    cfg.privacy.reproducible = reproducible
    return runconfig.to_run_config(OmegaConf.to_container(cfg, resolve=True))


def test_the_server_labels_a_reproducible_run_in_every_report(tmp_path, task_identity, caplog):
    user = UserPrivacyConfig(noise="central", noise_multiplier=2.0, clipping_norm=0.1, delta=1e-4)
    settings = replace(_server(tmp_path, "run", rounds=2, user=user, reproducible=True),
                       config={"name": "reproducible", "privacy": {"sample": None}})
    with caplog.at_level(logging.WARNING):
        run_server(RecordingGrid([1, 2, 3]), settings)
    run = tmp_path / "run"
    assert NO_PROTECTION in REPRODUCIBLE_LABEL
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["randomness"] == REPRODUCIBLE_LABEL
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["randomness"] == REPRODUCIBLE_LABEL for row in rows)
    assert f"privacy.reproducible=true: {REPRODUCIBLE_LABEL}" in caplog.text  # the console
    assert not (run / checkpoint.PRIVATE / checkpoint.SECRET).exists()  # derived from the seed, never drawn
    row = row_from_run(run, tmp_path)
    assert TABLE_LABEL in markdown_table([row]) and TABLE_LABEL in points_table(points_of([row]))
    assert TABLE_LABEL not in markdown_table([replace(row, randomness="secret")])


def test_unheard_launch_refuses_a_reproducible_run_before_reaching_the_superlink(tmp_path):
    (tmp_path / "ca.crt").write_text("never read: the run is refused first\n")
    out = tmp_path / "run"
    with held_port() as port:  # bound and never listening: nothing answers there
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "unheard-launch"), f"deploy.superlink=127.0.0.1:{port}",
             f"deploy.root_cert={tmp_path / 'ca.crt'}", "privacy.reproducible=true", f"hydra.run.dir={out}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2, said[-3000:]
    assert "privacy.reproducible=true" in said and "a deployment refuses it" in said, said[-3000:]
    assert "cannot reach the SuperLink" not in said  # refused before any connection
    assert not out.exists()  # and no run folder is left behind


def test_a_deployed_device_refuses_to_train_in_a_reproducible_run(tmp_path, monkeypatch, caplog):
    message, _ = train_message(1, {})
    state = tmp_path / "state"
    context = Context(run_id=1, node_id=5, node_config={DATA_DIR: str(tmp_path / "data"), STATE_DIR: str(state)},
                      state=RecordDict(), run_config=_run_config(tmp_path, reproducible=True))
    with caplog.at_level(logging.ERROR):
        reply = DeployedClientApp()(message, context)
    assert reply.has_error() and reply.error.code == P.ERROR_TRAINING
    assert reply.error.reason == P.DEVICE_ERRORS[P.ERROR_TRAINING]  # the fixed text: no detail leaves the device
    assert "a deployed device never trains with it" in caplog.text  # the device's own log says why
    assert not state.exists()  # nothing read, nothing spent, no secret derived
    # the same run without the flag gets past the refusal to the device's ClientApp
    built = {}
    monkeypatch.setattr(device_app, "make_client_app", lambda settings, *a, **k: built.setdefault("app", settings))
    own = json.dumps(asdict(policy_from_node_config({})), sort_keys=True)
    device_app._app_for(_run_config(tmp_path, reproducible=False)[runconfig.CONFIG_KEY], own, None, "cpu")
    assert "app" in built
    with pytest.raises(PermissionError, match="privacy.reproducible=true"):
        device_app._app_for(_run_config(tmp_path, reproducible=True)[runconfig.CONFIG_KEY], own, None, "cpu")
