"""``--help`` of every recipe and benchmark script runs (argparse formats help strings with ``%``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

SCRIPTS = sorted(p for folder in ("recipes", "benchmarks") for p in (ROOT / folder).glob("*.py") if not p.name.startswith("_"))
# An option each script must list; a script not named here must still print its usage and options.
EXPECTED_OPTION = {
    "train.py": "--nuclear_norm_every",
    "compress.py": "--param_reduction",
    "smooth_vs_plain.py": "--save_budget",
    "cpu_protocol.py": "--variants",
    "speed_size.py": "--macs_budgets",
    "step_overhead.py": "--batch-sizes",
    "transformers_path.py": "--vit_budgets",
}


def test_every_script_is_covered():
    assert {"train.py", "compress.py", "speed_size.py", "step_overhead.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_help_runs(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=subprocess_env(),
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: {script.name}"), done.stdout[:500]
    assert EXPECTED_OPTION.get(script.name, "--help") in done.stdout
