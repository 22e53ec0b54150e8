"""GPU latency of a trained ResNet-18 (CIFAR stem), dense vs compressed, with the accuracy of each model beside it.

Loads the dense weights that ``benchmarks/cnn_recipe.py`` saved (``save_weights``: fp16 safetensors shards),
compresses copies two ways -- a parameter budget (``LowRankConfig(param_reduction=p)``) and a multiply-add
budget (``LowRankConfig(macs_reduction=p)`` with one 28x28 test image as ``example_inputs``), on the GPU, so with
its default rank multiple -- and times each model's forward pass in fp16 and bf16 at the given batch
sizes (CUDA events, median of repeated runs, ratios to the dense model measured in the same process). Models
named in ``--compile`` are also timed under ``torch.compile`` (``ms_compile_*``) and, on a GPU, under
``torch.compile(mode="reduce-overhead")`` (``ms_graphs_*``): CUDA graphs replay the whole forward pass as one
launch, which should reduce the per-kernel launch cost, paid twice by a factorised layer (two kernels instead of
one); not measured yet.

    python benchmarks/gpu_latency.py --weights 'runs/cnn_recipe/r18_relprox0.3_s0-*.safetensors' --out latency.json
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from cnn_recipe import RunSpec, accuracy, build, load_fashion_mnist  # noqa: E402
from safetensors.torch import load_file
from torch import nn

from smooth_hf.data.processors import image_input_config  # noqa: E402
from smooth_hf.lowrank import LowRankConfig, compress, count_macs, count_parameters  # noqa: E402


def time_forward(model: nn.Module, batch: int, dtype: torch.dtype, reps: int = 50, groups: int = 5) -> float:
    """Median milliseconds per forward pass (CUDA events on a GPU), channels-last, inputs drawn at random."""
    device = next(model.parameters()).device
    x = torch.randn(batch, 1, 28, 28, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    with torch.no_grad():
        for _ in range(10):
            model(x)
        times = []
        for _ in range(groups):
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                began = time.perf_counter()
            for _ in range(reps):
                model(x)
            if cuda:
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / reps)
            else:
                times.append(1000 * (time.perf_counter() - began) / reps)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="Glob of the fp16 safetensors shards of the dense model.")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--channels", default="", help="Stage widths if not the model's own (comma-separated).")
    p.add_argument("--param_budgets", default="0.5,0.7,0.8")
    p.add_argument("--mac_budgets", default="0.5,0.7")
    p.add_argument("--batch_sizes", default="256,1")
    p.add_argument("--compile", default="dense,param0.7,macs0.7", help="Models also timed under torch.compile.")
    p.add_argument("--dtypes", default="bf16,fp16", help="Inference dtypes to time.")
    p.add_argument("--reps", type=int, default=50, help="Forward passes per timed group (5 groups, median).")
    p.add_argument("--time_limit", type=float, default=240, help="Skip torch.compile after this many seconds.")
    p.add_argument("--max_eval_samples", type=int, default=0, help="Test images for the accuracies (0 = all).")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    begin = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    dense = build(RunSpec(name=Path(args.weights).stem, model=args.model, channels=channels))
    state = {}
    for path in sorted(glob.glob(args.weights)):
        state.update(load_file(path))
    if not state:
        raise SystemExit(f"no weights match {args.weights}")
    dense.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    dense = dense.eval().to(device)
    spec = image_input_config(dense)
    data = load_fashion_mnist(spec["mean"][0], spec["std"][0])
    test_images, test_labels = data["test"]
    if args.max_eval_samples:
        test_images, test_labels = test_images[: args.max_eval_samples], test_labels[: args.max_eval_samples]
    image = test_images[:1].to(device)  # what a rank costs in multiply-adds: one 28x28 image
    dense_macs = count_macs(dense, image)
    models = {"dense": dense}
    for b in [float(v) for v in args.param_budgets.split(",") if v]:
        models[f"param{b:g}"] = compress(copy.deepcopy(dense), LowRankConfig(param_reduction=b))
    for b in [float(v) for v in args.mac_budgets.split(",") if v]:
        models[f"macs{b:g}"] = compress(copy.deepcopy(dense), LowRankConfig(macs_reduction=b), example_inputs=image)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "weights": args.weights, "models": {}}
    for name, model in models.items():
        row = {"params": count_parameters(model), "macs": count_macs(model, image),
               "accuracy_fp32": accuracy(model, test_images, test_labels)}
        row["params_removed"] = 1 - row["params"] / count_parameters(dense)
        row["macs_removed"] = 1 - row["macs"] / dense_macs
        row["ranks"] = getattr(model, "lowrank_config", None) and model.lowrank_config.ranks
        results["models"][name] = row
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype_name in args.dtypes.split(","):
        dtype = dtypes[dtype_name]
        for name, model in models.items():
            half = copy.deepcopy(model).to(dtype).to(memory_format=torch.channels_last)
            row = results["models"][name]
            row[f"accuracy_{dtype_name}"] = accuracy(half, test_images.to(dtype), test_labels)
            for batch in [int(v) for v in args.batch_sizes.split(",")]:
                row[f"ms_eager_{dtype_name}_b{batch}"] = time_forward(half, batch, dtype, args.reps)
                if name in args.compile.split(",") and time.time() - begin < args.time_limit:
                    modes = {"compile": "default", **({"graphs": "reduce-overhead"} if device.type == "cuda" else {})}
                    for key, mode in modes.items():
                        torch._dynamo.reset()  # past dynamo's recompile limit a compiled model silently runs eager
                        compiled = torch.compile(half, mode=mode)
                        row[f"ms_{key}_{dtype_name}_b{batch}"] = time_forward(compiled, batch, dtype, args.reps)
            print(f"{dtype_name} {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()
                                                       if k.startswith("ms_") and dtype_name in k), flush=True)
    for row in results["models"].values():
        for key in [k for k in row if k.startswith("ms_")]:
            base = results["models"]["dense"].get(key)
            if base:
                row[key.replace("ms_", "speedup_")] = base / row[key]
    results["seconds"] = time.time() - begin
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'model':10} {'params%':>8} {'macs%':>7} {'acc':>6} " + " ".join(
        f"{k:>22}" for k in results["models"]["dense"] if k.startswith("ms_")))
    for name, row in results["models"].items():
        print(f"{name:10} {100 * row['params_removed']:8.1f} {100 * row['macs_removed']:7.1f} "
              f"{100 * row['accuracy_fp32']:6.2f} " + " ".join(
                  f"{row[k]:10.3f} ({row.get(k.replace('ms_', 'speedup_'), 0):4.2f}x)   "
                  for k in row if k.startswith("ms_")))
    return results


if __name__ == "__main__":
    main()
