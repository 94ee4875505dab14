"""docs/deploy.md's set-up commands, run as written: parsed from the document's code blocks.

The substitutions are the ones a reader makes on one machine: the device's host name is
127.0.0.1, its home folder is a temporary one, ``NODE_ID`` is the node id ``allow`` reported, and
the second device key of "Adding and revoking" is made with the document's own ``unheard-certs``
line. The ports are substituted too, by ones the OS picked, so that nothing else on the machine can
fail the test: the document's 9093 (where devices connect) is replaced, and the two it leaves to their
defaults -- 9095, the SuperLink's own (``--control-port``), and 9094, the SuperNode's ClientApp API
(``--port``) -- are given explicitly. Each is held bound until the test ends (``held_port``), so no
other process can take it before its server binds it. The launch itself is exercised by
``test_deploy.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.loopback import ROOT, held_port, stop_group
from tests.test_deploy import write_device_data

DOC = ROOT / "docs" / "deploy.md"
FLEET_PORT = 9093
"""The document's port for devices (``unheard-superlink start --port``, ``unheard-device --superlink``)."""


def doc_commands(section: str) -> list[str]:
    """The shell commands of the bash blocks under the heading ``section`` (continuations joined)."""
    text = DOC.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def _run(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(shlex.split(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_the_documented_set_up_works_verbatim(tmp_path, sim_cache):
    with held_port("0.0.0.0") as fleet, held_port() as control, held_port() as supernode:
        _set_up_and_manage(tmp_path, sim_cache, fleet, control, supernode)


def _set_up_and_manage(tmp_path: Path, sim_cache: Path, fleet: int, control: int, supernode: int) -> None:
    """The two sections' commands in order, with the Fleet port ``fleet``, the SuperLink's own ``control``
    and the SuperNode's ClientApp API port ``supernode`` in place of the document's."""
    setup = doc_commands("Set-up, step by step (development certificates)")
    adding = doc_commands("Adding and revoking a device")
    assert setup[0] == "make install" and any(c.startswith(".venv/bin/unheard-superlink start") for c in setup)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)  # `make install` is done: this venv
    home = tmp_path / "home"
    write_device_data(home, sim_cache)  # the device's recordings, where the document keeps them
    (home / "data" / "device0").rename(home / "recordings")
    env = dict(os.environ, HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    server: list[subprocess.Popen] = []
    try:
        for cmd in setup[1:]:
            cmd = cmd.replace("~/", f"{home}/").replace("link.example.org", "127.0.0.1")
            if cmd.startswith(".venv/bin/unheard-superlink start"):
                assert f"--port {FLEET_PORT}" in cmd and "--control-port" not in cmd  # the default: 9095
                cmd = cmd.replace(f"--port {FLEET_PORT}", f"--port {fleet}") + f" --control-port {control}"
                log = open(tmp_path / "superlink.log", "w")
                server.append(subprocess.Popen(shlex.split(cmd), cwd=tmp_path, env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
                _wait(tmp_path / "superlink.log", "SuperLink ready", server[-1])
                assert "0 of 0 device keys allowed" in (tmp_path / "superlink.log").read_text()
            elif cmd.startswith(".venv/bin/unheard-device"):
                assert f"127.0.0.1:{FLEET_PORT} " in cmd and " --port " not in cmd  # the default: 9094
                cmd = cmd.replace(f"127.0.0.1:{FLEET_PORT} ", f"127.0.0.1:{fleet} ") + f" --port {supernode}"
                # "give keys/kitchen-speaker.pub to the server operator": who allows it, as "Adding" says
                _run(adding[0].replace("new-device.pub", "keys/kitchen-speaker.pub"), tmp_path, env)
                shutil.copy(tmp_path / "certs" / "ca.crt", tmp_path / "ca.crt")  # "copy certs/ca.crt to the device"
                log = open(tmp_path / "device.log", "w")
                server.append(subprocess.Popen(shlex.split(cmd), cwd=tmp_path, env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
                _wait(tmp_path / "device.log", "SuperNode ID", server[-1])
            elif cmd.startswith(".venv/bin/unheard-launch"):
                continue  # ten devices and twenty rounds: test_deploy.py launches runs
            else:
                _run(cmd, tmp_path, env)
        _run(".venv/bin/unheard-certs device . new-device", tmp_path, env)
        node = None
        for cmd in adding:
            if "NODE_ID" in cmd:
                node = json.loads((tmp_path / "superlink-state" / "allowed.json").read_text())
                node = next(e["node"] for e in node["keys"].values() if e["name"] == "new-device.pub")
                cmd = cmd.replace("NODE_ID", str(node))
            out = _run(cmd, tmp_path, env).stdout
            if "status" in cmd:
                assert "online" in out and "kitchen-speaker.pub" in out
        assert node is not None
        again = subprocess.run(shlex.split(adding[0]), cwd=tmp_path, env=env, capture_output=True, text=True)
        assert again.returncode != 0 and "revoked" in again.stdout + again.stderr  # and says why
    finally:
        for proc in server[::-1]:
            stop_group(proc)


def _wait(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
