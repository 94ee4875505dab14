"""End to end with both privacy levels, lost replies and a user-level budget."""

import json

import pytest

from fl.privacy.accounting import UserLevelSpec, user_level_epsilon
from server.results import read_private_rounds, read_results
from tests.conftest import simulate


def test_budget_stops_the_run_before_the_round_that_would_exceed_it(private_run):
    summary = json.loads((private_run / "summary.json").read_text())
    user = summary["privacy"]["user"]
    spec = lambda r: UserLevelSpec(user["noise_multiplier"], user["sampling_rate"], r, user["delta"],  # noqa: E731
                                   user["sampling"], user["accountant"])
    done = summary["rounds"]
    assert summary["stopped_early"] and f"round {done + 1}" in summary["stopped_early"]
    assert user_level_epsilon(spec(done)) <= 2.5 < user_level_epsilon(spec(done + 1))
    assert user["epsilon"] == pytest.approx(user_level_epsilon(spec(done)), rel=1e-9)
    assert user["rounds"] == done >= 1


def test_devices_whose_replies_were_lost_still_have_their_spend_counted(private_run):
    rows = read_results(private_run)
    trained = rows[1:]
    realised = read_private_rounds(private_run)[1:]  # the counts are the experimenter's alone under DP
    assert all(r["clients"] == 0 for r in realised)  # every training reply was lost ...
    assert sum(r["failures"] for r in realised) > 0
    assert trained[-1]["epsilon_sample"] > 0  # ... yet the server charged the devices it had asked to train
    sample = json.loads((private_run / "summary.json").read_text())["privacy"]["sample"]
    assert sample["max_rounds"] == len(trained)
    assert json.loads((private_run / "private" / "summary-private.json").read_text())["devices_charged"] == 4
    assert all("clients" not in r and "failures" not in r for r in rows)  # published rows: no realised counts


def test_distributed_noise_runs_under_secure_aggregation(tmp_path_factory, sim_cache):
    run = simulate(tmp_path_factory.mktemp("distributed"), sim_cache, "privacy=user",
                   "privacy.user.noise=distributed", "federation.sampling=fixed", "federation.rounds=2",
                   "federation.audit_outbound=true") / "run"
    assert [r["clients"] for r in read_private_rounds(run)[1:]] == [4, 4]
    user = json.loads((run / "summary.json").read_text())["privacy"]["user"]
    assert user["noise"] == "distributed" and user["rounds"] == 2
    spec = UserLevelSpec(user["noise_multiplier"], user["sampling_rate"], 2, user["delta"], "fixed", user["accountant"])
    assert user["epsilon"] == pytest.approx(user_level_epsilon(spec), rel=1e-9)
    _check_secure_inventory(run)


SECAGG = "secaggplus_configs"
SECAGG_STAGES = {  # what each SecAgg+ stage's reply may hold besides the masked vector's: keys, shares
    "setup": {"pk1": "bytes", "pk2": "bytes"}, "share-keys": {"dsts": "list[int]", "ctxts": "list[bytes]"},
    "unmask": {"nids": "list[int]", "shares": "list[bytes]"}}


def _check_secure_inventory(run):
    """What reached the server under SecAgg+, at receipt (``server/inbound.py``): protocol keys and
    shares, one masked vector per device and round, the clear echo; never an array in clear."""
    from clients.guard import allowed_metrics
    from fl.config import ModelConfig
    from fl.model.conformer import ConformerCTC
    from fl.privacy.user import UserRound
    from server.inbound import read_inventory

    cfg = json.loads((run / "summary.json").read_text())["config"]["model"]
    floats = [k for k, v in ConformerCTC(ModelConfig(**cfg), 29).state_dict().items() if v.is_floating_point()]
    rows = read_inventory(run)
    assert all(r["error"] is None for r in rows)
    assert [r["metrics"] for r in rows if r["type"] == "query"] == [{"metrics": {"device-key": "int"}}] * 4
    train = [r for r in rows if r["type"] == "train"]
    masked = [r for r in train if "masked_params" in r["configs"].get(SECAGG, {})]
    protocol = [r for r in train if r not in masked]
    assert len(train) == 4 * 4 * 2 and len(masked) == 4 * 2  # 4 stages, 4 devices, 2 rounds
    for r in protocol:
        assert r["records"] == [SECAGG] and r["arrays"] == r["metrics"] == {}
        assert r["configs"][SECAGG] in SECAGG_STAGES.values()
    for r in masked:
        assert r["records"] == ["fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status", SECAGG]
        assert r["arrays"] == {"fitres.parameters": {}}  # no update in clear: emptied by the device's mod
        assert r["configs"][SECAGG] == {"masked_params": "list[bytes]"}
        # masked: the weight factor (Flower's factor_combine), then one entry per update array
        assert r["lengths"][SECAGG] == {"masked_params": 1 + len(floats)}
        assert set(r["configs"]["fitres.metrics"]) == set(UserRound(1.0, 1.0, 1).echo())
        assert set(r["configs"]["fitres.metrics"]) <= allowed_metrics(sample=False, user=True)
        assert r["metrics"] == {"fitres.num_examples": {"num_examples": "int"}}
        assert r["configs"]["fitres.status"] == {"code": "int", "message": "str"}


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, sim_cache):
    return simulate(
        tmp_path_factory.mktemp("faults"), sim_cache, "federation.sampling=fixed",
        "federation.crash_before_training=0.5", "federation.slow_devices=0.5", "federation.slow_seconds=1.0",
    ) / "run"


def test_rounds_complete_with_the_devices_that_did_not_crash(faulty_run):
    from clients.simulated import state_dir
    from clients.state import DeviceState

    rows = read_private_rounds(faulty_run)[1:]
    assert [r["clients"] + r["failures"] for r in rows] == [4, 4]  # every sampled device answered or failed
    assert sum(r["failures"] for r in rows) > 0 and all(r["clients"] > 0 for r in rows)
    fleet = str(faulty_run / "fleet")
    trained = [DeviceState(state_dir(fleet, pid)).rounds_trained() for pid in range(4)]
    assert sum(map(len, trained)) == sum(r["clients"] for r in rows)  # a crash before training trains nothing
    for pid, rounds in enumerate(trained):  # ... and spends nothing: the ledger holds only the rounds trained
        ledger = state_dir(fleet, pid) / "ledger.json"
        steps = sum(n for _, _, n in json.loads(ledger.read_text())["history"]) if ledger.exists() else 0
        assert steps == 2 * len(rounds)


def test_every_message_of_a_both_levels_run_carries_only_the_update_and_the_echo(local_run):
    """The inventory of what reached the server, field by field, in a privacy=both run: taken at
    receipt (``server/inbound.py``), so a device guard that let anything more through would show."""
    from clients.guard import allowed_metrics
    from fl.config import ModelConfig
    from fl.model.conformer import ConformerCTC
    from fl.privacy.sample import SampleLevel
    from fl.privacy.user import UserRound
    from server.inbound import read_inventory

    cfg = json.loads((local_run / "summary.json").read_text())["config"]["model"]
    model = ConformerCTC(ModelConfig(**cfg), 29).state_dict()
    floats = {k: list(v.shape) for k, v in model.items() if v.is_floating_point()}
    echo = set(SampleLevel(1.0, 1.0, 1.0, 1).echo()) | set(UserRound(1.0, 1.0, 1).echo())
    rows = read_inventory(local_run)
    by_type = {t: [r for r in rows if r["type"] == t] for t in {r["type"] for r in rows}}
    assert set(by_type) == {"query", "train"}  # no evaluation replies under privacy
    assert len(by_type["query"]) == 4 and len(by_type["train"]) == 2 * 4
    assert all(r["error"] is None and r["configs"] == {} for r in rows)
    assert all(r["metrics"] == {"metrics": {"device-key": "int"}} and r["arrays"] == {} for r in by_type["query"])
    for r in by_type["train"]:
        assert r["records"] == ["arrays", "metrics"] and r["arrays"] == {"arrays": floats}
        metrics = r["metrics"]["metrics"]
        assert set(metrics) == echo and set(metrics) <= allowed_metrics(sample=True, user=True)


def test_local_noise_reports_what_the_server_learns_beside_the_models_epsilon(local_run):
    summary = json.loads((local_run / "summary.json").read_text())
    user = summary["privacy"]["user"]
    assert user["noise"] == "local" and user["secure_mode"] and summary["privacy"]["sample"]["secure_mode"]
    # towards the server: Gaussian(z / 2) (replace-one, no amplification) over the rounds the worst device trained
    spec = UserLevelSpec(user["update_noise_multiplier"] / 2, 1.0, user["server_rounds"], user["delta"], "fixed",
                         user["accountant"])
    assert user["server_rounds"] == 2 and user["epsilon_server"] == pytest.approx(user_level_epsilon(spec), rel=1e-9)
    assert user["epsilon_server"] > user["epsilon"]
    rows = read_results(local_run)
    assert rows[-1]["epsilon_user_server"] == pytest.approx(user["epsilon_server"])
    assert rows[0]["randomness"] == "secret"
    assert [r["clients"] for r in read_private_rounds(local_run)[1:]] == [4, 4]  # secure mode, both levels


def test_the_experimenters_evaluation_reads_the_devices_the_last_federated_evaluation_would_ask(local_run):
    from fl.data.fleet import load_device
    from fl.train import evaluation_devices

    summary = json.loads((local_run / "summary.json").read_text())
    view = json.loads((local_run / "experimenter_view.json").read_text())
    assert "simulation_eval" not in summary and view["label"] == "experimenter view, not covered by DP"
    sim = view["simulation_eval"]
    chosen = evaluation_devices(range(4), 3, summary["config"]["seed"], summary["rounds"])
    assert sim["devices"] == len(chosen) == 3
    assert sim["utterances"] == sum(len(load_device(str(local_run / "fleet"), pid).test) for pid in chosen)
