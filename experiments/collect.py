"""`unheard-collect DIR...`: gather finished runs into ``curves.csv``, ``points.csv``, ``curves.md`` and plots.

Works on any run directories (one run, a Hydra multirun, a tree of sweeps): every folder below
the given ones that holds a ``summary.json`` is a run; ``results.jsonl`` and ``audit.json``
beside it add the per-round figures and the leakage audit, and ``experimenter_view.json`` the
devices' test-split WER a private simulation's experimenter computed (covered by no DP, labelled
so). Nothing is recomputed from the data: every number in the outputs is one a run wrote, or the
mean / sample standard deviation / min / max of those over the repeats of a *point*. Nothing is read
from a run's ``private/`` folder: a private run's wall time is not published, so its ``seconds`` is empty.

A point (:func:`point_of`) is the set of runs with the same preset name, mechanism and privacy
parameters (sigma, z, target epsilon, the realised epsilons rounded to 2 decimals, rounds, noise
randomness): repeats that differ only in their secrets. ``curves.csv`` has one line per run (its
``point`` column names the group), ``points.csv`` one per point, and ``curves.md`` the per-point
table first, then the per-run one.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
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
    target_epsilon: Optional[float]
    epsilon_sample: Optional[float]
    epsilon_sample_rdp: Optional[float]
    accountant_sample: Optional[str]
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
    point: str = ""
    """The point (group of repeats) this run belongs to: :func:`point_of`."""


def mechanism_of(summary: dict[str, Any]) -> str:
    """``central-finetune``, ``none``, ``sample`` (on-device DP-SGD), ``sample-central`` (DP-FedSGD:
    the server adds the noise), ``sample-distributed``, ``user-<noise>`` or ``both-<noise>``, with
    ``-extrapolated`` when the user-level epsilon is for a stated population, not the simulated one.
    A sample-level block without ``noise`` (older summaries) is on-device DP-SGD: ``sample``."""
    if summary.get("kind") == "central":
        return "central-finetune"
    privacy = summary["privacy"]
    sample, user = privacy.get("sample"), privacy.get("user")
    if user is None:
        return _sample_mechanism(sample) if sample else _configured(summary)
    level = "both" if sample or summary["config"]["privacy"].get("sample") else "user"
    return f"{level}-{user['noise']}" + ("-extrapolated" if user.get("extrapolated") else "")


def _sample_mechanism(sample: dict[str, Any]) -> str:
    noise = sample.get("noise") or "device"
    return "sample" if noise == "device" else f"sample-{noise}"


def _configured(summary: dict[str, Any]) -> str:
    """A run whose devices never reported sample-level spend still has the mechanism it was configured with."""
    configured = summary["config"]["privacy"].get("sample")
    return "none" if configured is None else _sample_mechanism(configured)


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
    row = CurveRow(
        run=str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        name=summary["config"]["name"], mechanism=mechanism_of(summary),
        sigma=sample.get("noise_multiplier"), z=user.get("noise_multiplier"),
        target_epsilon=sample.get("target_epsilon"),
        epsilon_sample=sample.get("epsilon"), epsilon_sample_rdp=sample.get("epsilon_rdp"),
        accountant_sample=sample.get("accountant"), delta_sample=sample.get("delta"),
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
    return replace(row, point=point_of(row))


def _key(x: Optional[float], digits: int) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def _sig(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None else float(f"{float(x):.{digits}g}")


def point_of(row: CurveRow) -> str:
    """The name of ``row``'s point: preset name, mechanism and every privacy parameter that must agree
    between repeats (sigma and z to 6 significant digits, the realised epsilons to 2 decimals).
    Repeats of one configuration with fresh secrets share it; anything else tells them apart."""
    parts = [row.mechanism, row.name]
    for label, value in (("target_eps", _sig(row.target_epsilon)), ("sigma", _sig(row.sigma)), ("z", _sig(row.z)),
                         ("eps_sample", _key(row.epsilon_sample, 2)), ("eps_user", _key(row.epsilon_user, 2)),
                         ("eps_user_server", _key(row.epsilon_user_server, 2))):
        if value is not None:
            parts.append(f"{label}={value:g}")
    parts.append(f"rounds={row.rounds}")
    if row.randomness != "secret":
        parts.append(f"randomness={row.randomness}")
    return " ".join(parts)


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation (ddof=1; None for a single run), min and max of ``n`` values."""

    n: int
    mean: Optional[float]
    std: Optional[float]
    min: Optional[float]
    max: Optional[float]

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Stats":
        xs = [float(v) for v in values if v is not None]
        if not xs:
            return cls(0, None, None, None, None)
        return cls(len(xs), statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, min(xs), max(xs))


@dataclass(frozen=True)
class CurvePoint:
    """The repeats of one configuration (:func:`point_of`) and their accuracy over the repeats.

    The privacy figures are those of the repeats (equal up to rounding); where they are not exactly
    equal, the largest is kept and ``epsilon_varies`` says so."""

    point: str
    name: str
    mechanism: str
    sigma: Optional[float]
    z: Optional[float]
    target_epsilon: Optional[float]
    epsilon_sample: Optional[float]
    epsilon_sample_rdp: Optional[float]
    accountant_sample: Optional[str]
    epsilon_user: Optional[float]
    epsilon_user_server: Optional[float]
    epsilon_varies: bool
    extrapolated: bool
    randomness: str
    rounds: int
    n: int
    seed_wer: Optional[float]
    wer: Stats
    cer: Stats
    device_wer: Stats
    all_below_seed: bool
    runs: tuple[str, ...]


def _largest(values: list[Optional[float]]) -> tuple[Optional[float], bool]:
    """The largest of ``values`` (None if all are) and whether they differ."""
    present = [v for v in values if v is not None]
    return (max(present) if present else None), len(set(values)) > 1


def points_of(rows: list[CurveRow]) -> list[CurvePoint]:
    """Group ``rows`` by :attr:`CurveRow.point` into :class:`CurvePoint` s (by mechanism, then epsilon)."""
    groups: dict[str, list[CurveRow]] = defaultdict(list)
    for r in rows:
        groups[r.point or point_of(r)].append(r)
    points = []
    for name, members in groups.items():
        members.sort(key=lambda r: r.run)
        first = members[0]
        eps_s, varies_s = _largest([r.epsilon_sample for r in members])
        eps_rdp, varies_rdp = _largest([r.epsilon_sample_rdp for r in members])
        eps_u, varies_u = _largest([r.epsilon_user for r in members])
        eps_us, varies_us = _largest([r.epsilon_user_server for r in members])
        varies = varies_s or varies_rdp or varies_u or varies_us
        if varies:
            log.warning("point %r: its %d runs' epsilons differ below the rounding; reporting the largest",
                        name, len(members))
        points.append(CurvePoint(
            point=name, name=first.name, mechanism=first.mechanism, sigma=first.sigma, z=first.z,
            target_epsilon=first.target_epsilon, epsilon_sample=eps_s, epsilon_sample_rdp=eps_rdp,
            accountant_sample=first.accountant_sample, epsilon_user=eps_u, epsilon_user_server=eps_us,
            epsilon_varies=varies, extrapolated=first.extrapolated, randomness=first.randomness, rounds=first.rounds,
            n=len(members), seed_wer=Stats.of(r.seed_wer for r in members).mean,
            wer=Stats.of(r.wer for r in members), cer=Stats.of(r.cer for r in members),
            device_wer=Stats.of(r.device_wer for r in members),
            all_below_seed=all(r.wer < r.seed_wer for r in members), runs=tuple(r.run for r in members),
        ))
    points.sort(key=lambda p: (p.mechanism, p.name, -(p.epsilon_user or p.epsilon_sample or 0), p.point))
    return points


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


def _pct_stats(s: Stats) -> str:
    """``mean ± std`` in percent; ``-`` for the std of a single run, ``-`` alone for no values."""
    if s.mean is None:
        return "-"
    return f"{_pct(s.mean)} ± {_pct(s.std)}"


def _device_stats(p: CurvePoint) -> str:
    """The device-test WER over the runs that scored it, saying so when that is not all of them."""
    text = _pct_stats(p.device_wer)
    return text if p.device_wer.n in (0, p.n) else f"{text} ({p.device_wer.n} of {p.n} runs)"


def _eps(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def _eps_sample(p: CurvePoint) -> str:
    """``6.19 (pld; rdp 7.12)``: the reported figure, its accountant and the RDP figure beside it."""
    if p.epsilon_sample is None:
        return "-"
    notes = [n for n in (p.accountant_sample, None if p.epsilon_sample_rdp is None else
                         f"rdp {_eps(p.epsilon_sample_rdp)}") if n]
    return _eps(p.epsilon_sample) + (f" ({'; '.join(notes)})" if notes else "")


def _runs(n: int) -> str:
    return "**1 (single run: no spread)**" if n == 1 else f"{n} (fewer than 3)" if n < 3 else str(n)


def points_table(points: list[CurvePoint]) -> str:
    """One line per point: its mechanism and guarantee, and accuracy as mean ± sample std over its runs."""
    head = ("| mechanism | preset | sigma / z | target eps | eps sample | eps user | n runs | WER % | CER % | "
            "device WER % | seed WER % | every run below seed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        eps_user = _eps(p.epsilon_user) + (" (extrapolated)" if p.extrapolated else "")
        if p.epsilon_user_server is not None:
            eps_user += f"; server {_eps(p.epsilon_user_server)}"
        if p.randomness != "secret":
            eps_user += " (reproducible noise: no protection)"
        eps_sample = _eps_sample(p)
        if p.epsilon_varies:
            eps_sample += " (largest of the runs)"
        lines.append(
            f"| {p.mechanism} | {p.name} | {_fmt(p.sigma)} / {_fmt(p.z)} | {_fmt(p.target_epsilon)} | {eps_sample} | "
            f"{eps_user} | {_runs(p.n)} | {_pct_stats(p.wer)} | {_pct_stats(p.cer)} | {_device_stats(p)} | "
            f"{_pct(p.seed_wer)} | {'yes' if p.all_below_seed else 'no'} |"
        )
    return "\n".join(lines) + "\n"


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


def curves_markdown(rows: list[CurveRow], points: list[CurvePoint]) -> str:
    """``curves.md``: the per-point table (mean ± std over repeats), then the per-run table."""
    return ("## Points (mean ± sample std over each point's runs)\n\n" + points_table(points)
            + "\n## Runs\n\n" + markdown_table(rows))


def write_csv(rows: list[CurveRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(CurveRow)])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})


_STATS = ("wer", "cer", "device_wer")


def point_record(p: CurvePoint) -> dict[str, Any]:
    """One ``points.csv`` line: the point's figures, then ``<metric>_{n,mean,std,min,max}`` per metric."""
    record = {fl.name: getattr(p, fl.name) for fl in fields(CurvePoint) if fl.name not in _STATS + ("runs",)}
    for metric in _STATS:
        stats = getattr(p, metric)
        record |= {f"{metric}_{k}": getattr(stats, k) for k in ("n", "mean", "std", "min", "max")}
    record["runs"] = ";".join(p.runs)
    return record


def write_points_csv(points: list[CurvePoint], path: Path) -> None:
    records = [point_record(p) for p in points]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})


def collect(dirs: list[Path], out: Path) -> list[CurveRow]:
    """Read every run below ``dirs``; write ``curves.csv``, ``points.csv``, ``curves.md`` and the plots to ``out``."""
    # runs are named by their path below the given folders' common parent (one folder: below it)
    root = Path(os.path.commonpath([Path(d).resolve() for d in dirs]))
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
    points = points_of(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "curves.csv")
    write_points_csv(points, out / "points.csv")
    (out / "curves.md").write_text(curves_markdown(rows, points), encoding="utf-8")
    plot_all(rows, series, out, points)
    log.info("collected %d runs (%d points) into %s", len(rows), len(points), out)
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
    sys.stdout.write(curves_markdown(rows, points_of(rows)))


if __name__ == "__main__":
    main()
