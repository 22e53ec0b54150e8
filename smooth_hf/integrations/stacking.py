"""Quantization on top of the low-rank structure: a quantizer that hands the weights to another quantizer.

transformers keeps one ``quantization_config`` per checkpoint and one quantizer per load, and refuses a
``quantization_config=`` argument of another method than the one in ``config.json``. A compressed checkpoint's
method is ``"smooth_hf"`` (the low-rank structure), so ``from_pretrained(compressed, quantization_config=
TorchAoConfig(...))`` needs both at once. :class:`StackedQuantizer` is how: smooth_hf's quantizer rebuilds the
structure itself and forwards every weight-level step of the load (which tensors to quantize, how, how to read
quantized tensors back, how to save them) to the *inner* quantizer of the other method, which then sees the
factor layers ``down`` / ``up`` as the ``nn.Linear`` layers they are. The inner method's section is saved inside
smooth_hf's (``weight_quantization``), so the saved folder reloads both.

Which methods stack is decided here (:data:`STACKABLE_METHODS`): torchao, which quantizes ``nn.Linear`` weights
as they load, on CPU too (tested). The others fail with an error naming what works instead (:func:`check_stackable`):
bitsandbytes needs CUDA and swaps modules in a way not tested here, GPTQ / AWQ / compressed-tensors need a
calibrated, pre-quantized checkpoint of the dense architecture, which a low-rank model is not.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AutoHfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.optional import require

__all__ = ["STACKABLE_METHODS", "StackedQuantizer", "check_stackable", "method_of"]

# quant_method -> the library it needs (smooth_hf.core.optional names the extra that installs it)
STACKABLE_METHODS = {"torchao": "torchao"}

_INSTEAD = (
    "Pass a transformers.TorchAoConfig instead, e.g. TorchAoConfig(torchao.quantization.Int8WeightOnlyConfig()) "
    "(pip install 'smooth_hf[deploy]'). Other methods can only be applied by their own library to the model loaded "
    "without quantization_config (its factor layers are nn.Linear modules named 'down' and 'up'); smooth_hf does not "
    "test that, and its save_pretrained cannot record it."
)


def method_of(config: QuantizationConfigMixin | dict[str, Any]) -> str:
    """The ``quant_method`` of a quantization config or of its ``config.json`` section, as a plain string."""
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method))


def check_stackable(config: QuantizationConfigMixin | dict[str, Any]) -> None:
    """Refuse a quantization method that cannot go on top of a compressed checkpoint, saying what works; a missing
    library is an ImportError naming the extra that installs it. ``config`` may be a ``config.json`` section."""
    method = method_of(config)
    name = f"quant_method {method!r}" if isinstance(config, dict) else f"{type(config).__name__} (quant_method {method!r})"
    if method not in STACKABLE_METHODS:
        raise ValueError(
            f"{name} cannot be combined with a smooth_hf compressed checkpoint at load time: smooth_hf stacks "
            f"{', '.join(sorted(STACKABLE_METHODS))} on the low-rank factors. {_INSTEAD}"
        )
    require(STACKABLE_METHODS[method], f"{name} on a smooth_hf compressed checkpoint")


class StackedQuantizer(HfQuantizer):
    """An ``HfQuantizer`` for a structure, that forwards the weights to ``self.inner`` (another method's quantizer).

    Without an inner quantizer every hook behaves as :class:`HfQuantizer`'s. With one, transformers' weight-level
    hooks (dtype, device map, which parameters to quantize and how, reading quantized tensors back, the state dict
    to save) go to it; subclasses rebuild their structure in ``_process_model_before_weight_loading`` and then call
    :meth:`_inner_before` / :meth:`_inner_after`. ``pre_quantized`` follows the inner quantizer: it says whether the
    *weights* in the file are quantized already, which is what transformers reads it for.
    """

    inner: HfQuantizer | None = None

    def _stack(self, config: QuantizationConfigMixin, pre_quantized: bool) -> None:
        check_stackable(config)
        self.inner = AutoHfQuantizer.from_config(config, pre_quantized=pre_quantized)
        self.pre_quantized = self.inner.pre_quantized

    # ---- forwarded hooks (transformers calls them on the quantizer of the load)
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.inner is not None:
            self.inner.validate_environment(*args, **kwargs)

    def update_device_map(self, device_map):
        return device_map if self.inner is None else self.inner.update_device_map(device_map)

    def adjust_max_memory(self, max_memory):
        return max_memory if self.inner is None else self.inner.adjust_max_memory(max_memory)

    @property
    def quantized_element_size(self) -> float | None:
        return None if self.inner is None else self.inner.quantized_element_size

    def param_element_size(self, model, param_name, param) -> float:
        return super().param_element_size(model, param_name, param) if self.inner is None else \
            self.inner.param_element_size(model, param_name, param)

    def get_new_dtype(self, converter, param, dtype):
        return super().get_new_dtype(converter, param, dtype) if self.inner is None else \
            self.inner.get_new_dtype(converter, param, dtype)

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        if self.inner is None or not self.inner.param_needs_quantization(model, param_name, **kwargs):
            return False
        # A rank-1 factor's `up` has a single input column, which torchao's int8 per-row quantization (0.18) fails
        # on ("shape '[out, 1]' is invalid"); it holds `out` numbers, so it stays in float.
        module, _, name = param_name.rpartition(".")
        weight = getattr(model.get_submodule(module), name, None)
        return not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == 1)

    def get_quantize_ops(self):
        return super().get_quantize_ops() if self.inner is None else self.inner.get_quantize_ops()

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        return {} if self.inner is None else self.inner.serialized_names

    def get_load_operations(self) -> dict:
        return {} if self.inner is None else self.inner.get_load_operations()

    def get_weight_conversions(self):
        return [] if self.inner is None else self.inner.get_weight_conversions()

    def update_weight_conversions(self, weight_conversions, model):
        return weight_conversions if self.inner is None else self.inner.update_weight_conversions(weight_conversions, model)

    def update_parallel_plan(self, model, plan: dict[str, str]) -> None:
        if self.inner is not None:
            self.inner.update_parallel_plan(model, plan)

    def update_attn_implementation(self, config):
        return config if self.inner is None else self.inner.update_attn_implementation(config)

    def _inner_before(self, model, **kwargs: Any) -> None:
        if self.inner is not None:
            self.inner._process_model_before_weight_loading(model, **kwargs)

    def _inner_after(self, model, **kwargs: Any) -> None:
        if self.inner is None:
            return
        self.inner._process_model_after_weight_loading(model, **kwargs)
        if self.inner.pre_quantized:
            # transformers keeps the conversions a load used, to revert them when the model is saved; the inner
            # method's reading of its quantized tensors has no reverse (save_pretrained would raise
            # NotImplementedError), and none is needed: _inner_state_dict writes the tensors in the saved form.
            reads = tuple(self.inner.get_load_operations().values())
            model._weight_conversions = [
                conversion for conversion in getattr(model, "_weight_conversions", None) or []
                if not any(isinstance(op, reads) for op in getattr(conversion, "operations", ()))
            ]

    def _inner_state_dict(self, model) -> tuple[dict[str, Any], dict[str, str]]:
        """What the inner method saves (e.g. torchao's tensors flattened for safetensors), or the plain state dict."""
        if self.inner is not None:
            state_dict, metadata = self.inner.get_state_dict_and_metadata(model)
            if state_dict is not None:
                return state_dict, dict(metadata or {})
        return model.state_dict(), {}

    def is_serializable(self) -> bool:
        return self.inner is None or bool(self.inner.is_serializable())
