"""Trains a tiny ViT with SmoothTrainer under each setting in RUNS and writes each run's final weights and logs.

Launched by torchrun (2 processes), it trains under Accelerate's FSDP2 on CPU processes (``accelerate_fsdp2_cpu``),
each process taking half of each global batch of 8; alone, in one process with the whole batch.

usage: [torchrun --nproc_per_node 2] fsdp_train.py OUT
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from conftest import image_dataset, tiny_vit  # noqa: E402

import smooth_hf.training.smoothness as smoothness  # noqa: E402
from smooth_hf import SmoothTrainer, SmoothTrainingArguments  # noqa: E402
from smooth_hf.training.shards import whole_weights  # noqa: E402
from smooth_hf.training.trainer import PENALTY_STATE_NAME  # noqa: E402

HELD = {"split": 0, "whole": 0}  # layers the penalty saw split across processes, or whole, summed over its calls
_layer_sums = smoothness.layer_sums


def counting_layer_sums(helds, *args, **kwargs):
    for h in helds:
        HELD["split" if h.split is not None else "whole"] += 1
    return _layer_sums(helds, *args, **kwargs)


smoothness.layer_sums = counting_layer_sums

ALL = {"first_order_coef": 1.0, "second_order_coef": 1.0, "nuclear_norm_coef": 1.0}
PROJECTION = {"rank_projection_param_reduction": 0.3, "rank_projection_every": 2, "rank_projection_start": 0.0,
              "rank_projection_end": 0.5}
RUNS = {
    "first_order": {"first_order_coef": 1.0},
    "second_order": {"second_order_coef": 1.0},
    "nuclear_exact": {"nuclear_norm_coef": 1.0, "nuclear_norm_every": 1},
    # 4 steps, refreshed at steps 0 and 2: the surrogate of a direction 1 step old at steps 1 and 3.
    # ... with a checkpoint at step 2: the cached directions are saved whole
    "nuclear_cached": {"nuclear_norm_coef": 1.0, "nuclear_norm_every": 2, "penalty_normalization": "sum",
                       "save_strategy": "steps", "save_steps": 2},
    "nuclear_tail": {"nuclear_norm_coef": 1.0, "nuclear_norm_every": 2, "nuclear_norm_param_reduction": 0.2},
    # the first and last layers too: the classifier stays whole in the root module between forward and backward
    "all_relative": {**ALL, "nuclear_norm_every": 2, "penalty_normalization": "relative", "penalty_skip_first_last": False},
    "all_accumulated": {**ALL, "nuclear_norm_every": 2, "gradient_accumulation_steps": 2},
    "projection": {**PROJECTION, "first_order_coef": 1.0, "nuclear_norm_coef": 1.0, "nuclear_norm_every": 2},
    "projection_whitened": {**PROJECTION, "rank_projection_method": "whitened", "rank_projection_calibration_batches": 2},
}
GLOBAL_BATCH, STEPS = 8, 4


def train(out: str, name: str, options: dict, world: int) -> None:
    options = dict(options)
    accumulation = options.pop("gradient_accumulation_steps", 1) if world > 1 else 1
    options.pop("gradient_accumulation_steps", None)
    # ViTLayer only: accelerate 1.15 also wraps _no_split_modules' ViTEmbeddings, then fails to wrap the patch
    # embeddings inside it as the input embeddings (their weights are split already). Checkpoints sharded, as
    # recipes/accelerate_configs/fsdp2.yaml writes them.
    config = {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"], "state_dict_type": "SHARDED_STATE_DICT"}
    sharding = {"fsdp": True, "fsdp_config": config} if world > 1 else {}
    args = SmoothTrainingArguments(
        output_dir=os.path.join(out, name), per_device_train_batch_size=GLOBAL_BATCH // world // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=STEPS, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
        dataloader_drop_last=True, plan_rank_multiple=1, **{"save_strategy": "no", **sharding, **options},
    )
    torch.manual_seed(0)
    HELD.update(split=0, whole=0)
    trainer = SmoothTrainer(model=tiny_vit(), args=args, train_dataset=image_dataset(n=64))
    trainer.train()
    with whole_weights(trainer.model) as model:
        if trainer.is_world_process_zero():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"{name}.safetensors"))
    if trainer.is_world_process_zero():
        state = os.path.join(args.output_dir, "checkpoint-2", PENALTY_STATE_NAME)
        if os.path.isfile(state):
            shutil.copy(state, os.path.join(out, f"{name}.penalty.safetensors"))
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"world_size": args.world_size, "fsdp": trainer.is_fsdp_enabled, "penalty_layers": HELD,
                       "logs": trainer.state.log_history}, f)


def main() -> None:
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from accelerate_fsdp2_cpu import enable

        enable()
    for name, options in RUNS.items():
        train(out, name, options, world)
    # Leave the process group before the interpreter's teardown, as smooth-hf-train does (gloo threads can abort there).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
