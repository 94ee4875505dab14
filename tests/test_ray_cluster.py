"""A simulation attaches to an existing Ray cluster (its head started here, on loopback, by PID);
otherwise the local Ray instance it starts has the size ``federation.num_cpus`` says.

The head takes every port it listens on from the OS, so neither another head nor anything else on
the machine can make it fail: its GCS port is 0 (the address is read back from the file Ray writes),
so are the dashboard agent's HTTP port (52365 by default) and the workers' (10002-19999 by
default), and the Ray client server (10001 by default; Ray takes no 0 there) gets a port held bound
for it (``held_port``); the dashboard is off.
Its CPU count is fixed, so the actor pool does not grow with the runner's cores.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.loopback import held_port, stop_group
from experiments.simulate import backend_config
from fl.config import FederationConfig
from tests.conftest import ROOT, listening, simulate

pytestmark = pytest.mark.timeout(600)
HEAD_CPUS = 3
"""The head's CPUs: fixed, and not the smoke preset's local ``federation.num_cpus``, so the actor
pool's size shows whose resources ran it."""
SMOKE_CPUS = OmegaConf.load(ROOT / "conf" / "experiment" / "smoke.yaml").federation.num_cpus


def _head_port(temp: Path, head: subprocess.Popen, log: Path) -> int:
    """The GCS port of the head started with ``--temp-dir=temp``, once it accepts connections on loopback."""
    address_file = temp / "ray_current_cluster"  # `ray start` writes HOST:PORT there once the head is up
    deadline = time.monotonic() + 120
    while True:
        assert head.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the Ray head did not come up:\n{log.read_text()[-3000:]}"
        found = re.fullmatch(r".+:(\d+)", address_file.read_text().strip()) if address_file.exists() else None
        if found and listening(int(found.group(1))):
            return int(found.group(1))
        time.sleep(0.5)


@pytest.fixture
def ray_head(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    log = tmp_path / "ray-head.log"
    with held_port("0.0.0.0") as client_port:
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port=0",
               "--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0",
               f"--ray-client-server-port={client_port}",
               f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]  # so no ray_current_cluster is left in /tmp/ray
        with open(log, "w") as out:
            head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        try:
            port = _head_port(temp, head, log)
            yield f"127.0.0.1:{port}"
        finally:
            stop_group(head, timeout=60)
            shutil.rmtree(temp, ignore_errors=True)
    deadline = time.monotonic() + 30
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not listening(port), "the Ray head is still listening after being stopped"


def test_the_smoke_run_attaches_to_a_running_ray_cluster(ray_head, tmp_path, sim_cache):
    assert SMOKE_CPUS is not None and SMOKE_CPUS != HEAD_CPUS
    out = simulate(tmp_path / "sim", sim_cache, f"federation.ray_address={ray_head}", "privacy=none")
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["federation"]["ray_address"] == ray_head
    assert f"attaching the simulation to the Ray cluster at {ray_head}" in (out / "stdout.txt").read_text()
    # one actor per CPU of the cluster it ran on: the head's, not a new local instance's federation.num_cpus
    assert f"Constructed ActorPool with: {HEAD_CPUS} actors" in (out / "stdout.txt").read_text()


def test_a_local_ray_instance_has_the_configured_cpus_and_an_attached_cluster_its_own():
    local = backend_config(FederationConfig(num_cpus=2, num_cpus_per_client=0.5))
    assert local["init_args"] == {"include_dashboard": False, "address": "local", "num_cpus": 2}
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert "num_cpus" not in backend_config(FederationConfig())["init_args"]  # default: all of this machine's
    attached = backend_config(FederationConfig(num_cpus=2, ray_address="127.0.0.1:6380"))["init_args"]
    assert attached == {"include_dashboard": False, "address": "127.0.0.1:6380"}  # Ray refuses num_cpus there
