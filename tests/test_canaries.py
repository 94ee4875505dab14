"""Canaries: distinct phrases, planted on distinct devices, and the exposure arithmetic."""

import math

import pytest

from fl.audit.canaries import PREFIX, exposure, make_canaries, plant
from fl.data.fleet import DeviceData
from tests.conftest import fake_examples


def test_exposure_is_log_rank_among_references():
    refs = [1.0, 2.0, 3.0]
    assert exposure(0.5, refs) == (1, pytest.approx(math.log2(4)))  # lowest loss: maximal exposure
    assert exposure(2.5, refs) == (3, pytest.approx(math.log2(4) - math.log2(3)))
    assert exposure(9.0, refs) == (4, pytest.approx(0.0))
    with pytest.raises(ValueError):
        exposure(1.0, [])


def test_canaries_are_distinct_deterministic_phrases(tokenizer, conformer):
    a = make_canaries(2, 5, 3, conformer, seed=0)
    b = make_canaries(2, 5, 3, conformer, seed=0)
    texts = [c.text for c in a.planted + a.references]
    assert len(set(texts)) == 7 and all(len(t.split()) == 3 for t in texts)
    assert texts == [c.text for c in b.planted + b.references]
    assert all(c.id.startswith(PREFIX) and c.feats.shape[1] == 16 and c.feats.shape[0] > 50 for c in a.planted)
    assert tokenizer.decode(a.planted[0].tokens.tolist()) == a.planted[0].text


def test_plant_puts_each_canary_on_its_own_device(conformer):
    canaries = make_canaries(2, 1, 3, conformer, seed=0)
    devices = {f"d{i}": DeviceData(f"d{i}", fake_examples(3, seed=i), fake_examples(1, seed=10 + i)) for i in range(4)}
    fleet, holders = plant(devices, canaries.planted, repeats=3, seed=0)
    assert len(set(holders.values())) == 2
    for cid, device_id in holders.items():
        copies = [e for e in fleet[device_id].train if e.id.startswith(cid)]
        assert len(copies) == 3 and len(fleet[device_id].train) == 6
        assert fleet[device_id].test == devices[device_id].test
    untouched = set(devices) - set(holders.values())
    assert all(fleet[d] is devices[d] for d in untouched)
    with pytest.raises(ValueError):
        plant(dict(list(devices.items())[:1]), canaries.planted, 1, 0)


def test_the_runs_canary_ranks_are_recomputed_from_its_own_losses(smoke_run):
    """The smoke run's published canary ranks and exposures, recomputed from the losses it kept privately."""
    import json

    run = smoke_run / "run"
    canaries = json.loads((run / "audit.json").read_text())["canaries"]
    losses = json.loads((run / "private" / "audit-losses.json").read_text())["canaries"]
    references = losses["references"]
    assert canaries["references"] == len(references) == 7
    assert [c["canary"] for c in canaries["canaries"]] == list(losses["planted"])
    for c in canaries["canaries"]:
        rank = 1 + sum(r < losses["planted"][c["canary"]] for r in references)  # 1 = below every reference
        assert c["rank"] == rank and c["exposure"] == pytest.approx(math.log2(8) - math.log2(rank))
