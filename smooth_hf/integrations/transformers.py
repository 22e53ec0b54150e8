"""Compressed transformers models that save and load the Hugging Face way.

transformers rebuilds a checkpoint whose modules differ from the base architecture through a
registered *quantization method*: ``config.json`` keeps the base ``model_type`` and gains a
``quantization_config`` section, and the method's quantizer replaces modules on the still-empty
(meta-device) model before the weights load -- what bitsandbytes, GPTQ or HQQ do. A low-rank
model is such a checkpoint: its structure is the base architecture with some layers replaced by
two thin factors. So ``import smooth_hf`` registers the method ``"smooth_hf"``:

* :class:`SmoothHfConfig` -- the ``quantization_config`` section: the rank rule, the rank of every
  factorised layer (:class:`~smooth_hf.lowrank.LowRankConfig`), and the tensors kept in another dtype
  than the model's (:mod:`smooth_hf.core.dtypes`);
* :class:`SmoothHfQuantizer` -- before the weights load, :func:`~smooth_hf.lowrank.apply_ranks` gives
  the empty model the low-rank structure; after, it checks that every factor came from the file.

:func:`smooth_hf.compress` attaches both to a transformers model, so the first things an HF user tries
work: ``model.save_pretrained(d)``, ``AutoModelFor*.from_pretrained(d)`` (a local folder or a Hub
repo), ``pipeline(task, model=d)``, ``model.push_to_hub(repo)``. No remote code is involved.

``from_pretrained(compressed, quantization_config=TorchAoConfig(...))`` quantizes the factor layers as they load:
the quantizer rebuilds the structure and hands the weights to torchao's (:mod:`smooth_hf.integrations.stacking`).

Without ``import smooth_hf``, transformers only warns that it does not know the method
``smooth_hf`` and builds the dense architecture. To make that fail instead of silently loading
random weights into every factorised layer, each checkpoint also stores a **guard**: a one-byte tensor
at the name of the dense layer's weight (``<layer>.weight``). The dense model expects a full matrix
there, so transformers stops with a size-mismatch error; with ``import smooth_hf`` the guard is
recognised and skipped.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    AutoQuantizationConfig,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._version import __version__
from ..core.dtypes import dtype_from_name, dtype_islands, main_dtype, set_tensor_dtypes
from ..lowrank import LowRankConfig, apply_ranks, check_compressed
from ..lowrank.compress import register_on_compressed
from ..lowrank.guard import GUARD_SUFFIX, guard_keys, guard_tensor
from .stacking import StackedQuantizer, check_stackable, method_of

__all__ = [
    "LOAD_NOTE",
    "QUANT_METHOD",
    "SmoothHfConfig",
    "SmoothHfQuantizer",
    "attach_quantization_config",
    "quantization_section",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "smooth_hf"
# What someone reading config.json (or transformers' warning about an unknown method) needs to know.
LOAD_NOTE = (
    "Compressed with smooth_hf (low-rank factorised layers). Run `import smooth_hf` (the smooth_hf package) before "
    "from_pretrained/pipeline: without it transformers builds the dense architecture and refuses the weights."
)


class SmoothHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` section of a compressed transformers model's ``config.json``.

    It holds every field of :class:`~smooth_hf.lowrank.LowRankConfig` at the top level (``ranks``
    included), plus:

    * ``dtype``: the model's main dtype when it was saved;
    * ``dtypes``: ``{tensor name: dtype}`` for the tensors saved in another dtype (e.g. a float32
      ``lm_head`` in a bfloat16 model). They are restored when the model is loaded in its saved dtype
      (``dtype="auto"``, the default); with another ``dtype=`` the whole model takes that dtype, except
      what transformers itself keeps in float32 (``_keep_in_fp32_modules``);
    * ``weight_quantization``: the ``quantization_config`` section of the method that quantized the weights on
      top of the low-rank structure (torchao: :mod:`smooth_hf.integrations.stacking`), or ``None``. It is set
      when ``from_pretrained(compressed, quantization_config=TorchAoConfig(...))`` loads the model, and a save
      of that model records it, so the folder reloads quantized.
    """

    def __init__(
        self,
        lowrank: LowRankConfig | None = None,
        dtype: str | None = None,
        dtypes: dict[str, str] | None = None,
        weight_quantization: QuantizationConfigMixin | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        for key in ("quant_method", "smooth_hf_version", "load_note"):
            kwargs.pop(key, None)
        if lowrank is None:
            try:
                lowrank = LowRankConfig.from_dict(kwargs)
            except (TypeError, ValueError) as err:
                raise ValueError(f"invalid smooth_hf quantization_config in config.json: {err}") from err
        elif kwargs:
            raise ValueError(f"give either lowrank= or its fields, not both (got {sorted(kwargs)})")
        if dtype is not None:
            dtype_from_name(dtype)  # a typo must fail here, not as a half-restored model later
        for name in (dtypes or {}).values():
            dtype_from_name(name)
        self.lowrank = lowrank
        self.dtype = dtype
        self.dtypes = dict(dtypes or {})
        if isinstance(weight_quantization, dict):
            check_stackable(weight_quantization)  # what config.json names must be loadable here
            weight_quantization = AutoQuantizationConfig.from_dict(weight_quantization)
        self.weight_quantization = weight_quantization
        # True while a load quantizes the weights (from_pretrained's quantization_config=); never saved: once
        # loaded, the weights are quantized and a save records them so.
        self.quantize_on_load = False

    @classmethod
    def from_model(cls, model: nn.Module, weight_quantization: QuantizationConfigMixin | None = None) -> SmoothHfConfig:
        """The section for ``model`` as it is now: its ``lowrank_config`` and its tensors' dtypes."""
        lowrank = check_compressed(model, allow_meta=True)
        return cls(lowrank=lowrank, dtype=str(main_dtype(model)).removeprefix("torch."), dtypes=dtype_islands(model),
                   weight_quantization=weight_quantization)

    def stacked(self, other: QuantizationConfigMixin) -> SmoothHfConfig:
        """This section with ``other`` quantizing the weights on top, for a load (``from_pretrained``'s
        ``quantization_config=other`` on a compressed checkpoint); see :mod:`smooth_hf.integrations.stacking`."""
        if self.weight_quantization is not None:
            saved = method_of(self.weight_quantization)
            if saved != method_of(other) or type(self.weight_quantization).__name__ != type(other).__name__:
                raise ValueError(
                    f"this compressed checkpoint's weights are already quantized with {saved!r}; it cannot be loaded "
                    f"with {type(other).__name__}. Load it without quantization_config, or load the unquantized "
                    "compressed checkpoint with the quantization_config you want."
                )
            warnings.warn(
                "the compressed checkpoint's weights are already quantized: its own weight_quantization is used and "
                "the quantization_config passed to from_pretrained is ignored (as transformers does for quantized "
                "checkpoints)",
                stacklevel=3,
            )
            return self
        stacked = copy.copy(self)
        stacked.weight_quantization = other
        stacked.quantize_on_load = True
        return stacked

    @property
    def ranks(self) -> dict[str, int]:
        return self.lowrank.ranks

    def to_dict(self) -> dict[str, Any]:
        section = {
            "quant_method": QUANT_METHOD,
            **self.lowrank.to_dict(),
            "dtype": self.dtype,
            "dtypes": dict(sorted(self.dtypes.items())),
            "smooth_hf_version": __version__,
            "load_note": LOAD_NOTE,
        }
        if self.weight_quantization is not None:
            section["weight_quantization"] = _section(self.weight_quantization)
        return section

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SmoothHfConfig) and (self.lowrank, self.dtype, self.dtypes) == (
            other.lowrank,
            other.dtype,
            other.dtypes,
        ) and _section(self.weight_quantization) == _section(other.weight_quantization)


def _section(config: QuantizationConfigMixin | None) -> dict[str, Any] | None:
    """A method's ``quantization_config`` section as config.json holds it: through JSON, so plain values only (a
    method's ``to_dict`` may hold enums)."""
    return None if config is None else json.loads(config.to_json_string(use_diff=False))


def _module_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules()}


def _renamer(model: PreTrainedModel):
    """Maps a name of the checkpoint's model to ``model``: a checkpoint of a model with a head loads into its
    base model (``transformer.h.0...`` -> ``h.0...``) and the other way round, as transformers allows for
    weights. Returns ``rename(name, exists) -> new name | None`` (``None``: a head layer the base model lacks)."""
    prefix = model.base_model_prefix
    is_base = not prefix or not hasattr(model, prefix)

    def rename(name: str, exists) -> str | None:
        if exists(name):
            return name
        if prefix and name.startswith(prefix + ".") and exists(name[len(prefix) + 1 :]):
            return name[len(prefix) + 1 :]
        if prefix and exists(f"{prefix}.{name}"):
            return f"{prefix}.{name}"
        if is_base and prefix and not name.startswith(prefix + "."):
            return None  # a head layer of the checkpoint (classifier, lm_head): the base model has none
        raise KeyError(name)

    return rename


def _resolve_names(model: PreTrainedModel, ranks: dict[str, int]) -> dict[str, int]:
    """The ranks, renamed for ``model`` (see :func:`_renamer`)."""
    names, rename = {name for name, _ in model.named_modules()}, _renamer(model)
    resolved, unknown = {}, []
    for name, rank in ranks.items():
        try:
            new = rename(name, names.__contains__)
        except KeyError:
            unknown.append(name)
            continue
        if new is not None:
            resolved[new] = rank
    if unknown:
        raise ValueError(
            f"the smooth_hf quantization_config names layers that {type(model).__name__} does not have: "
            f"{', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''}. Load the checkpoint with the model "
            "class it was saved from (config.json 'architectures')."
        )
    return resolved


def _resolve_tensors(model: PreTrainedModel, dtypes: dict[str, str]) -> dict[str, str]:
    """The recorded dtypes, renamed for ``model``; tensors it does not have are left out."""
    tensors = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    rename, resolved = _renamer(model), {}
    for name, dtype in dtypes.items():
        try:
            new = rename(name, tensors.__contains__)
        except KeyError:
            continue
        if new is not None:
            resolved[new] = dtype
    return resolved


class SmoothHfQuantizer(StackedQuantizer):
    """Rebuilds the low-rank structure before transformers loads the weights (see the module doc).

    With a ``weight_quantization`` (torchao), that method's quantizer quantizes the weights of the rebuilt model
    (factor layers included) as they load, or reads them back quantized (:mod:`smooth_hf.integrations.stacking`).
    """

    requires_calibration = False
    quantization_config: SmoothHfConfig

    def __init__(self, quantization_config: SmoothHfConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError(
                "SmoothHfConfig cannot compress a model while it loads: load the dense model, then call "
                "smooth_hf.compress(model, LowRankConfig(...)). from_pretrained reads SmoothHfConfig only from "
                "the config.json of a checkpoint saved after compress()."
            )
        self._load_dtype: torch.dtype | None = None
        self._ranks: dict[str, int] = {}
        if quantization_config.weight_quantization is not None:
            self._stack(quantization_config.weight_quantization, pre_quantized=not quantization_config.quantize_on_load)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self._load_dtype = dtype  # the dtype the model is being loaded in: decides whether islands come back
        return dtype if self.inner is None else self.inner.update_dtype(dtype)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        config = self.quantization_config
        self._ranks = _resolve_names(model, config.ranks)
        apply_ranks(model, self._ranks)
        if config.dtypes and config.dtype is not None and self._load_dtype == dtype_from_name(config.dtype):
            # transformers casts each loaded tensor to the dtype of the empty tensor it goes into when that
            # differs from the load dtype: giving the empty islands their saved dtype restores them exactly.
            set_tensor_dtypes(model, _resolve_tensors(model, config.dtypes))
        guards = {r"(^|\.)" + re.escape(f"{name}.{GUARD_SUFFIX}") + "$" for name in self._ranks}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | guards
        model.lowrank_config = LowRankConfig.from_dict({**config.lowrank.to_dict(), "ranks": dict(self._ranks)})
        self._inner_before(model, **kwargs)  # after the structure: the inner method sees the factor layers

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        self._inner_after(model, **kwargs)
        # Every factor must come from the file: transformers would otherwise initialise it at random and
        # only list it in its loading report. Loaded tensors carry transformers' _is_hf_initialized flag.
        missing = [
            f"{name}.{pname}"
            for name in self._ranks
            for pname, p in model.get_submodule(name).named_parameters()
            if p.device.type != "meta" and not getattr(p, "_is_hf_initialized", False)
        ]
        if missing:
            raise ValueError(
                f"the checkpoint's weights lack the low-rank factors its config.json describes (e.g. "
                f"{', '.join(missing[:3])}): the weights and config.json come from different saves. Re-save the "
                "compressed model with model.save_pretrained or smooth_hf.save_pretrained."
            )
        self.quantization_config.quantize_on_load = False  # loaded: the weights are what a save records
        # A low-rank model is an ordinary float model: .half(), .float() and training work as before saving,
        # so it is not flagged as quantized (transformers refuses those on quantized models). With quantized
        # weights on top it is quantized, and transformers' checks apply.
        model.is_quantized = self.inner is not None
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What ``model.save_pretrained`` writes: the state dict plus the guards, with the section refreshed."""
        fresh = SmoothHfConfig.from_model(model, self.quantization_config.weight_quantization)
        self.quantization_config = fresh
        model.config.quantization_config = fresh
        state_dict, metadata = self._inner_state_dict(model)
        if self.inner is None:
            _refuse_quantized_tensors(state_dict)
        for key in guard_keys(fresh.ranks):
            state_dict[key] = guard_tensor()
        return state_dict, metadata

    @property
    def is_trainable(self) -> bool:
        return self.inner is None or bool(self.inner.is_trainable)

    @property
    def is_qat_trainable(self) -> bool:
        # transformers' Trainer refuses "purely quantized" models unless this is set; the factors are
        # ordinary parameters that train (or fine-tune) like any other.
        return self.inner is None or bool(self.inner.is_qat_trainable)

    @property
    def is_compileable(self) -> bool:
        return self.inner is None or bool(self.inner.is_compileable)


def _refuse_quantized_tensors(state_dict: dict[str, torch.Tensor]) -> None:
    """A model quantized by hand after loading (e.g. torchao's ``quantize_``) holds tensor subclasses that neither
    safetensors nor a reload of the low-rank structure knows: say which load records them instead."""
    quantized = [name for name, tensor in state_dict.items() if type(tensor) not in (torch.Tensor, nn.Parameter)]
    if quantized:
        raise ValueError(
            f"{quantized[0]} is a {type(state_dict[quantized[0]]).__name__}: the weights were quantized after the "
            "model was loaded, which save_pretrained cannot record with the low-rank structure. Load the compressed "
            "checkpoint with the quantization instead, e.g. AutoModelFor*.from_pretrained(folder, "
            "quantization_config=TorchAoConfig(Int8WeightOnlyConfig())); its save_pretrained records both."
        )


def attach_quantization_config(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write a checkpoint that ``from_pretrained`` rebuilds (transformers models).

    Sets ``model.config.quantization_config`` and ``model.hf_quantizer``, as ``from_pretrained`` does for a
    loaded quantized model. Other models are left alone. A model that already carries another
    quantization method keeps it, with a warning: neither save can then record the low-rank structure.
    """
    if not isinstance(model, PreTrainedModel):
        return
    existing = getattr(model.config, "quantization_config", None)
    method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
    if existing is not None and method != QUANT_METHOD:
        logger.warning(
            "the model already carries the quantization method %r: model.save_pretrained and "
            "smooth_hf.save_pretrained cannot record its low-rank structure",
            method,
        )
        return
    quantizer = SmoothHfQuantizer(SmoothHfConfig.from_model(model))
    _own_config(model)
    model.config.quantization_config = quantizer.quantization_config
    model.hf_quantizer = quantizer


def _own_config(model: PreTrainedModel) -> None:
    """Give ``model`` a private copy of its config, shared with its own submodules as before.

    transformers does not copy the config a model is built from: models built from one config object share
    it, and the ranks written into the compressed one would make a dense sibling save as compressed (a
    checkpoint whose reload then fails). Nested configs (a ``text_config``) are copied and re-pointed alike.
    """
    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) in memo:
            module.config = memo[id(config)]


def _merge_stacking(merge):
    """transformers' ``AutoHfQuantizer.merge_quantization_configs``, extended by one case: a compressed checkpoint
    (smooth_hf's section in ``config.json``) loaded with another method's ``quantization_config=`` gets that method
    stacked on the low-rank structure (:meth:`SmoothHfConfig.stacked`), where transformers would refuse two methods.
    Every other case is transformers' own."""

    def merged(cls, quantization_config, quantization_config_from_args):
        ours = method_of(quantization_config) == QUANT_METHOD
        if not ours or quantization_config_from_args is None or isinstance(quantization_config_from_args, SmoothHfConfig):
            return merge(quantization_config, quantization_config_from_args)
        section = quantization_config
        if isinstance(section, dict):
            section = SmoothHfConfig.from_dict(section)
        return section.stacked(quantization_config_from_args)

    merged._smooth_hf = True
    return classmethod(merged)


def _register() -> None:
    """Register the method with transformers (once per process: transformers refuses a second registration)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SmoothHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SmoothHfQuantizer)
    if not getattr(AutoHfQuantizer.merge_quantization_configs, "_smooth_hf", False):
        # transformers has no registry for combining two methods; this one classmethod is where it decides.
        AutoHfQuantizer.merge_quantization_configs = _merge_stacking(AutoHfQuantizer.merge_quantization_configs)
    register_on_compressed(attach_quantization_config)  # a compressed model's save_pretrained records its ranks


_register()


def quantization_section(config: dict[str, Any]) -> dict[str, Any] | None:
    """The smooth_hf ``quantization_config`` of a parsed ``config.json``, or ``None``."""
    section = config.get("quantization_config")
    if isinstance(section, dict) and section.get("quant_method") == QUANT_METHOD:
        return section
    return None
