"""CNN recipe search and confirmation: train CIFAR-style ResNets with SmoothTrainer, cut them without fine-tuning.

Each *run* is one training (a JSON dict of settings, see ``RunSpec``) followed by truncated-SVD compression at
several budgets (global allocation, ``LowRankConfig(param_reduction=p)``), evaluated on the full Fashion-MNIST
test set, with no fine-tuning and no BatchNorm repair. Runs go through the product's own path --
``SmoothTrainer`` + ``SmoothTrainingArguments`` with the optimizer and schedule a user would pass to
``recipes/train.py`` -- on in-memory tensors, so that many runs fit a GPU lease. Several worker processes share
one GPU (small CNNs are bound by kernel launches, not by the GPU); on a CPU use one worker.

    # a grid (a JSON list of run dicts, or a name from GRIDS) on every visible device, results as JSON lines
    python benchmarks/cnn_recipe.py --grid smoke --workers 1 --out runs/cnn_recipe_smoke.jsonl
    python benchmarks/cnn_recipe.py --grid my_runs.json --workers 8 --deadline 480 --out $OUT/runs.jsonl

Each finished run appends one JSON line (settings, training log, dense and compressed accuracies, timings), so a
run cut short by ``--deadline`` keeps what finished. ``benchmarks/cnn_recipe_report.py`` turns lines into tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from smooth_hf.core.machine import core_shares, machine_info, usable_cores
from smooth_hf.data import fashion_mnist_arrays
from smooth_hf.evaluation import classification_accuracy


@dataclass
class RunSpec:
    """One training run and its compression sweep. Penalty fields are SmoothTrainingArguments fields."""

    name: str
    model: str = "resnet14_cifar"
    channels: list[int] | None = None
    init: str = "model"  # "model": the architecture's own init; "torch": PyTorch's default conv init
    init_scale: float = 1.0  # multiply every conv weight by this after init (BN makes it a no-op for the function)
    epochs: float = 4.0
    batch_size: int = 128
    optim: str = "sgd"
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    warmup: float = 0.25
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    flip: bool = True
    max_train_samples: int | None = None
    nuclear_norm_coef: float = 0.0
    first_order_coef: float = 0.0
    second_order_coef: float = 0.0
    penalty_normalization: str = "scale_free"
    nuclear_norm_param_reduction: float | None = None
    nuclear_norm_every: int = 25
    penalty_exclude_modules: list[str] | None = None
    penalty_warmup_ratio: float = 0.0
    rank_projection_param_reduction: float | None = None
    rank_projection_macs_reduction: float | None = None  # a compute budget, priced on one 1x28x28 image
    rank_projection_every: int = 10
    rank_projection_start: float = 0.1
    rank_projection_end: float = 0.6
    plan_rank_multiple: int | None = None  # None: the training device's (8 on a GPU); the sweep cuts with the same
    channels_last: bool = False  # SmoothTrainingArguments.channels_last (the trainer checks the model's convs first)
    seed: int = 0
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    sweep_rule: str | None = None  # what the budgets remove: None = the rule the run planned (else param_reduction)
    save_weights: bool = False  # write the trained dense weights (fp16 safetensors shards) next to --out


# ---- data ------------------------------------------------------------------------------------------
def load_fashion_mnist(mean: float, std: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fashion-MNIST (smooth_hf.data's reader of the Debian files) as normalised tensors, held in memory."""
    out = {}
    for split, (images, labels) in fashion_mnist_arrays().items():
        pixels = (torch.from_numpy(images.copy()).float() / 255.0 - mean) / std
        out[split] = pixels.unsqueeze(1), torch.from_numpy(labels)
    return out


class FlipDataset:
    """``{"pixel_values", "labels"}`` items from tensors; random horizontal flips (torch RNG, seeded by the Trainer)."""

    def __init__(self, images, labels, flip: bool):
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"pixel_values": x, "labels": self.labels[i]}


# ---- one run -----------------------------------------------------------------------------------------
def build(spec: RunSpec) -> torch.nn.Module:
    import timm

    import smooth_hf  # noqa: F401  (registers the CIFAR ResNets)

    kwargs = {"in_chans": 1, "num_classes": 10}
    if spec.channels:
        kwargs["channels"] = tuple(spec.channels)
    model = timm.create_model(spec.model, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                if spec.init == "torch":
                    module.reset_parameters()
                module.weight.mul_(spec.init_scale)
    return model




def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """smooth_hf.evaluation's accuracy, on tensors held in memory."""
    return classification_accuracy(model, [{"pixel_values": x, "labels": y} for x, y in zip(images, labels, strict=True)],
                                   batch_size=1000)


def normalized_nuclear(model: torch.nn.Module) -> float:
    """The scale-free nuclear term (exact SVD) over the layers training penalises: 1 = flat spectrum."""
    from smooth_hf import SmoothnessPenalty

    penalty = SmoothnessPenalty.for_model(model, skip_first_last=True, nuclear_norm_coef=1.0, nuclear_norm_every=1)
    with torch.no_grad():
        return penalty(0)[1]["nuclear_norm"]


def save_shards(model: torch.nn.Module, folder: Path, name: str, max_bytes: int = 15_000_000) -> None:
    """The dense weights as fp16 safetensors shards of at most ``max_bytes`` (the device tool returns <=16 MB files)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        tensor = tensor.half() if tensor.is_floating_point() else tensor
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > max_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for i, shard in enumerate(shards):
        save_file(shard, str(folder / f"{name}-{i:02d}.safetensors"))


def layer_spectra(model: torch.nn.Module) -> dict[str, list[float]]:
    """Singular values of every Linear/Conv2d weight (as (out, in*kh*kw)), for offline rank allocations."""
    from smooth_hf.lowrank.targeting import find_layers

    return {name: torch.linalg.svdvals(m.weight.detach().double().reshape(m.weight.shape[0], -1)).cpu().tolist()
            for name, m in find_layers(model)}


def run_one(spec: RunSpec, data: dict, work_dir: Path, out_dir: Path) -> dict[str, Any]:
    from transformers import set_seed

    from smooth_hf import LowRankConfig, SmoothTrainer, SmoothTrainingArguments, compress
    from smooth_hf.evaluation.sweep import budget_sweep

    set_seed(spec.seed)
    model = build(spec)
    images, labels = data["train"]
    if spec.max_train_samples:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(spec.seed))[: spec.max_train_samples]
        images, labels = images[order], labels[order]
    optim_args = "momentum=0.9,nesterov=True" if spec.optim == "sgd" else None
    args = SmoothTrainingArguments(
        output_dir=str(work_dir / spec.name), num_train_epochs=spec.epochs, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, optim=spec.optim, optim_args=optim_args,
        lr_scheduler_type=spec.scheduler, warmup_steps=spec.warmup, max_grad_norm=spec.max_grad_norm,
        logging_steps=50, save_strategy="no", report_to=[], seed=spec.seed, data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        nuclear_norm_coef=spec.nuclear_norm_coef, first_order_coef=spec.first_order_coef,
        second_order_coef=spec.second_order_coef, penalty_normalization=spec.penalty_normalization,
        nuclear_norm_param_reduction=spec.nuclear_norm_param_reduction, nuclear_norm_every=spec.nuclear_norm_every,
        penalty_warmup_ratio=spec.penalty_warmup_ratio, penalty_exclude_modules=spec.penalty_exclude_modules,
        rank_projection_param_reduction=spec.rank_projection_param_reduction,
        rank_projection_macs_reduction=spec.rank_projection_macs_reduction,
        rank_projection_every=spec.rank_projection_every, rank_projection_start=spec.rank_projection_start,
        rank_projection_end=spec.rank_projection_end, plan_rank_multiple=spec.plan_rank_multiple,
        channels_last=spec.channels_last,
    )
    start = time.time()
    trainer = SmoothTrainer(model=model, args=args, train_dataset=FlipDataset(images, labels, spec.flip))
    trainer.train()
    train_seconds = time.time() - start
    model = trainer.model.eval()
    test_images, test_labels = data["test"]
    planned = None
    if spec.nuclear_norm_param_reduction:  # what the tail penalty aimed at, vs what compress then chooses
        kept = trainer.smoothness._kept_ranks()
        cut = compress(copy.deepcopy(model), LowRankConfig(param_reduction=spec.nuclear_norm_param_reduction))
        planned = {"training_plan": dict(zip(trainer.smoothness.layer_names, kept, strict=True)),
                   "compress": {r.name: r.rank for r in cut.lowrank_report.layers},
                   "energy_kept": {r.name: r.energy_kept for r in cut.lowrank_report.layers}}
    start = time.time()
    multiple = {"rank_multiple": args.plan_rank_multiple} if args.plan_rank_multiple else {}  # the planned rounding
    # every row also counts multiply-adds per image (the planned rule decides what the budgets are fractions of)
    rule = spec.sweep_rule or args.projection_rule or "param_reduction"
    rows = budget_sweep(model, spec.budgets, lambda m: accuracy(m, test_images, test_labels), config_kwargs=multiple,
                        rule=rule, example_inputs=test_images[:1])
    if spec.save_weights:
        save_shards(model, out_dir, spec.name)
    log = [{k: v for k, v in e.items() if k in ("step", "epoch", "loss", "smooth/nuclear_norm", "smooth/first_order",
                                                 "learning_rate", "grad_norm")}
           for e in trainer.state.log_history if "loss" in e]
    return {
        "spec": asdict(spec), "sweep_rule": rule, "train_seconds": round(train_seconds, 1), "sweep_seconds": round(time.time() - start, 1),
        "steps": trainer.state.global_step, "normalized_nuclear": normalized_nuclear(model), "rows": rows, "log": log,
        "spectra": layer_spectra(model) if spec.save_weights else None, "tail_plan": planned,
    }


# ---- workers -----------------------------------------------------------------------------------------
def _worker(queue, out_path: str, deadline: float, threads: int, work_dir: str, cores: list[int] | None) -> None:
    if cores:  # its own cores, as the main job's side-by-side processes: workers never compete for one core
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("smooth_hf").setLevel(logging.WARNING)
    from smooth_hf.data.processors import image_input_config

    # The normalisation recipes/train.py applies: the model's timm config, averaged to one channel.
    spec = image_input_config(build(RunSpec(name="probe")))
    data = load_fashion_mnist(mean=spec["mean"][0], std=spec["std"][0])
    while True:
        item = queue.get()
        if item is None:
            return
        spec = RunSpec(**item)
        if time.time() > deadline:
            print(f"[skip] {spec.name}: deadline reached", flush=True)
            continue
        try:
            result = run_one(spec, data, Path(work_dir), Path(out_path).parent)
        except Exception as err:  # one bad run must not lose the others' results
            result = {"spec": asdict(spec), "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        with open(out_path, "a") as f:
            f.write(json.dumps(result) + "\n")
        rows = result.get("rows") or []
        summary = " ".join(f"{r['budget']:.1f}:{100 * r['accuracy']:.2f}" for r in rows) or result.get("error")
        print(f"[done] {spec.name} ({result.get('train_seconds')} s train) {summary}", flush=True)


def load_grid(name: str) -> list[dict[str, Any]]:
    if name in GRIDS:
        return GRIDS[name]()
    return json.loads(Path(name).read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grid", required=True, help=f"A JSON file with a list of run dicts, or one of {sorted(GRIDS)}.")
    p.add_argument("--out", required=True, help="JSON-lines file the results are appended to.")
    p.add_argument("--workers", type=int, default=1, help="Processes sharing the device (1 on a CPU).")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers).")
    p.add_argument("--deadline", type=float, default=0, help="Seconds after which no new run starts (0: none).")
    p.add_argument("--work_dir", default="runs/cnn_recipe", help="Scratch folder for the Trainer.")
    p.add_argument("--only", default="", help="Comma-separated run names to keep from the grid.")
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    names = [g["name"] for g in grid]
    if len(set(names)) != len(names):
        raise SystemExit("run names in the grid must be unique")
    unknown = [k for g in grid for k in g if k not in {f.name for f in fields(RunSpec)}]
    if unknown:
        raise SystemExit(f"unknown run settings: {sorted(set(unknown))}")
    if args.only:
        keep = set(args.only.split(","))
        grid = [g for g in grid if g["name"] in keep]
    done = set()
    if Path(args.out).is_file():
        done = {json.loads(line)["spec"]["name"] for line in Path(args.out).read_text().splitlines() if line.strip()}
    grid = [g for g in grid if g["name"] not in done]
    threads = args.threads or max(1, len(usable_cores()) // args.workers)
    deadline = time.time() + args.deadline if args.deadline else float("inf")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"machine": machine_info(), "runs": len(grid), "skipped_done": len(done)}), flush=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for item in grid:
        queue.put(item)
    for _ in range(args.workers):
        queue.put(None)
    shares = core_shares(args.workers) if args.threads is None else None  # pinned when the threads share the cores
    procs = [ctx.Process(target=_worker, args=(queue, args.out, deadline, threads, args.work_dir,
                                                 shares[i] if shares else None))
             for i in range(args.workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()


# ---- grids ---------------------------------------------------------------------------------------------
def _smoke() -> list[dict[str, Any]]:
    tiny = {"channels": [8, 16, 32], "epochs": 1, "max_train_samples": 512, "budgets": [0.5, 0.8]}
    return [
        {"name": "smoke_plain", **tiny},
        {"name": "smoke_tail", **tiny, "nuclear_norm_coef": 0.5, "penalty_normalization": "relative",
         "nuclear_norm_param_reduction": 0.5, "nuclear_norm_every": 2},
        {"name": "smoke_relative", **tiny, "nuclear_norm_coef": 1, "penalty_normalization": "relative",
         "init": "torch", "init_scale": 3.0},
        {"name": "smoke_projection", **tiny, "rank_projection_param_reduction": 0.5, "rank_projection_every": 2},
    ]


def _gpu2() -> list[dict[str, Any]]:
    """The second GPU lease (one wave): the tail-only nuclear norm and gradient clipping, resnet14_cifar 32-64-128."""
    rel = {"penalty_normalization": "relative"}
    tail = {**rel, "nuclear_norm_param_reduction": 0.8}
    return [
        {"name": "r14_tail0.8_rel0.15_e4_s0", **tail, "nuclear_norm_coef": 0.15},
        {"name": "r14_tail0.8_rel0.15_noclip_e4_s0", **tail, "nuclear_norm_coef": 0.15, "max_grad_norm": 0.0},
        {"name": "r14_tail0.8_rel0.4_e4_s0", **tail, "nuclear_norm_coef": 0.4},
        {"name": "r14_plain_noclip_e4_s0", "max_grad_norm": 0.0},
        {"name": "r14_rel0.1_e4_s0", **rel, "nuclear_norm_coef": 0.1},
        {"name": "r14_rel0.05_noclip_e4_s0", **rel, "nuclear_norm_coef": 0.05, "max_grad_norm": 0.0},
        {"name": "r14_tail0.8_rel0.15_init3x_e4_s0", **tail, "nuclear_norm_coef": 0.15, "init_scale": 3.0},
        {"name": "r14_tail0.7_rel0.15_e4_s0", **rel, "nuclear_norm_param_reduction": 0.7, "nuclear_norm_coef": 0.15},
    ]


def _init_scale() -> list[dict[str, Any]]:
    """Does the penalty's pull depend on the initial weight scale? The same training with every conv weight x1 and
    x3 at init (a no-op for the function under BatchNorm), scale-free vs relative weighting; CPU-sized
    (resnet14_cifar 16-32-64, 20,000 images, 2 epochs)."""
    small = {"channels": [16, 32, 64], "epochs": 2, "max_train_samples": 20000, "budgets": [0.5, 0.7, 0.8]}
    runs = []
    for normalization, coef in (("scale_free", 10.0), ("relative", 0.4)):
        for scale in (1.0, 3.0):
            runs.append({"name": f"init{scale:.0f}x_{normalization}{coef:g}", **small, "init_scale": scale,
                         "penalty_normalization": normalization, "nuclear_norm_coef": coef})
    return runs


def _projection() -> list[dict[str, Any]]:
    """Rank projection (``rank_projection_param_reduction``) on this CPU: the full recipe's model and data
    (resnet14_cifar 32-64-128, 60,000 images, 4 epochs), and the main job's size (16-32-64, 20,000 images,
    2 epochs) with and without the nuclear norm, planned for 70% and 80% fewer parameters, and the whole cut at
    once in mid-training instead of the gradual schedule."""
    small = {"channels": [16, 32, 64], "epochs": 2, "max_train_samples": 20000}
    return [
        {"name": "r14_proj0.8_e4_s0", "rank_projection_param_reduction": 0.8, "save_weights": True},
        {"name": "m16_plain", **small},
        {"name": "m16_proj0.8", **small, "rank_projection_param_reduction": 0.8},
        {"name": "m16_proj0.7", **small, "rank_projection_param_reduction": 0.7},
        {"name": "m16_proj0.8_rel0.4", **small, "rank_projection_param_reduction": 0.8,
         "penalty_normalization": "relative", "nuclear_norm_coef": 0.4},
        {"name": "m16_proj0.8_sudden", **small, "rank_projection_param_reduction": 0.8, "rank_projection_start": 0.5,
         "rank_projection_end": 0.5},
    ]


def _gpu3() -> list[dict[str, Any]]:
    """Prepared for the next GPU lease: the recipe (rank projection, 80%) over three seeds on resnet14_cifar 32-64-128,
    and on ResNet-18 (CIFAR stem) with its plain baseline, full Fashion-MNIST, 4 epochs."""
    proj = {"rank_projection_param_reduction": 0.8}
    # planned and cut in any rank, as on the CPU (the GPU's default rounds to multiples of 8): the same runs
    runs = [{"name": f"r14_proj0.8_e4_s{seed}", **proj, "seed": seed, "plan_rank_multiple": 1} for seed in (0, 1, 2)]
    # ResNet-18's weights are kept for benchmarks/gpu_latency.py (issue 11's GPU row: latency at batch 256)
    return [*runs, {"name": "r18_proj0.8_s0", "model": "resnet18_cifar", **proj, "save_weights": True},
            {"name": "r18_plain_s0", "model": "resnet18_cifar"}]


def _main_gap() -> list[dict[str, Any]]:
    """What narrows the gap to dense plain at the main job's size (16-32-64, 20,000 images, 2 epochs): when the
    projection schedule runs, how often it projects, smaller batches (twice the steps), and -- for the README's
    statement that a projection has no strength to tune -- the recipe with every conv weight x3 at init."""
    small = {"channels": [16, 32, 64], "epochs": 2, "max_train_samples": 20000}
    proj = {**small, "rank_projection_param_reduction": 0.8}
    return [
        {"name": "m16_proj0.8_early", **proj, "rank_projection_start": 0.05, "rank_projection_end": 0.4},
        {"name": "m16_proj0.8_late", **proj, "rank_projection_start": 0.2, "rank_projection_end": 0.85},
        {"name": "m16_proj0.8_every1", **proj, "rank_projection_every": 1},
        {"name": "m16_plain_b64", **small, "batch_size": 64},
        {"name": "m16_proj0.8_b64", **proj, "batch_size": 64},
        {"name": "m16_proj0.8_init3x", **proj, "init_scale": 3.0},
        {"name": "m16_plain_init3x", **small, "init_scale": 3.0},
    ]


def _main_width() -> list[dict[str, Any]]:
    """The main job's training length (20,000 images, 2 epochs) at wider widths, plain and projected for 80%: is the
    gap to dense plain the capacity left by an 80% cut of a 16-32-64 network? Widened everywhere, and only in the
    last stages (where a ResNet holds most of its parameters at little compute: 7x7 and 14x14 maps). channels_last
    makes the wider networks affordable on a CPU."""
    small = {"epochs": 2, "max_train_samples": 20000, "channels_last": True}
    runs = []
    for channels in ([24, 48, 96], [32, 64, 128], [16, 32, 128], [16, 48, 128]):
        tag = "m" + str(channels[0]) if channels[2] == 4 * channels[0] else "m" + "-".join(map(str, channels))
        runs += [{"name": f"{tag}_plain_cl", **small, "channels": channels},
                 {"name": f"{tag}_proj0.8_cl", **small, "channels": channels, "rank_projection_param_reduction": 0.8}]
    return runs


def _main_b64() -> list[dict[str, Any]]:
    """The main job's model (16-32-128, channels_last, 20,000 images, 2 epochs) at batch 64: twice the updates in
    about the same training time. Does the projected model close more of its gap than plain gains?"""
    small = {"epochs": 2, "max_train_samples": 20000, "channels_last": True, "channels": [16, 32, 128], "batch_size": 64}
    return [{"name": "m16-32-128_plain_cl_b64", **small},
            {"name": "m16-32-128_proj0.8_cl_b64", **small, "rank_projection_param_reduction": 0.8}]


def _speed_pilot() -> list[dict[str, Any]]:
    """Issue 26's pilot at the main job's size (16-32-128, channels_last, 20,000 images, 2 epochs, batch 64): the
    recipe planned for 70% fewer multiply-adds beside the parameter recipe (80% fewer parameters), weights kept for
    benchmarks/speed_size.py."""
    small = {"epochs": 2, "max_train_samples": 20000, "channels_last": True, "channels": [16, 32, 128], "batch_size": 64,
             "save_weights": True}
    return [{"name": "m16-32-128_macs0.7_cl_b64", **small, "rank_projection_macs_reduction": 0.7},
            {"name": "m16-32-128_proj0.8_cl_b64_w", **small, "rank_projection_param_reduction": 0.8}]


def _speed() -> list[dict[str, Any]]:
    """Issue 26: the full recipe (resnet14_cifar 32-64-128, all 60,000 images, 4 epochs, channels_last) planned for 70%
    fewer multiply-adds, three seeds, and the parameter recipe (80% fewer parameters) once more with its weights kept
    for the speed table; the first seed's weights are kept too."""
    full = {"channels_last": True, "budgets": [0.5, 0.6, 0.7, 0.8]}
    runs = [{"name": f"r14_macs0.7_cl_s{seed}", **full, "rank_projection_macs_reduction": 0.7, "seed": seed,
             "save_weights": seed == 0} for seed in (0, 1, 2)]
    return [runs[0], {"name": "r14_proj0.8_cl_s0", **full, "rank_projection_param_reduction": 0.8, "save_weights": True},
            *runs[1:]]


def _gpu_speed() -> list[dict[str, Any]]:
    """Issue 26's GPU row, prepared for a lease: ResNet-18 (CIFAR stem) trained with the CNN recipe planned for 70% fewer
    multiply-adds (in the GPU's rank multiple, 8), its weights kept for benchmarks/gpu_latency.py."""
    return [{"name": "r18_macs0.7_s0", "model": "resnet18_cifar", "rank_projection_macs_reduction": 0.7,
             "channels_last": True, "save_weights": True}]


GRIDS = {"smoke": _smoke, "gpu2": _gpu2, "init_scale": _init_scale, "projection": _projection, "gpu3": _gpu3,
         "main_gap": _main_gap, "main_width": _main_width, "main_b64": _main_b64, "speed_pilot": _speed_pilot,
         "speed": _speed, "gpu_speed": _gpu_speed}


if __name__ == "__main__":
    sys.exit(main())
