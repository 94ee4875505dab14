"""A whole deployment on this machine: SuperLink, devices and launches as child processes.

Used by the deployment test (``tests/test_deploy.py``) and the device cost measurement
(``experiments/device_cost.py``). Every process is started in its own session on ports held free for it,
logged to ``root/<name>.log`` and stopped by process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def hold_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound (``SO_REUSEADDR``, never listening) to a TCP port the OS picks on ``host``.

    While it stays open, no other bind to port 0 and no outgoing connection's ephemeral port gets
    that port, and a plain bind of it fails, so nothing else on the machine can take it between the
    pick and the bind of the server meant to serve it; a server that binds with ``SO_REUSEADDR`` and
    listens -- uvicorn/asyncio and gRPC, as Flower's SuperLink and SuperNode and the Fleet proxy
    do -- binds it all the same. (A pick closed before that bind leaves the window open.)"""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@contextmanager
def held_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port from :func:`hold_port`, held until the block ends: start its server inside the block."""
    with hold_port(host) as sock:
        yield int(sock.getsockname()[1])


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
        self._held: list[socket.socket] = []  # every port this deployment serves, held until stop_all
        self.port = self.free_port()
        self.address = f"127.0.0.1:{self.port}"  # what devices dial: the Fleet-only proxy
        self.control = f"127.0.0.1:{self.free_port()}"  # the SuperLink itself: operator commands and launches

    def free_port(self) -> int:
        """A port held for this deployment (:func:`hold_port`) until :meth:`stop_all`."""
        self._held.append(hold_port())
        return int(self._held[-1].getsockname()[1])

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
        for sock in self._held:
            sock.close()
        self._held.clear()

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
                                 "--root-cert", str(ca), "--auth-key", str(key), "--port", str(self.free_port()),
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
