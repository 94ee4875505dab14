"""The curve plots (matplotlib, Agg): accuracy against epsilon (per point: the mean over its runs with
the sample std as error bars), and both against rounds (one line per run)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

if TYPE_CHECKING:
    from experiments.collect import CurvePoint, CurveRow

_BASELINES = {"none": "non-private FL", "central-finetune": "central non-private fine-tune (upper bound)"}
_STYLES = {"none": ("tab:gray", "--"), "central-finetune": ("black", ":")}


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _baselines(ax: Any, rows: list[CurveRow], metric: str) -> None:
    seed = _mean([getattr(r, "seed_" + metric) for r in rows])
    if seed is not None:
        ax.axhline(100 * seed, color="tab:red", linestyle="-.", linewidth=1,
                   label="seed model (before any federated round)")
    for mech, label in _BASELINES.items():
        values = [getattr(r, metric) for r in rows if r.mechanism == mech]
        value = _mean(values)
        if value is not None:
            color, style = _STYLES[mech]
            ax.axhline(100 * value, color=color, linestyle=style, linewidth=1,
                       label=f"{label}, mean of {len(values)} run{'s' if len(values) > 1 else ''}")


def _private_series(ax: Any, points: list[CurvePoint], metric: str, eps_key: str) -> bool:
    """One error-bar series per private mechanism: each point's mean over its runs, +- the sample std
    (no bar for a single run, drawn hollow)."""
    by_mech: dict[str, list[CurvePoint]] = defaultdict(list)
    for p in points:
        if getattr(p, eps_key) is not None and getattr(p, metric).mean is not None and p.mechanism not in _BASELINES:
            by_mech[p.mechanism].append(p)
    for mech, series in sorted(by_mech.items()):
        series.sort(key=lambda p: getattr(p, eps_key))
        xs = [getattr(p, eps_key) for p in series]
        ys = [100 * getattr(p, metric).mean for p in series]
        errs = [100 * (getattr(p, metric).std or 0.0) for p in series]
        extrapolated = eps_key == "epsilon_user" and any(p.extrapolated for p in series)
        label = f"{mech} (epsilon for a stated population, not this simulation)" if extrapolated else mech
        runs = sorted({p.n for p in series})
        label += f" (n = {'/'.join(map(str, runs))} runs a point)"
        container = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label,
                                linestyle="--" if extrapolated else "-")
        line = container.lines[0]
        if extrapolated:
            line.set_markerfacecolor("none")
        singles = [(x, y) for x, y, p in zip(xs, ys, series) if p.n == 1]
        if singles:  # a single run has no spread: a hollow marker says "no error bar", not "no error"
            sx, sy = zip(*singles)
            ax.plot(sx, sy, linestyle="none", marker="o", markersize=9, markerfacecolor="white",
                    markeredgecolor=line.get_color())
    return bool(by_mech)


def plot_wer_vs_epsilon(rows: list[CurveRow], path: Path, points: list[CurvePoint]) -> None:
    """WER and CER (rows) against sample-level and user-level epsilon (columns): each private point's
    mean over its runs with the sample std as error bars, one series per mechanism; the seed model,
    non-private FL and the central fine-tune (means over their runs) as horizontal lines."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    for i, metric in enumerate(("wer", "cer")):
        for j, (eps_key, title) in enumerate((("epsilon_sample", "utterance-level (sample) epsilon"),
                                              ("epsilon_user", "device-level (user) epsilon"))):
            ax = axes[i][j]
            if _private_series(ax, points, metric, eps_key):
                ax.set_xscale("log")
                # plain numbers ("4.6", not "4.6 x 10^0"): points within one decade label their minor ticks
                ax.xaxis.set_major_formatter(ticker.LogFormatter())
                ax.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
            _baselines(ax, rows, metric)
            ax.set_xlabel(title)
            ax.set_ylabel(f"{metric.upper()} on evaluation speakers (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Accuracy vs privacy (lower is better on both axes; bars: sample std over a point's runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _round_lines(ax: Any, rows: list[CurveRow], series: dict[str, list[dict[str, Any]]], key: str,
                 ylabel: str, scale: float = 1.0, log_y: bool = False) -> None:
    """One line per run of ``key`` (a results.jsonl column) against the round; rounds where it is null
    (not scored: ``federation.eval_every``) are skipped."""
    drawn = False
    for r in sorted(rows, key=lambda r: r.run):
        points = [(s["round"], s[key]) for s in series.get(r.run, []) if s.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [scale * y for y in ys], marker=".", label=f"{r.mechanism} ({r.run})")
            drawn = True
    if log_y and drawn:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6, ncol=2)


def plot_all(rows: list[CurveRow], series: dict[str, list[dict[str, Any]]], out: Path,
             points: list[CurvePoint]) -> None:
    """``wer_vs_epsilon.png`` (per point), ``wer_vs_round.png`` and ``epsilon_vs_round.png`` (per run) in ``out``."""
    plot_wer_vs_epsilon(rows, out / "wer_vs_epsilon.png", points)
    fig, ax = plt.subplots(figsize=(9, 6))
    _round_lines(ax, rows, series, "wer", "WER on evaluation speakers (%)", scale=100)
    fig.tight_layout()
    fig.savefig(out / "wer_vs_round.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    _round_lines(axes[0], rows, series, "epsilon_sample", "sample-level epsilon (worst device)", log_y=True)
    _round_lines(axes[1], rows, series, "epsilon_user", "user-level epsilon", log_y=True)
    fig.tight_layout()
    fig.savefig(out / "epsilon_vs_round.png", dpi=110)
    plt.close(fig)
