import pytest
import torch

from fl.metrics import error_rates, greedy_decode


def test_greedy_decode_merges_repeats_and_drops_blanks(tokenizer):
    ids = [0, 10, 10, 0, 10, 1, 1, 0, 3]  # h h _ h ' ' ' ' _ a  -> "hh a"
    text_ids = [tokenizer.encode("h")[0] if i == 10 else i for i in ids]
    lp = torch.full((1, len(text_ids), tokenizer.vocab_size), -10.0)
    for t, i in enumerate(text_ids):
        lp[0, t, i] = 0.0
    assert greedy_decode(lp, torch.tensor([len(text_ids)]), tokenizer) == ["hh a"]
    assert greedy_decode(lp, torch.tensor([2]), tokenizer) == ["h"]


def test_error_rates_are_corpus_level():
    wer, cer = error_rates(["turn on the light", "call mom"], ["turn of the light", ""])
    assert wer == pytest.approx(3 / 6)
    assert cer == pytest.approx((1 + 8) / (17 + 8))


def test_error_rates_reject_bad_input():
    with pytest.raises(ValueError):
        error_rates([], [])
    with pytest.raises(ValueError):
        error_rates(["a"], ["a", "b"])
