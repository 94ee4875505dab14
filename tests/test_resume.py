"""Checkpoint and resume: a run killed mid-round and resumed ends exactly as an uninterrupted one.

Also: a device asked a round again (after the server restarted) never spends twice unnoticed, and
a run folder is never started over or resumed with another config. The comparison with an
uninterrupted run needs both runs to draw the same noise, so it uses ``privacy.reproducible=true``
(which writes no secret). That a resumed run with secret randomness draws from its persisted
secret is checked in ``tests/test_device_policy.py``
(``test_a_resumed_run_draws_its_noise_from_the_persisted_secret``).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message

from clients.client_app import DeviceSettings, _train
from clients.state import LEDGER, DeviceState, round_key
from fl import protocol as P
from fl.config import SamplePrivacyConfig, TrainConfig
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC, ConformerRecognizer
from fl.privacy.sample import SampleLevel
from server import checkpoint
from server.results import read_private_rounds
from tests.conftest import ROOT, TINY, OneDevice, fake_examples, simulate, train_message

# Two rounds of four devices on two actors; every device sleeps 1 s before training, so a kill
# once the first device of round 2 has trained lands before round 2 is committed.
RUN = ("federation.rounds=2", "privacy=both", "federation.slow_devices=1", "federation.slow_seconds=1",
       "privacy.reproducible=true")
MECHANISM = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, steps=2)


def _message(server_round: int, arrays: ArrayRecord) -> tuple[Message, Context]:
    return train_message(server_round, MECHANISM.to_config(), arrays)


def _device(tmp_path: Path, secure_mode: bool) -> tuple[DeviceSettings, OneDevice, ArrayRecord]:
    sample = SamplePrivacyConfig(secure_mode=secure_mode)
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), sample, None, seed=3)
    torch.manual_seed(0)
    arrays = ArrayRecord(ConformerCTC(TINY, CharTokenizer().vocab_size).state_dict())
    return settings, OneDevice(tmp_path, fake_examples(12), key_=0, name="d0"), arrays


def _steps(state: Path) -> int:
    return DeviceState(state).account("rdp").steps


@pytest.mark.parametrize("secure_mode", [False, True])
def test_a_round_asked_again_is_answered_with_the_same_bits_and_counted_once(tmp_path, secure_mode):
    settings, store, arrays = _device(tmp_path, secure_mode)  # secret streams: secure mode replays exactly too
    tok = ConformerRecognizer(TINY)
    first = _train(settings, *_message(1, arrays), store, tok)
    assert _steps(tmp_path) == 2
    again = _train(settings, *_message(1, arrays), store, tok)
    a, b = first.content[P.ARRAYS].to_torch_state_dict(), again.content[P.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dict(first.content[P.METRICS]) == dict(again.content[P.METRICS])
    assert _steps(tmp_path) == 2 and DeviceState(tmp_path).rounds_trained() == [1]
    # a new round, or the same round number with another global model, is a new release with new streams
    _train(settings, *_message(2, arrays), store, tok)
    assert _steps(tmp_path) == 4 and DeviceState(tmp_path).rounds_trained() == [1, 2]
    moved = ArrayRecord({k: v + 0.01 for k, v in arrays.to_torch_state_dict().items()})
    _train(settings, *_message(2, moved), store, tok)
    assert _steps(tmp_path) == 6 and DeviceState(tmp_path).release().index == 2  # a stream index of its own


def test_a_repeated_round_that_would_differ_is_declined_and_the_first_stays_counted(tmp_path):
    settings, store, arrays = _device(tmp_path, secure_mode=False)
    tok = ConformerRecognizer(TINY)
    first = _train(settings, *_message(1, arrays), store, tok)
    assert P.ARRAYS in first.content
    store.examples = fake_examples(12, seed=1)  # the device's recordings changed since it answered round 1
    again = _train(settings, *_message(1, arrays), store, tok)
    assert P.ARRAYS not in again.content and dict(again.content[P.METRICS]) == {P.DECLINED: P.DECLINED_REPLAY_DIFFERS}
    assert _steps(tmp_path) == 2  # the first release stays counted, once
    assert DeviceState(tmp_path).release().round_key == round_key(1, arrays)


def test_a_device_that_died_between_release_record_and_ledger_counts_the_round_once(tmp_path):
    settings, store, arrays = _device(tmp_path, secure_mode=False)
    tok = ConformerRecognizer(TINY)
    _train(settings, *_message(1, arrays), store, tok)
    _train(settings, *_message(2, arrays), store, tok)
    before = DeviceState(tmp_path).release().history_before
    (tmp_path / LEDGER).write_text(json.dumps({"history": before}))  # died after the release record, before the ledger
    assert _steps(tmp_path) == 2
    again = _train(settings, *_message(2, arrays), store, tok)  # the never-sent reply, asked again
    assert P.ARRAYS in again.content and _steps(tmp_path) == 4


def test_resuming_needs_the_interrupted_runs_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist: point hydra.run.dir"):
        checkpoint.check_out_dir(tmp_path, {"seed": 0}, resume=True)
    checkpoint.check_out_dir(tmp_path, {"seed": 0}, resume=False)  # a fresh folder starts a run


def test_config_mismatch_names_the_keys_and_resume_is_exempt():
    saved = {"seed": 0, "resume": False, "train": {"lr": 0.001, "batch_size": 8}}
    assert checkpoint.mismatch(saved, {**saved, "resume": True}) == []
    assert checkpoint.mismatch(saved, {"seed": 1, "resume": True, "train": {"lr": 0.002, "batch_size": 8}}) == [
        "seed", "train.lr"]


def test_resume_tolerates_keys_added_since_and_where_the_models_run():
    """A run saved before a key existed resumes when the key is left at its default, and the
    device may change (a run interrupted on one machine continues on another); nothing else may."""
    now = checkpoint.schema_defaults()
    saved = {k: v for k, v in now.items() if k != "device"}
    saved["model"] = {k: v for k, v in now["model"].items() if k != "autocast"}
    saved["federation"] = {k: v for k, v in now["federation"].items() if k != "gpus_per_client"}
    assert checkpoint.mismatch(saved, now, now) == []
    moved = {**now, "device": "cuda", "federation": {**now["federation"], "gpus_per_client": 0.25}}
    assert checkpoint.mismatch(now, moved, now) == []
    changed = {**now, "model": {**now["model"], "autocast": "bf16"}}
    assert checkpoint.mismatch(saved, changed, now) == ["model.autocast"]
    assert checkpoint.mismatch(saved, now, None) == ["model.autocast"]  # no defaults: a new key differs


def _kill_mid_round_2(out: Path, cache: Path) -> None:
    """Start the simulation, SIGKILL its whole process group once a device has trained in round 2."""
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    cmd = [sys.executable, "-m", "experiments.simulate", "experiment=smoke", f"data.cache_dir={cache}",
           f"hydra.run.dir={out}", *RUN]
    with open(out.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not any(2 in DeviceState(d).rounds_trained() for d in (out / "fleet" / "state").glob("device-*")):
            assert proc.poll() is None, (out.parent / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no device trained in round 2 within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "device_seconds")} for row in rows]


def _realised(run: Path) -> list[dict]:
    """The rounds' realised counts (the server's private folder), without their wall times."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_private_rounds(run)]


def test_a_run_killed_mid_round_resumes_to_the_results_of_an_uninterrupted_run(tmp_path, sim_cache):
    whole = simulate(tmp_path / "whole", sim_cache, *RUN) / "run"
    cut = tmp_path / "cut" / "run"
    cut.parent.mkdir()
    _kill_mid_round_2(cut, sim_cache)
    assert checkpoint.load(cut).round == 1  # killed inside round 2, after devices had trained and spent
    assert not list(cut.rglob("*secret"))  # reproducible: every secret is derived from the seed, none written
    assert len(_rows(cut)) == 2
    saved = checkpoint.load(cut).config
    with pytest.raises(ValueError, match="already holds a run"):  # never started over by mistake
        checkpoint.check_out_dir(cut, saved, resume=False)
    with pytest.raises(ValueError, match="config differs .* in seed"):
        checkpoint.check_out_dir(cut, {**saved, "seed": 1}, resume=True)
    simulate(tmp_path / "cut", sim_cache, *RUN, "resume=true")
    assert "resuming after round 1 of 2" in (tmp_path / "cut" / "stdout.txt").read_text() + \
        "".join(p.read_text() for p in cut.glob("*.log"))
    assert _rows(cut) == _rows(whole) and len(_rows(cut)) == 3
    assert _realised(cut) == _realised(whole) and len(_realised(cut)) == 3  # the private file is restored too
    a = torch.load(whole / "checkpoints" / "round-002.pt", weights_only=False)["state_dict"]
    b = torch.load(cut / "checkpoints" / "round-002.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    s_whole, s_cut = (json.loads((r / "summary.json").read_text()) for r in (whole, cut))
    assert s_cut["privacy"] == s_whole["privacy"] and s_cut["final"] == s_whole["final"]
    assert s_cut["resumed_after"] == 1 and s_whole["resumed_after"] is None
    # every device's privacy ledger and round history as if nothing had happened
    for device in sorted((whole / "fleet" / "state").glob("device-*")):
        twin = cut / "fleet" / "state" / device.name
        assert (twin / LEDGER).read_text() == (device / LEDGER).read_text()
        assert DeviceState(twin).rounds_trained() == DeviceState(device).rounds_trained()
