"""End to end: `unheard-simulate experiment=smoke` -- Hydra, eSpeak corpus, seed model, a Flower
simulation with Opacus DP-SGD on 4 devices for 2 rounds -- and the files it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"round", "wer", "cer", "loss", "clients", "epsilon_sample", "epsilon_user", "delta", "seconds"}


def simulate(out: Path, cache: Path, *overrides: str) -> Path:
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    cmd = [sys.executable, "-m", "experiments.simulate", "experiment=smoke",
           f"data.cache_dir={cache}", f"hydra.run.dir={out / 'run'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, sim_cache) -> Path:
    return simulate(tmp_path_factory.mktemp("smoke"), sim_cache, "federation.sampling=fixed",
                    "federation.audit_outbound=true")


def test_results_have_a_row_per_round(smoke_run):
    rows = [json.loads(x) for x in (smoke_run / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert 0.0 <= r["wer"] and 0.0 <= r["cer"]
    assert rows[0]["epsilon_sample"] is None
    assert rows[1]["clients"] == rows[2]["clients"] == 4
    assert 0 < rows[1]["epsilon_sample"] < rows[2]["epsilon_sample"]
    assert rows[2]["epsilon_user"] is None
    assert rows[2]["delta"] == 1e-5


def test_summary_epsilon_is_recomputable_from_its_fields(smoke_run):
    summary = json.loads((smoke_run / "run" / "summary.json").read_text())
    assert summary["config"]["name"] == "smoke"
    assert {"wer", "cer", "device_wer"} <= set(summary["seed_model"]) and "wer" in summary["final"]
    sample = summary["privacy"]["sample"]
    acc = RDPAccountant()
    acc.history = [(sample["noise_multiplier"], sample["sample_rate"], sample["max_steps"])]
    assert acc.get_epsilon(sample["delta"]) == pytest.approx(sample["epsilon"], rel=1e-9)
    # and independently, with Google's dp-accounting
    independent = dp_accounting.rdp.RdpAccountant([1 + x / 10 for x in range(1, 100)] + list(range(12, 256)))
    independent.compose(dp_accounting.PoissonSampledDpEvent(
        sample["sample_rate"], dp_accounting.GaussianDpEvent(sample["noise_multiplier"])), sample["max_steps"])
    assert independent.get_epsilon(sample["delta"]) == pytest.approx(sample["epsilon"], rel=0.05)
    assert sample["max_steps"] == 2 * 2  # two rounds of two local steps each, every device trains every round
    assert summary["privacy"]["user"] is None


def test_run_dir_holds_checkpoints_and_the_printed_table(smoke_run):
    ckpts = sorted(p.name for p in (smoke_run / "run" / "checkpoints").iterdir())
    assert ckpts == ["round-000.pt", "round-001.pt", "round-002.pt"]
    out = (smoke_run / "stdout.txt").read_text()
    assert "seed (public only)" in out and "epsilon" in out


def test_devices_send_only_model_shaped_arrays_and_protocol_scalars(smoke_run):
    from clients.guard import ALLOWED_METRICS
    from fl.config import ModelConfig
    from fl.model.conformer import ConformerCTC

    run = smoke_run / "run"
    cfg = json.loads((run / "summary.json").read_text())["config"]["model"]
    shapes = {k: list(v.shape) for k, v in ConformerCTC(ModelConfig(**cfg), 29).state_dict().items()}
    rows = [json.loads(line) for f in (run / "outbound").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {r["type"] for r in rows} == {"train", "evaluate"}
    assert sum(r["type"] == "train" for r in rows) == 2 * 4  # every training reply of the run was seen
    for r in rows:
        assert set(r["records"]) <= {"arrays", "metrics"}
        if r["type"] == "train":
            assert r["arrays"] == shapes  # the whole update, exactly the model's arrays and shapes
        else:
            assert r["arrays"] is None
        assert set(r["metrics"]) <= ALLOWED_METRICS and set(r["metrics"].values()) <= {"int", "float"}
