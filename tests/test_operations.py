"""What an operator and a device owner run into: logs, locks, refusals and status commands."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.state import DeviceState, Release
from fl.deploy.certs import make_device_key
from fl.deploy.flower import PACKAGES
from fl.privacy.sample import SampleAccount
from server import checkpoint, superlink
from server.fleet_proxy import FLEET_PATHS, allowed
from tests.conftest import ROOT


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_projects_log_lines_survive_the_opacus_import():
    # a CLI configures logging, then imports the device code (which imports Opacus, which calls basicConfig)
    proc = _run("import logging; from fl.deploy.flower import console_logging; console_logging(); "
                "import clients.client_app; logging.getLogger('clients.local').info('still heard')")
    assert "still heard" in proc.stderr, proc.stderr
    # ... and in a process Flower started, where the apps call it after their imports
    proc = _run("import logging; import opacus; import server.deploy_app; "
                "logging.getLogger('server.server_app').info('round 1 of 2')")
    assert "round 1 of 2" in proc.stderr, proc.stderr


def test_a_devices_log_names_no_transcript_and_no_recording(tmp_path, caplog):
    from clients.device_cli import check_data

    (tmp_path / "a.wav").write_bytes(b"RIFF")  # unreadable
    (tmp_path / "a.txt").write_text("zebra crossing")
    (tmp_path / "b.txt").write_text("☃☃ quokka ☃☃")  # no audio, odd transcript
    loggers = [logging.getLogger(name) for name in PACKAGES]  # their own handler: caplog's must be added
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO"):
            check_data(tmp_path)
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    text = caplog.text
    assert "skipped" in text
    for secret in ("zebra", "quokka", "a.wav", "b.txt"):
        assert secret not in text


def test_a_device_ledger_is_updated_by_one_run_at_a_time(tmp_path):
    """Another process asks for the lock while this one holds it: it must still be waiting after
    it said it was about to ask (its imports done), and get the lock only once it is released."""
    state = DeviceState(tmp_path)
    with state.locked():
        second = subprocess.Popen([sys.executable, "-c", (
            "import sys; from pathlib import Path; from clients.state import DeviceState\n"
            f"state = DeviceState(Path({str(tmp_path)!r}))\n"
            "print('asking', flush=True)\n"
            "with state.locked(): print('b in', flush=True)")],
            cwd=ROOT, stdout=subprocess.PIPE, bufsize=0)
        seen = b""  # raw reads: nothing the child wrote can hide in a buffer of ours
        while b"asking\n" not in seen:
            chunk = os.read(second.stdout.fileno(), 1024)
            assert chunk, "the other process ended before asking for the lock"
            seen += chunk
        deadline = time.monotonic() + 1.0  # a second holder would print "b in" at once
        while (left := deadline - time.monotonic()) > 0 and select.select([second.stdout], [], [], left)[0]:
            chunk = os.read(second.stdout.fileno(), 1024)
            seen += chunk
            if not chunk:
                break
        assert b"b in" not in seen, "the other process got the lock while this one held it"
    out, _ = second.communicate(timeout=60)
    out = (seen + out).decode()
    assert out.split() == ["asking", "b", "in"] and second.returncode == 0  # ... and it got it once released


def test_a_device_owner_sees_their_own_epsilon(tmp_path):
    state = DeviceState(tmp_path)
    state.key()
    state.commit(Release("1:x", "d", [], 0), SampleAccount(history=[(1.0, 0.25, 8)]), 1, 8, 20, 1.5, delta=1e-5)
    state.declined(2, "privacy budget spent", epsilon=0.9, max_epsilon=1.0)
    proc = subprocess.run([str(Path(sys.executable).parent / "unheard-device"), "status", "--state", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    eps = SampleAccount(history=[(1.0, 0.25, 8)]).epsilon(1e-5)
    assert f"{eps:.3f} at delta 1e-05" in proc.stdout
    assert "1 trained" in proc.stdout and "round 2: privacy budget spent (budget 1.0)" in proc.stdout


def test_one_serverapp_per_run_folder(tmp_path):
    with checkpoint.exclusive(tmp_path):
        with pytest.raises(RuntimeError, match="another ServerApp is running"):
            with checkpoint.exclusive(tmp_path):
                pass
    with checkpoint.exclusive(tmp_path):  # free again once the first one ended
        pass


def test_the_superlinks_state_folder_is_canonical(tmp_path):
    certs, first, other = tmp_path / "certs", tmp_path / "state", tmp_path / "elsewhere"
    certs.mkdir()
    first.mkdir()
    assert superlink._check_canonical(certs, first, new_state=False) is None  # the first start names it
    (first / "superlink.db").write_text("")
    assert superlink._check_canonical(certs, first, new_state=False) is None
    refused = superlink._check_canonical(certs, other, new_state=False)
    assert refused and "start with --state" in refused and str(first) in refused
    (first / "superlink.db").unlink()  # the database is gone: an empty one would re-admit every key
    assert "lost its database" in superlink._check_canonical(certs, first, new_state=False)
    assert superlink._check_canonical(certs, other, new_state=True) is None  # said explicitly


def test_a_revoked_key_is_refused_with_the_reason(tmp_path, caplog):
    key = make_device_key(tmp_path / "keys", "lost-phone")
    (tmp_path / "allowed.json").write_text(json.dumps(
        {"keys": {superlink._fingerprint(key): {"name": key.name, "node": 42, "revoked": True}}}))
    logging.getLogger("server").addHandler(caplog.handler)
    try:
        assert superlink.allow(tmp_path, key) is False  # never reaches Flower
    finally:
        logging.getLogger("server").removeHandler(caplog.handler)
    assert "revoked (node 42)" in caplog.text and "new key pair" in caplog.text


def test_the_proxy_lets_through_only_the_fleet_calls():
    def scope(method: str, path: str, raw: bytes | None = None, query: bytes = b"") -> dict:
        return {"method": method, "path": path, "raw_path": raw if raw is not None else path.encode(),
                "query_string": query}

    assert all(allowed(scope("POST", p)) for p in FLEET_PATHS) and len(FLEET_PATHS) == 12
    for s in (scope("GET", "/v1/fleet/get-run"), scope("POST", "/v1/control/list-runs"),
              scope("POST", "/v1/runtime/acquire-task"), scope("POST", "/v1/fleet/get-run", query=b"a=1"),
              scope("POST", "/v1/fleet/get-run", raw=b"/v1/fleet/get%2drun"), scope("GET", "/docs")):
        assert not allowed(s), s


def test_launch_help_says_what_to_type():
    proc = subprocess.run([str(Path(sys.executable).parent / "unheard-launch"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "deploy.superlink=127.0.0.1:9095" in proc.stdout and "resume=true" in proc.stdout
