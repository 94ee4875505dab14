"""`unheard-labels`: how good a teacher's pseudo-labels are, at every threshold, before a run uses them.

Same Hydra config and data as ``unheard-simulate``. Every simulated device's training recordings
are transcribed by a teacher exactly as a device does it (:func:`fl.labels.pseudo_label`: greedy,
one recording at a time, with the decode's mean log-probability per step as its confidence), and
scored against the transcripts the corpus holds -- the hidden truth a device never has. For each
threshold of ``--thresholds`` (the keys of ``train.pseudo_threshold``) it reports how many
recordings a device would keep and the corpus WER/CER of the kept pseudo-labels. The teacher is
the run's seed: what ``train.teacher=seed`` loads, and the global model of round 1 under
``train.teacher=global``. Writes ``pseudo_labels.json`` to the run folder; the
per-recording labels stay in ``private/pseudo_labels.jsonl`` (owner-only), since they are the
corpus' content. Measurement only: nothing here is part of a federated run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from experiments.inputs import build_inputs
from experiments.simulate import CONF_DIR, run_checked
from fl.config import Config, register_configs
from fl.metrics import scores
from fl.model import build_recognizer

log = logging.getLogger(__name__)
register_configs()

THRESHOLDS = (-math.inf, -1.0, -0.7, -0.5, -0.35, -0.25, -0.15, -0.1)
"""The confidences (mean log-probability per decoding step) the table is cut at."""


def quality(rows: list[dict], thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict]:
    """Per threshold: recordings kept (confidence >= threshold and a non-empty decode) and the
    normalised corpus WER/CER of their pseudo-labels against their true transcripts."""
    table = []
    for t in thresholds:
        kept = [r for r in rows if r["confidence"] >= t and r["label"].strip()]
        s = scores([r["truth"] for r in kept], [r["label"] for r in kept]) if kept else None
        table.append({"threshold": t, "kept": len(kept), "of": len(rows),
                      "wer": s.wer if s else None, "cer": s.cer if s else None})
    return table


def run(cfg: Config, out_dir: Path, resolved: dict) -> dict:
    """Label every device's training recordings with the seed and write the report (``resolved``, the
    composed config, is what :func:`~experiments.simulate.run_checked` passes every runner)."""
    cfg = replace(cfg, data=replace(cfg.data, drop_transcripts=False))  # the truth, to score against
    inputs = build_inputs(cfg, out_dir)
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, cfg.device)
    teacher = recognizer.module_from(inputs.seed.state_dict).eval()
    recordings = [e for d in inputs.devices.values() for e in d.train if e.text is not None]
    log.info("pseudo-labelling %d device training recordings with the seed", len(recordings))
    rows, started = [], time.perf_counter()
    for i, e in enumerate(recordings, start=1):
        (label, confidence), = recognizer.transcribe_with_confidence(teacher, recognizer.collate([e]))
        rows.append({"id": e.id, "truth": e.text, "label": label, "confidence": confidence})
        if i % 200 == 0:
            log.info("%d/%d labelled (%.2f s a recording)", i, len(recordings), (time.perf_counter() - started) / i)
    seconds = time.perf_counter() - started
    private = out_dir / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    path = private / "pseudo_labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.chmod(path, 0o600)
    report = {"teacher": "seed", "recordings": len(rows), "devices": len(inputs.devices),
              "seconds_per_recording": seconds / max(1, len(rows)), "thresholds": quality(rows)}
    (out_dir / "pseudo_labels.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict, out_dir: Path) -> None:
    table = Table(title=f"pseudo-labels of {report['recordings']} recordings ({report['teacher']}, "
                        f"{report['seconds_per_recording']:.2f} s each)")
    for column in ("threshold", "kept", "WER %", "CER %"):
        table.add_column(column, justify="right")
    for row in report["thresholds"]:
        pct = (lambda x: "-" if x is None else f"{100 * x:.1f}")
        table.add_row(f"{row['threshold']:g}", f"{row['kept']}/{row['of']}", pct(row["wer"]), pct(row["cer"]))
    Console().print(table)
    Console().print(f"report: {out_dir / 'pseudo_labels.json'}; the labels: {out_dir / 'private' / 'pseudo_labels.jsonl'}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    run_checked(dcfg, run, print_report)


if __name__ == "__main__":
    main()
