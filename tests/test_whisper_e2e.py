"""The default model end to end: the pinned Whisper tiny.en seed through the real Flower simulation.

One small run of ``unheard-simulate experiment=smoke model=whisper_tiny_en`` (the embedded corpus,
2 devices, 1 round of 1 DP-SGD step, the server's inbound inventory on), then checks of the two
things the Whisper recipe rests on: the frozen encoder's outputs are computed once and cached under
``data.cache_dir`` (and read back, not recomputed), and only the trainable preset's values travel
and are published (the frozen rest stays the seed's). About 45-60 s on 2 idle cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fl import protocol as P
from fl.config import DataConfig, ModelConfig
from fl.data.audio import load_audio
from fl.data.embedded import build_embedded_corpus
from fl.data.fleet import load_device
from fl.data.prepare import prepare_data
from fl.model import build_recognizer
from fl.model.whisper import DEFAULT_TRAINABLE, WhisperRecognizer
from fl.model.whisper_seed import load_seed
from server.inbound import read_inventory
from tests.conftest import simulate

pytestmark = pytest.mark.slow

OVERRIDES = (
    "model=whisper_tiny_en",  # the default model (conf/config.yaml), replacing smoke's tiny Conformer
    "data.private_speakers=4", "data.private_utterances=4", "data.eval_speakers=2", "data.eval_utterances=2",
    "federation.rounds=1", "federation.clients_per_round=2", "federation.sampling=fixed",
    "train.local_steps=1", "train.batch_size=2", "federation.audit_outbound=true",
)
"""Smoke's DP-SGD (privacy=sample) kept; the fleet cut to 2 devices of 2-3 utterances and 1 step."""


@pytest.fixture(scope="module")
def whisper_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, cache dir) of one Whisper simulation with a cache of its own, empty before it."""
    cache = tmp_path_factory.mktemp("whisper-cache")
    out = simulate(tmp_path_factory.mktemp("whisper-run"), cache, *OVERRIDES)
    return out / "run", cache


@pytest.fixture(scope="module")
def recognizer() -> WhisperRecognizer:
    """The run's recognizer, built in this process from the same pinned seed."""
    return build_recognizer(ModelConfig(kind="whisper", path=None, input_seconds=10.0))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_the_run_trains_the_pinned_seed_under_dp(whisper_run):
    """The run really is the default model through Flower: Whisper from the wheel, DP-SGD on, every
    device's reply aggregated into one published round."""
    run, _ = whisper_run
    summary = _summary(run)
    assert summary["config"]["model"]["kind"] == "whisper" and summary["config"]["model"]["path"] is None
    assert summary["config"]["privacy"]["name"] == "sample" and summary["rounds"] == 1
    assert summary["privacy"]["sample"]["max_steps"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-000.pt", "round-001.pt"]


def test_the_frozen_encoders_outputs_are_cached_and_a_second_use_reads_them(whisper_run, recognizer, monkeypatch):
    """The cache holds encoder states ``[positions, d_model]`` (not log-mels), equal to what the frozen
    encoder computes for the utterance; the devices trained on exactly those tensors; and preparing the
    same data again reads the cache: the featuriser (which runs the encoder) is never called."""
    run, cache = whisper_run
    assert recognizer.cached_encoder
    files = sorted((cache / "features").glob("feats-*.pt"))
    assert len(files) == 1  # the private pool's features (no public set: the seed is pretrained)
    cached = {e.id: e for e in torch.load(files[0], weights_only=False)["examples"]}
    assert len(cached) == 16  # 4 speakers x 4 utterances, none skipped
    positions, width = 50 * 10, recognizer.config.d_model  # 10 s window, halved by the strided conv
    assert all(e.feats.shape == (positions, width) and e.feats.dtype == torch.float16 for e in cached.values())

    # the cached tensors are the frozen encoder's outputs for that audio
    corpus = build_embedded_corpus(cache / "embedded", n_public=0, n_private=4, public_utterances=20,
                                   private_utterances=4, seed=0, shift=0.5, workers=1)  # reused, not rebuilt
    first = corpus.private[0]
    again = recognizer.features([load_audio(first.audio, max_seconds=10.0)])[0]
    torch.testing.assert_close(cached[first.id].feats.float(), again, atol=2e-2, rtol=1e-2)

    # the devices' files hold exactly the cached features
    fleet = str(run / "fleet")
    for pid in range(2):
        for e in load_device(fleet, pid).train + load_device(fleet, pid).test:
            assert torch.equal(e.feats, cached[e.id].feats)

    # a second use of the same data and cache reads the file: no encoder run, no new file
    def no_featuriser(self, audio):
        raise AssertionError("featuriser called: the encoder cache was not used")

    monkeypatch.setattr(WhisperRecognizer, "features", no_featuriser)
    data = prepare_data(DataConfig(**_summary(run)["config"]["data"]), recognizer, seed=0)
    assert sorted((cache / "features").glob("feats-*.pt")) == files
    ids = {e.id for d in data.devices.values() for e in d.train + d.test} | {e.id for e in data.held_out}
    assert ids <= set(cached) and len(data.devices) == 2 and len(data.held_out) == 2
    assert all(torch.equal(e.feats, cached[e.id].feats) for d in data.devices.values() for e in d.train)


def test_only_the_trainable_preset_travels_and_the_frozen_rest_stays_the_seeds(whisper_run, recognizer):
    """What the server receives from the devices (its inbound inventory) and what it publishes (checkpoints) are the
    decoder's biases and LayerNorms alone (26,880 values, not 37.8M); they moved in the round; and the
    final model rebuilt from them has every other parameter bit-equal to the pinned seed's."""
    run, _ = whisper_run
    seed_module = recognizer.new_module()
    shared = recognizer.shared(seed_module)
    preset = {n for n in load_seed(None).state if re.search(DEFAULT_TRAINABLE, n)}
    assert set(shared) == preset and sum(v.numel() for v in shared.values()) == 26_880
    shapes = {k: list(v.shape) for k, v in shared.items()}

    # what the server received, recorded at receipt (server/inbound.py): both replies, the preset alone
    train = [r for r in read_inventory(run) if r["type"] == "train"]
    assert len(train) == 2 and all(r["error"] is None for r in train)
    assert all(r["arrays"] == {P.ARRAYS: shapes} for r in train)  # exactly the preset's arrays, nothing frozen

    start = torch.load(run / "checkpoints" / "round-000.pt", weights_only=False)["state_dict"]
    final = torch.load(run / "checkpoints" / "round-001.pt", weights_only=False)["state_dict"]
    assert set(start) == set(final) == preset
    assert all(torch.equal(start[k], shared[k]) for k in preset)  # round 0 is the seed itself
    assert any(not torch.equal(start[k], final[k]) for k in preset)  # the round moved the trainable values

    # the final model: the published values on the seed, every frozen tensor the wheel's own
    params = dict(recognizer.module_from(final).named_parameters())
    seed = load_seed(None).state
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert len(frozen) + len(preset) == len(params) and not set(frozen) & preset
    window = recognizer.config.max_source_positions  # the encoder's positional table, cut to 10 s
    for n in frozen:
        expected = seed[n][:window] if n == "model.encoder.embed_positions.weight" else seed[n]
        assert torch.equal(params[n], expected), n
    assert all(torch.equal(params[k], final[k]) for k in preset)
