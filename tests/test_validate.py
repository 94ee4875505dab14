"""`unheard-data validate`: every kind of bad recording or line is reported once, with a reason."""

import numpy as np
import pytest
import soundfile as sf

from fl.data.validate import detect_kind, main, validate


def tone(path, sr=16000, seconds=0.5, channels=1, subtype=None, value=None):
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    if value is not None:
        x[len(x) // 2] = value
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr, subtype=subtype)
    return path


@pytest.fixture
def messy(tmp_path):
    d = tmp_path / "kaldi"
    (d / "wav").mkdir(parents=True)
    tone(d / "wav" / "good.wav")
    tone(d / "wav" / "rate8k.wav", sr=8000)
    tone(d / "wav" / "stereo.wav", channels=2)
    (d / "wav" / "corrupt.wav").write_bytes(b"RIFF\x00\x00junk that is not audio")
    (d / "wav" / "empty.wav").write_bytes(b"")
    sf.write(d / "wav" / "header.wav", np.zeros(0, np.float32), 16000)
    tone(d / "wav" / "nan.wav", subtype="FLOAT", value=np.nan)
    tone(d / "wav" / "inf.wav", subtype="FLOAT", value=np.inf)
    sf.write(d / "wav" / "silent.wav", np.zeros(8000, np.float32), 16000)
    tone(d / "wav" / "long.wav", seconds=3.0)
    for name in ("emptytext", "foreign"):
        tone(d / "wav" / f"{name}.wav")
    ids = ["good", "rate8k", "stereo", "corrupt", "empty", "header", "nan", "inf", "silent", "long", "emptytext",
           "foreign"]
    wav = [f"{i} wav/{i}.wav" for i in ids] + ["missing wav/missing.wav", "good wav/good.wav", "malformed"]
    text = {i: "turn on the lights" for i in ids} | {"emptytext": "", "foreign": "日本語", "missing": "call mom"}
    (d / "wav.scp").write_text("\n".join(wav) + "\n")
    (d / "text").write_text("\n".join(f"{k} {v}" for k, v in text.items()) + "\n")
    (d / "utt2spk").write_text("\n".join(f"{k} spk1" for k in text) + "\n")
    return d


def test_every_problem_is_reported_once_with_its_reason(messy):
    report = validate(messy, max_seconds=2.0)
    why = {p.utterance_id: p.reason for p in report.problems}
    assert len(why) == len(report.problems)
    expected = {
        "corrupt": "unreadable", "empty": "empty", "header": "header", "nan": "NaN", "inf": "NaN or Inf",
        "silent": "silent", "long": "too long", "emptytext": "empty transcript", "foreign": "character",
        "missing": "not found", "good": "duplicate", "malformed": "malformed",
    }
    assert set(why) == set(expected)
    for uid, fragment in expected.items():
        assert fragment.lower() in why[uid].lower(), (uid, why[uid])
    assert report.usable == 2  # rate8k and stereo are converted, not rejected
    assert report.conversions == {"resampled from 8000 Hz to 16000 Hz": 1, "2 channels averaged to mono": 1}


def test_cli_prints_a_line_per_problem_then_a_summary_and_exits_1(messy, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(messy), "--max-seconds", "2"])
    assert exc.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(":")[0] in {"good", "malformed", "corrupt"}
    assert any("2 usable recordings" in line and "12 problems" in line for line in lines)


def test_a_clean_folder_exits_0(tmp_path, capsys):
    tone(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("call mom")
    assert detect_kind(tmp_path) == "folder"
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(tmp_path)])
    assert exc.value.code == 0 and "1 usable recordings" in capsys.readouterr().out


def test_not_a_corpus_is_a_message_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(tmp_path / "nowhere")])
    assert exc.value.code == 1 and "nowhere" in capsys.readouterr().out
