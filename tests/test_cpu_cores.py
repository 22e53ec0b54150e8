"""Sharing the CPU cores between processes (the main job's side-by-side runs, the benchmark's workers)."""

from __future__ import annotations

import os

from smooth_hf.core.machine import core_shares, usable_cores


def test_core_shares_split_the_usable_cores_disjointly(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 0, 1, 3, 2})  # e.g. taskset -c 0-3,5
    assert usable_cores() == [0, 1, 2, 3, 5]
    assert core_shares(2) == [[0, 1], [2, 3]]  # equal shares; the odd core out stays free
    assert core_shares(5) == [[0], [1], [2], [3], [5]]
    assert core_shares(6) is None  # more processes than cores: no pinning
