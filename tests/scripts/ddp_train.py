"""Trains TinyConvNet with SmoothTrainer (penalties and rank projection) and writes this rank's final weights; launched by the tests.

usage: [accelerate launch ...] ddp_train.py OUT_DIR PER_DEVICE_BATCH GA STEPS
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TinyConvNet, image_dataset  # noqa: E402

from smooth_hf import SmoothTrainer, SmoothTrainingArguments  # noqa: E402


def main() -> None:
    out, batch, ga, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    model = TinyConvNet()
    args = SmoothTrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=steps,
        optim="sgd", learning_rate=0.2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, first_order_coef=1.0, nuclear_norm_coef=1.0,
        second_order_coef=1.0, nuclear_norm_every=2, penalty_skip_first_last=False, dataloader_drop_last=True,
        rank_projection_param_reduction=0.3, rank_projection_every=2, rank_projection_start=0.0,
        rank_projection_end=0.5,
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=image_dataset(n=64))
    seen = []
    original = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **k):
        seen.append(int(inputs["labels"].shape[0]))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = counting_compute_loss
    trainer.train()
    rank = trainer.args.process_index
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": trainer.args.world_size, "samples": sum(seen),
                   "logs": trainer.state.log_history}, f)
    # Leave the process group before the interpreter's teardown, as smooth-hf-train does (gloo threads can abort there).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
