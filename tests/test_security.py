"""No pickle anywhere in smooth_hf's own code paths; nothing that needs remote code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.joinpath("smooth_hf").rglob("*.py"), *ROOT.joinpath("recipes").rglob("*.py")])

FORBIDDEN = {
    r"\btorch\.load\(": "torch.load unpickles: read safetensors instead",
    r"\bpickle\.loads?\(": "pickle executes code on load",
    r"trust_remote_code\s*=\s*True": "smooth_hf never needs remote code",
    r"\btorch\.save\(": "whole-model pickles: save safetensors",
}


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_pickle_or_remote_code(path):
    text = path.read_text()
    for pattern, why in FORBIDDEN.items():
        assert not re.search(pattern, text), f"{path.name}: {why}"
