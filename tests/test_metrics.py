"""Scoring: Whisper's English normaliser on both sides, corpus-level rates, raw WER beside it."""

import pytest
import torch

from fl.metrics import english_normalize, scores
from fl.model.conformer import ConformerRecognizer
from tests.conftest import TINY, fake_examples


def test_best_path_decoding_merges_repeats_and_drops_blanks(monkeypatch, tokenizer):
    recognizer = ConformerRecognizer(TINY)
    h, a = tokenizer.encode("h")[0], tokenizer.encode("a")[0]
    path = [0, h, h, 0, h, 1, 1, 0, a]  # h h _ h ' ' ' ' _ a  -> "hh a"
    lp = torch.full((1, len(path), tokenizer.vocab_size), -10.0)
    for t, i in enumerate(path):
        lp[0, t, i] = 0.0
    batch = recognizer.collate(fake_examples(1))
    out = recognizer.transcribe(lambda feats, lens: (lp, torch.tensor([len(path)])), batch)
    assert out.texts == ["hh a"] and out.loops_cut == 0
    assert recognizer.transcribe(lambda feats, lens: (lp, torch.tensor([2])), batch).texts == ["h"]


def test_rates_are_corpus_level():
    s = scores(["turn on the light", "call mom"], ["turn of the light", ""])
    assert s.wer == pytest.approx(3 / 6) and s.raw_wer == pytest.approx(3 / 6)
    assert s.cer == pytest.approx((1 + 8) / (17 + 8))


def test_numbers_case_and_punctuation_are_normalised_on_both_sides_raw_wer_keeps_them():
    s = scores(["TWO NINE NINE TWO", "Mark is going to see the elephant"],
               ["2992", "mark is going to see the elephant."])
    assert s.wer == 0.0
    assert s.raw_wer == pytest.approx(4 / 11)  # "2992" against four number words
    assert english_normalize("Colour of the T-shirt!") == "color of the t shirt"


def test_a_reference_emptied_by_normalising_scores_nothing():
    assert english_normalize("um") == ""
    assert scores(["um", "call mom"], ["hello", "call mom"]).wer == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        scores([], [])
    with pytest.raises(ValueError):
        scores(["a"], ["a", "b"])
