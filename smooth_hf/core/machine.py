"""The machine: the CPU cores this process may run on, how to share them between processes, and the description
every measurement records (one place that reads them)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Any

import torch

__all__ = ["core_shares", "load_average", "machine_info", "machine_summary", "release_freed_memory", "usable_cores"]


def usable_cores() -> list[int]:
    """The cores this process may run on (its CPU affinity: a container or ``taskset`` may allow fewer than the
    machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_shares(n: int) -> list[list[int]] | None:
    """The usable cores split into ``n`` disjoint groups of equal size, one per process (pin each with
    ``os.sched_setaffinity``); None if there are fewer than ``n`` or the platform cannot pin a process."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = usable_cores()
    if len(cores) < n:
        return None
    size = len(cores) // n
    return [cores[i * size : (i + 1) * size] for i in range(n)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (how busy the machine is), where the system reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """The machine and software a result was measured on, and how busy the machine was at the start."""
    import transformers

    return {
        "platform": platform.platform(), "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "usable_cores": len(usable_cores()), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load_average(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def machine_summary(info: dict[str, Any]) -> str:
    """:func:`machine_info` on one line, for the Markdown tables."""
    return (f"{info['cpu']}, {info['cpus']} CPUs, {info['torch_threads']} torch threads, torch {info['torch']}"
            + (f", {info['cuda']}" if info["cuda"] else "")
            + f", OMP_WAIT_POLICY={info['omp_wait_policy'] or 'unset'}, load average at start {info['load_average_at_start']}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the memory freed by large temporaries back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc raises its threshold for serving allocations from its own heap after large ones are freed, and the heap
    keeps what is freed: a loop that builds and frees a large temporary per layer then grows the process's resident
    memory by the fragments, though nothing is in use. Block-streamed compression calls this after each layer.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
