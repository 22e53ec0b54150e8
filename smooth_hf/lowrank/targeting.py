"""Which layers a penalty or a compression applies to: one matcher for both.

Patterns follow peft's ``target_modules`` convention so they read the same to HF users:

* a **list** of names: a module matches a name when its qualified name, or the name of a module
  that contains it, equals it or ends with ``"." + name`` (``["query", "value"]``,
  ``["layer4.0.conv1"]``, ``["layer4"]`` for every layer inside ``layer4``);
* a single **string**: a regular expression that must match the whole qualified name
  (``r".*layer[34]\\..*conv.*"``).

Only weights that can be both penalised and factorised are ever selected: ``nn.Linear`` (and its
subclasses whose forward still computes ``x @ W.T + b``, such as Falcon's ``FalconLinear``: see
``_computes_linear_map``), ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2). A pattern that matches
nothing, or that names only layers of another type, is an error that says what to do -- never
silently ignored.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..core.libraries import is_hf_conv1d

__all__ = ["PatternSpec", "find_layers", "is_plain_embedding", "is_supported_layer", "layer_kind", "low_rank_factor_names"]

PatternSpec = str | Sequence[str] | None


def layer_kind(module: nn.Module, embeddings: bool = False) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (HF, transposed weight) or ``None`` if unsupported; with
    ``embeddings``, ``"embedding"`` for a plain ``nn.Embedding`` too (a compression target on request only:
    penalties never apply to one).

    A low-rank layer is none of these (it is not an ``nn.Linear`` / ``nn.Conv2d``): it is never cut twice.
    """
    if embeddings and is_plain_embedding(module):
        return "embedding"
    # Subclasses that change the computation (timm's StdConv2d standardises its weight) are not plain
    # x @ W layers: a factorisation of W would change what they compute.
    cls = type(module)
    if isinstance(module, nn.Linear) and (cls.forward is nn.Linear.forward or _computes_linear_map(module)):
        return "linear"
    if isinstance(module, nn.Conv2d) and cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward:
        return "conv2d"
    if is_hf_conv1d(module):
        return "conv1d"
    return None


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose forward is a plain row lookup (``max_norm`` rescales rows as it reads them)."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward and module.max_norm is None


# nn.Linear subclasses that were probed, by (class, has bias, the instance's own attributes): True when the forward
# computes x @ W.T + b.
_LINEAR_MAP_CLASSES: dict[tuple[type, bool, tuple], bool] = {}
# What every nn.Linear holds (module state, in/out features), and what transformers and accelerate add to any module
# (accelerate's dispatch hook and the forward it wraps): attributes beyond these are a subclass's own.
_PLAIN_LINEAR_ATTRIBUTES = frozenset(vars(nn.Linear(1, 1))) | {"_is_hf_initialized", "_hf_hook", "_old_forward", "forward"}
_PROBE_IN, _PROBE_OUT = 7, 5


def _computes_linear_map(module: nn.Linear) -> bool:
    """Whether an ``nn.Linear`` subclass with its own ``forward`` still computes ``x @ W.T + b``.

    Falcon's ``FalconLinear`` writes the same product by hand; timm-style subclasses may standardise or
    scale the weight, and quantised layers store something else. The rule, so that a factorisation
    never changes what a layer computes:

    * the module holds only ``weight`` (floating point) and ``bias``: no other parameter, buffer or
      sub-module that its forward could use;
    * its class's forward, run on a shallow copy given small random float64 ``weight``/``bias`` (and
      matching ``in_features``/``out_features``) and a random input, returns ``x @ W.T + b`` to float64
      precision. The probe calls ``forward`` directly (no hooks fire), never touches the module's
      tensors, and runs once per class, bias or not and plain attribute values (a ``scale``); an instance
      holding other attributes is probed on its own.
    """
    weight = module._parameters.get("weight")
    if (
        set(module._parameters) - {"weight", "bias"}
        or module._buffers
        or module._modules
        or not isinstance(weight, torch.Tensor)
        or not weight.is_floating_point()
    ):
        return False
    # The probe sees the instance's own attributes (a scale, a flag), so instances that differ in them are probed
    # apart. Only plain values go into the cached key (the cache must not keep modules, tensors or bound methods
    # alive); an instance with any other attribute is probed alone, never answered from another's probe.
    extra = tuple(sorted((k, v) for k, v in vars(module).items() if k not in _PLAIN_LINEAR_ATTRIBUTES))
    if not all(_plain_value(v) for _, v in extra):
        return _probe_linear_map(module)
    key = (type(module), module.bias is not None, extra)
    if key not in _LINEAR_MAP_CLASSES:
        _LINEAR_MAP_CLASSES[key] = _probe_linear_map(module)
    return _LINEAR_MAP_CLASSES[key]


def _plain_value(value: object) -> bool:
    """An immutable value that a cache key can hold without keeping anything else alive."""
    if isinstance(value, tuple):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str | torch.dtype)


def _probe_linear_map(module: nn.Linear) -> bool:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(_PROBE_OUT, _PROBE_IN, generator=g, dtype=torch.float64)
    bias = torch.randn(_PROBE_OUT, generator=g, dtype=torch.float64) if module.bias is not None else None
    x = torch.randn(2, 3, _PROBE_IN, generator=g, dtype=torch.float64)
    probe = copy.copy(module)  # a new __dict__: the assignments below leave the module itself untouched
    object.__setattr__(probe, "_parameters", {"weight": nn.Parameter(weight, False), "bias": bias})
    object.__setattr__(probe, "in_features", _PROBE_IN)
    object.__setattr__(probe, "out_features", _PROBE_OUT)
    expected = x @ weight.T + (bias if bias is not None else 0)
    try:
        with torch.no_grad():
            out = type(module).forward(probe, x)
    except Exception:  # noqa: BLE001 - a forward that cannot run on the probe is not a plain linear map
        return False
    return (
        isinstance(out, torch.Tensor)
        and out.shape == expected.shape
        and out.dtype == torch.float64
        and torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    )


def is_supported_layer(module: nn.Module, embeddings: bool = False) -> bool:
    return layer_kind(module, embeddings) is not None


def _matcher(patterns: PatternSpec):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        return lambda name: regex.fullmatch(name) is not None
    keys = list(patterns)

    def matches(name: str) -> bool:  # the module itself or any module that contains it
        parts = name.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(p == k or p.endswith("." + k) for p in prefixes for k in keys)

    return matches


def _check_patterns(patterns: PatternSpec, names: list[str], what: str) -> None:
    """Every pattern must match at least one module: a typo must not silently select nothing."""
    if patterns is None:
        return
    hint = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    if isinstance(patterns, str):
        try:
            regex = re.compile(patterns)
        except re.error as err:
            raise ValueError(
                f"{what} regex {patterns!r} is invalid: {err}. Fix the regex, or pass a list of module names "
                "(matched by name or name suffix) instead."
            ) from None
        if not any(regex.fullmatch(n) for n in names):
            raise ValueError(
                f"{what} regex {patterns!r} matches no module name (it must match the whole name, e.g. "
                f"'.*conv.*' rather than 'conv'). Module names look like: {hint}"
            )
        return
    for key in patterns:
        if not any(n == key or n.endswith("." + key) for n in names):
            raise ValueError(
                f"{what} {key!r} matches no module: use a module name, or the end of one after a dot. "
                f"Module names look like: {hint}"
            )


def low_rank_factor_names(named: list[tuple[str, nn.Module]]) -> set[str]:
    """The names, among ``named`` (``model.named_modules()``), of the modules inside low-rank layers: their factors."""
    from .base import LowRankLayer  # here, not at the top: the lowrank package imports this module

    return {f"{n}.{c}" for n, m in named if isinstance(m, LowRankLayer) for c, _ in m.named_modules() if c}


def find_layers(
    model: nn.Module,
    target_modules: PatternSpec = None,
    exclude_modules: PatternSpec = None,
    skip_first_last: bool = False,
    embeddings: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The supported layers of ``model`` selected by the patterns, in registration order.

    Args:
        target_modules: which layers (see module doc); ``None`` selects every supported layer.
        exclude_modules: layers to leave out, same syntax.
        skip_first_last: leave out the first and the last selected layer (typically the stem and
            the classifier head: small, and the most sensitive to smoothing or truncation); embeddings
            are not counted in first and last.
        embeddings: select plain ``nn.Embedding`` layers too (``LowRankConfig.factorise_embeddings``).

    Raises:
        ValueError: a pattern matches no module, the target patterns select only layers of an
            unsupported type (the message names them), or an exclude regex excludes no supported layer
            (a regex matches whole names, not the layers inside a container it names).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    _check_patterns(target_modules, names, "target_modules pattern")
    _check_patterns(exclude_modules, names, "exclude_modules pattern")
    is_target, is_excluded = _matcher(target_modules), _matcher(exclude_modules)

    inside_low_rank = low_rank_factor_names(named)  # factors of an already low-rank layer, not new targets
    selected, unsupported = [], []
    for name, module in named:
        if name in inside_low_rank or (is_target is not None and not is_target(name)):
            continue
        if is_excluded is not None and is_excluded(name):
            continue
        if is_supported_layer(module, embeddings):
            selected.append((name, module))
        elif is_target is not None and not list(module.children()):
            unsupported.append(f"{name} ({type(module).__name__})")
    if target_modules is not None and not selected:
        raise ValueError(
            f"target_modules {target_modules!r} selects no Linear, Conv2d or Conv1D layer; it matched "
            f"only {', '.join(unsupported[:8]) or 'containers'}. Only those three layer types can be "
            "penalised or factorised: name layers of those types, or a container that holds them."
        )
    if isinstance(exclude_modules, str) and not any(
        is_excluded(n) and is_supported_layer(m, embeddings) for n, m in named if n not in inside_low_rank
    ):
        raise ValueError(
            f"exclude_modules regex {exclude_modules!r} matches no Linear, Conv2d or Conv1D layer (a regex must match "
            "a layer's whole name; it does not reach into the containers it matches), so it would exclude nothing. "
            f"Match the layers, e.g. {exclude_modules + chr(92) + '..*'!r}, or pass a list of names, which covers "
            "containers."
        )
    if skip_first_last:
        ends = [i for i, (_, m) in enumerate(selected) if not is_plain_embedding(m)]
        if len(ends) > 2:
            selected = [layer for i, layer in enumerate(selected) if i not in (ends[0], ends[-1])]
    return selected
