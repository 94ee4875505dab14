"""The curve collector: real smoke runs (federated + centralised) and hand-written run folders."""

import csv
import json
from pathlib import Path

import pytest

from experiments.collect import collect, main, markdown_table, mechanism_of
from tests.conftest import run_entry


@pytest.fixture(scope="module")
def central_run(tmp_path_factory, sim_cache) -> Path:
    return run_entry("experiments.central", tmp_path_factory.mktemp("central"), sim_cache,
                     "privacy=none", "audit.membership=true", "audit.max_utterances=20")


def test_collects_federated_and_central_runs(smoke_run, central_run, tmp_path):
    rows = collect([smoke_run, central_run], tmp_path)
    by_mech = {r.mechanism: r for r in rows}
    assert set(by_mech) == {"sample", "central-finetune"}
    fed = json.loads((smoke_run / "run" / "summary.json").read_text())
    assert by_mech["sample"].epsilon_sample == fed["privacy"]["sample"]["epsilon"]
    assert by_mech["sample"].wer == fed["final"]["wer"] and by_mech["sample"].seed_wer == fed["seed_model"]["wer"]
    audit = json.loads((smoke_run / "run" / "audit.json").read_text())
    assert by_mech["sample"].mia_auc_same == audit["membership"]["same_speakers"]["auc"]
    assert by_mech["sample"].canary_exposure == audit["canaries"]["mean_exposure"]
    central = by_mech["central-finetune"]
    assert central.epsilon_sample is None and central.epsilon_user is None and central.mia_auc_other is not None
    # the centralised run starts from the same seed model on the same evaluation speakers
    assert central.seed_wer == by_mech["sample"].seed_wer
    with (tmp_path / "curves.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and float(table[0]["wer"]) >= 0
    assert (tmp_path / "curves.md").read_text().count("\n") == 4
    for name in ("wer_vs_epsilon.png", "wer_vs_round.png", "epsilon_vs_round.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_central_run_fine_tunes_on_the_pooled_device_data(central_run):
    summary = json.loads((central_run / "run" / "summary.json").read_text())
    assert summary["kind"] == "central" and summary["steps"] == 2 * 4 * 2  # rounds x cohort x local steps
    assert summary["final"]["loss"] != summary["seed_model"]["loss"]  # it trained


def _fake_run(root: Path, name: str, sample: dict | None, user: dict | None, configured_sample: bool = False):
    run = root / name
    run.mkdir(parents=True)
    scores = {"wer": 0.9, "cer": 0.5, "device_wer": None, "device_cer": None}
    configured = {"sample": {"noise_multiplier": 1.0} if configured_sample else None}
    summary = {"config": {"name": name, "privacy": configured},
               "seed_model": scores, "final": scores, "rounds": 3, "seconds": 1.0,
               "privacy": {"sample": sample, "user": user}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "results.jsonl").write_text(json.dumps({"round": 0, "wer": 0.9, "epsilon_user": None}) + "\n")
    return run


def test_labels_mark_extrapolation_and_missing_amplification(tmp_path):
    user = {"epsilon": 0.5, "delta": 1e-3, "noise_multiplier": 1.0, "noise": "central", "extrapolated": True,
            "amplification": True}
    _fake_run(tmp_path, "extrap", None, user)
    _fake_run(tmp_path, "fixed", None, dict(user, extrapolated=False, amplification=False, noise="local"))
    _fake_run(tmp_path, "both", {"epsilon": 3.0, "delta": 1e-5}, dict(user, noise="distributed"), True)
    _fake_run(tmp_path, "declined", None, None, configured_sample=True)  # DP on, no device reported spend
    rows = {r.run: r for r in collect([tmp_path], tmp_path / "out")}
    assert {k: r.mechanism for k, r in rows.items()} == {
        "extrap": "user-central-extrapolated", "fixed": "user-local", "both": "both-distributed-extrapolated",
        "declined": "sample"}
    table = markdown_table(list(rows.values()))
    assert "0.5 (extrapolated)" in table and "(no amplification)" in table


def test_cli_reports_when_there_is_nothing_to_collect(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 1


def test_mechanism_of_central_kind():
    assert mechanism_of({"kind": "central"}) == "central-finetune"
