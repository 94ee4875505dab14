"""Running Flower's own command-line programs the way a secure unheard deployment needs them.

Flower's SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` by bare name, so this interpreter's ``bin`` folder goes first on ``PATH``;
runtime dependency installation is always off (it would pull a second, CUDA torch); and each
role gets its own ``FLWR_HOME`` (the ``flwr`` CLI's SuperLink connections, installed app bundles).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

CONNECTION = "unheard"
"""The name of the SuperLink connection written to ``FLWR_HOME/config.toml``."""
PACKAGES = ("fl", "clients", "server", "experiments")


def console_logging(level: int = logging.INFO) -> None:
    """Log this project's messages at ``level`` to stderr, whatever an import configured first.

    Opacus calls ``logging.basicConfig`` when it is imported (``opacus/utils/module_utils.py``),
    which makes every later ``basicConfig`` a no-op and leaves the root logger at WARNING, and
    Flower owns the logging of the processes it starts: so the project's own loggers get their own
    handler and level instead (idempotent). ``tests/test_logs.py`` checks it survives the import.
    """
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(getattr(h, "unheard", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.unheard = True  # type: ignore[attr-defined]
            logger.addHandler(handler)


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_HOME"] = str(flwr_home)
    return env


def tool(name: str) -> str:
    """The path of a Flower program installed beside this interpreter."""
    return str(Path(sys.executable).parent / name)


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (a JSON string with non-ASCII escaped is one)."""
    return json.dumps(value)


def flwr(flwr_home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``FLWR_HOME=flwr_home``; output captured as text."""
    return subprocess.run([tool("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout)


def write_connection(flwr_home: Path, address: str, root_cert: Path) -> None:
    """Point the ``flwr`` CLI (with ``FLWR_HOME=flwr_home``) at a TLS SuperLink, as :data:`CONNECTION`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = {toml_string(address)}\n'
        f'root-certificates = {toml_string(str(Path(root_cert).resolve()))}\n', encoding="utf-8")


def wait_for_tls(address: str, root_cert: Path, timeout: float) -> None:
    """Block until ``address`` accepts a TLS handshake verified by ``root_cert``."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(root_cert))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2) as sock:
                with context.wrap_socket(sock, server_hostname=host):
                    return
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no TLS SuperLink answered at {address} within {timeout:g} s") from None
            time.sleep(0.5)
