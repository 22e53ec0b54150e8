"""The architecture holds (docs/architecture.md): each layer imports only the layers below it, no module imports one
that imports it back (function-local imports included), and nothing inside the package imports its root.

The layers and the cycle rule are pyproject.toml's import-linter contracts, checked here as ``make lint`` checks them.
"""

from __future__ import annotations

import grimp
from conftest import ROOT
from importlinter import configuration
from importlinter.application.use_cases import lint_imports


def test_the_import_contracts_hold(capsys):
    configuration.configure()  # what the lint-imports command does first
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out  # import-linter's report names each broken import chain


def test_no_module_of_the_package_imports_its_root():
    """The root only re-exports: a submodule importing it would import every layer (and, from a lower layer, the
    layers above it)."""
    graph = grimp.build_graph("smooth_hf", cache_dir=None)
    importers = graph.find_modules_that_directly_import("smooth_hf")
    assert not importers, f"these modules import the package root: {sorted(importers)}"


def test_every_module_belongs_to_a_layer():
    """A new top-level module would sit outside every contract: it must go into one of the layers."""
    layers = {"scripts", "hub", "checkpoint", "integrations", "training", "evaluation", "lowrank", "data", "models",
              "core", "_version"}
    top = {p.stem if p.is_file() else p.name for p in (ROOT / "smooth_hf").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert top == layers, f"outside the layers of pyproject.toml's contract: {sorted(top - layers)}"
