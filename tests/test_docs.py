"""The README and the guides in docs/ stay true, as the recipes' own commands do (tests/test_recipe_commands.py).

- every recipe command in a ```bash block (``python recipes/<x>.py``, ``accelerate launch ... recipes/<x>.py``,
  ``smooth-hf-<x>``) parses with that recipe's own parser, so a renamed or removed flag fails here; every
  ``make <target>`` is a Makefile target and every ``python -m <module>`` a module;
- every ```python block compiles;
- every ``smooth_hf.<name>`` the docs (and BENCHMARKS.md) mention resolves, every file path they name exists, and
  every relative link (and its #anchor) resolves;
- the README stays short and links every guide; docs/options.md is its generator's output and names every option;
  docs/architecture.md names every module of the package.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT
from transformers import TrainingArguments

from smooth_hf.checkpoint.card import ModelCardInfo
from smooth_hf.lowrank import LowRankConfig
from smooth_hf.scripts import compress, options_doc, smooth_vs_plain, train
from smooth_hf.scripts.args import DataArguments, LowRankArguments, ModelArguments, TrainingDataArguments
from smooth_hf.training.config import SmoothTrainingArguments

README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *GUIDES]  # what users copy commands and snippets from
ALL_DOCS = [*DOCS, ROOT / "BENCHMARKS.md"]  # names, paths and links are checked here too
README_MAX_LINES = 200

RECIPES = {"train": train, "compress": compress, "smooth_vs_plain": smooth_vs_plain}
# pyproject.toml's [project.scripts]; test_console_scripts_are_the_recipes checks this against it
CONSOLE_SCRIPTS = {"smooth-hf-train": "train", "smooth-hf-compress": "compress", "smooth-hf-main-job": "smooth_vs_plain"}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
NAME = re.compile(r"\bsmooth_hf(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./-])((?:benchmarks|recipes|smooth_hf|tests|model_cards|docs|\.ci)/[\w.{},*/-]*[\w}*/])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def shell_commands() -> list[tuple[str, list[str]]]:
    """Every command of every ```bash block of the docs (continuation lines joined), as words; comments dropped."""
    commands = []
    for doc in DOCS:
        for start, code in blocks(doc, "bash"):
            lines = code.replace("\\\n", " \\\n").split("\n")
            logical, first = "", start
            for offset, line in enumerate(lines):
                if not logical:
                    first = start + offset
                logical += line.rstrip("\\") if line.endswith("\\") else line
                if line.endswith("\\"):
                    continue
                words = shlex.split(logical, comments=True)
                if words:
                    commands.append((f"{rel(doc)}:{first}", words))
                logical = ""
    return commands


COMMANDS = shell_commands()


def recipe_call(words: list[str]) -> tuple[str, list[str]] | None:
    """``(recipe, its arguments)`` when ``words`` runs a recipe (as a file or a console script), else ``None``."""
    for i, word in enumerate(words):
        match = re.fullmatch(r"recipes/(\w+)\.py", word)
        if match or word in CONSOLE_SCRIPTS:
            return (match.group(1) if match else CONSOLE_SCRIPTS[word]), words[i + 1:]
    return None


RECIPE_COMMANDS = [(where, *call) for where, words in COMMANDS if (call := recipe_call(words))]


def test_the_docs_show_recipe_commands():
    """The collection below is not empty by accident: the README and the guides show each recipe."""
    assert {recipe for _, recipe, _ in RECIPE_COMMANDS} == set(RECIPES)


@pytest.mark.parametrize(("where", "recipe", "argv"), RECIPE_COMMANDS, ids=[w for w, *_ in RECIPE_COMMANDS])
def test_recipe_command_parses_with_the_recipes_own_parser(where, recipe, argv):
    assert "..." not in " ".join(argv), f"{where}: a ```bash block holds a runnable command, not an abbreviation"
    try:
        RECIPES[recipe].parse_args(argv)
    except SystemExit as exit_:  # argparse's way of refusing a value (its message is on stderr)
        pytest.fail(f"{where}: recipes/{recipe}.py refuses {shlex.join(argv)} (exit {exit_.code}); see stderr")
    except ValueError as err:  # an unknown flag (HfArgumentParser), or a check of the recipe's own
        pytest.fail(f"{where}: recipes/{recipe}.py refuses {shlex.join(argv)}: {err}")


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_make_targets_and_modules_in_commands_exist():
    targets = makefile_targets()
    for where, words in COMMANDS:
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"{where}: no Makefile target {set(words[1:]) - targets}"
        if words[0] == "python" and words[1:2] == ["-m"]:
            assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"


def test_console_scripts_are_the_recipes():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"smooth_hf.scripts.{recipe}:cli" for name, recipe in CONSOLE_SCRIPTS.items()}
    for recipe in RECIPES:
        assert (ROOT / "recipes" / f"{recipe}.py").is_file()


PYTHON_BLOCKS = [(f"{rel(doc)}:{line}", code) for doc in DOCS for line, code in blocks(doc, "python")]


@pytest.mark.parametrize(("where", "code"), PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_block_compiles(where, code):
    compile(code, where, "exec")


def resolve(dotted: str) -> object:
    """The module or attribute ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not (module_name == err.name or module_name.startswith(f"{err.name}.")):
                raise  # a real module whose own import failed: that is an error to show
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_smooth_hf_name_in_the_docs_exists():
    missing = []
    for doc in ALL_DOCS:
        for name in sorted(set(NAME.findall(doc.read_text()))):
            try:
                resolve(name)
            except (ImportError, AttributeError) as err:
                missing.append(f"{rel(doc)}: {name} ({type(err).__name__}: {err})")
    assert not missing, "names that do not exist (moved or renamed?):\n" + "\n".join(missing)


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion, as the docs write sets of files: ``main_job.{json,md}`` -> both names."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [name for option in match.group(1).split(",") for name in expand_braces(head + option + tail)]


# Paths written with a placeholder the text explains (BENCHMARKS.md section 2: "N = 1 ... or 8", "M = 1 ... or 8").
PLACEHOLDER_PATHS = {"benchmarks/results/plan_rank_multiple/planN_cutM"}


def test_every_file_path_in_the_docs_exists():
    missing = []
    for doc in ALL_DOCS:
        text = doc.read_text()
        for match in PATH.finditer(text):
            if text[match.end():match.end() + 1] == "<":  # a placeholder follows: `step_overhead<tag>.json`
                continue
            for path in expand_braces(match.group(1)):
                if path not in PLACEHOLDER_PATHS and not glob.glob(str(ROOT / path)):
                    missing.append(f"{rel(doc)}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(sorted(set(missing)))


def github_anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the headings of a Markdown file (lower case, punctuation dropped, spaces to
    hyphens, repeats numbered)."""
    anchors, seen = set(), {}
    for _, title in HEADING.findall(without_code_blocks(path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in ALL_DOCS:
        for target in LINK.findall(without_code_blocks(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{rel(doc)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked):
                broken.append(f"{rel(doc)}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_reads_in_five_minutes_and_links_every_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    linked = {target.partition("#")[0] for target in LINK.findall(README.read_text())}
    assert {rel(guide) for guide in GUIDES} <= linked, "a guide in docs/ that the README does not link"


def test_options_page_is_its_generators_output():
    assert (ROOT / "docs" / "options.md").read_text() == options_doc.render(), (
        "docs/options.md is stale: run `make docs` (python -m smooth_hf.scripts.options_doc > docs/options.md)"
    )


def test_options_page_names_every_option_and_field():
    text = (ROOT / "docs" / "options.md").read_text()
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    flags = [f.name for f in dataclasses.fields(SmoothTrainingArguments) if f.name not in trainer_fields]
    for cls in (ModelArguments, TrainingDataArguments, DataArguments, LowRankArguments, compress.CompressArguments,
                smooth_vs_plain.MainJobArguments):
        flags += [f.name for f in dataclasses.fields(cls)]
    fields = [f.name for cls in (LowRankConfig, ModelCardInfo) for f in dataclasses.fields(cls)]
    missing = [f"--{name}" for name in flags if f"`--{name}`" not in text]
    missing += [name for name in fields if f"| `{name}` |" not in text]
    assert not missing, f"docs/options.md does not name {missing}: run `make docs`"


def test_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [rel(p) for p in (ROOT / "smooth_hf").rglob("*.py") if p.name != "__init__.py"]
    missing = [m for m in sorted(modules) if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not place {missing}: add each to its layer's row"
