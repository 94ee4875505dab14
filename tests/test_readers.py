"""Corpus readers: good items become utterances, every bad item becomes a problem with its reason."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fl.data.readers import (
    CorpusError,
    ReadResult,
    problem_summary,
    read_corpus,
    read_folder,
    read_fsdd,
    read_kaldi_dir,
    read_librispeech,
    read_manifest,
)

# the read-only real data sits beside the checkout (../shared/data), on developer machines and in CI
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_tone(path: Path, sr: int = 8000, seconds: float = 0.25, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr, format=fmt)
    return path


def reasons(result: ReadResult) -> dict[str, str]:
    """utterance id -> reason; each skipped item is reported exactly once."""
    why = {p.utterance_id: p.reason for p in result.problems}
    assert len(why) == len(result.problems), result.problems
    return why


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def kaldi_dir(tmp_path: Path) -> Path:
    """corpus/{train,WAVE} like speechocean762, with one bad item of each kind."""
    root = tmp_path / "corpus"
    for uid in ("u1", "u2", "u3", "u5", "u6", "u7", "u8"):
        write_tone(root / "WAVE" / f"{uid}.wav")
    (root / "WAVE" / "broken.wav").write_bytes(b"not a wav file at all")
    d = root / "train"
    d.mkdir()
    write_lines(d / "wav.scp", [
        "u1 WAVE/u1.wav",
        "u2 WAVE/u2.wav",
        f"u3 {root / 'WAVE' / 'u3.wav'}",  # absolute path
        "u4 WAVE/does_not_exist.wav",
        "u5 WAVE/u5.wav",
        "u6 WAVE/u6.wav",
        "u7 sox WAVE/u7.wav -t wav - |",
        "u8 WAVE/u8.wav",
        "u8 WAVE/u8.wav",
        "u9",
        "u10 WAVE/broken.wav",
        "",
        "u11 WAVE/u1.wav",
    ])
    write_lines(d / "text", [
        "u1 WE CALL IT BEAR.",
        "u2 LET'S GO",
        "u3 ONE TWO",
        "u4 MISSING AUDIO",
        "u5 ROOM 101",
        "u6 ?!",
        "u7 PIPED",
        "u8 DUPLICATED",
        "u9 NO PATH",
        "u10 BROKEN",
        "u12 ONLY IN TEXT",
    ])
    write_lines(d / "utt2spk", [f"u{i} s{i % 2}" for i in range(1, 11)])
    return d


def test_kaldi_reads_good_items_and_reports_bad_ones(kaldi_dir: Path) -> None:
    r = read_kaldi_dir(kaldi_dir)
    assert [u.id for u in r.utterances] == ["u1", "u2", "u3"]
    u1 = r.utterances[0]
    assert u1.text == "we call it bear" and u1.speaker == "s1"
    assert Path(u1.audio).is_absolute() and Path(u1.audio).is_file()
    assert u1.duration == pytest.approx(0.25)
    why = reasons(r)
    assert set(why) == {"u4", "u5", "u6", "u7", "u8", "u9", "u10", "u11", "u12"}
    assert "audio file not found" in why["u4"]
    assert "outside the vocabulary" in why["u5"] and "'1'" in why["u5"]
    assert "empty transcript" in why["u6"]
    assert why["u7"] == "pipe commands are not supported"
    assert "duplicate id in wav.scp" in why["u8"]
    assert "malformed line" in why["u9"]
    assert "unreadable audio header" in why["u10"]
    assert why["u11"] == "no transcript in text"
    assert why["u12"] == "listed in text but not in wav.scp"


def test_kaldi_bad_bytes_skip_one_line_and_summary_counts_reasons(kaldi_dir: Path) -> None:
    with (kaldi_dir / "text").open("ab") as f:
        f.write(b"u11 CAF\xc9\n")  # Latin-1, not UTF-8
    with (kaldi_dir / "utt2spk").open("a") as f:
        f.write("u11 s1\n")
    r = read_kaldi_dir(kaldi_dir)
    assert [u.id for u in r.utterances] == ["u1", "u2", "u3"]
    assert "outside the vocabulary" in reasons(r)["u11"]
    summary = problem_summary(r.problems)
    assert summary["characters outside the vocabulary"] == 2  # u5 and u11
    assert summary["pipe commands are not supported"] == 1
    assert sum(summary.values()) == len(r.problems)


def test_kaldi_missing_speaker_and_audio_root(kaldi_dir: Path, tmp_path: Path) -> None:
    write_lines(kaldi_dir / "utt2spk", ["u1 s1", "u3 s3"])
    r = read_kaldi_dir(kaldi_dir, audio_root=kaldi_dir.parent)
    assert [u.id for u in r.utterances] == ["u1", "u3"]
    assert reasons(r)["u2"] == "no speaker in utt2spk"
    r = read_kaldi_dir(kaldi_dir, audio_root=tmp_path / "elsewhere")
    assert [u.id for u in r.utterances] == ["u3"]  # only the absolute path still resolves


def test_kaldi_invalid_directory(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not a directory"):
        read_kaldi_dir(tmp_path / "nope")
    (tmp_path / "wav.scp").write_text("")
    with pytest.raises(CorpusError, match="missing utt2spk"):  # text is optional: without it, unlabelled
        read_kaldi_dir(tmp_path)


@pytest.fixture
def fsdd_dir(tmp_path: Path) -> Path:
    rec = tmp_path / "fsdd" / "recordings"
    for name in ("0_alice_0", "7_alice_32", "3_bob_4", "9_bob_12", "not_a_digit"):
        write_tone(rec / f"{name}.wav")
    (rec / "5_bob_7.wav").write_bytes(b"")
    return tmp_path / "fsdd"


def test_fsdd(fsdd_dir: Path) -> None:
    for path in (fsdd_dir, fsdd_dir / "recordings"):
        r = read_fsdd(path)
        assert {u.id: (u.text, u.speaker) for u in r.utterances} == {
            "0_alice_0": ("zero", "alice"),
            "7_alice_32": ("seven", "alice"),
            "3_bob_4": ("three", "bob"),
            "9_bob_12": ("nine", "bob"),
        }
        why = reasons(r)
        assert set(why) == {"not_a_digit", "5_bob_7"}
        assert "does not match" in why["not_a_digit"]
        assert "unreadable audio header" in why["5_bob_7"]
    assert [u.id for u in read_fsdd(fsdd_dir, split="test").utterances] == ["0_alice_0", "3_bob_4"]
    assert [u.id for u in read_fsdd(fsdd_dir, split="train").utterances] == ["7_alice_32", "9_bob_12"]
    with pytest.raises(ValueError, match="split"):
        read_fsdd(fsdd_dir, split="dev")


def test_fsdd_invalid_directory(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no .wav files"):
        read_fsdd(tmp_path)


def test_librispeech(tmp_path: Path) -> None:
    root = tmp_path / "train-clean-100"
    chapter = root / "19" / "198"
    for uid in ("19-198-0000", "19-198-0001"):
        write_tone(chapter / f"{uid}.flac", sr=16000, fmt="FLAC")
    write_lines(chapter / "19-198.trans.txt", [
        "19-198-0000 NORTHANGER ABBEY",
        "19-198-0001 THIS LITTLE WORK WAS FINISHED",
        "19-198-0002 AUDIO IS MISSING",
        "19-198-0003",
    ])
    other = root / "26" / "495"
    write_tone(other / "26-495-0000.flac", sr=16000, fmt="FLAC")
    write_lines(other / "26-495.trans.txt", ["26-495-0000 CHAPTER ONE", "19-198-0000 AGAIN"])
    r = read_librispeech(root)
    assert [(u.id, u.speaker) for u in r.utterances] == [
        ("19-198-0000", "19"), ("19-198-0001", "19"), ("26-495-0000", "26")
    ]
    assert r.utterances[1].text == "this little work was finished"
    assert r.utterances[0].audio.endswith("19-198-0000.flac")
    why = reasons(r)
    assert set(why) == {"19-198-0000", "19-198-0002", "19-198-0003"}
    assert "duplicate id" in why["19-198-0000"]
    assert "audio file not found" in why["19-198-0002"]
    assert "malformed line in 19-198.trans.txt (line 4" in why["19-198-0003"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="trans.txt"):
        read_librispeech(tmp_path / "empty")


def test_manifest(tmp_path: Path) -> None:
    write_tone(tmp_path / "audio" / "a.wav")
    absolute = write_tone(tmp_path / "elsewhere" / "b.wav")
    rows = [
        json.dumps({"id": "a", "audio": "audio/a.wav", "text": "Hello there!", "speaker": "s1"}),
        json.dumps({"id": "b", "audio": str(absolute), "text": "hi", "speaker": "s2", "duration": 9.5}),
        "{not json",
        json.dumps({"id": "c", "audio": "audio/a.wav", "speaker": "s1"}),
        json.dumps({"id": "a", "audio": "audio/a.wav", "text": "again", "speaker": "s1"}),
        json.dumps({"id": "d", "audio": "audio/none.wav", "text": "gone", "speaker": "s1"}),
        json.dumps(["a", "list"]),
        "",
    ]
    write_lines(tmp_path / "m.jsonl", rows)
    r = read_manifest(tmp_path / "m.jsonl")
    assert [(u.id, u.text, u.speaker) for u in r.utterances] == [
        ("a", "hello there", "s1"), ("b", "hi", "s2")
    ]
    assert r.utterances[0].audio == str((tmp_path / "audio" / "a.wav").resolve())
    assert r.utterances[0].duration == pytest.approx(0.25)
    assert r.utterances[1].duration == 9.5  # given durations are trusted
    why = reasons(r)
    assert set(why) == {"line 3", "c", "a", "d", "line 7"}
    assert "invalid JSON" in why["line 3"]
    assert "missing field(s) text (line 4)" in why["c"]
    assert "duplicate id" in why["a"]
    assert "audio file not found" in why["d"]
    assert "JSON object" in why["line 7"]
    with pytest.raises(CorpusError, match="JSONL manifest"):
        read_manifest(tmp_path / "none.jsonl")


def test_folder_pairs_recordings_with_transcripts(tmp_path: Path) -> None:
    write_tone(tmp_path / "kitchen" / "a.wav")
    (tmp_path / "kitchen" / "a.txt").write_text("Turn on the lights\n", encoding="utf-8")
    write_tone(tmp_path / "b.flac", fmt="FLAC")
    (tmp_path / "b.txt").write_text("call mom", encoding="utf-8")
    write_tone(tmp_path / "no_text.wav")
    write_tone(tmp_path / "empty.wav")
    (tmp_path / "empty.txt").write_text("  ", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a transcript of anything", encoding="utf-8")
    r = read_folder(tmp_path)
    assert [(u.id, u.text, u.speaker) for u in r.utterances] == [
        ("b", "call mom", tmp_path.name), ("kitchen/a", "turn on the lights", "kitchen")]
    why = reasons(r)
    assert set(why) == {"no_text", "empty"}
    assert "no transcript" in why["no_text"] and "empty transcript" in why["empty"]
    with pytest.raises(CorpusError, match="folder of recordings"):
        read_folder(tmp_path / "absent")


def test_read_corpus_dispatches(fsdd_dir: Path) -> None:
    assert len(read_corpus("fsdd", fsdd_dir).utterances) == 4
    with pytest.raises(ValueError, match="unknown corpus kind 'timit'"):
        read_corpus("timit", fsdd_dir)


@pytest.mark.skipif(not (SHARED / "speechocean762").is_dir(), reason="speechocean762 not available")
def test_real_speechocean762_train() -> None:
    r = read_corpus("kaldi", SHARED / "speechocean762" / "train")
    assert len(r.utterances) + len(r.problems) == 2500
    assert len({u.speaker for u in r.utterances}) == 125
    assert len(r.problems) < 25
    assert all(Path(u.audio).is_file() and u.duration > 0 for u in r.utterances[:50])


@pytest.mark.skipif(not (SHARED / "fsdd").is_dir(), reason="FSDD not available")
def test_real_fsdd() -> None:
    r = read_corpus("fsdd", SHARED / "fsdd")
    assert len(r.utterances) + len(r.problems) == 3000
    assert len({u.speaker for u in r.utterances}) == 6
    assert len(read_fsdd(SHARED / "fsdd", split="test").utterances) == 6 * 10 * 5
