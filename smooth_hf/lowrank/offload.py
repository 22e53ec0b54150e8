"""Keeping each layer's decomposition between the two passes of block-streamed compression, off the model's memory.

The global budget needs every layer's spectrum before any rank is chosen, and a layer's factors come from its
decomposition (its singular vectors): block-streamed compression (:mod:`smooth_hf.lowrank.streaming`) takes every
decomposition in a first pass, chooses the ranks, then cuts in a second. In between, each layer's vectors wait here:
in memory while they fit ``ram_bytes``, then in safetensors files in ``folder`` (a temporary folder by default,
removed on :meth:`DecompositionStore.close`; as ``accelerate``'s ``offload_folder``). Only the vectors up to the
largest rank that pays are kept: no rule keeps more.

They wait in float32 (``dtype``), half the memory and disk of the float64 they are computed in, and come back in
float64 for the math that builds the factors. The rounding (about 6e-8 of each entry) is below that of the float32
or bf16 factors they become; a float64 model passes ``dtype=torch.float64`` and keeps them exact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["DecompositionStore"]

DEFAULT_RAM_BYTES = 64 << 20  # beyond it, disk: a layer of a 1B model alone can exceed it


class DecompositionStore:
    """``put(name, tensors)`` / ``pop(name)``: named groups of tensors, in memory up to a cap, on disk beyond it.

    Floating tensors are kept in ``dtype`` and come back in float64 (see the module docstring).
    """

    def __init__(
        self, folder: str | os.PathLike | None = None, ram_bytes: int | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.dtype = dtype
        self._given = folder is not None
        self._folder = Path(folder) if folder is not None else None
        self._ram_bytes = DEFAULT_RAM_BYTES if ram_bytes is None else ram_bytes
        self._in_ram: dict[str, dict[str, Tensor]] = {}
        self._on_disk: dict[str, Path] = {}
        self._used = 0
        self.disk_bytes = 0  # written to disk in all (for the report and the benchmarks)

    def put(self, name: str, tensors: dict[str, Tensor]) -> None:
        # Copies (to() with copy=True): a slice kept as it is would keep the whole tensor it views alive.
        kept = {k: t.detach().to("cpu", self.dtype if t.is_floating_point() else t.dtype, copy=True).contiguous()
                for k, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in kept.values())
        if self._used + size <= self._ram_bytes:
            self._in_ram[name] = kept
            self._used += size
            return
        path = self._path(name)
        save_file(kept, str(path))
        self._on_disk[name] = path
        self.disk_bytes += size

    def pop(self, name: str) -> dict[str, Tensor]:
        if name in self._in_ram:
            tensors = self._in_ram.pop(name)
            self._used -= sum(t.numel() * t.element_size() for t in tensors.values())
        else:
            path = self._on_disk.pop(name)
            tensors = load_file(str(path))
            path.unlink()
        return {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}

    def _path(self, name: str) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="smooth_hf-offload-"))
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder / f"{len(self._on_disk)}-{name.replace('/', '_')}.safetensors"

    def close(self) -> None:
        """Drop everything; remove the folder when the store made it (a given folder only loses its files)."""
        self._in_ram.clear()
        for path in self._on_disk.values():
            path.unlink(missing_ok=True)
        self._on_disk.clear()
        if self._folder is not None and not self._given:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> DecompositionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
