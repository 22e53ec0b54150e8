"""Per-tensor dtypes of a model: which tensors differ from its main dtype, and how to give them back.

Mixed-precision models keep some tensors wider than the rest on purpose: transformers keeps T5's ``wo``
layers in float32 when the model is loaded in float16 (``_keep_in_fp32_modules``), and a bf16 model may
keep its ``lm_head`` in float32. A checkpoint that records one dtype for the whole model loses these
"islands", and the reloaded model computes something else. These pure helpers record them by
state-dict name and restore them on a freshly built model (the meta device included), so the weights
then load into tensors of the right dtype.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dtype_from_name", "dtype_islands", "main_dtype", "set_tensor_dtypes"]


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` (or ``"torch.float16"``) -> ``torch.float16``; anything else is a clear error."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (expected e.g. 'float32', 'bfloat16')")
    return dtype


def main_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter: what transformers records as ``config.dtype``."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def dtype_islands(model: nn.Module) -> dict[str, str]:
    """``{state-dict name: dtype name}`` of the floating-point tensors whose dtype is not :func:`main_dtype`."""
    main = main_dtype(model)
    return {
        name: str(tensor.dtype).removeprefix("torch.")
        for name, tensor in model.state_dict(keep_vars=True).items()
        if tensor.is_floating_point() and tensor.dtype != main
    }


def set_tensor_dtypes(model: nn.Module, dtypes: dict[str, str | torch.dtype]) -> None:
    """Cast the named parameters and buffers of ``model`` in place, keeping every ``Parameter`` object.

    The ``Parameter`` objects stay the same (only their data is replaced), so tied weights stay tied and
    optimisers or hooks holding them are unaffected. Works on the meta device. Unknown names are an error:
    a record that does not describe the model must not be half applied.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    unknown = sorted(set(dtypes) - set(tensors))
    if unknown:
        raise ValueError(f"no tensor named {', '.join(unknown[:4])} in {type(model).__name__}")
    with torch.no_grad():
        for name, dtype in dtypes.items():
            dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
            tensor = tensors[name]
            if tensor.dtype == dtype:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(dtype)
            else:
                module_name, _, buffer_name = name.rpartition(".")
                module = model.get_submodule(module_name) if module_name else model
                module._buffers[buffer_name] = tensor.to(dtype)
