"""``SmoothnessPenalty``: the weighted sum of the penalties over a model's targeted layers.

Independent of the Trainer so that a custom training loop (plain Accelerate, nanoGPT-style) can use
it the same way: ``total, terms = penalty(step); (task_loss + total).backward()``.

Weighting (``normalization``):

* ``"scale_free"`` (default): each layer's term is divided by a scale of its own weight -- first and
  second order by ``||W||_F^2``, the nuclear norm by ``||M||_F * sqrt(min(M.shape))`` (1 for a flat
  spectrum, ``1/sqrt(n)`` for rank one) -- and the terms are averaged over the targeted layers. The
  value does not depend on the layer sizes, the number of layers or the scale of the weights.
* ``"relative"``: the scale-free terms, each multiplied by its layer's ``||W||_F^2`` held constant. Same
  value at unit norm and the same gradient direction, but the gradient grows with the weight instead of
  shrinking as ``1/||W||``: one SGD step then moves every weight by the same *fraction of its own size*,
  whatever the initial scale of the weights. Under BatchNorm the scale of a conv weight is free, and with
  ``scale_free`` a model initialised 3x larger feels the penalty 9x more weakly (docs/training.md, "Penalty strength").
* ``"sum"``: the plain sums of docs/training.md, "The penalties, exactly", added over layers.

The nuclear norm needs an SVD of every targeted weight; the penalty uses the exact gradient ``U V^T``
refreshed every ``nuclear_norm_every`` steps and the surrogate ``<W, U V^T>`` in between (see
:func:`smooth_hf.training.penalties.nuclear_norm_surrogate`). ``nuclear_norm_every=1`` is the exact norm.

With ``nuclear_norm_param_reduction=p`` only the *tail* of each spectrum is penalised: at every refresh the
ranks that ``compress(model, LowRankConfig(param_reduction=p))``'s global allocation would keep are computed
from the current spectra (over the penalised layers), and the nuclear norm acts on the singular values beyond
them -- what the planned cut will remove -- leaving the kept ones, which carry the function, untouched.
``nuclear_norm_macs_reduction=p`` plans the tail for ``LowRankConfig(macs_reduction=p)`` instead: multiply-adds
on the inputs that ``macs_profile`` was measured on (:class:`smooth_hf.training.cut_plan.MacsProfile`).

On a model FSDP2 split across processes (``fully_shard``) every term is computed on the rows each process holds, with
the whole weight's value and gradient (:mod:`smooth_hf.training.sharded`); every process must call the penalty (and
:meth:`SmoothnessPenalty.state_dict`) together.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.weights import out_in_weight
from ..lowrank.targeting import PatternSpec, find_layers
from .cut_plan import CutBudget, MacsProfile, check_plan_budget, plan_ranks
from .penalties import spectral_direction
from .sharded import direction, layer_sums, spectra
from .shards import any_split, gather, held, is_split

__all__ = ["COEFFICIENTS", "NORMALIZATIONS", "SmoothnessPenalty", "check_coefficients"]

NORMALIZATIONS = ("scale_free", "relative", "sum")
COEFFICIENTS = ("nuclear_norm_coef", "first_order_coef", "second_order_coef")  # the penalties' weights, by field name


def check_coefficients(owner: object, flag: str = "") -> None:
    """Each of ``owner``'s :data:`COEFFICIENTS` is a finite number >= 0 (``flag`` prefixes the name, e.g. ``--``)."""
    for name in COEFFICIENTS:
        value = getattr(owner, name)
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag}{name} must be a finite number >= 0 (0 turns that penalty off), got {value!r}")


@dataclass
class SmoothnessPenalty:
    """Weighted smoothness penalties over ``layers`` (``(name, module)`` pairs)."""

    layers: list[tuple[str, nn.Module]]
    nuclear_norm_coef: float = 0.0
    first_order_coef: float = 0.0
    second_order_coef: float = 0.0
    normalization: str = "scale_free"
    nuclear_norm_every: int = 25
    nuclear_norm_param_reduction: float | None = None
    model_parameters: int | None = None  # the whole model's, for nuclear_norm_param_reduction (for_model sets it)
    rank_multiple: int = 1  # of the cut the tail plans for (smooth_hf.training.cut_plan)
    nuclear_norm_macs_reduction: float | None = None
    macs_profile: MacsProfile | None = None  # for nuclear_norm_macs_reduction: the inputs multiply-adds are priced on
    _directions: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _blocks: set[str] = field(default_factory=set, repr=False)  # layers whose direction is this process's block (FSDP2)
    _refreshed_at: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_coefficients(self)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.nuclear_norm_param_reduction is not None and self.nuclear_norm_macs_reduction is not None:
            raise ValueError("give nuclear_norm_param_reduction or nuclear_norm_macs_reduction, not both: the tail is "
                             "planned for one cut")
        if self.nuclear_norm_macs_reduction is not None and self.macs_profile is None:
            raise ValueError("nuclear_norm_macs_reduction needs macs_profile (MacsProfile.measure(model, input_shape)): "
                             "multiply-adds are priced on inputs")
        budget = self.tail_budget
        if budget is not None:
            check_plan_budget(self.layers, budget, f"nuclear_norm_{budget.rule}", self.rank_multiple)
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
        from ..lowrank import count_parameters

        layers = find_layers(model, target_modules, exclude_modules, skip_first_last)
        return cls(layers, model_parameters=count_parameters(model), **coefs)

    @property
    def active(self) -> bool:
        return (self.nuclear_norm_coef + self.first_order_coef + self.second_order_coef) > 0

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def tail_budget(self) -> CutBudget | None:
        """The cut whose tail the nuclear norm penalises, or None: the whole nuclear norm."""
        if self.nuclear_norm_macs_reduction is not None:
            return CutBudget.macs(self.nuclear_norm_macs_reduction, self.macs_profile)
        if self.nuclear_norm_param_reduction is not None:
            return CutBudget.parameters(self.nuclear_norm_param_reduction, self.model_parameters)
        return None

    def _kept_ranks(self) -> list[int | None]:
        """The ranks the global allocation keeps at the current spectra (None: the layer stays dense)."""
        return plan_ranks(self.layers, self.tail_budget, rank_multiple=self.rank_multiple)

    def invalidate(self) -> None:
        """Forget the cached nuclear-norm directions: the weights were changed outside the optimizer (e.g. a
        :class:`smooth_hf.RankProjection` step), so the next call recomputes them from the new weights."""
        self._refreshed_at = None

    def _refresh_directions(self, step: int) -> None:
        # A step counter that went backwards (a second train() call) also makes the cache stale.
        due = self._refreshed_at is None or not 0 <= step - self._refreshed_at < self.nuclear_norm_every
        if due or len(self._directions) != len(self.layers):
            self._blocks = set()
            if any_split(self.layers):  # FSDP2: each process computes the directions of its blocks
                self._directions = self._split_directions()
                self._blocks = {name for name, module in self.layers if is_split(module)}
            elif self.tail_budget is None:
                self._directions = {name: spectral_direction(out_in_weight(m)) for name, m in self.layers}
            else:  # the tail only; a layer the cut keeps dense is not penalised
                self._directions = {
                    name: spectral_direction(out_in_weight(m), skip=rank) if rank is not None
                    else torch.zeros_like(out_in_weight(m).detach())
                    for (name, m), rank in zip(self.layers, self._kept_ranks(), strict=True)
                }
            self._refreshed_at = step

    def _split_directions(self) -> dict[str, Tensor]:
        """The directions on weights FSDP2 split: each process's block of them (smooth_hf.training.sharded)."""
        found = spectra([held(module, name) for name, module in self.layers])
        ranks = ([0] * len(found) if self.tail_budget is None else
                 plan_ranks(self.layers, self.tail_budget, [s.values for s in found], self.rank_multiple))
        return {name: direction(s, skip=rank) if rank is not None else torch.zeros_like(s.held.weight.detach())
                for (name, _), s, rank in zip(self.layers, found, ranks, strict=True)}

    def __call__(self, step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """The weighted total (differentiable) and each unweighted term (floats, for logging).

        Logged terms are the ``scale_free`` (or ``sum``) values, also under ``relative``, so that they read
        the same whatever the weighting: 1 is a flat spectrum for the nuclear term.
        """
        if self.nuclear_norm_coef > 0:
            self._refresh_directions(step)
        normalized = self.normalization != "sum"
        coefs = {
            "nuclear_norm": self.nuclear_norm_coef,
            "first_order": self.first_order_coef,
            "second_order": self.second_order_coef,
        }
        penalties = [key for key, coef in coefs.items() if coef > 0]
        sums = {"nuclear_norm": 0.0, "first_order": 0.0, "second_order": 0.0}
        logged = dict(sums)
        # Each layer's plain sums over its whole weight, also when FSDP2 split it (smooth_hf.training.sharded).
        helds = [held(module, name) for name, module in self.layers]
        directions = [self._directions[name] for name, _ in self.layers] if self.nuclear_norm_coef > 0 else None
        blocks = [name in self._blocks for name, _ in self.layers]
        wanted = (["sq_norm"] if normalized else []) + penalties
        for h, layer in zip(helds, layer_sums(helds, wanted, directions, blocks), strict=True):
            sq_norm = layer.get("sq_norm")
            # "relative": the scale-free term times ||W||^2 held constant (see the module doc).
            gain = sq_norm.detach() if self.normalization == "relative" else None
            for key in penalties:
                term = layer[key]
                if normalized and key == "nuclear_norm":
                    term = term / (sq_norm.sqrt() * math.sqrt(min(h.shape[0], math.prod(h.shape[1:]))))
                elif normalized:
                    term = term / sq_norm
                logged[key] = logged[key] + term.detach()
                sums[key] = sums[key] + (term * gain if gain is not None else term)
        denominator = len(self.layers) if normalized else 1
        total, out = None, {}
        for key, coef in coefs.items():
            if coef > 0:
                value = coef * sums[key] / denominator
                total = value if total is None else total + value
                out[key] = float(logged[key]) / denominator
        if total is None:
            total = torch.zeros(())
        return total, out

    # Checkpointing: the cached directions are training state, so a resumed run steers exactly as an
    # uninterrupted one would (see SmoothTrainer._save_checkpoint).
    def state_dict(self) -> dict[str, Tensor]:
        """The cached directions, whole (a direction FSDP2 split is gathered: every process must call this)."""
        state = {}
        for name, module in self.layers:
            if name in self._directions:
                direction = self._directions[name]
                if name in self._blocks:
                    direction = gather(direction, held(module, name).split)
                state[f"direction.{name}"] = direction.detach().cpu().contiguous()
        if self._refreshed_at is not None:
            state["refreshed_at"] = torch.tensor(self._refreshed_at)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Directions saved whole; on weights FSDP2 split, each process uses its block of them."""
        devices = {name: out_in_weight(m).device for name, m in self.layers}
        directions = {k.removeprefix("direction."): v for k, v in state.items() if k.startswith("direction.")}
        unknown = set(directions) - set(devices)
        if unknown:
            raise ValueError(f"penalty state names layers this model does not target: {sorted(unknown)[:5]}")
        self._directions = {k: v.to(devices[k]) for k, v in directions.items()}
        self._blocks = set()
        self._refreshed_at = int(state["refreshed_at"]) if "refreshed_at" in state else None
