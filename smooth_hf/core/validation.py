"""Checks of option values shared by the engine, training and the recipes: one message for each kind of mistake."""

from __future__ import annotations

__all__ = ["check_count", "check_fraction"]


def check_count(value: object, name: str) -> None:
    """``value`` (the option called ``name``: ``min_rank``, ``rank_multiple``) is an integer >= 1, or a clear error."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; 1 means no constraint.")


def check_fraction(value: object, name: str) -> None:
    """``value`` (the option called ``name``) is a fraction of the model's parameters in (0, 1), or a clear error."""
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"{name} must be a fraction in (0, 1), e.g. 0.8; got {value!r}")
