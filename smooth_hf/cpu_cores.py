"""The CPU cores this process may run on, and how to share them between processes: one place that reads them."""

from __future__ import annotations

import os

__all__ = ["core_shares", "usable_cores"]


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
