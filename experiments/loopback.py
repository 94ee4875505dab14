"""A whole deployment on this machine: SuperLink, devices and launches as child processes.

Used by the deployment test (``tests/test_deploy.py``) and the device cost measurement
(``experiments/device_cost.py``). Every process is started in its own session on free ports,
logged to ``root/<name>.log`` and stopped by process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``); SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def flower_free_env() -> dict[str, str]:
    return dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")


class Loopback:
    """The processes of one loopback deployment under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # what devices dial: the Fleet-only proxy
        self.control = f"127.0.0.1:{free_port()}"  # the SuperLink itself: operator commands and launches

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flower_free_env(),
                                    cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        stop_group(self.procs.pop(name))

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def superlink(self, certs: Path, allow: Path) -> None:
        self.start("superlink", [str(BIN / "unheard-superlink"), "start", "--certs", str(certs), "--state",
                                 str(self.root / "superlink"), "--allow", str(allow), "--host", "127.0.0.1",
                                 "--port", str(self.port), "--control-port", self.control.rsplit(":", 1)[1]])
        self.wait_for("superlink", "SuperLink ready", timeout=120)

    def device(self, name: str, key: Path, ca: Path, *extra: str) -> subprocess.Popen:
        return self.start(name, [str(BIN / "unheard-device"), "--superlink", self.address,
                                 "--data", str(self.root / "data" / name), "--state", str(self.root / "state" / name),
                                 "--root-cert", str(ca), "--auth-key", str(key), "--port", str(free_port()),
                                 "--max-wait-time", "30", *extra])

    def wait_for(self, name: str, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no {text!r} within {timeout} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def launch_command(self, ca: Path, out: Path, *overrides: str) -> list[str]:
        return [str(BIN / "unheard-launch"), f"hydra.run.dir={out}", f"deploy.superlink={self.control}",
                f"deploy.root_cert={ca}", *overrides]

    def launch(self, ca: Path, out: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(self.launch_command(ca, out, *overrides), cwd=ROOT, env=flower_free_env(),
                              capture_output=True, text=True, timeout=timeout)
