"""The curve collector: real smoke runs (federated + centralised) and hand-written run folders."""

import csv
import json
from pathlib import Path

import pytest

from experiments.collect import collect, main, markdown_table, mechanism_of, points_of, row_from_run
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
    assert len(table) == 2 and float(table[0]["wer"]) >= 0 and len({r["point"] for r in table}) == 2
    points_md, runs_md = (tmp_path / "curves.md").read_text().split("## Runs\n\n")
    assert runs_md.count("\n") == 4 and points_md.count("| **1 (single run") == 2  # one run a point
    with (tmp_path / "points.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
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


def test_runs_from_several_folders_are_named_below_their_common_parent(tmp_path):
    _fake_run(tmp_path / "results" / "curves", "r1", None, None)
    _fake_run(tmp_path / "results" / "gain", "run1", None, None)
    rows = collect([tmp_path / "results" / "curves", tmp_path / "results" / "gain"], tmp_path / "out")
    assert sorted(r.run for r in rows) == [str(Path("curves") / "r1"), str(Path("gain") / "run1")]
    assert [r.run for r in collect([tmp_path / "results" / "gain" / "run1"], tmp_path / "out1")] == ["run1"]


def test_cli_reports_when_there_is_nothing_to_collect(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 1


def test_mechanism_of_central_kind():
    assert mechanism_of({"kind": "central"}) == "central-finetune"


# --- points: repeats of one configuration, hand-written run folders ---------------------------------

SEED = {"wer": 0.40, "cer": 0.20}


def _run(root: Path, rel: str, wer: float, cer: float, sample: dict | None = None, device_wer: float | None = None,
         name: str = "private_gain", rounds: int = 60, results: list | None = None, seed: dict = SEED) -> Path:
    """A finished run folder ``root/rel`` with the given final scores and sample-level block."""
    run = root / rel
    run.mkdir(parents=True)
    final = {"wer": wer, "cer": cer, "device_wer": device_wer, "device_cer": None}
    summary = {"config": {"name": name, "privacy": {"sample": sample}}, "seed_model": seed, "final": final,
               "rounds": rounds, "privacy": {"sample": sample, "user": None}}
    (run / "summary.json").write_text(json.dumps(summary))
    rows = results if results is not None else [{"round": 0, "wer": seed["wer"]}, {"round": rounds, "wer": wer}]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _dp_fedsgd(target: float, epsilon: float, sigma: float) -> dict:
    return {"noise": "central", "noise_multiplier": sigma, "epsilon": epsilon, "epsilon_rdp": epsilon + 1.11,
            "accountant": "pld", "target_epsilon": target, "delta": 1e-5}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three repeats of DP-FedSGD at epsilon 8, one run at epsilon 4, one non-private FL run."""
    root = tmp_path / "sweep"
    for r, (wer, cer, dev) in enumerate([(0.30, 0.10, 0.20), (0.31, 0.12, 0.22), (0.35, 0.17, 0.27)], start=1):
        _run(root, f"sample-central/r{r}/0", wer, cer, _dp_fedsgd(8.0, 7.99, 0.5815), device_wer=dev)
    _run(root, "sample-central/r1/1", 0.38, 0.19, _dp_fedsgd(4.0, 3.98, 0.7625))
    _run(root, "none/r1/0", 0.28, 0.09)
    return root


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_three_repeats_are_one_point_with_their_mean_and_sample_std(sweep, tmp_path):
    rows = collect([sweep], tmp_path / "out")
    repeats = [r for r in rows if r.run.startswith("sample-central/r") and r.run.endswith("/0")]
    assert len(repeats) == 3 and len({r.point for r in repeats}) == 1
    assert len({r.point for r in rows}) == 3  # epsilon 4 and non-private FL are points of their own
    point = next(p for p in points_of(rows) if p.n == 3)
    assert point.mechanism == "sample-central" and point.target_epsilon == 8.0 and point.epsilon_sample == 7.99
    # by hand: WER 0.30, 0.31, 0.35: mean 0.32, deviations -.02 -.01 .03, sample var .0014 / 2 = .0007
    assert point.wer.mean == pytest.approx(0.32) and point.wer.std == pytest.approx(0.0007 ** 0.5)
    assert (point.wer.min, point.wer.max) == (0.30, 0.35)
    # CER 0.10, 0.12, 0.17: mean 0.13, deviations -.03 -.01 .04, sample var .0026 / 2 = .0013
    assert point.cer.mean == pytest.approx(0.13) and point.cer.std == pytest.approx(0.0013 ** 0.5)
    # device WER 0.20, 0.22, 0.27: mean 0.23, deviations -.03 -.01 .04, sample var .0013
    assert point.device_wer.mean == pytest.approx(0.23) and point.device_wer.std == pytest.approx(0.0013 ** 0.5)
    assert point.all_below_seed and point.seed_wer == pytest.approx(0.40)

    md = (tmp_path / "out" / "curves.md").read_text()
    points_md, runs_md = md.split("## Runs")
    line = next(x for x in points_md.splitlines() if "| 3 |" in x)
    assert "| sample-central |" in line and "| 32.0 ± 2.6 |" in line and "| 13.0 ± 3.6 |" in line
    assert "| 23.0 ± 3.6 |" in line and "| 40.0 |" in line and line.endswith("| yes |")
    assert "7.99 (pld; rdp 9.1)" in line
    assert runs_md.count("| sample-central |") == 4  # the per-run table is still there, one line a run

    per_run = _csv(tmp_path / "out" / "curves.csv")
    assert len(per_run) == 5 and len({r["point"] for r in per_run if r["target_epsilon"] == "8.0"}) == 1
    assert {r["accountant_sample"] for r in per_run if r["target_epsilon"]} == {"pld"}
    assert {r["epsilon_sample_rdp"] for r in per_run if r["target_epsilon"] == "8.0"} == {str(7.99 + 1.11)}
    points = {r["point"]: r for r in _csv(tmp_path / "out" / "points.csv")}
    assert len(points) == 3
    agg = points[repeats[0].point]
    assert agg["n"] == "3" and agg["wer_n"] == "3" and float(agg["wer_mean"]) == pytest.approx(0.32)
    assert float(agg["wer_std"]) == pytest.approx(0.0007 ** 0.5)
    assert (float(agg["wer_min"]), float(agg["wer_max"])) == (0.30, 0.35)
    assert float(agg["cer_std"]) == pytest.approx(0.0013 ** 0.5) and float(agg["device_wer_mean"]) == pytest.approx(0.23)
    assert agg["runs"].split(";") == [r.run for r in sorted(repeats, key=lambda r: r.run)]


def test_a_single_run_point_says_n_1_and_has_no_std(sweep, tmp_path):
    rows = collect([sweep], tmp_path / "out")
    none = next(p for p in points_of(rows) if p.mechanism == "none")
    assert none.n == 1 and none.wer.std is None and none.wer.mean == 0.28
    points_md = (tmp_path / "out" / "curves.md").read_text().split("## Runs")[0]
    line = next(x for x in points_md.splitlines() if x.startswith("| none |"))
    assert "| **1 (single run: no spread)** |" in line and "| 28.0 ± - |" in line
    record = next(r for r in _csv(tmp_path / "out" / "points.csv") if r["mechanism"] == "none")
    assert record["n"] == "1" and record["wer_std"] == "" and record["wer_mean"] == "0.28"
    assert record["device_wer_n"] == "0" and record["device_wer_mean"] == ""


def test_a_run_above_the_seed_makes_the_point_not_every_run_below_seed(tmp_path):
    for r, wer in enumerate((0.30, 0.45, 0.33)):
        _run(tmp_path / "runs", f"r{r}", wer, 0.1, _dp_fedsgd(8.0, 7.99, 0.58))
    (point,) = points_of(collect([tmp_path / "runs"], tmp_path / "out"))
    assert point.n == 3 and not point.all_below_seed
    assert (tmp_path / "out" / "curves.md").read_text().splitlines()[4].endswith("| no |")


def test_epsilons_equal_after_rounding_are_one_point_reporting_the_largest(tmp_path):
    """Realised epsilons that agree to 2 decimals are one point (the largest shown, and said so)."""
    _run(tmp_path / "runs", "a", 0.3, 0.1, _dp_fedsgd(8.0, 7.991, 0.58), device_wer=0.2)
    _run(tmp_path / "runs", "b", 0.3, 0.1, _dp_fedsgd(8.0, 7.994, 0.58))
    _run(tmp_path / "runs", "c", 0.3, 0.1, _dp_fedsgd(8.0, 7.60, 0.58))  # another realised epsilon: another point
    points = points_of(collect([tmp_path / "runs"], tmp_path / "out"))
    assert sorted(p.n for p in points) == [1, 2]
    pair = next(p for p in points if p.n == 2)
    assert pair.epsilon_sample == 7.994 and pair.epsilon_varies
    md = (tmp_path / "out" / "curves.md").read_text()
    assert "7.99 (pld; rdp 9.1) (largest of the runs)" in md
    assert "| 20.0 ± - (1 of 2 runs) |" in md  # a device WER not every repeat scored says so


def test_sample_level_mechanisms_are_named_by_where_the_noise_is_added(tmp_path):
    def summary(sample, configured=None):
        return {"config": {"privacy": {"sample": configured}}, "privacy": {"sample": sample, "user": None}}

    old = {"epsilon": 2.0, "delta": 1e-5, "noise_multiplier": 1.0}  # an older summary: no "noise" key
    assert mechanism_of(summary(old)) == "sample"
    assert mechanism_of(summary(dict(old, noise="device"))) == "sample"
    assert mechanism_of(summary(dict(old, noise="central"))) == "sample-central"
    assert mechanism_of(summary(dict(old, noise="distributed"))) == "sample-distributed"
    # no device reported spend: the configured placement names it
    assert mechanism_of(summary(None, {"noise": "central"})) == "sample-central"
    assert mechanism_of(summary(None, {"noise_multiplier": 1.0})) == "sample"
    assert mechanism_of(summary(None)) == "none"
    # an older summary's row: no accountant or RDP figure
    row = row_from_run(_run(tmp_path, "old", 0.3, 0.1, old), tmp_path)
    assert row.mechanism == "sample" and row.accountant_sample is None and row.epsilon_sample_rdp is None
    assert row.target_epsilon is None


def test_the_epsilon_plot_draws_each_point_s_mean_and_std_and_the_baselines(sweep, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bars, lines = [], []
    errorbar, axhline = Axes.errorbar, Axes.axhline

    def spy_errorbar(self, x, y, yerr=None, **kw):
        bars.append((self.get_xlabel(), list(x), list(y), list(yerr), kw.get("label")))
        return errorbar(self, x, y, yerr=yerr, **kw)

    def spy_axhline(self, y=0, **kw):
        lines.append((round(y, 6), kw.get("label")))
        return axhline(self, y, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy_errorbar)
    monkeypatch.setattr(Axes, "axhline", spy_axhline)
    _run(sweep, "central", 0.25, 0.08, name="private_gain", rounds=0)
    central = json.loads((sweep / "central" / "summary.json").read_text())
    (sweep / "central" / "summary.json").write_text(json.dumps(dict(central, kind="central")))
    collect([sweep], tmp_path / "out")
    assert (tmp_path / "out" / "wer_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    # WER against sample-level epsilon: one series (sample-central), one marker per point, by epsilon
    wer = [b for b in bars if b[1] == [3.98, 7.99] and b[2][1] == pytest.approx(32.0)]
    assert len(wer) == 1 and wer[0][4].startswith("sample-central")
    assert wer[0][2][0] == pytest.approx(38.0) and wer[0][3] == pytest.approx([0.0, 100 * 0.0007 ** 0.5])
    assert len(bars) == 2  # WER and CER; no user-level epsilon in this sweep, baselines are not series
    drawn = {y for y, _ in lines}
    assert {40.0, 28.0, 25.0} <= drawn  # seed, non-private FL, central fine-tune (WER, in %)
    assert any(label and label.startswith("non-private FL") for _, label in lines)


def test_round_plots_skip_unscored_rounds(tmp_path):
    import matplotlib.pyplot as plt

    from experiments.plots import _round_lines

    results = [{"round": 0, "wer": 0.4}, {"round": 1, "wer": None}, {"round": 2, "wer": 0.3}]
    run = _run(tmp_path / "runs", "r", 0.3, 0.1, results=results, rounds=2)
    rows = collect([tmp_path / "runs"], tmp_path / "out")
    assert (tmp_path / "out" / "wer_vs_round.png").read_bytes()[:4] == b"\x89PNG"
    fig, ax = plt.subplots()
    _round_lines(ax, rows, {rows[0].run: [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]},
                 "wer", "WER", scale=100)
    assert list(ax.lines[0].get_xdata()) == [0, 2] and list(ax.lines[0].get_ydata()) == [40.0, 30.0]
    plt.close(fig)
