"""Run a script with Accelerate's FSDP2 on CPU processes (tests only).

usage: torchrun --nproc_per_node 2 accelerate_fsdp2_cpu.py SCRIPT [ARGS...]   (the script's own arguments follow it)

Accelerate 1.15 selects FSDP only for GPU-like process groups (``AcceleratorState.__init__``): CPU processes stay
``MULTI_CPU`` even when given an FSDP plugin, and ``prepare`` then wraps the model in DDP. :func:`enable` makes exactly
that one switch; everything after it -- ``fully_shard`` through ``fsdp2_prepare_model`` with its auto-wrap policy, the
optimizer, gradient clipping, gradient accumulation, state dicts -- is Accelerate's and torch's own code, as on GPUs.
The script sets FSDP up as a user would (``--fsdp true --fsdp_config ...`` or ``TrainingArguments(fsdp=True, ...)``).
"""

import runpy
import sys


def enable() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = fsdp_on_cpu


if __name__ == "__main__":
    enable()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
