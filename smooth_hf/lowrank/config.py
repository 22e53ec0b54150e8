"""``LowRankConfig``: how many singular values each layer keeps, and which layers are cut.

The config is saved next to the weights (``compression_config.json``) so a compressed model can be
rebuilt without the data or the dense weights: ``ranks`` records the rank every factorised layer
kept, which is all :func:`smooth_hf.lowrank.apply_ranks` needs to recreate the structure before a
strict ``load_state_dict``. JSON is written with sorted keys and the library version, like peft's
adapter configs, so two saves of the same compression are byte-identical and diffs stay readable.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._version import __version__
from ..core.files import COMPRESSION_CONFIG_NAME
from ..core.validation import check_count

__all__ = ["LowRankConfig"]

_VERSION_KEY = "smooth_hf_version"
_RULES = ("param_reduction", "macs_reduction", "rank_ratio", "energy")
METHODS = ("svd", "whitened")
ALLOCATIONS = ("spectrum", "sensitivity")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LowRankConfig:
    """Which layers to factorise and the rule that picks each layer's rank.

    Exactly one of ``param_reduction``, ``macs_reduction``, ``rank_ratio`` and ``energy`` must be set.
    ``param_reduction`` is what a user usually means by "70% fewer parameters": it counts the whole
    model (every unique parameter: weights, biases, norms, embeddings, tied weights once), not only the
    factorised layers, and spreads the cut over layers so that the least spectral energy is lost.
    ``macs_reduction`` is the same global allocation against multiply-adds for the inputs passed as
    ``compress(..., example_inputs=...)``: a conv at a high resolution then costs more per rank than
    one at a low resolution (:mod:`smooth_hf.lowrank.cost` says what is counted).
    """

    param_reduction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction in [0, 1) of the whole model's parameters to remove, allocated globally across "
            "the targeted layers so that the least relative spectral energy is lost (e.g. 0.7 removes seven tenths)."
        },
    )
    macs_reduction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction in [0, 1) of the multiply-adds of all Linear/Conv2d/Conv1D layers to remove, for the "
            "inputs given as compress(..., example_inputs=...), allocated globally like param_reduction (each "
            "rank costs its multiply-adds at the layer's output resolution)."
        },
    )
    rank_ratio: float | None = field(
        default=None,
        metadata={
            "help": "In (0, 1]: every targeted layer keeps ceil(rank_ratio * min(out, in*kh*kw)) singular values."
        },
    )
    energy: float | None = field(
        default=None,
        metadata={
            "help": "In (0, 1]: every targeted layer keeps the smallest rank whose sum of squared singular values "
            "reaches this fraction of the total."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Layers to factorise: a list of module names or name suffixes, or one regex matching the whole "
            "name. None = every Linear, Conv2d and HF Conv1D layer."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers to keep dense, same syntax as target_modules."}
    )
    skip_first_last: bool = field(
        default=False,
        metadata={"help": "Keep the first and the last targeted layer dense (stem and classifier: small, sensitive)."},
    )
    factorise_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Target plain nn.Embedding layers too (a transformer's word embeddings: half of a small BERT's "
            "parameters), each replaced by a lookup into `rank` columns and a Linear to the embedding width. With "
            "method='whitened' each token weighs by how often the calibration data use it (a token they never use "
            "weighs whitening_damping x the mean count). Not with macs_reduction, keep_slower_dense or example_inputs."
        },
    )
    min_rank: int = field(default=1, metadata={"help": "No factorised layer keeps fewer singular values than this."})
    rank_multiple: int | None = field(
        default=None,
        metadata={
            "help": "Round every rank up to a multiple of this, capped at the full rank. None = what suits the "
            "device of the model's weights: 8 on CUDA (tensor cores), 1 elsewhere; compress() records the value used."
        },
    )
    keep_slower_dense: bool = field(
        default=False,
        metadata={
            "help": "Time every layer to be factorised, dense and factorised, on the model's device with the input "
            "shape it gets from compress(..., example_inputs=...); keep those that are not faster dense and "
            "allocate the budget again over the others."
        },
    )
    # ---- how each layer is cut (smooth_hf.lowrank.whitening) ----
    method: str = field(
        default="svd",
        metadata={
            "help": "'svd': truncated SVD of each weight (no data). 'whitened': the truncation that loses the least "
            "on the layer's inputs over calibration batches (SVD-LLM's data whitening), and ranks allocated by that "
            "loss; needs compress(..., calibration_data=...)."
        },
    )
    whitening_damping: float = field(
        default=0.01,
        metadata={
            "help": "method='whitened': the inputs' Gram matrix G is damped to G + damping * mean(diag G) * I, which "
            "keeps it invertible when the data do not span every input direction. Larger moves towards plain SVD."
        },
    )
    sequential: bool = field(
        default=False,
        metadata={
            "help": "method='whitened', models made of repeated blocks (LLMs, transformer encoders): cut each block "
            "for the inputs it sees once the blocks before it are cut (its statistics taken on their outputs), so "
            "later layers correct for earlier cuts. The ranks are allocated on the dense model's statistics first."
        },
    )
    rank_allocation: str = field(
        default="spectrum",
        metadata={
            "help": "How param_reduction / macs_reduction share the cut between layers. 'spectrum': by each layer's "
            "relative spectral energy (no extra work). 'sensitivity' (method='whitened' only): by the measured error "
            "of the model's output when that layer alone is truncated at a few ranks (ASVD-style; a few forward "
            "passes over sensitivity_samples calibration samples per layer)."
        },
    )
    sensitivity_samples: int = field(
        default=16,
        metadata={
            "help": "rank_allocation='sensitivity': the first this-many calibration samples measure each layer's "
            "effect on the output (every layer costs a few forward passes over them)."
        },
    )
    calibration_dataset: str | None = field(
        default=None,
        metadata={"help": "method='whitened': name or description of the calibration data, recorded in the card."},
    )
    calibration_samples: int | None = field(
        default=None,
        metadata={"help": "Filled by compress() for method='whitened': the number of calibration samples it used."},
    )
    ranks: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Filled by compress(): module name -> rank kept, for the factorised layers only. Used to "
            "rebuild the compressed structure when reloading."
        },
    )

    def __post_init__(self) -> None:
        chosen = [name for name in _RULES if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"LowRankConfig needs exactly one rank rule, got {len(chosen)} ({', '.join(chosen) or 'none'}). "
                "Set one of param_reduction (e.g. 0.7 = 70% fewer parameters), macs_reduction (e.g. 0.6 = 60% fewer "
                "multiply-adds), rank_ratio or energy."
            )
        for name, low, low_closed, high, high_closed, example in (
            ("param_reduction", 0.0, True, 1.0, False, "0.7"),
            ("macs_reduction", 0.0, True, 1.0, False, "0.6"),
            ("rank_ratio", 0.0, False, 1.0, True, "0.25"),
            ("energy", 0.0, False, 1.0, True, "0.99"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            above = _is_number(value) and (value >= low if low_closed else value > low)
            below = _is_number(value) and (value <= high if high_closed else value < high)
            if not (above and below):  # also rejects NaN, strings and bools
                interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
                raise ValueError(f"{name} must be a number in {interval}, got {value!r}; e.g. {name}={example}.")
        for name in ("min_rank", "rank_multiple"):
            if not (name == "rank_multiple" and getattr(self, name) is None):
                check_count(getattr(self, name), name)
        for name in ("keep_slower_dense", "factorise_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.factorise_embeddings and (self.macs_reduction is not None or self.keep_slower_dense):
            raise ValueError(
                "factorise_embeddings does not count multiply-adds (a lookup costs none; its factorised form does): "
                "use param_reduction, rank_ratio or energy with it, or leave the embeddings dense."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            # Tuples and sets become lists so the JSON round trip gives back an equal config.
            value = list(value)
            if not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"{name} must be a regex string or a list of module names, got {value!r}; e.g. "
                    f"{name}=['query', 'value'] or {name}=r'.*layer4.*'."
                )
            setattr(self, name, value)
        self._check_method()
        if not isinstance(self.ranks, dict):
            raise ValueError(
                f"ranks must be a dict of module name -> int rank, got {type(self.ranks).__name__}. "
                "Leave ranks empty: compress() fills it."
            )
        bad = {
            k: v
            for k, v in self.ranks.items()
            if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool) or v < 1
        }
        if bad:
            raise ValueError(
                f"ranks must map module names to integers >= 1; invalid entries: {bad!r}. "
                "Leave ranks empty: compress() fills it."
            )

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}: 'svd' needs no data, "
                "'whitened' uses calibration batches (compress(..., calibration_data=...))."
            )
        damping = self.whitening_damping
        if not (_is_number(damping) and 0 < damping < math.inf):
            raise ValueError(f"whitening_damping must be a finite number > 0, got {damping!r}; e.g. 0.01.")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}.")
        if self.sequential and self.method != "whitened":
            raise ValueError("sequential=True takes each block's statistics on the cut blocks' outputs: it needs "
                             "method='whitened' (and compress(..., calibration_data=...)).")
        if self.rank_allocation not in ALLOCATIONS:
            raise ValueError(
                f"rank_allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, got {self.rank_allocation!r}."
            )
        if self.rank_allocation == "sensitivity":
            if self.method != "whitened":
                raise ValueError(
                    "rank_allocation='sensitivity' measures the model on calibration data, so it needs "
                    "method='whitened' (and compress(..., calibration_data=...)); with method='svd' use "
                    "rank_allocation='spectrum'."
                )
            if self.param_reduction is None and self.macs_reduction is None:
                raise ValueError(
                    "rank_allocation='sensitivity' shares a global budget: set param_reduction or macs_reduction "
                    f"(rank_ratio / energy fix every layer's rank on their own), got {self.rule}."
                )
        samples = self.sensitivity_samples
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"sensitivity_samples must be an integer >= 1, got {samples!r}; e.g. 16.")
        if self.calibration_dataset is not None and not isinstance(self.calibration_dataset, str):
            raise ValueError(
                f"calibration_dataset is a name or description (a string), got {type(self.calibration_dataset).__name__}"
            )
        samples = self.calibration_samples
        if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
            raise ValueError(
                f"calibration_samples must be an integer >= 1 or None, got {samples!r}. Leave it unset: compress() "
                "fills it."
            )

    @property
    def rule(self) -> str:
        """The name of the rank rule that is set."""
        return next(name for name in _RULES if getattr(self, name) is not None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> LowRankConfig:
        """Build a config, refusing unknown keys: a typo in a hand-edited JSON must not be dropped silently."""
        data = {k: v for k, v in config_dict.items() if k != _VERSION_KEY}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown LowRankConfig keys: {', '.join(unknown)}. Valid keys: {', '.join(sorted(known))}. "
                "Fix or remove them (a typo in a hand-edited file?), or upgrade smooth_hf if a newer version wrote it."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        data = self.to_dict()
        data[_VERSION_KEY] = __version__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, COMPRESSION_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LowRankConfig:
        path = os.path.join(directory, COMPRESSION_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {COMPRESSION_CONFIG_NAME} in {os.fspath(directory)!r}: pass the folder that smooth_hf.save_pretrained wrote "
                "for a compressed model (a dense checkpoint has no compression config)."
            )
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
