"""Using a trained model outside a run: `unheard-eval`, `unheard-transcribe` and `unheard-export`.

A model reference (``MODEL``) is any of:

* ``seed``: the pinned Whisper tiny.en seed;
* a run folder of ``unheard-simulate`` or ``unheard-launch`` (its ``summary.json`` names the
  model; the last round's checkpoint holds the shared weights);
* one checkpoint ``<run>/checkpoints/round-NNN.pt`` of such a run;
* a Hugging Face Whisper folder (``config.json`` + ``tokenizer.json``), e.g. one ``unheard-export`` wrote.

Every figure printed is computed here, by the same evaluation code a run uses (``fl/train.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fl.config import ModelConfig
from fl.data.audio import TARGET_SR, AudioError, load_audio
from fl.data.features import Example, featurize
from fl.data.readers import READERS, CorpusError, read_corpus
from fl.model import Recognizer, build_recognizer
from fl.model.whisper_seed import SeedError
from fl.train import evaluate
from server.results import SUMMARY

DEVICE_HELP = "where the model runs: auto (a GPU if CUDA is available, else the CPU; default), cpu, cuda, cuda:N"

log = logging.getLogger(__name__)


class ModelRefError(ValueError):
    """A model reference that names no usable model; the message says what was expected."""


def _from_run(run: Path, checkpoint: Optional[Path], device: str) -> tuple[Recognizer, nn.Module, str]:
    summary_path = run / SUMMARY
    if not summary_path.is_file():
        raise ModelRefError(f"{run} has no {SUMMARY}: not a finished run folder")
    summary = json.loads(summary_path.read_text())
    config = summary.get("config") or {}
    if "model" not in config:
        raise ModelRefError(f"{summary_path} names no model (a central run keeps no weights)")
    recognizer = build_recognizer(ModelConfig(**config["model"]), (config.get("train") or {}).get("trainable"), device)
    if checkpoint is None:
        checkpoints = sorted((run / "checkpoints").glob("round-*.pt"))
        if not checkpoints:
            raise ModelRefError(f"{run} has no checkpoints/round-*.pt")
        checkpoint = checkpoints[-1]
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    return recognizer, recognizer.module_from(state), f"{run.name}/{checkpoint.name}"


def load_model(ref: str, device: str = "cpu") -> tuple[Recognizer, nn.Module, str]:
    """The recognizer, the module with its weights, and a label, for a model reference (module
    docstring); ``device``: where the module runs (a ``device`` spec: auto, cpu, cuda, cuda:N)."""
    if ref == "seed":
        recognizer = build_recognizer(ModelConfig(kind="whisper"), device=device)
        return recognizer, recognizer.new_module(), "whisper tiny.en seed"
    path = Path(ref)
    if path.is_file() and path.suffix == ".pt" and path.parent.name == "checkpoints":
        return _from_run(path.parent.parent, path, device)
    if (path / SUMMARY).is_file():
        return _from_run(path, None, device)
    if (path / "config.json").is_file():
        window = json.loads((path / "config.json").read_text()).get("max_source_positions", 1500) // 50
        recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(path), input_seconds=min(30, window)),
                                      device=device)
        return recognizer, recognizer.new_module(), path.name
    raise ModelRefError(f"{ref}: not 'seed', a run folder, a run's checkpoint or a Hugging Face Whisper folder")


def _corpus_kind(data: Path, kind: Optional[str]) -> str:
    if kind:
        return kind
    if (data / "wav.scp").is_file():
        return "kaldi"
    if (data / "manifest.jsonl").is_file():
        return "manifest"
    return "folder"


def _table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    return table


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """`unheard-eval MODEL DATA_DIR`: exit 0 with the figures, 2 when the model or the corpus cannot be used."""
    parser = argparse.ArgumentParser(prog="unheard-eval", description="Score a model on a corpus: WER after "
                                     "Whisper's English normaliser (the headline), raw WER, CER, decoding loops cut.")
    parser.add_argument("model", help="seed, a run folder, a checkpoint, or a Hugging Face Whisper folder")
    parser.add_argument("data", help="a corpus folder (Kaldi data dir, FSDD, LibriSpeech, manifest, or audio+.txt)")
    parser.add_argument("--corpus", choices=sorted(READERS), help="the corpus' reader (default: from its files)")
    parser.add_argument("--limit", type=int, default=0,
                        help="score N utterances spread evenly over the corpus (every k-th; 0: all)")
    parser.add_argument("--cache", default=".cache/features", help="feature cache folder")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recognizer, module, label = load_model(args.model, args.device)
        data = Path(args.data)
        read = read_corpus(_corpus_kind(data, args.corpus), data)
        utterances = read.utterances
        if args.limit and len(utterances) > args.limit:
            utterances = [utterances[i * len(utterances) // args.limit] for i in range(args.limit)]
        feats = featurize(utterances, recognizer, Path(args.cache))
    except (ModelRefError, SeedError, CorpusError, ValueError, OSError) as err:
        print(f"unheard-eval: {err}", file=sys.stderr)
        return 2
    examples = feats.examples
    if not examples:
        print(f"unheard-eval: no usable utterance in {data} ({len(read.problems) + len(feats.problems)} skipped)",
              file=sys.stderr)
        return 2
    result = evaluate(recognizer, module, examples)
    figures = {"model": label, "data": str(data), **asdict(result),
               "skipped": len(read.problems) + len(feats.problems)}
    Console().print(_table(f"{label} on {data}", [
        ("WER (normalised)", f"{result.wer:.2%}"), ("raw WER", f"{result.raw_wer:.2%}"), ("CER", f"{result.cer:.2%}"),
        ("loops cut", str(result.loops_cut)), ("utterances", str(result.utterances)),
        ("skipped", str(figures["skipped"]))]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def transcribe_main(argv: Optional[Sequence[str]] = None) -> int:
    """`unheard-transcribe AUDIO...`: one ``path<TAB>text`` line per file; exit 1 if any file was skipped."""
    parser = argparse.ArgumentParser(prog="unheard-transcribe", description="Print a transcript for each audio file.")
    parser.add_argument("audio", nargs="+", help="audio files (anything libsndfile reads; resampled to 16 kHz)")
    parser.add_argument("--model", default="seed", help="seed (default), a run folder, a checkpoint, or a HF folder")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recognizer, module, _ = load_model(args.model, args.device)
    except (ModelRefError, SeedError, ValueError, OSError) as err:
        print(f"unheard-transcribe: {err}", file=sys.stderr)
        return 2
    failed = 0
    module.eval()
    for path in args.audio:
        try:
            audio = load_audio(path, max_seconds=recognizer.max_seconds)
        except AudioError as err:
            print(f"{path}\t[skipped: {err}]")
            failed += 1
            continue
        example = Example(path, "", recognizer.features([audio])[0], torch.zeros(1, dtype=torch.long), "",
                          len(audio) / TARGET_SR)
        with recognizer.autocast():
            out = recognizer.transcribe(module, recognizer.collate([example]))
        print(f"{path}\t{out.texts[0]}" + ("\t[runaway decoding cut]" if out.loops_cut else ""))
    return 1 if failed else 0


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """`unheard-export RUN OUT`: exit 0 once written, 2 for a reference that cannot be exported."""
    parser = argparse.ArgumentParser(prog="unheard-export", description="Write a Whisper run's final global model "
                                     "as a Hugging Face Whisper folder (from_pretrained opens it).")
    parser.add_argument("run", help="a run folder or one of its checkpoints/round-NNN.pt")
    parser.add_argument("out", help="the folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recognizer, module, label = load_model(args.run)
        if not hasattr(recognizer, "export"):
            raise ModelRefError(f"{label} is a {recognizer.kind} model: only Whisper runs export as a "
                                "Hugging Face folder")
        out = recognizer.export(recognizer.shared(module), Path(args.out))  # type: ignore[attr-defined]
    except (ModelRefError, SeedError, ValueError, OSError) as err:
        print(f"unheard-export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {label} to {out}")
    return 0
