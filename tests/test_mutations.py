"""The mutation list (``tests/mutations.py``) stays applicable: every snippet it breaks still occurs
exactly once where it says, and every test file it runs exists."""

from pathlib import Path

import pytest

from tests.mutations import MUTATIONS, ROOT, apply


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_to_exactly_one_place(mutation, tmp_path):
    names = {name for name, _, _ in mutation.edits()}
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    apply(mutation, tmp_path)
    for name in names:
        assert (tmp_path / name).read_text(encoding="utf-8") != (ROOT / name).read_text(encoding="utf-8")
    files = [t.split("::")[0] for t in mutation.tests if t.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files)


def test_names_are_unique():
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert Path(__file__).with_name("mutations.py").is_file()
