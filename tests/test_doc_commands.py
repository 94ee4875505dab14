"""Every command in the documents' shell blocks names something that exists.

README.md and docs/*.md are parsed like tests/test_deploy_doc.py parses docs/deploy.md: each
fenced ``bash``/``sh``/``shell``/``console`` block, line continuations joined, comments dropped.
Nothing is run. For each command:

* ``make T...``: every T is a target of the Makefile, and make gets no options (the targets take
  none: ``make bench --only X`` would be make's own unknown option);
* ``.venv/bin/NAME`` or a bare ``unheard-*``: NAME is a ``[project.scripts]`` entry point of
  pyproject.toml or a program the installed virtual environment has (``ray``, ``python``);
  an entry point's ``--options`` are defined in its module's source (argparse), and
  ``python -m MODULE`` names an importable module;
* a path (``experiments/curves.sh``) exists in the repository; any other program is on PATH;
* the Hydra apps' (``unheard-simulate``, ``unheard-launch``, ``unheard-central``) ``key=value``
  arguments compose with conf/ and the typed schema of fl/config.py (Hydra's compose API, struct
  mode: an unknown key is an error), every config group choice (``experiment=X``,
  ``privacy=X``, ...) names a file of conf/<group>/, and the composed config passes
  ``fl.config.validate`` (what a run checks before it starts: ``privacy.user.noise=lokal`` fails).

Inline code in the prose (`` `federation.eval_devices` ``) is checked too, where it spells a
dotted config key of a known top-level section.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shlex
import shutil
import sys
import tomllib
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fl.config import Config, register_configs, validate

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)
HYDRA_APPS = {"unheard-simulate", "unheard-launch", "unheard-central"}
BUILTINS = {"cd", "export", "time", "source", ".", "echo", "true"}
# placeholders a reader fills in: they stand for a value, so they are checked as one
PLACEHOLDER = re.compile(r"<[^<>]*>")


def shell_commands(doc: Path) -> list[tuple[int, str]]:
    """(line number, command) for every command of ``doc``'s shell blocks."""
    text = doc.read_text()
    commands = []
    for match in SHELL_BLOCK.finditer(text):
        first = text.count("\n", 0, match.start(1)) + 1
        lines = match.group(1).split("\n")
        joined, start = "", None
        for number, line in enumerate(lines, first):
            start = number if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            joined += line
            words = shlex.split(joined, comments=True)
            if words:
                commands.append((start, joined.strip()))
            joined, start = "", None
    return commands


def make_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if rule and not line.startswith("."):
            targets.update(rule.group(1).split())
    return targets


def entry_points() -> dict[str, str]:
    """[project.scripts]: name -> "module:function"."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def option_problems(name: str, args: list[str]) -> list[str]:
    """The ``--options`` an argparse entry point's module does not define (Hydra apps take none)."""
    if name in HYDRA_APPS or name not in entry_points():
        return []
    spec = importlib.util.find_spec(entry_points()[name].split(":")[0])
    source = Path(spec.origin).read_text() if spec and spec.origin else ""
    options = {a.split("=")[0] for a in args if a.startswith("--") and a != "--help"}
    return [f"{name} has no option {o} (not in {spec.name if spec else 'its module'})" for o in sorted(options)
            if f'"{o}"' not in source and f"'{o}'" not in source]


def venv_programs() -> set[str]:
    """What the virtual environment running this test installed (``.venv/bin`` under make)."""
    found = {p.name for p in Path(sys.executable).parent.iterdir()}
    venv = ROOT / ".venv" / "bin"
    if venv.is_dir():
        found |= {p.name for p in venv.iterdir()}
    return found


def config_groups() -> dict[str, set[str]]:
    return {d.name: {f.stem for f in d.glob("*.yaml")} for d in CONF.iterdir() if d.is_dir()}


def _strip_env(words: list[str]) -> list[str]:
    """Drop ``time`` and leading ``NAME=value`` environment assignments."""
    while words and (words[0] == "time" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0])):
        words = words[1:]
    return words


def program_problems(words: list[str]) -> list[str]:
    """What is wrong with the program a command runs (empty: nothing)."""
    words = _strip_env(words)
    if not words:
        return []
    program, args = words[0], words[1:]
    name = Path(program).name
    if program == "make":
        targets = make_targets()
        problems = [f"make gets an option {a!r}: the Makefile's targets take no arguments"
                    for a in args if a.startswith("-")]
        problems += [f"{a!r} is not a Makefile target" for a in args
                     if not a.startswith("-") and "=" not in a and a not in targets]
        return problems + ([] if args else ["`make` without a target"])
    if name in {"python", "python3", "python3.11"} and args[:1] == ["-m"]:
        module = args[1] if len(args) > 1 else ""
        if program.startswith(".venv/") and name not in venv_programs():
            return [f"{program}: the virtual environment has no {name}"]
        return [] if module and importlib.util.find_spec(module) else [f"no module {module!r} to run"]
    if program.startswith(".venv/bin/"):
        if name in entry_points():
            return option_problems(name, args)
        if not name.startswith("unheard-") and name in venv_programs():
            return []
        return [f"{program}: not a [project.scripts] entry point of pyproject.toml, nor installed"]
    if name.startswith("unheard-"):
        return option_problems(name, args) if name in entry_points() else [f"{name}: not a [project.scripts] entry point"]
    if "/" in program:
        return [] if (ROOT / program).exists() else [f"{program}: no such file in the repository"]
    if program in BUILTINS or shutil.which(program):
        return []
    return [f"{program}: not a known program"]


def hydra_overrides(words: list[str]) -> list[str]:
    """The Hydra overrides of a Hydra app's command line (a sweep's first value stands for all)."""
    words = _strip_env(words)
    if not words or Path(words[0]).name not in HYDRA_APPS:
        return []
    sweep = "-m" in words or "--multirun" in words
    overrides = []
    for word in words[1:]:
        if word.startswith("-") or "=" not in word:
            continue
        key, value = word.split("=", 1)
        if sweep and "," in value:
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    return overrides


def _quoted(override: str) -> str:
    """Quote a value Hydra's override grammar would not parse bare (a regex, ``~/``, ``HOST:PORT``)."""
    key, value = override.split("=", 1)
    if PLACEHOLDER.search(value) or re.search(r"[\\^~'\"<>\[\]{}()]", value) or re.search(r"[A-Za-z]:\d", value):
        value = "'" + PLACEHOLDER.sub("x", value).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={value}"


def override_problems(overrides: list[str]) -> list[str]:
    """Compose conf/ with ``overrides``; what Hydra or the schema refuses (empty: nothing)."""
    groups = config_groups()
    problems = []
    for override in overrides:
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        if key in groups and value not in groups[key]:
            problems.append(f"{key}={value}: no conf/{key}/{value}.yaml")
    if problems:
        return problems
    register_configs()
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[_quoted(o) for o in overrides], return_hydra_config=True)
        hydra_config.set_config(cfg)  # as a run's Hydra does, so that ${hydra:runtime.cwd} resolves
        with open_dict(cfg):
            del cfg["hydra"]
        validate(OmegaConf.to_object(cfg))  # the values too: what a run checks before it starts
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return [f"{' '.join(overrides)}: {type(err).__name__}: {err}".splitlines()[0]]
    finally:
        hydra_config.cfg = before
    return []


def _all_commands() -> list[tuple[str, int, str]]:
    return [(doc.relative_to(ROOT).as_posix(), line, cmd) for doc in DOCS for line, cmd in shell_commands(doc)]


def test_the_documents_have_commands_to_check():
    docs = {doc for doc, _, _ in _all_commands()}
    assert {"README.md", "docs/deploy.md", "docs/scale.md"} <= docs
    assert sum(1 for _, _, c in _all_commands() if "unheard-simulate" in c) >= 20


@pytest.mark.parametrize("doc", [d.relative_to(ROOT).as_posix() for d in DOCS])
def test_every_documented_command_names_what_exists(doc):
    problems = []
    for line, cmd in shell_commands(ROOT / doc):
        words = shlex.split(cmd, comments=True)
        found = program_problems(words) + override_problems(hydra_overrides(words))
        problems += [f"{doc}:{line}: {cmd}\n    {p}" for p in found]
    assert not problems, "\n".join(problems)


# `a.b` or `a.b=value` in inline code, a.b a dotted key under one of the config's sections
INLINE = re.compile(r"`((?:data|model|pretrain|train|privacy|federation|audit|central|deploy)"
                    r"(?:\.[a-z_]+)+)(?:=[^`\s]*)?`")


def _schema_has(path: list[str]) -> bool:
    """Whether fl/config.py's typed schema has the dotted key ``path`` (Optional sections included)."""
    node: object = Config
    for part in path:
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
        if typing.get_origin(node) is typing.Union:  # Optional[Section]
            node = next(a for a in typing.get_args(node) if a is not type(None))
    return True


# `audit.json` is a file, not the key audit.json; `privacy.randomness` is a block of summary.json
FILE = re.compile(r"\.(json|jsonl|pt|md|yaml|csv|txt|png)$")
# the committed runs' summaries (federated, central and labelling runs have different blocks)
SUMMARIES = [json.loads(p.read_text()) for p in sorted(ROOT.glob("experiments/results/**/summary.json"))]


def _inline_names(text: str) -> set[str]:
    return {m.group(1) for m in INLINE.finditer(text)}


def _summary_has(path: list[str]) -> bool:
    """Whether ``path`` is a field of a run's summary.json (of a committed one), not a config key."""
    def has(node: object) -> bool:
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True
    return any(has(summary) for summary in SUMMARIES)


@pytest.mark.parametrize("doc", [d.relative_to(ROOT).as_posix() for d in DOCS])
def test_every_config_key_in_the_prose_exists(doc):
    text = SHELL_BLOCK.sub("", (ROOT / doc).read_text())
    names = {n for n in _inline_names(text) if not FILE.search(n)}
    missing = sorted(n for n in names if not _schema_has(n.split(".")) and not _summary_has(n.split(".")))
    assert not missing, f"{doc} names config keys that fl/config.py does not have: {missing}"
