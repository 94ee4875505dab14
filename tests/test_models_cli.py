"""`unheard-export`, `unheard-eval` and `unheard-transcribe` on a run folder of a small Whisper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperForConditionalGeneration

from experiments.models import eval_main, export_main, load_model, transcribe_main
from fl.config import ModelConfig
from fl.model import build_recognizer
from tests.test_whisper import small_whisper  # noqa: F401  (fixture)


@pytest.fixture
def run_folder(tmp_path, small_whisper):  # noqa: F811
    """What a finished Whisper run leaves: summary.json with its config, and round checkpoints."""
    model = {"kind": "whisper", "path": str(small_whisper), "input_seconds": 10.0}
    recognizer = build_recognizer(ModelConfig(**model))
    shared = {k: v + 0.01 for k, v in recognizer.shared(recognizer.new_module()).items()}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"round": 1, "state_dict": shared}, run / "checkpoints" / "round-001.pt")
    config = {"model": model, "train": {"trainable": None}}
    (run / "summary.json").write_text(json.dumps({"rounds": 1, "config": config}))
    return run, shared


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, text in enumerate(["turn on the lights", "call mom"]):
        sf.write(folder / f"clip{i}.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
        (folder / f"clip{i}.txt").write_text(text)
    sf.write(folder / "long.wav", 0.1 * rng.standard_normal(16000 * 12).astype(np.float32), 16000)
    (folder / "long.txt").write_text("longer than the model's window")
    return folder


def test_export_writes_the_runs_last_model_as_a_transformers_folder(run_folder, tmp_path, capsys):
    run, shared = run_folder
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out")
    for name, value in shared.items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    recognizer, module, _ = load_model(str(tmp_path / "out"))  # and the export is itself a model reference
    assert recognizer.kind == "whisper" and recognizer.max_seconds == 10


def test_eval_scores_a_run_on_a_corpus_and_reports_what_it_skipped(run_folder, corpus, tmp_path, capsys):
    run, _ = run_folder
    out = tmp_path / "figures.json"
    assert eval_main([str(run), str(corpus), "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["utterances"] == 2 and figures["skipped"] == 1  # the 12 s clip is past the 10 s window
    assert figures["wer"] >= 0 and figures["raw_wer"] >= 0 and figures["loops_cut"] >= 0
    assert "WER (normalised)" in capsys.readouterr().out


def test_transcribe_prints_a_line_per_file_and_skips_what_it_cannot_read(run_folder, corpus, capsys):
    run, _ = run_folder
    files = [str(corpus / "clip0.wav"), str(corpus / "long.wav")]
    assert transcribe_main(["--model", str(run), *files]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(files[0]) and "skipped" in lines[1]


def test_bad_references_are_refused_with_a_reason(tmp_path, corpus, capsys):
    assert eval_main([str(tmp_path), str(corpus)]) == 2
    assert "not 'seed', a run folder" in capsys.readouterr().err
    conformer_run = tmp_path / "conformer"
    (conformer_run / "checkpoints").mkdir(parents=True)
    (conformer_run / "summary.json").write_text(json.dumps({"config": {"model": {"kind": "conformer"}}}))
    torch.save({"state_dict": build_recognizer(ModelConfig()).shared(build_recognizer(ModelConfig()).new_module())},
               conformer_run / "checkpoints" / "round-001.pt")
    assert export_main([str(conformer_run), str(tmp_path / "x")]) == 2
    assert "only Whisper runs export" in capsys.readouterr().err
