"""Log-mel features, the feature cache, skipping of bad items, and batch padding."""

import numpy as np
import pytest
import soundfile as sf
import torch

from fl.config import Config, ModelConfig, PrivacyConfig, UserPrivacyConfig, validate
from fl.data.features import Example, LogMel, collate, featurize
from fl.data.records import Utterance
from fl.model.conformer import ConformerRecognizer


def _wav(path, seconds=0.5, sr=16000, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32), sr)
    return str(path)


def test_log_mel_is_per_utterance_normalised_at_10_ms_frames():
    feats = LogMel(32)(np.random.default_rng(0).normal(size=16000).astype(np.float32))
    assert feats.shape == (101, 32)
    assert torch.allclose(feats.mean(0), torch.zeros(32), atol=1e-4)


def test_featurize_skips_bad_items_with_a_reason_and_caches(tmp_path, tokenizer):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    utts = [
        Utterance("a", _wav(tmp_path / "a.wav"), "turn on the lights", "s1"),
        Utterance("b", str(bad), "call mom", "s1"),
        Utterance("c", _wav(tmp_path / "c.wav"), "caf\u00e9 ol\u00e9", "s2"),
        Utterance("d", str(tmp_path / "missing.wav"), "play jazz", "s2"),
    ]
    out = featurize(utts, ConformerRecognizer(ModelConfig(n_mels=32)), tmp_path / "cache")
    assert [e.id for e in out.examples] == ["a"]
    assert {p.utterance_id for p in out.problems} == {"b", "c", "d"}
    assert out.examples[0].feats.dtype == torch.float16
    assert tokenizer.decode(out.examples[0].tokens.tolist()) == "turn on the lights"
    (tmp_path / "a.wav").unlink()  # a second call must come from the cache, not the audio
    again = featurize(utts, ConformerRecognizer(ModelConfig(n_mels=32)), tmp_path / "cache")
    assert [e.id for e in again.examples] == ["a"] and torch.equal(again.examples[0].feats, out.examples[0].feats)


def test_the_cache_is_keyed_by_the_length_limit(tmp_path, tokenizer):
    utts = [Utterance("short", _wav(tmp_path / "s.wav", 0.5), "play jazz", "s1"),
            Utterance("long", _wav(tmp_path / "l.wav", 2.0), "call mom", "s1")]
    recognizer = ConformerRecognizer(ModelConfig(n_mels=32))
    assert len(featurize(utts, recognizer, tmp_path / "cache", max_seconds=30).examples) == 2
    limited = featurize(utts, recognizer, tmp_path / "cache", max_seconds=1.0)
    assert [e.id for e in limited.examples] == ["short"] and "too long" in limited.problems[0].reason


def test_collate_pads_with_zeros_and_keeps_lengths(examples):
    batch = collate(examples[:3])
    lens = [e.feats.shape[0] for e in examples[:3]]
    assert batch.feats.shape == (3, max(lens), 16) and batch.feat_lens.tolist() == lens
    for i, n in enumerate(lens):
        assert not batch.feats[i, n:].any()
        assert batch.targets[i, : batch.target_lens[i]].tolist() == examples[i].tokens.tolist()
    assert batch.seconds.tolist() == pytest.approx([e.seconds for e in examples[:3]])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_validate_rejects_inconsistent_configs():
    validate(Config(privacy=PrivacyConfig(name="none")))
    with pytest.raises(ValueError, match="privacy.name=user"):
        validate(Config(privacy=PrivacyConfig(name="user")))
    with pytest.raises(ValueError, match="noise"):
        validate(Config(privacy=PrivacyConfig(name="user", user=UserPrivacyConfig(noise="everywhere"))))
    cfg = Config()
    cfg.federation.sampling = "round-robin"
    with pytest.raises(ValueError, match="federation.sampling"):
        validate(cfg)


def test_a_fleet_file_rewritten_under_a_mapping_keeps_the_mapped_data(tmp_path):
    """Devices are memory-mapped (``fl/data/fleet.py``): a rewrite of the fleet replaces each file
    instead of overwriting it, so a process that mapped the old one reads the old features (an
    overwrite in place would truncate the mapping under it), and the writing process' next load
    reads the new ones (its cache is cleared)."""
    from fl.data.fleet import DeviceData, load_device, write_fleet

    def fleet(value: float) -> dict[str, DeviceData]:
        e = Example("u", "s", torch.full((200, 8), value, dtype=torch.float16), torch.tensor([1, 2]), "a b", 1.0)
        return {"d": DeviceData("d", [e], [])}

    write_fleet(fleet(1.0), tmp_path)
    mapped = load_device(str(tmp_path), 0)
    write_fleet(fleet(2.0), tmp_path)
    assert float(mapped.train[0].feats.float().mean()) == 1.0
    assert float(load_device(str(tmp_path), 0).train[0].feats.float().mean()) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-00000.pt", "fleet.json"]
