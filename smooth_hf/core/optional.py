"""Optional dependencies: which extra installs each, and the error that says so when one is missing.

A plain ``pip install smooth_hf`` stays light; deployment tools (ONNX export and runtime, torchao) come with
``pip install 'smooth_hf[deploy]'`` (pyproject.toml's extras). Code that needs one imports it through
:func:`require`, so a missing package is an ``ImportError`` naming the extra, not a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require"]

# importable name -> the smooth_hf extra that installs it (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "onnx": "deploy",
    "onnxruntime": "deploy",
    "onnxscript": "deploy",
    "torchao": "deploy",
    "peft": "peft",
}


def require(module: str, feature: str) -> ModuleType:
    """``import module``, or an ``ImportError`` saying that ``feature`` needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the package is there but one of its own imports failed: that is its error
            raise
        extra = EXTRAS.get(module)
        how = f"pip install 'smooth_hf[{extra}]' (or pip install {module})" if extra else f"pip install {module}"
        raise ImportError(f"{feature} needs {module}, which is not installed: {how}") from err
