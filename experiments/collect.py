"""`unheard-collect DIR...`: gather finished runs into ``curves.csv``, ``curves.md`` and plots.

Works on any run directories (one run, a Hydra multirun, a tree of sweeps): every folder below
the given ones that holds a ``summary.json`` is a run; ``results.jsonl`` and ``audit.json``
beside it add the per-round figures and the leakage audit, and ``experimenter_view.json`` the
devices' test-split WER a private simulation's experimenter computed (covered by no DP, labelled
so). Nothing is recomputed: every number in the outputs is one a run wrote. Nothing is read from a
run's ``private/`` folder: a private run's wall time is not published, so its ``seconds`` is empty.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Optional

from experiments.inputs import AUDIT
from experiments.plots import plot_all
from server.results import RESULTS, SUMMARY, read_experimenter_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveRow:
    """One run: its mechanism, its guarantee, its accuracy and its audit figures (None = not applicable)."""

    run: str
    name: str
    mechanism: str
    sigma: Optional[float]
    z: Optional[float]
    epsilon_sample: Optional[float]
    delta_sample: Optional[float]
    epsilon_user: Optional[float]
    epsilon_user_server: Optional[float]
    delta_user: Optional[float]
    extrapolated: bool
    randomness: str
    amplification: Optional[bool]
    rounds: int
    seed_wer: float
    seed_cer: float
    wer: float
    cer: float
    device_wer: Optional[float]
    device_cer: Optional[float]
    mia_auc_same: Optional[float]
    mia_tpr_same: Optional[float]
    mia_auc_other: Optional[float]
    mia_tpr_other: Optional[float]
    canary_exposure: Optional[float]
    canaries_trained: Optional[int]
    stopped_early: Optional[str]
    seconds: Optional[float]


def mechanism_of(summary: dict[str, Any]) -> str:
    """``central-finetune``, ``none``, ``sample``, ``user-<noise>`` or ``both-<noise>``, with
    ``-extrapolated`` when the user-level epsilon is for a stated population, not the simulated one."""
    if summary.get("kind") == "central":
        return "central-finetune"
    privacy = summary["privacy"]
    sample, user = privacy.get("sample"), privacy.get("user")
    if user is None:
        return "sample" if sample else _configured(summary)
    level = "both" if sample or summary["config"]["privacy"].get("sample") else "user"
    return f"{level}-{user['noise']}" + ("-extrapolated" if user.get("extrapolated") else "")


def _configured(summary: dict[str, Any]) -> str:
    """A run whose devices never reported sample-level spend still has the mechanism it was configured with."""
    return "sample" if summary["config"]["privacy"].get("sample") else "none"


def _attack(audit: dict[str, Any], population: str, key: str) -> Optional[float]:
    result = (audit.get("membership") or {}).get(population)
    return None if result is None else result[key]


def row_from_run(run_dir: Path, root: Path) -> CurveRow:
    summary = json.loads((run_dir / SUMMARY).read_text())
    audit_path = run_dir / AUDIT
    audit = json.loads(audit_path.read_text()) if audit_path.exists() else {}
    privacy = summary["privacy"]
    sample, user = privacy.get("sample") or {}, privacy.get("user") or {}
    canaries = audit.get("canaries") or {}
    view = read_experimenter_view(run_dir) or {}
    devices = (view.get("simulation_eval") or summary)["final"]
    return CurveRow(
        run=str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        name=summary["config"]["name"], mechanism=mechanism_of(summary),
        sigma=sample.get("noise_multiplier"), z=user.get("noise_multiplier"),
        epsilon_sample=sample.get("epsilon"), delta_sample=sample.get("delta"),
        epsilon_user=user.get("epsilon"), epsilon_user_server=user.get("epsilon_server"), delta_user=user.get("delta"),
        extrapolated=bool(user.get("extrapolated")), randomness=privacy.get("randomness", "secret"),
        amplification=user.get("amplification"),
        rounds=summary["rounds"], seed_wer=summary["seed_model"]["wer"], seed_cer=summary["seed_model"]["cer"],
        wer=summary["final"]["wer"], cer=summary["final"]["cer"],
        device_wer=devices.get("device_wer"), device_cer=devices.get("device_cer"),
        mia_auc_same=_attack(audit, "same_speakers", "auc"), mia_tpr_same=_attack(audit, "same_speakers",
                                                                                  "tpr_at_1pct_fpr"),
        mia_auc_other=_attack(audit, "other_speakers", "auc"), mia_tpr_other=_attack(audit, "other_speakers",
                                                                                     "tpr_at_1pct_fpr"),
        canary_exposure=canaries.get("mean_exposure"), canaries_trained=canaries.get("trained"),
        stopped_early=summary.get("stopped_early"), seconds=summary.get("seconds"),
    )


def find_runs(dirs: Iterable[Path]) -> list[Path]:
    """Every folder at or below ``dirs`` that holds a ``summary.json``, sorted, without repeats."""
    found = {p.parent.resolve() for d in dirs for p in Path(d).rglob(SUMMARY)}
    return sorted(found)


def round_series(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 100 else f"{x:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(x)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(rows: list[CurveRow]) -> str:
    """The table experiments/README.md shows: one line per run, private mechanisms by epsilon."""
    head = ("| mechanism | sigma | z | eps sample | eps user (models) | eps user (server) | WER % | CER % | "
            "seed WER % | seed CER % | "
            "MIA AUC same / other | TPR@1%FPR same / other | canary exposure (bits) | run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r.mechanism, -(r.epsilon_user or r.epsilon_sample or 0))):
        eps_user = _fmt(r.epsilon_user) + (" (extrapolated)" if r.extrapolated else "")
        if r.amplification is False:
            eps_user += " (no amplification)"
        if r.randomness != "secret":
            eps_user += " (reproducible noise: no protection)"
        lines.append(
            f"| {r.mechanism} | {_fmt(r.sigma)} | {_fmt(r.z)} | {_fmt(r.epsilon_sample)} | {eps_user} | "
            f"{_fmt(r.epsilon_user_server)} | "
            f"{_pct(r.wer)} | {_pct(r.cer)} | {_pct(r.seed_wer)} | {_pct(r.seed_cer)} | "
            f"{_fmt(r.mia_auc_same)} / {_fmt(r.mia_auc_other)} | {_fmt(r.mia_tpr_same)} / {_fmt(r.mia_tpr_other)} | "
            f"{_fmt(r.canary_exposure, 2)} | {r.run} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(rows: list[CurveRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(CurveRow)])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})


def collect(dirs: list[Path], out: Path) -> list[CurveRow]:
    """Read every run below ``dirs``; write ``curves.csv``, ``curves.md`` and the plots to ``out``."""
    root = Path(dirs[0]).resolve() if len(dirs) == 1 else Path("/")
    rows, series = [], {}
    for run_dir in find_runs(dirs):
        try:
            row = row_from_run(run_dir, root)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            log.warning("skipped %s: not a complete unheard run (%s)", run_dir, err)
            continue
        rows.append(row)
        series[row.run] = round_series(run_dir)
    if not rows:
        raise FileNotFoundError(f"no finished runs (folders with {SUMMARY}) under {', '.join(map(str, dirs))}")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "curves.csv")
    (out / "curves.md").write_text(markdown_table(rows), encoding="utf-8")
    plot_all(rows, series, out)
    log.info("collected %d runs into %s", len(rows), out)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="unheard-collect", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories to search for runs")
    parser.add_argument("--out", type=Path, help="where to write the outputs (default: the first DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        rows = collect(args.dirs, args.out or args.dirs[0])
    except FileNotFoundError as err:
        log.error("%s", err)
        sys.exit(1)
    sys.stdout.write(markdown_table(rows))


if __name__ == "__main__":
    main()
