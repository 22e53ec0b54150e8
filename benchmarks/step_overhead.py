"""Step-time overhead and efficacy of the smoothness penalties (``SmoothnessPenalty``).

Answers the issue requirement "the penalties must not make training noticeably slower": at most 10%
step-time overhead over plain training (ResNet-18, all three penalties on), while the penalised
quantities fall as fast as with exact per-step penalties.

Three parts, all CPU by default (``torch.set_num_threads``):

1. **Step time** (``--model``, default ``resnet18_cifar``; a fixed random batch, SGD or AdamW). Configurations, interleaved
   in rotated order over ``--rounds`` rounds of ``--block`` timed steps each (warm-up excluded):

   * ``plain``: forward, cross-entropy, backward, optimizer step;
   * ``all_k1``: + all three penalties with ``nuclear_norm_every=1`` (the exact direction of every
     layer recomputed every step);
   * ``all_cached``: + all three penalties on a step that reuses the cached ``U V^T`` (what every step
     but one in ``k`` costs when ``nuclear_norm_every=k``);
   * ``nuclear_cached`` / ``first_order`` / ``second_order``: each penalty alone.

   The direction refresh (``spectral_direction`` on every penalised layer) is timed on its own once
   per round (with the cheaper alternatives of part 3), and the amortised cost of
   ``nuclear_norm_every=k`` is ``(t(all_cached) + t(refresh) / k) / t(plain) - 1``. ``--direct-steps``
   additionally times each ``k`` end to end over ``max(direct_steps, 2k)`` steps.
   Overheads are paired per round (each round's block against that round's ``plain`` block), so a
   change in machine load between rounds cancels; the spread over rounds is reported.

2. **Efficacy** (``resnet14_cifar``, Fashion-MNIST or random data, the same seed and batch stream for
   every run): trains ``--efficacy-steps`` steps for ``nuclear_norm_every`` in ``--ks`` (and a plain
   run for reference) and records, at every step, the *exact* scale-free terms (nuclear norm by SVD,
   first and second order), normalised as ``SmoothnessPenalty`` does. If the cached direction steers
   as well as the exact gradient, the curves for all ``k`` overlap.

3. **Refresh alternatives**: ``current`` (``smooth_hf.training.penalties.spectral_direction`` as installed: an
   ``eigh`` of the float64 Gram matrix since commit 6d0bdb2), ``svd64`` (float64 ``torch.linalg.svd``,
   the original implementation and the accuracy reference) and ``svd32``: time per round and accuracy.

Writes ``<out>/step_overhead<tag>.json``, ``.md`` and ``.png``; the JSON records the run's wall time
(``wall_s``), and BENCHMARKS.md section 4 quotes the committed results. Bigger runs: ``--batch-sizes 64 128
--rounds 12 --direct-steps 100 --efficacy-steps 300``.

    .venv/bin/python benchmarks/step_overhead.py

Shared machines: another busy process on the cores can slow single rounds several-fold, so run it alone.
``OMP_WAIT_POLICY`` (set before the command, e.g. ``OMP_WAIT_POLICY=PASSIVE``), the thread count and the load
average are recorded in the outputs, so runs under different settings can be compared (BENCHMARKS.md section 4
has one of each).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from _common import add_common_arguments, apply_threads, load_average, machine_summary, run_metadata, write_json
from torch import Tensor, nn

import smooth_hf  # noqa: F401  (registers resnet18_cifar / resnet14_cifar with timm)
from smooth_hf import SmoothnessPenalty
from smooth_hf.training.penalties import first_order, nuclear_norm, out_in_weight, second_order, spectral_direction

COEFS = {"nuclear_norm_coef": 10.0, "first_order_coef": 1.0, "second_order_coef": 1.0}
NEVER = 10**12  # nuclear_norm_every that never refreshes after the first call


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def summarize(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {
        "n": int(arr.size),
        "median": float(np.median(arr)),
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "p25": float(np.percentile(arr, 25)),
        "p75": float(np.percentile(arr, 75)),
        "max": float(arr.max()),
    }


def make_optimizer(name: str, params, lr: float | None = None) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3 if lr is None else lr, weight_decay=0.0)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# refresh alternatives (part 3)
# ---------------------------------------------------------------------------------------------
def direction_current(weight: Tensor) -> Tensor:
    """What ``SmoothnessPenalty`` uses: ``smooth_hf.training.penalties.spectral_direction`` as installed."""
    return spectral_direction(weight)


def direction_svd64(weight: Tensor) -> Tensor:
    """``U V^T`` from a float64 ``torch.linalg.svd`` (the package's original implementation; the reference)."""
    with torch.no_grad():
        m = weight.detach().reshape(weight.shape[0], -1).double()
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        return (u @ vh).to(weight.dtype).reshape(weight.shape)


def direction_svd32(weight: Tensor) -> Tensor:
    """``U V^T`` from a float32 SVD."""
    with torch.no_grad():
        m = weight.detach().reshape(weight.shape[0], -1).float()
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        return (u @ vh).to(weight.dtype).reshape(weight.shape)


# "current" first: it is the one SmoothnessPenalty (and the k configs) use.
REFRESH_METHODS = {"current": direction_current, "svd64": direction_svd64, "svd32": direction_svd32}


def refresh_accuracy(methods: dict, matrices: list[Tensor]) -> dict[str, dict[str, float]]:
    """Per method, worst case over ``matrices``: ||D - D_svd64||_F / ||D_svd64||_F, |<M,D>/||M||_* - 1|,
    and ||D||_2 - 1 (a valid nuclear-norm subgradient has spectral norm <= 1)."""
    out = {name: {"max_rel_err_vs_svd64": 0.0, "max_nuclear_identity_err": 0.0, "max_spectral_norm_minus_1": 0.0}
           for name in methods}
    for mat in matrices:
        ref = direction_svd64(mat).double()
        exact = torch.linalg.svdvals(mat.double().reshape(mat.shape[0], -1)).sum()
        for name, method in methods.items():
            d = method(mat).double()
            acc = out[name]
            acc["max_rel_err_vs_svd64"] = max(acc["max_rel_err_vs_svd64"], float((d - ref).norm() / ref.norm()))
            acc["max_nuclear_identity_err"] = max(acc["max_nuclear_identity_err"],
                                                  float(((mat.double() * d).sum() / exact - 1).abs()))
            spec = torch.linalg.svdvals(d.reshape(d.shape[0], -1))[0]
            acc["max_spectral_norm_minus_1"] = max(acc["max_spectral_norm_minus_1"], float(spec - 1))
    return out


def synthetic_matrices(seed: int = 0) -> dict[str, list[Tensor]]:
    """float64 512x4608 (ResNet-18's widest layer) with a geometric spectrum 1..1e-6, and exactly rank 64.

    For the rank-64 matrix the SVD's ``U V^T`` includes arbitrary unit directions for the 448 zero
    singular values while the Gram route gives them 0: both are valid subgradients, so there the error
    against svd64 is expected to be large and only the nuclear identity and ``||D||_2 <= 1`` matter.
    Float32 weights: float64 routes (svd64, a Gram eigh) typically round to the same float32 values.
    """
    g = torch.Generator().manual_seed(seed)
    m, n = 512, 4608
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    geometric = (u * torch.logspace(0, -6, m, dtype=torch.float64)) @ v.T
    s_rank = torch.zeros(m, dtype=torch.float64)
    s_rank[:64] = torch.linspace(1, 0.1, 64, dtype=torch.float64)
    low_rank = (u * s_rank) @ v.T
    return {"geometric_1_to_1e-6": [geometric], "rank_64_of_512": [low_rank]}


def time_one_refresh(layers: list[tuple[str, nn.Module]], method) -> float:
    """ms to recompute every penalised layer's direction with ``method`` (what one refresh costs)."""
    t0 = time.perf_counter()
    for _, module in layers:
        method(out_in_weight(module))
    return (time.perf_counter() - t0) * 1e3


def time_penalty_only(model: nn.Module, runners: list, reps: int) -> dict[str, dict]:
    """ms of ``penalty(step)`` forward + backward alone (no model pass), per config, interleaved."""
    runners = [r for r in runners if r.penalty is not None and r.name != "all_k1"]
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(reps + 1):
        for r in runners[rep % len(runners):] + runners[: rep % len(runners)]:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            total, _ = r.penalty(r.step)
            total.backward()
            if rep:  # rep 0 is warm-up
                samples[r.name].append((time.perf_counter() - t0) * 1e3)
    model.zero_grad(set_to_none=True)
    return {k: summarize(v) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------
# part 1: step time
# ---------------------------------------------------------------------------------------------
class Runner:
    """One configuration: a penalty (or none) on a shared model/optimizer, with its own step counter."""

    def __init__(self, name: str, penalty: SmoothnessPenalty | None):
        self.name, self.penalty, self.step = name, penalty, 0
        self.samples: list[float] = []
        self.block_means: list[float] = []
        self.cpu_samples: list[float] = []
        self.cpu_block_means: list[float] = []

    def __call__(self, model, opt, x, y) -> float:
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if self.penalty is not None:
            total, _ = self.penalty(self.step)
            loss = loss + total
        loss.backward()
        opt.step()
        self.step += 1
        self.last_cpu = (time.process_time() - c0) * 1e3
        return (time.perf_counter() - t0) * 1e3


def step_time(args, batch_size: int) -> dict:
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, in_chans=3, num_classes=10)
    model.train()
    opt = make_optimizer(args.optimizer, model.parameters())
    x = torch.randn(batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (batch_size,))

    def pen(**kw):
        return SmoothnessPenalty.for_model(model, **kw)

    runners = [
        Runner("plain", None),
        Runner("all_k1", pen(**COEFS, nuclear_norm_every=1)),
        Runner("all_cached", pen(**COEFS, nuclear_norm_every=NEVER)),
        Runner("nuclear_cached", pen(nuclear_norm_coef=10.0, nuclear_norm_every=NEVER)),
        Runner("first_order", pen(first_order_coef=1.0)),
        Runner("second_order", pen(second_order_coef=1.0)),
    ]
    n_layers = len(runners[1].penalty.layers)
    n_params = sum(out_in_weight(m).numel() for _, m in runners[1].penalty.layers)
    print(f"\n== step time: {args.model}, batch {batch_size}x3x{args.image_size}x{args.image_size}, "
          f"{args.optimizer}, {n_layers} penalised layers ({n_params / 1e6:.2f}M weights) ==", flush=True)
    for r in runners:  # warm-up, excluded (also does the cached runners' one refresh)
        for _ in range(args.warmup):
            r(model, opt, x, y)
    layers = runners[1].penalty.layers
    methods = REFRESH_METHODS if args.alternatives else {"current": direction_current}
    refresh_rounds: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up (LAPACK workspace, allocator)
        fn(out_in_weight(layers[-1][1]))
    load_before = load_average()
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)]
        for r in order:
            block, cpu = [], []
            for _ in range(args.block):
                block.append(r(model, opt, x, y))
                cpu.append(r.last_cpu)
            r.samples += block
            r.block_means.append(statistics.fmean(block))
            r.cpu_samples += cpu
            r.cpu_block_means.append(statistics.fmean(cpu))
        # one refresh per method per round, paired with this round's plain block
        names = list(methods)
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            refresh_rounds[name].append(time_one_refresh(layers, methods[name]))
        print(f"  round {rnd + 1}/{args.rounds}: "
              + "  ".join(f"{r.name} {r.block_means[-1]:.0f}" for r in runners) + " ms; refresh "
              + "  ".join(f"{n} {v[-1]:.0f}" for n, v in refresh_rounds.items()) + " ms", flush=True)

    # the penalty's own forward + backward (no model pass), on the same weights
    penalty_only = time_penalty_only(model, runners, args.penalty_reps)
    refresh = {name: summarize(v) for name, v in refresh_rounds.items()}
    load_after = load_average()

    plain_blocks = runners[0].block_means
    plain_med = summarize(runners[0].samples)["median"]
    plain_cpu_med = summarize(runners[0].cpu_samples)["median"]
    configs = {}
    for r in runners:
        s = summarize(r.samples)
        sc = summarize(r.cpu_samples)
        ratios = [100 * (b / p - 1) for b, p in zip(r.block_means, plain_blocks, strict=True)]
        cpu_ratios = [100 * (b / p - 1) for b, p in zip(r.cpu_block_means, runners[0].cpu_block_means, strict=True)]
        configs[r.name] = {
            "ms": s,
            "overhead_pct_median_of_samples": 100 * (s["median"] / plain_med - 1),
            "overhead_pct_paired_rounds": summarize(ratios),
            "cpu_ms": sc,
            "cpu_overhead_pct_median_of_samples": 100 * (sc["median"] / plain_cpu_med - 1),
            "cpu_overhead_pct_paired_rounds": summarize(cpu_ratios),
        }
    # amortised nuclear_norm_every=k: penalty step with cached direction + refresh / k, paired per round
    cached = configs["all_cached"]["ms"]["median"]
    per_k = {}
    for k in args.ks:
        entry = {}
        for name, times in refresh_rounds.items():
            rounds = [100 * ((c + f / k) / p - 1)
                      for c, f, p in zip(runners[2].block_means, times, plain_blocks, strict=True)]
            suffix = "" if name == "current" else f"_with_{name}"
            entry[f"ms_amortised{suffix}"] = cached + refresh[name]["median"] / k
            entry[f"overhead_pct{suffix}"] = 100 * ((cached + refresh[name]["median"] / k) / plain_med - 1)
            entry[f"overhead_pct_paired_rounds{suffix}"] = summarize(rounds)
            entry[f"overhead_pct_from_parts{suffix}"] = 100 * (
                penalty_only["all_cached"]["median"] + refresh[name]["median"] / k) / plain_med
        per_k[str(k)] = entry

    direct = {}
    if args.direct_steps > 0:
        direct = direct_per_k(args, model, opt, x, y, runners[0])
    return {
        "batch_size": batch_size,
        "penalised_layers": n_layers,
        "penalised_weights": n_params,
        "steps_per_config": args.rounds * args.block,
        "configs": configs,
        "refresh_ms": refresh,
        "penalty_only_fwd_bwd_ms": penalty_only,
        "per_k": per_k,
        "direct_per_k": direct,
        "loadavg_before_after": [load_before, load_after],
    }


def direct_per_k(args, model, opt, x, y, plain: Runner) -> dict:
    """End-to-end: each k for max(direct_steps, 2k) steps (refreshes included), plain alternated in."""
    out = {}
    for k in args.ks:
        n = max(args.direct_steps, 2 * k)
        runner = Runner(f"k{k}", SmoothnessPenalty.for_model(model, **COEFS, nuclear_norm_every=k))
        runner(model, opt, x, y)  # first call refreshes; then a clean window of n steps
        runner.step = 1  # n steps from here contain exactly n // k refreshes
        smooth, base = [], []
        for i in range(n):
            smooth.append(runner(model, opt, x, y))
            if i % 2 == 0:  # plain every other step keeps the run short and the pairing local
                base.append(plain(model, opt, x, y))
        out[str(k)] = {
            "steps": n,
            "refreshes": n // k,
            "smooth_ms": summarize(smooth),
            "plain_ms": summarize(base),
            "overhead_pct_mean": 100 * (statistics.fmean(smooth) / statistics.fmean(base) - 1),
        }
        print(f"  direct k={k}: {n} steps, mean {out[str(k)]['smooth_ms']['mean']:.0f} ms vs plain "
              f"{out[str(k)]['plain_ms']['mean']:.0f} ms -> {out[str(k)]['overhead_pct_mean']:+.1f}%", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# part 2: efficacy
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_terms(layers: list[tuple[str, nn.Module]]) -> dict[str, float]:
    """Exact unweighted scale-free terms, normalised and averaged as ``SmoothnessPenalty`` does."""
    sums = {"nuclear_norm": 0.0, "first_order": 0.0, "second_order": 0.0}
    for _, module in layers:
        w = out_in_weight(module).detach().double()
        sq = w.pow(2).sum()
        sums["nuclear_norm"] += float(nuclear_norm(w) / (sq.sqrt() * math.sqrt(min(w.shape[0], w[0].numel()))))
        sums["first_order"] += float(first_order(w) / sq)
        sums["second_order"] += float(second_order(w) / sq)
    return {k: v / len(layers) for k, v in sums.items()}


def efficacy_batches(args) -> tuple[list[tuple[Tensor, Tensor]], str]:
    g = torch.Generator().manual_seed(args.seed)
    n = args.efficacy_steps * args.efficacy_batch
    source = args.efficacy_data
    if source == "fashion_mnist":
        try:
            from smooth_hf.data.images import (  # the idx files load_fashion_mnist_local reads
                FASHION_MNIST_DIR,
                read_idx,
            )

            all_images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
            all_labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
            idx = torch.randperm(len(all_images), generator=g)[:n].numpy()
            images = torch.from_numpy(all_images[idx].copy()).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
            labels = torch.from_numpy(all_labels[idx].astype(np.int64))
        except (FileNotFoundError, OSError) as err:
            print(f"  Fashion-MNIST not available ({err}); using random data", flush=True)
            source = "random"
    if source == "random":
        images = torch.randn(n, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
    b = args.efficacy_batch
    return [(images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b]) for i in range(args.efficacy_steps)], source


def efficacy(args) -> dict:
    batches, source = efficacy_batches(args)
    torch.manual_seed(args.seed)
    init = timm.create_model("resnet14_cifar", in_chans=1, num_classes=10)
    print(f"\n== efficacy: resnet14_cifar on {source}, {args.efficacy_steps} steps of batch "
          f"{args.efficacy_batch}, {args.efficacy_optimizer} lr {args.efficacy_lr} ==", flush=True)
    runs = {}
    for k in [None, *args.ks]:
        name = "plain" if k is None else f"k{k}"
        model = copy.deepcopy(init)
        model.train()
        opt = make_optimizer(args.efficacy_optimizer, model.parameters(), args.efficacy_lr)
        pen = SmoothnessPenalty.for_model(model, **COEFS, nuclear_norm_every=k or 1)
        curve = {key: [] for key in ("nuclear_norm", "first_order", "second_order")}
        task_loss, surrogate, step_ms = [], [], []
        for step, (x, y) in enumerate(batches):
            for key, v in exact_terms(pen.layers).items():
                curve[key].append(v)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            task_loss.append(float(loss.detach()))
            if k is not None:
                total, terms = pen(step)
                surrogate.append(terms["nuclear_norm"])
                loss = loss + total
            loss.backward()
            opt.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        for key, v in exact_terms(pen.layers).items():
            curve[key].append(v)
        runs[name] = {
            "nuclear_norm_every": k,
            "exact_terms": curve,
            "surrogate_nuclear_norm": surrogate,
            "task_loss": task_loss,
            "end": {key: v[-1] for key, v in curve.items()},
            "start": {key: v[0] for key, v in curve.items()},
            "step_ms": summarize(step_ms),
        }
        e = runs[name]["end"]
        print(f"  {name:6s} end: nuclear {e['nuclear_norm']:.4f}  first {e['first_order']:.4f}  "
              f"second {e['second_order']:.4f}  task loss (last 10) {statistics.fmean(task_loss[-10:]):.3f}  "
              f"step mean {runs[name]['step_ms']['mean']:.0f} ms", flush=True)
    ref = runs.get("k1")
    if ref is not None:  # how far each k's curve is from the exact-every-step curve
        for run in runs.values():
            run["max_abs_dev_from_k1"] = {
                key: max(abs(a - b) for a, b in zip(run["exact_terms"][key], ref["exact_terms"][key], strict=True))
                for key in run["exact_terms"]
            }
            run["drop_vs_k1_pct"] = {
                key: 100 * (run["start"][key] - run["end"][key]) / (ref["start"][key] - ref["end"][key])
                for key in run["exact_terms"] if ref["start"][key] != ref["end"][key]
            }
    return {"data": source, "steps": args.efficacy_steps, "batch_size": args.efficacy_batch,
            "optimizer": args.efficacy_optimizer, "lr": args.efficacy_lr, "runs": runs}


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = ["# Step-time overhead of the smoothness penalties\n",
             f"Command: `{result['command']}`  ",
             f"Machine: {machine_summary(result['machine'])}  ",
             "Coefficients: nuclear 10, first order 1, second order 1 (scale_free, first/last layer skipped).\n"]
    for t in result["step_time"]:
        lines += [f"## Step time: {result['arguments']['model']}, batch {t['batch_size']} "
                  f"({t['steps_per_config']} timed steps per config, interleaved; load avg before/after "
                  f"{t['loadavg_before_after']})\n",
                  "| config | wall median ms | wall mean ms | wall p25-p75 ms | overhead % (medians) | "
                  "overhead % paired rounds: median [min, max] | CPU-time overhead % paired: median [min, max] | "
                  "penalty alone fwd+bwd ms (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, c in t["configs"].items():
            s, o, oc = c["ms"], c["overhead_pct_paired_rounds"], c["cpu_overhead_pct_paired_rounds"]
            alone = t["penalty_only_fwd_bwd_ms"].get(name)
            lines.append(f"| {name} | {s['median']:.0f} | {s['mean']:.0f} | {s['p25']:.0f}-{s['p75']:.0f} | "
                         f"{c['overhead_pct_median_of_samples']:+.1f} | {o['median']:+.1f} [{o['min']:+.1f}, {o['max']:+.1f}] | "
                         f"{oc['median']:+.1f} [{oc['min']:+.1f}, {oc['max']:+.1f}] | "
                         f"{'' if alone is None else format(alone['median'], '.0f')} |")
        lines += ["", "Refresh of all directions (ms, median [min, max]): " + ", ".join(
            f"{m} {s['median']:.0f} [{s['min']:.0f}, {s['max']:.0f}]" for m, s in t["refresh_ms"].items()), ""]
        lines += ["Amortised `nuclear_norm_every=k` (all three penalties): overhead = (all_cached + refresh / k) / plain - 1, "
                  "per round (paired), median [min, max] over rounds; 'from parts' = (penalty alone fwd+bwd + "
                  "refresh / k) / plain.\n"]
        for name in t["refresh_ms"]:
            suffix = "" if name == "current" else f"_with_{name}"
            lines += [f"Refresh by **{name}**{' (smooth_hf.training.penalties.spectral_direction as installed)' if name == 'current' else ''}:\n",
                      "| k | amortised ms | overhead % (medians) | overhead % paired rounds | from parts % |",
                      "|---|---|---|---|---|"]
            for k, v in t["per_k"].items():
                o = v[f"overhead_pct_paired_rounds{suffix}"]
                lines.append(f"| {k} | {v[f'ms_amortised{suffix}']:.0f} | {v[f'overhead_pct{suffix}']:+.1f} | "
                             f"{o['median']:+.1f} [{o['min']:+.1f}, {o['max']:+.1f}] | {v[f'overhead_pct_from_parts{suffix}']:+.1f} |")
            lines.append("")
        if t["direct_per_k"]:
            lines += ["", "Direct end-to-end (refresh steps included):", "",
                      "| k | steps | refreshes | smooth mean ms | plain mean ms | overhead % |", "|---|---|---|---|---|---|"]
            for k, v in t["direct_per_k"].items():
                lines.append(f"| {k} | {v['steps']} | {v['refreshes']} | {v['smooth_ms']['mean']:.0f} | "
                             f"{v['plain_ms']['mean']:.0f} | {v['overhead_pct_mean']:+.1f} |")
        lines.append("")
    if result.get("refresh_accuracy"):
        lines += ["## Refresh alternatives: accuracy (worst case over the matrices)\n",
                  "| method | matrices | max rel err of UV^T vs svd64 | max abs(<M,D>/nuclear - 1) | max (spectral norm of D) - 1 |",
                  "|---|---|---|---|---|"]
        for m, per in result["refresh_accuracy"].items():
            for mats, a in per.items():
                lines.append(f"| {m} | {mats} | {a['max_rel_err_vs_svd64']:.1e} | {a['max_nuclear_identity_err']:.1e} | "
                             f"{a['max_spectral_norm_minus_1']:.1e} |")
        lines.append("")
    if result.get("efficacy"):
        e = result["efficacy"]
        lines += [f"## Efficacy: resnet14_cifar, {e['data']}, {e['steps']} steps, batch {e['batch_size']}, "
                  f"{e['optimizer']} lr {e['lr']} (exact scale-free terms)\n",
                  "| run | nuclear start -> end | first order start -> end | second order start -> end | "
                  "drop vs k=1 (nuc / 1st / 2nd) % | max abs dev from k=1 curve (nuc / 1st) | task loss (mean last 10) | train step mean ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in e["runs"].items():
            d = r.get("drop_vs_k1_pct", {})
            dev = r.get("max_abs_dev_from_k1", {})
            lines.append(
                f"| {name} | {r['start']['nuclear_norm']:.4f} -> {r['end']['nuclear_norm']:.4f} | "
                f"{r['start']['first_order']:.4f} -> {r['end']['first_order']:.4f} | "
                f"{r['start']['second_order']:.4f} -> {r['end']['second_order']:.4f} | "
                f"{d.get('nuclear_norm', float('nan')):.0f} / {d.get('first_order', float('nan')):.0f} / "
                f"{d.get('second_order', float('nan')):.0f} | "
                f"{dev.get('nuclear_norm', float('nan')):.4f} / {dev.get('first_order', float('nan')):.4f} | "
                f"{statistics.fmean(r['task_loss'][-10:]):.3f} | {r['step_ms']['mean']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0, 0]
    top = 60.0
    width = 0.8 / max(1, len(result["step_time"]))
    for i, t in enumerate(result["step_time"]):
        plain_ms = t["configs"]["plain"]["ms"]["median"]
        alone = t["penalty_only_fwd_bwd_ms"]
        labels, med, lo, hi, parts = [], [], [], [], []
        for name in ("nuclear_cached", "first_order", "second_order", "all_cached"):
            o = t["configs"][name]["overhead_pct_paired_rounds"]
            labels.append(name)
            med.append(o["median"]), lo.append(o["median"] - o["min"]), hi.append(o["max"] - o["median"])
            parts.append(100 * alone[name]["median"] / plain_ms)
        for name in t["refresh_ms"]:
            suffix = "" if name == "current" else f"_with_{name}"
            for k, v in t["per_k"].items():
                o = v[f"overhead_pct_paired_rounds{suffix}"]
                labels.append(f"all, k={k} ({name})")
                med.append(o["median"]), lo.append(o["median"] - o["min"]), hi.append(o["max"] - o["median"])
                parts.append(v[f"overhead_pct_from_parts{suffix}"])
        xs = np.arange(len(labels)) + (i - (len(result["step_time"]) - 1) / 2) * width
        shown = np.minimum(med, top)
        ax.bar(xs, shown, width=width * 0.95, yerr=[np.clip(np.minimum(lo, shown + 30), 0, None), np.clip(np.minimum(hi, top - shown + 5), 0, None)],
               capsize=3, alpha=0.8, label=f"batch {t['batch_size']}, paired rounds (plain {plain_ms:.0f} ms)")
        ax.scatter(xs, np.minimum(parts, top), marker="D", s=22, color="black", zorder=3,
                   label="from parts: (penalty alone + refresh/k) / plain" if i == 0 else None)
        for x, m in zip(xs, med, strict=True):
            if m > top:
                ax.text(x, top - 2, f"{m:.0f}%", ha="center", va="top", fontsize=7, rotation=90, color="white")
        ax.set_xticks(np.arange(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.axhline(10, color="red", ls="--", lw=1, label="10% target")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylim(-25, top)
    ax.set_ylabel("step-time overhead vs plain (%)")
    ax.set_title(f"{result['arguments']['model']} step overhead: bar = median of per-round paired overheads, whiskers = min/max;\n"
                 "k: all_cached step + refresh / k, refresh method in brackets (bars clipped at 60%)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    if result.get("efficacy"):
        e = result["efficacy"]
        panels = [("nuclear_norm", axes[0, 1]), ("first_order", axes[1, 0]), ("second_order", axes[1, 1])]
        for key, ax in panels:
            for name, r in e["runs"].items():
                style = {"color": "gray", "ls": ":"} if name == "plain" else {}
                lw = 2.5 if name == "k1" else 1.2
                (line,) = ax.plot(r["exact_terms"][key], label=name if name == "plain" else f"k={r['nuclear_norm_every']}",
                                  lw=lw, **style)
                if key == "nuclear_norm" and name not in ("plain", "k1") and r["surrogate_nuclear_norm"]:
                    ax.plot(r["surrogate_nuclear_norm"], lw=0.7, ls="--", alpha=0.7, color=line.get_color())
            ax.set_xlabel("step")
            ax.set_title(f"exact {key} term (scale-free, mean over layers)"
                         + ("\n(dashed thin: surrogate <W, UV^T> seen by k>1)" if key == "nuclear_norm" else ""),
                         fontsize=9)
            ax.legend(fontsize=8)
        fig.suptitle(f"resnet14_cifar, {e['data']}, {e['optimizer']} lr {e['lr']}, batch {e['batch_size']}; "
                     "coefs nuclear 10 / first 1 / second 1", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(result: dict) -> None:
    for t in result["step_time"]:
        plain = t["configs"]["plain"]["ms"]
        print(f"\n{result['arguments']['model']} batch {t['batch_size']}: plain median {plain['median']:.0f} ms "
              f"(mean {plain['mean']:.0f}, p25-p75 {plain['p25']:.0f}-{plain['p75']:.0f})")
        print(f"{'config':>16} {'median ms':>10} {'mean ms':>8} {'ovh % (med)':>12} {'paired rounds: med [min,max]':>30}"
              f" {'CPU-time paired: med [min,max]':>32} {'alone ms':>9}")
        for name, c in t["configs"].items():
            o, oc = c["overhead_pct_paired_rounds"], c["cpu_overhead_pct_paired_rounds"]
            alone = t["penalty_only_fwd_bwd_ms"].get(name)
            print(f"{name:>16} {c['ms']['median']:10.0f} {c['ms']['mean']:8.0f} {c['overhead_pct_median_of_samples']:+12.1f} "
                  f"{o['median']:+14.1f} [{o['min']:+.1f}, {o['max']:+.1f}]"
                  f"{oc['median']:+14.1f} [{oc['min']:+.1f}, {oc['max']:+.1f}]"
                  f" {'' if alone is None else format(alone['median'], '9.0f')}")
        print("refresh (all layers) ms median: " + ", ".join(f"{m} {s['median']:.0f}" for m, s in t["refresh_ms"].items()))
        for k, v in t["per_k"].items():
            parts = []
            for name in t["refresh_ms"]:
                suffix = "" if name == "current" else f"_with_{name}"
                o = v[f"overhead_pct_paired_rounds{suffix}"]
                parts.append(f"{name} {o['median']:+.1f}% [{o['min']:+.1f}, {o['max']:+.1f}]")
            print(f"  k={k:>3} amortised overhead, paired rounds median [min, max]: " + "   ".join(parts))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18_cifar", help="timm model of the step-time part (smoke runs: a smaller one)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 10, 25, 50], help="nuclear_norm_every values")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per config")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    p.add_argument("--block", type=int, default=1, help="timed steps per config per round")
    p.add_argument("--penalty-reps", type=int, default=10, help="reps of the penalty-alone fwd+bwd timing")
    p.add_argument("--direct-steps", type=int, default=0,
                   help="also time each k end to end over max(N, 2k) steps (0 = off; slow on CPU)")
    p.add_argument("--no-alternatives", dest="alternatives", action="store_false",
                   help="skip the float32-SVD / Gram-eigh refresh alternatives")
    p.add_argument("--efficacy-steps", type=int, default=80)
    p.add_argument("--efficacy-batch", type=int, default=32)
    p.add_argument("--efficacy-optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--efficacy-lr", type=float, default=1e-3)
    p.add_argument("--efficacy-data", choices=["fashion_mnist", "random"], default="fashion_mnist")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-efficacy", action="store_true")
    add_common_arguments(p, threads=2)
    args = p.parse_args(argv)

    apply_threads(args)
    load = load_average()
    if load is not None and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load} -- other processes share the CPUs; timings will be noisy "
              "(see the module docstring about OMP_WAIT_POLICY=PASSIVE)", flush=True)
    start = time.perf_counter()
    result = {
        **run_metadata(__file__, argv, args),
        "coefs": COEFS,
        "step_time": [],
    }
    if not args.skip_timing:
        for bs in args.batch_sizes:
            result["step_time"].append(step_time(args, bs))
        if args.alternatives:
            torch.manual_seed(args.seed)
            model = timm.create_model(args.model, in_chans=3, num_classes=10)
            layers = [out_in_weight(m).detach() for _, m in SmoothnessPenalty.for_model(model, **COEFS).layers]
            mats = {"resnet18_init_layers": layers, **synthetic_matrices(args.seed)}
            alts = {name: fn for name, fn in REFRESH_METHODS.items() if name != "svd64"}  # svd64 is the reference
            per_set = {mname: refresh_accuracy(alts, ms) for mname, ms in mats.items()}
            result["refresh_accuracy"] = {name: {mname: per_set[mname][name] for mname in mats} for name in alts}
    if not args.skip_efficacy:
        result["efficacy"] = efficacy(args)
    result["wall_s"] = time.perf_counter() - start

    stem = args.output_dir / f"step_overhead{args.tag}"
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result, stem.with_suffix(".png"))
    print_summary(result)
    print(f"\nwall {result['wall_s']:.0f} s; wrote {stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
