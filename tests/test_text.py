"""Transcript normalisation and the CTC character vocabulary."""

import pytest

from fl.data.text import CharTokenizer, TextError, normalize_transcript


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("WE CALL IT BEAR", "we call it bear"),
        ("  Hello,   World!  ", "hello world"),
        ('He said "LET\'S GO."', "he said let's go"),
        ("It\u2019s fine?", "it's fine"),
        ("twenty-one", "twenty one"),
        ("a\tb\nc", "a b c"),
        ("...!?", ""),
        ("", ""),
        ("Room 101", "room 101"),  # digits are kept for the tokenizer to reject, not spelled out
        ("CAF\u00c9", "caf\u00e9"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_transcript(raw) == expected


def test_vocabulary_layout() -> None:
    tok = CharTokenizer()
    assert tok.blank == 0
    assert tok.vocab_size == 29
    assert tok.encode(" 'az") == [1, 2, 3, 28]


def test_round_trip() -> None:
    tok = CharTokenizer()
    text = "let's go to the gym"
    ids = tok.encode(text)
    assert tok.blank not in ids
    assert tok.decode(ids) == text
    assert tok.decode([0, *ids, 0]) == text  # blanks are skipped


def test_decode_keeps_repeats() -> None:
    tok = CharTokenizer()
    assert tok.decode(tok.encode("ll")) == "ll"


@pytest.mark.parametrize(
    "text, bad", [("room 101", "'0', '1'"), ("Hi", "'H'"), ("caf\u00e9!", "'!', '\u00e9'")]
)
def test_encode_names_offending_characters(text: str, bad: str) -> None:
    with pytest.raises(TextError, match=bad):
        CharTokenizer().encode(text)


def test_decode_rejects_out_of_range_ids() -> None:
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="29"):
        tok.decode([3, tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])
