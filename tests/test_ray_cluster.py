"""A simulation attaches to an existing Ray cluster (its head started here, on loopback, by PID)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from experiments.loopback import free_port, stop_group
from tests.conftest import simulate

pytestmark = pytest.mark.timeout(600)
HEAD_CPUS = (os.cpu_count() or 1) + 1  # not this machine's: the actor pool's size shows whose resources ran it


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def ray_head(tmp_path):
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = open(tmp_path / "ray-head.log", "w")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
           f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]  # so no ray_current_cluster is left in /tmp/ray
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    deadline = time.monotonic() + 120
    while not _listening(port):
        assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the Ray head did not come up"
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    stop_group(head, timeout=60)
    shutil.rmtree(temp, ignore_errors=True)
    deadline = time.monotonic() + 30
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listening(port), "the Ray head is still listening after being stopped"


def test_the_smoke_run_attaches_to_a_running_ray_cluster(ray_head, tmp_path, sim_cache):
    out = simulate(tmp_path / "sim", sim_cache, f"federation.ray_address={ray_head}", "privacy=none")
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["federation"]["ray_address"] == ray_head
    assert f"attaching the simulation to the Ray cluster at {ray_head}" in (out / "stdout.txt").read_text()
    # one actor per CPU of the cluster it ran on: the head's, not a new local instance's os.cpu_count()
    assert f"Constructed ActorPool with: {HEAD_CPUS} actors" in (out / "stdout.txt").read_text()
