"""End to end: `unheard-simulate experiment=smoke` -- Hydra, eSpeak corpus, seed model, a Flower
simulation with Opacus DP-SGD on 4 devices for 2 rounds -- and the files it promises."""

import json

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import RDPAccountant

from fl.data.fleet import load_device

# exactly what a published row holds under privacy=sample: no realised count, no wall time
ROW_KEYS = {"round", "wer", "cer", "raw_wer", "loss", "loops_cut", "epsilon_sample", "epsilon_user",
            "epsilon_user_server", "delta", "delta_user", "extrapolated", "randomness", "expected_cohort"}


def test_results_have_a_row_per_round(smoke_run):
    rows = [json.loads(x) for x in (smoke_run / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert 0.0 <= r["wer"] and 0.0 <= r["cer"]
    assert rows[0]["epsilon_sample"] == 0.0  # the seed model: nothing spent yet
    assert [r["expected_cohort"] for r in rows] == [0, 4, 4]  # public config, not the realised cohort
    assert 0 < rows[1]["epsilon_sample"] < rows[2]["epsilon_sample"]
    assert rows[2]["epsilon_user"] is None
    assert rows[2]["delta"] == 1e-5 and rows[2]["randomness"] == "secret" and rows[2]["extrapolated"] is False


def test_published_outputs_hold_only_covered_values_and_the_realised_ones_stay_private(smoke_run):
    """The output inventory of a privacy=sample run (docs/privacy.md's observer table)."""
    from server.results import PRIVATE_FIELDS, PUBLISHED_UNDER_PRIVACY, read_private_rounds
    from server.server_app import PROGRESS_UNDER_PRIVACY

    run = smoke_run / "run"
    assert ROW_KEYS == PUBLISHED_UNDER_PRIVACY
    progress = json.loads((run / "progress.json").read_text())
    assert progress["phase"] == "finished" and set(progress) <= PROGRESS_UNDER_PRIVACY  # no counts, no time
    summary = json.loads((run / "summary.json").read_text())
    assert not {"simulation_eval", "seconds"} & set(summary)
    assert "devices_charged" not in summary["privacy"]["sample"]
    private = read_private_rounds(run)  # the experimenter's own: private/, owner-only
    assert [r["round"] for r in private] == [0, 1, 2] and all(set(r) == set(PRIVATE_FIELDS) for r in private)
    assert [(r["clients"], r["declined"], r["failures"], r["rejected"]) for r in private[1:]] == [(4, 0, 0, 0)] * 2
    assert all(r["seconds"] > 0 for r in private)
    totals = json.loads((run / "private" / "summary-private.json").read_text())
    assert totals["devices_charged"] == 4 and totals["seconds"] == pytest.approx(sum(r["seconds"] for r in private))
    view = json.loads((run / "experimenter_view.json").read_text())
    assert view["label"] == "experimenter view, not covered by DP" and set(view) == {"label", "simulation_eval"}


def test_summary_epsilon_is_recomputable_from_its_fields(smoke_run):
    summary = json.loads((smoke_run / "run" / "summary.json").read_text())
    assert summary["config"]["name"] == "smoke"
    assert {"wer", "cer", "device_wer"} <= set(summary["seed_model"]) and "wer" in summary["final"]
    sample = summary["privacy"]["sample"]
    assert sample["accountant"] == "pld" and sample["device_sampling_credit"] is False
    acc = RDPAccountant()  # the RDP figure beside the reported one: Opacus' own
    acc.history = [(sample["noise_multiplier"], sample["sample_rate"], sample["max_steps"])]
    assert acc.get_epsilon(sample["delta"]) == pytest.approx(sample["epsilon_rdp"], rel=1e-9)
    # the reported PLD figure, independently with Google's dp-accounting on a fine grid: tight, and below RDP
    event = dp_accounting.PoissonSampledDpEvent(sample["sample_rate"],
                                                dp_accounting.GaussianDpEvent(sample["noise_multiplier"]))
    pld = PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event, sample["max_steps"])
    assert pld.get_epsilon(sample["delta"]) - 1e-3 <= sample["epsilon"] <= pld.get_epsilon(sample["delta"]) * 1.01
    assert sample["epsilon"] < sample["epsilon_rdp"]
    assert sample["max_steps"] == 2 * 2  # two rounds of two local steps each, every device trains every round
    assert summary["privacy"]["user"] is None


def test_run_dir_publishes_checkpoints_and_keeps_the_servers_state_private(smoke_run):
    run = smoke_run / "run"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["round-000.pt", "round-001.pt", "round-002.pt"]
    private = run / "private"
    owner_only = ("server-secret", "server-state.pt", "rounds-private.jsonl", "summary-private.json",
                  "audit-losses.json")
    assert {p.name for p in private.iterdir()} == {*owner_only, "server.lock"}
    assert private.stat().st_mode & 0o777 == 0o700
    assert all((private / name).stat().st_mode & 0o777 == 0o600 for name in owner_only)
    out = (smoke_run / "stdout.txt").read_text()
    assert "seed (public only)" in out and "epsilon" in out and "experimenter_view.json" in out
    summary = json.loads((run / "summary.json").read_text())
    # the experimenter's view of the devices' test splits: beside the summary, labelled as such
    sim = json.loads((run / "experimenter_view.json").read_text())["simulation_eval"]
    assert sim["utterances"] > 0 and sim["final"]["device_wer"] is not None and "experimenter" in sim["observer"]
    assert summary["federated_evaluation"].startswith("off")


def _check_inventory(run) -> None:
    """The inventory the server took of every reply at receipt (``server/inbound.py``), before any
    check, of a smoke run with fixed sampling under sample-level DP: only the update and the echo."""
    from clients.guard import allowed_metrics
    from fl.config import ModelConfig
    from fl.model.conformer import ConformerCTC
    from server.inbound import read_inventory

    cfg = json.loads((run / "summary.json").read_text())["config"]["model"]
    shapes = {k: list(v.shape) for k, v in ConformerCTC(ModelConfig(**cfg), 29).state_dict().items()}
    rows = read_inventory(run)
    assert not (run / "outbound").exists()  # the simulated devices keep no log of their own
    assert {r["type"] for r in rows} == {"query", "train"}  # no federated evaluation under privacy
    assert sum(r["type"] == "query" for r in rows) == 4 and sum(r["type"] == "train" for r in rows) == 2 * 4
    assert len({r["node"] for r in rows}) == 4
    for r in rows:
        assert r["error"] is None and r["configs"] == {}
        if r["type"] == "train":
            assert r["records"] == ["arrays", "metrics"]
            assert r["arrays"] == {"arrays": shapes}  # the whole update, exactly the model's arrays and shapes
            assert set(r["metrics"]["metrics"]) <= allowed_metrics(sample=True, user=False)
            assert set(r["metrics"]["metrics"].values()) <= {"int", "float"}
        else:
            assert r["records"] == ["metrics"] and r["arrays"] == {}
            assert r["metrics"] == {"metrics": {"device-key": "int"}}  # the device's key, nothing else


def test_devices_send_only_model_shaped_arrays_and_protocol_scalars(smoke_run):
    """Not the device guard's word for what it let through: the server's own record."""
    _check_inventory(smoke_run / "run")


def test_pseudo_labelling_devices_send_exactly_what_transcribed_ones_do(tmp_path, sim_cache):
    """Devices without transcripts (``data.drop_transcripts``) label their recordings themselves
    (``train.labels=pseudo``): no pseudo-label, score or count of them reaches the server."""
    from tests.conftest import simulate

    run = simulate(tmp_path, sim_cache, "federation.sampling=fixed", "federation.audit_outbound=true",
                   "train.labels=pseudo", "train.pseudo_threshold=-inf", "data.drop_transcripts=true") / "run"
    _check_inventory(run)
    fleet = run / "fleet"
    assert all(e.text is None for pid in range(4) for e in load_device(str(fleet), pid).train)


def test_devices_keep_a_record_of_the_rounds_they_trained_in(smoke_run):
    from clients.simulated import state_dir
    from clients.state import DeviceState

    fleet = str(smoke_run / "run" / "fleet")
    states = [DeviceState(state_dir(fleet, pid)) for pid in range(4)]
    assert [s.rounds_trained() for s in states] == [[1, 2]] * 4
    assert all(s.account("rdp").steps == 4 for s in states)
    assert all(0 < r["seconds"] for s in states for r in s.rounds())  # timings stay on the device


def test_the_leakage_audit_covers_members_and_canaries(smoke_run):
    audit = json.loads((smoke_run / "run" / "audit.json").read_text())
    assert audit["devices_trained"] == audit["devices"] == 4
    mia = audit["membership"]
    assert mia["members"] > 0
    for population in ("same_speakers", "other_speakers"):
        assert 0.0 <= mia[population]["auc"] <= 1.0 and 0.0 <= mia[population]["tpr_at_1pct_fpr"] <= 1.0
    canaries = audit["canaries"]
    assert canaries["planted"] == canaries["trained"] == 2 and canaries["references"] == 7
    assert all(1 <= c["rank"] <= 8 and c["trained"] for c in canaries["canaries"])
    out = (smoke_run / "stdout.txt").read_text()
    assert "membership inference" in out and "canaries" in out
