"""train.labels: pseudo-labels, corrections and corpora without transcripts (fl/labels.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clients.client_app import DeviceSettings, _train
from fl import protocol as P
from fl.config import Config, DevicePolicy, SamplePrivacyConfig, TrainConfig, validate as validate_config
from fl.data.features import featurize
from fl.data.readers import read_folder, read_kaldi_dir, read_manifest
from fl.data.validate import main as data_main
from fl.labels import Labeler, is_corrected, pseudo_label
from fl.model import build_recognizer
from fl.model.conformer import ConformerCTC
from fl.privacy.randomness import BATCHES, Secret
from fl.privacy.sample import ClippingModule, SampleAccount, SampleLevel, poisson_batch
from fl.train import evaluate
from tests.conftest import TINY, OneDevice, fake_examples, tiny_global, train_message
from tests.test_readers import write_tone
from tests import test_whisper

SECRET_A, SECRET_B = Secret(bytes(range(32))), Secret(bytes(range(1, 33)))
OPEN = DevicePolicy.permissive()  # a device that accepts a run without privacy
small_whisper = test_whisper.small_whisper  # the fixture: a random 2-layer Whisper with tiny.en's tokenizer


def _teacher() -> ConformerCTC:
    """The global model of :func:`tests.conftest.train_message`, as the device loads it."""
    module = ConformerCTC(TINY, 29)
    module.load_state_dict(tiny_global().to_torch_state_dict())
    return module


def _scores(conformer, examples) -> dict[str, tuple[str, float]]:
    teacher = _teacher().eval()
    return {e.id: conformer.transcribe_with_confidence(teacher, conformer.collate([e]))[0] for e in examples}


def _unlabelled(examples):
    return [replace(e, text=None, tokens=e.tokens[:0]) for e in examples]


# ---------------------------------------------------------------------------------------------------
# Pseudo-labels
# ---------------------------------------------------------------------------------------------------
def test_pseudo_labels_keep_only_the_pairs_at_or_above_the_threshold(conformer):
    examples = fake_examples(16)
    scores = _scores(conformer, examples)
    assert all(text for text, _ in scores.values()) and all(math.isfinite(s) for _, s in scores.values())
    threshold = sorted(s for _, s in scores.values())[8]
    kept = pseudo_label(conformer, _teacher(), examples, threshold)
    assert {e.id for e in kept} == {i for i, (_, s) in scores.items() if s >= threshold}
    assert 0 < len(kept) < len(examples)
    for e in kept:  # the teacher's text, tokenised, replaces the transcript
        assert e.text == scores[e.id][0] != next(x.text for x in examples if x.id == e.id)
        assert e.tokens.tolist() == conformer.encode(e.text)


def test_the_threshold_at_minus_infinity_keeps_all_and_at_infinity_none(conformer):
    examples = _unlabelled(fake_examples(10))
    train = TrainConfig(labels="pseudo", pseudo_threshold=-math.inf)
    assert [e.id for e in Labeler(train, conformer, _teacher, SECRET_A, 1.0)(examples)] == \
        [e.id for e in examples]
    train = replace(train, pseudo_threshold=math.inf)
    assert Labeler(train, conformer, _teacher, SECRET_A, 1.0)(examples) == []


def test_with_no_pseudo_label_kept_a_device_declines_without_privacy_and_trains_on_noise_under_dp(conformer, tmp_path):
    examples = _unlabelled(fake_examples(8))
    none_kept = TrainConfig(local_steps=2, batch_size=4, labels="pseudo", pseudo_threshold=math.inf)
    plain = DeviceSettings(TINY, none_kept, None, None, seed=0, policy=OPEN)
    reply = _train(plain, *train_message(1, {}), OneDevice(tmp_path / "plain", examples), conformer)
    assert dict(reply.content[P.METRICS]) == {P.DECLINED: P.DECLINED_NO_DATA} and P.ARRAYS not in reply.content
    private = DeviceSettings(TINY, none_kept, SamplePrivacyConfig(), None, seed=0, policy=OPEN)
    config = SampleLevel(0.8, 1.0, 0.25, 2).to_config()
    reply = _train(private, *train_message(1, config), OneDevice(tmp_path / "dp", examples), conformer)
    assert P.ARRAYS in reply.content and P.DECLINED not in reply.content[P.METRICS]  # noise alone: no count leaves
    assert set(reply.content[P.METRICS]) == set(SampleLevel(0.8, 1.0, 0.25, 2).echo())


def test_a_device_trains_on_its_pseudo_labels_and_sends_nothing_about_them(conformer, tmp_path, monkeypatch):
    import clients.client_app as client_app

    seen: list = []
    real = client_app.plain_round
    monkeypatch.setattr(client_app, "plain_round",
                        lambda m, r, ex, t, s, label: seen.append([e.id for e in label(ex)]) or real(m, r, ex, t, s, label))
    examples = _unlabelled(fake_examples(8))
    settings = DeviceSettings(TINY, TrainConfig(local_steps=1, batch_size=4, labels="pseudo",
                                                pseudo_threshold=-math.inf), None, None, seed=0, policy=OPEN)
    reply = _train(settings, *train_message(1, {}), OneDevice(tmp_path, examples), conformer)
    assert seen == [[e.id for e in examples]]  # every recording gets its pseudo-label at -inf
    assert set(reply.content[P.METRICS]) == {P.NUM_EXAMPLES, P.TRAIN_LOSS}  # as with transcripts: nothing new
    assert reply.content[P.METRICS][P.NUM_EXAMPLES] == len(examples)  # the recordings, not the labels kept


def test_only_the_drawn_recordings_are_labelled_and_labels_never_move_a_coin(conformer):
    """DP-FedSGD's device half draws every step's Poisson coins first and labels what was drawn: the
    teacher decodes the drawn recordings alone, and the same coins fall whatever the threshold."""
    examples = _unlabelled(fake_examples(24))
    level = SampleLevel(0.8, 1.0, 0.25, 3, noise="central", expected_batch=6.0, sum_cap=3.0)
    weights = tiny_global().to_torch_state_dict()

    def drawn_with(threshold: float) -> tuple[list[list[str]], dict]:
        calls: list[list[str]] = []
        labeler = Labeler(TrainConfig(labels="pseudo", pseudo_threshold=threshold), conformer, _teacher, SECRET_A, 1.0)
        label = lambda batch: calls.append([e.id for e in batch]) or labeler(batch)  # noqa: E731
        return calls, level.clipped_sum(weights, ClippingModule(conformer), examples, SampleAccount(), SECRET_A, 3,
                                        label)

    every, summed = drawn_with(-math.inf)
    none, zero = drawn_with(math.inf)
    coins = SECRET_A.stream(BATCHES, 3)
    want = [[examples[i].id for i in poisson_batch(len(examples), 0.25, coins)] for _ in range(3)]
    assert every == none == want and all(0 < len(b) < len(examples) for b in want)  # the drawn batches alone
    assert any(v.abs().sum() > 0 for v in summed.values()) and all(v.abs().sum() == 0 for v in zero.values())


# ---------------------------------------------------------------------------------------------------
# Corrections: drawn from the device's secret, per recording
# ---------------------------------------------------------------------------------------------------
def test_corrections_are_drawn_from_the_devices_secret_at_the_fraction():
    ids = [f"rec-{i}" for i in range(2000)]
    a = {i for i in ids if is_corrected(SECRET_A, i, 0.3)}
    assert a == {i for i in ids if is_corrected(Secret(SECRET_A.key), i, 0.3)}  # the same secret: the same
    b = {i for i in ids if is_corrected(SECRET_B, i, 0.3)}
    assert a != b and len(a ^ b) > 500  # another secret: another selection
    assert abs(len(a) / len(ids) - 0.3) < 0.04 and abs(len(b) / len(ids) - 0.3) < 0.04
    assert not any(is_corrected(SECRET_A, i, 0.0) for i in ids) and all(is_corrected(SECRET_A, i, 1.0) for i in ids)


def test_corrected_recordings_keep_their_transcript_and_the_rest_are_pseudo_labelled(conformer):
    examples = fake_examples(20)
    train = TrainConfig(labels="corrections", pseudo_threshold=-math.inf)
    out = Labeler(train, conformer, _teacher, SECRET_A, 0.5)(examples)
    scores = _scores(conformer, examples)
    corrected = {e.id for e in examples if is_corrected(SECRET_A, e.id, 0.5)}
    assert 0 < len(corrected) < len(examples) and [e.id for e in out] == [e.id for e in examples]
    truth = {e.id: e.text for e in examples}
    assert all(e.text == (truth[e.id] if e.id in corrected else scores[e.id][0]) for e in out)
    other = Labeler(train, conformer, _teacher, SECRET_B, 0.5)(examples)
    assert [e.text for e in other] != [e.text for e in out]  # the selection is the secret's


def test_removing_a_recording_changes_no_other_label_or_selection(conformer):
    examples = fake_examples(16)
    threshold = sorted(s for _, s in _scores(conformer, examples).values())[6]
    train = TrainConfig(labels="corrections", pseudo_threshold=threshold)
    full = {e.id: (e.text, e.tokens.tolist()) for e in Labeler(train, conformer, _teacher, SECRET_A, 0.4)(examples)}
    for gone in (examples[0].id, examples[7].id, examples[-1].id):
        rest = [e for e in examples if e.id != gone]
        less = {e.id: (e.text, e.tokens.tolist()) for e in Labeler(train, conformer, _teacher, SECRET_A, 0.4)(rest)}
        assert less == {k: v for k, v in full.items() if k != gone}


# ---------------------------------------------------------------------------------------------------
# Corpora without transcripts
# ---------------------------------------------------------------------------------------------------
def _unlabelled_corpora(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "folder"
    for spk in ("alice", "bob"):
        for i in range(2):
            write_tone(folder / spk / f"clip{i}.wav")
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text("".join(f"u{i} {write_tone(kaldi / f'u{i}.wav')}\n" for i in range(3)))
    (kaldi / "utt2spk").write_text("u0 s0\nu1 s0\nu2 s1\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"m{i}", "audio": str(write_tone(tmp_path / f"m{i}.wav")),
                                            "speaker": "s"}) + "\n" for i in range(2)))
    return {"folder": folder, "kaldi": kaldi, "manifest": manifest}


def test_every_reader_returns_the_recordings_of_a_corpus_without_transcripts(tmp_path, conformer):
    corpora = _unlabelled_corpora(tmp_path)
    for read, key, n in ((read_folder, "folder", 4), (read_kaldi_dir, "kaldi", 3), (read_manifest, "manifest", 2)):
        result = read(corpora[key])
        assert not result.labelled and result.problems == [], key
        assert len(result.utterances) == n and all(u.text is None for u in result.utterances), key
    feats = featurize(read_folder(corpora["folder"]).utterances, conformer, tmp_path / "feats")
    assert len(feats.examples) == 4 and all(e.text is None and e.tokens.numel() == 0 for e in feats.examples)


def test_a_labelled_corpus_still_reports_a_recording_without_its_transcript(tmp_path):
    folder = _unlabelled_corpora(tmp_path)["folder"]
    (folder / "alice" / "clip0.txt").write_text("hello")
    result = read_folder(folder)
    assert result.labelled and [u.id for u in result.utterances] == ["alice/clip0"]
    assert len(result.problems) == 3 and all("no transcript" in p.reason for p in result.problems)


def test_validate_reports_a_corpus_without_transcripts_as_unlabelled_not_as_errors(tmp_path, capsys):
    folder = _unlabelled_corpora(tmp_path)["folder"]
    with pytest.raises(SystemExit) as done:
        data_main(["validate", str(folder)])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"{folder} (folder, unlabelled): 4 usable recordings" in out
    assert "0 problems" in out and "train.labels=pseudo" in out


def test_transcripts_mode_on_a_device_without_transcripts_declines_with_its_reason(conformer, tmp_path):
    examples = _unlabelled(fake_examples(8))
    settings = DeviceSettings(TINY, TrainConfig(local_steps=1, batch_size=4), None, None, seed=0, policy=OPEN)
    reply = _train(settings, *train_message(1, {}), OneDevice(tmp_path, examples), conformer)
    assert dict(reply.content[P.METRICS]) == {P.DECLINED: P.DECLINED_NO_TRANSCRIPTS}
    assert P.DECLINED_NO_TRANSCRIPTS in P.DECLINE_REASONS
    labelled = _train(settings, *train_message(1, {}), OneDevice(tmp_path / "b", fake_examples(8)), conformer)
    assert P.DECLINED not in labelled.content[P.METRICS]


def test_evaluation_without_references_says_so(conformer):
    with pytest.raises(ValueError, match="reference transcripts"):
        evaluate(conformer, _teacher(), _unlabelled(fake_examples(3)))


def test_label_settings_are_checked_before_a_run():
    validate_config(replace(Config(), train=TrainConfig(labels="pseudo")))
    for train, data in ((TrainConfig(labels="oracle"), {}), (TrainConfig(labels="pseudo", teacher="seed"), {}),
                        (TrainConfig(), {"drop_transcripts": True}),
                        (TrainConfig(labels="corrections"), {"corrected_fraction": 1.5})):
        cfg = Config()
        cfg = replace(cfg, train=train, data=replace(cfg.data, **data))
        with pytest.raises(ValueError):
            validate_config(cfg)


# ---------------------------------------------------------------------------------------------------
# Whisper: the same contract
# ---------------------------------------------------------------------------------------------------
def test_whisper_confidence_comes_with_the_same_transcripts(small_whisper):
    from fl.config import ModelConfig

    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper), input_seconds=4.0))
    module = recognizer.new_module().eval()
    examples = test_whisper._examples(recognizer)
    batch = recognizer.collate(examples)
    scored = recognizer.transcribe_with_confidence(module, batch)
    assert [t for t, _ in scored] == recognizer.transcribe(module, batch).texts
    assert all(s <= 0.0 for _, s in scored)
    assert recognizer.transcribe(module, batch).loops_cut == sum(s == -math.inf for _, s in scored) > 0  # cut: -inf
    assert {e.id for e in pseudo_label(recognizer, module, examples, -math.inf)} == \
        {e.id for e, (t, _) in zip(examples, scored) if t.strip()}  # -inf keeps every decode
    assert {e.id for e in pseudo_label(recognizer, module, examples, -1e9)} == \
        {e.id for e, (t, s) in zip(examples, scored) if t.strip() and s > -math.inf}  # a finite one drops the cut
    with torch.no_grad():
        one = [recognizer.transcribe_with_confidence(module, recognizer.collate([e]))[0] for e in examples]
    assert [t for t, _ in one] == [t for t, _ in scored]


def test_the_quality_table_keeps_what_a_device_would_and_scores_it_against_the_truth():
    from experiments.labels import quality

    rows = [{"truth": "red apple", "label": "red apple", "confidence": -0.1},
            {"truth": "green tree", "label": "green three", "confidence": -0.6},
            {"truth": "blue", "label": "", "confidence": -0.05},  # an empty decode: never kept
            {"truth": "small house", "label": "mall", "confidence": -2.0}]
    table = {r["threshold"]: r for r in quality(rows, (-math.inf, -1.0, -0.2, 0.0))}
    assert [table[t]["kept"] for t in (-math.inf, -1.0, -0.2, 0.0)] == [3, 2, 1, 0]
    assert table[-math.inf]["wer"] == pytest.approx(3 / 6) and table[-1.0]["wer"] == pytest.approx(1 / 4)
    assert table[-0.2]["wer"] == 0.0 and table[0.0]["wer"] is None and table[-1.0]["of"] == 4
