"""``SmoothnessPenalty``: the weighted sum of the penalties over a model's targeted layers.

Independent of the Trainer so that a custom training loop (plain Accelerate, nanoGPT-style) can use
it the same way: ``total, terms = penalty(step); (task_loss + total).backward()``.

Weighting (``normalization``):

* ``"scale_free"`` (default): each layer's term is divided by a scale of its own weight -- first and
  second order by ``||W||_F^2``, the nuclear norm by ``||M||_F * sqrt(min(M.shape))`` (1 for a flat
  spectrum, ``1/sqrt(n)`` for rank one) -- and the terms are averaged over the targeted layers. The
  value no longer depends on the layer sizes, the number of layers or the scale of the weights, so
  one set of coefficients (about 1 for first order, 10 for nuclear) works across models.
* ``"sum"``: the plain sums of README "The method", added over layers.

The nuclear norm needs an SVD of every targeted weight; the penalty uses the exact gradient ``U V^T``
refreshed every ``nuclear_norm_every`` steps and the surrogate ``<W, U V^T>`` in between (see
:func:`smooth_hf.penalties.nuclear_norm_surrogate`). ``nuclear_norm_every=1`` is the exact norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .penalties import (
    first_order,
    nuclear_norm_surrogate,
    out_in_weight,
    second_order,
    shrink_singular_values,
    spectral_direction,
)
from .targeting import PatternSpec, find_layers

__all__ = ["NORMALIZATIONS", "NUCLEAR_NORM_MODES", "SmoothnessPenalty"]

NORMALIZATIONS = ("scale_free", "relative", "sum")
NUCLEAR_NORM_MODES = ("gradient", "proximal")


@dataclass
class SmoothnessPenalty:
    """Weighted smoothness penalties over ``layers`` (``(name, module)`` pairs)."""

    layers: list[tuple[str, nn.Module]]
    nuclear_norm_coef: float = 0.0
    first_order_coef: float = 0.0
    second_order_coef: float = 0.0
    normalization: str = "scale_free"
    nuclear_norm_every: int = 25
    nuclear_norm_mode: str = "gradient"
    _directions: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _refreshed_at: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("nuclear_norm_coef", "first_order_coef", "second_order_coef"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0 turns the penalty off), got {value}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.nuclear_norm_mode not in NUCLEAR_NORM_MODES:
            raise ValueError(f"nuclear_norm_mode must be one of {NUCLEAR_NORM_MODES}, got {self.nuclear_norm_mode!r}")
        if self.nuclear_norm_every < 1:
            raise ValueError(f"nuclear_norm_every must be >= 1 (1 = exact SVD every step), got {self.nuclear_norm_every}")
        if self.active and not self.layers:
            raise ValueError("penalties are on but no layer is targeted: check the target/exclude patterns")

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        target_modules: PatternSpec = None,
        exclude_modules: PatternSpec = None,
        skip_first_last: bool = True,
        **coefs,
    ) -> SmoothnessPenalty:
        return cls(find_layers(model, target_modules, exclude_modules, skip_first_last), **coefs)

    @property
    def active(self) -> bool:
        return (self.nuclear_norm_coef + self.first_order_coef + self.second_order_coef) > 0

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def _refresh_directions(self, step: int) -> None:
        # A step counter that went backwards (a second train() call) also makes the cache stale.
        due = self._refreshed_at is None or not 0 <= step - self._refreshed_at < self.nuclear_norm_every
        if due or len(self._directions) != len(self.layers):
            self._directions = {name: spectral_direction(out_in_weight(m)) for name, m in self.layers}
            self._refreshed_at = step

    def _layer_scale(self, weight: Tensor) -> Tensor | None:
        """What each layer's term is divided by (``None``: plain sums), and multiplied by for ``relative``."""
        return None if self.normalization == "sum" else weight.pow(2).sum()

    def __call__(self, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """The weighted total (differentiable) and each unweighted term (floats, for logging).

        In ``proximal`` mode the nuclear norm is not part of the total: :meth:`proximal_step` applies it.
        """
        by_gradient = self.nuclear_norm_coef > 0 and self.nuclear_norm_mode == "gradient"
        if by_gradient:
            self._refresh_directions(step)
        normalized = self.normalization != "sum"
        sums = {"nuclear_norm": 0.0, "first_order": 0.0, "second_order": 0.0}
        for name, module in self.layers:
            weight = out_in_weight(module)
            sq_norm = self._layer_scale(weight)
            # "relative": the scale-free term times ||W||^2 (a constant): the same direction, but an SGD step
            # then moves the weight by a fixed fraction of its own size, whatever that size is.
            gain = sq_norm.detach() if self.normalization == "relative" else 1.0
            if by_gradient:
                direction = self._directions[name].to(weight.device, weight.dtype)
                term = nuclear_norm_surrogate(weight, direction)
                if normalized:
                    term = term / (sq_norm.sqrt() * math.sqrt(min(weight.shape[0], weight[0].numel())))
                sums["nuclear_norm"] = sums["nuclear_norm"] + term * gain
            if self.first_order_coef > 0:
                term = first_order(weight)
                sums["first_order"] = sums["first_order"] + (term / sq_norm * gain if normalized else term)
            if self.second_order_coef > 0:
                term = second_order(weight)
                sums["second_order"] = sums["second_order"] + (term / sq_norm * gain if normalized else term)
        denominator = len(self.layers) if normalized else 1
        coefs = {
            "nuclear_norm": self.nuclear_norm_coef if by_gradient else 0.0,
            "first_order": self.first_order_coef,
            "second_order": self.second_order_coef,
        }
        total, terms = None, {}
        for key, coef in coefs.items():
            if coef > 0:
                value = sums[key] / denominator
                total = coef * value if total is None else total + coef * value
                terms[key] = float(value.detach())
        if total is None:
            total = torch.zeros(())
        return total, terms

    @torch.no_grad()
    def proximal_step(self, step_size: float) -> dict[str, float]:
        """Apply the nuclear norm as a proximal step: soft-threshold every layer's singular values.

        ``step_size`` is the sum of the learning rates since the last call (times any warm-up ramp), so a
        call every ``nuclear_norm_every`` steps shrinks as much as that many steps would. The threshold of a
        layer is ``step_size * nuclear_norm_coef`` times the derivative of its weighted term with respect
        to a singular value: ``1`` for ``sum``; ``1 / (||M||_F sqrt(min(M.shape)) L)`` for ``scale_free``
        (``L`` layers), and ``||M||_F / (sqrt(min(M.shape)) L)`` for ``relative``. For the two normalised
        modes the weight keeps its Frobenius norm (the penalty does not depend on it). Returns the
        normalised nuclear term before the step (for logging).
        """
        if self.nuclear_norm_coef <= 0 or self.nuclear_norm_mode != "proximal":
            return {}
        count = len(self.layers)
        total = 0.0
        for _, module in self.layers:
            weight = out_in_weight(module)
            norm = float(weight.detach().double().norm())
            width = min(weight.shape[0], weight[0].numel())
            if self.normalization == "sum":
                per_value = 1.0
            elif self.normalization == "scale_free":
                per_value = 1.0 / (max(norm, 1e-12) * math.sqrt(width) * count)
            else:
                per_value = norm / (math.sqrt(width) * count)
            shrunk, singular = shrink_singular_values(
                weight, step_size * self.nuclear_norm_coef * per_value, keep_norm=self.normalization != "sum"
            )
            weight.copy_(shrunk)  # a view for HF Conv1D (transposed): copy_ writes through to the parameter
            if self.normalization == "sum":
                total += float(singular.sum())
            else:
                total += float(singular.sum()) / (max(norm, 1e-12) * math.sqrt(width) * count)
        return {"nuclear_norm": total}

    # Checkpointing: the cached directions are training state, so a resumed run steers exactly as an
    # uninterrupted one would (see SmoothTrainer._save_checkpoint).
    def state_dict(self) -> dict[str, Tensor]:
        state = {f"direction.{k}": v.detach().cpu().contiguous() for k, v in self._directions.items()}
        if self._refreshed_at is not None:
            state["refreshed_at"] = torch.tensor(self._refreshed_at)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        devices = {name: out_in_weight(m).device for name, m in self.layers}
        directions = {k.removeprefix("direction."): v for k, v in state.items() if k.startswith("direction.")}
        unknown = set(directions) - set(devices)
        if unknown:
            raise ValueError(f"penalty state names layers this model does not target: {sorted(unknown)[:5]}")
        self._directions = {k: v.to(devices[k]) for k, v in directions.items()}
        self._refreshed_at = int(state["refreshed_at"]) if "refreshed_at" in state else None
