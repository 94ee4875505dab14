"""Data preparation guards: missing corpora are named before anything runs; evaluation caps stay balanced."""

import random

import pytest

from fl.config import DataConfig
from fl.data.prepare import DataNotFound, _cap_examples, check_paths
from tests.conftest import fake_examples


def test_a_missing_corpus_is_named_with_the_key_to_set(tmp_path):
    check_paths(DataConfig())  # the embedded corpus needs no path
    with pytest.raises(DataNotFound, match="needs data.path"):
        check_paths(DataConfig(corpus="kaldi"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataNotFound, match=r"data.eval_path=.*dev does not exist.*UNHEARD_DATA"):
        check_paths(DataConfig(corpus="kaldi", path=str(tmp_path / "train"), eval_path=str(tmp_path / "dev")))
    with pytest.raises(DataNotFound, match="data.public_path"):
        check_paths(DataConfig(public_corpus="fsdd", public_path=str(tmp_path / "fsdd")))


def test_the_evaluation_cap_draws_evenly_over_speakers():
    examples = fake_examples(30)  # speakers s0, s1, s2: ten each
    capped = _cap_examples(examples, 9, random.Random(0))
    assert len(capped) == 9 and sorted(e.id for e in capped) == [e.id for e in capped]
    assert {s: sum(e.speaker == s for e in capped) for s in ("s0", "s1", "s2")} == {"s0": 3, "s1": 3, "s2": 3}
    assert _cap_examples(examples, 0, random.Random(0)) == examples
    assert _cap_examples(examples, 9, random.Random(0)) == capped  # reproducible
