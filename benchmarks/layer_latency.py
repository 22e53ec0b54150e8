"""Where a cut's time goes, layer by layer: do multiply-adds predict what a factorised layer saves on this device?

For each ``--models`` entry (the specs of ``benchmarks/speed_size.py``), the model is cut at ``--budget`` of
``--rule`` (``compress``'s own plan, multiply-adds priced on the benchmark's input shape), and every factorised layer
is timed alone, dense and at its rank (``smooth_hf.lowrank.timing.median_latency``, the ``keep_slower_dense`` timer:
eager PyTorch, a random input of the shape the layer sees), in the usual memory format and in channels_last, at each
batch size. The table puts each layer's share of the multiply-adds removed beside its share of the time removed: where
they differ, a plan priced in multiply-adds cuts layers whose cut saves little time.

    python benchmarks/layer_latency.py --models 'resnet14_cifar=<folder>/r14_macs0.7_cl_s0-*.safetensors' \\
        --rule macs_reduction --budget 0.7 --batch_sizes 1,64 --threads 2

Writes ``layer_latency<tag>.{json,md}`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from _common import add_common_arguments, apply_threads, run_metadata, write_json
from speed_size import example_inputs, load_model

from smooth_hf.lowrank import LowRankConfig, compress
from smooth_hf.lowrank.cost import trace_layers
from smooth_hf.lowrank.timing import median_latency, random_input


def layer_times(dense: torch.nn.Module, cut: torch.nn.Module, x: torch.Tensor, channels_last: bool) -> list[dict]:
    """Every factorised layer of ``cut`` timed alone against its dense original, on the input shape it sees."""
    calls = trace_layers(dense, x)
    rows = []
    for layer in cut.lowrank_report.factorised:
        call = calls.get(layer.name)
        if call is None or call.input_shape is None:
            continue
        original = dense.get_submodule(layer.name)
        replaced = cut.get_submodule(layer.name)
        inputs = random_input(call.input_shape, call.input_dtype, "cpu")
        modules = [original, replaced]
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            modules = [copy.deepcopy(m).to(memory_format=torch.channels_last) for m in modules]
        dense_s, cut_s = (median_latency(m, inputs) for m in modules)
        out, inp, kh, kw = layer.shape
        macs_dense = out * inp * kh * kw * call.positions
        macs_cut = macs_dense if layer.rank is None else layer.rank * (inp * kh * kw + out) * call.positions
        rows.append({"layer": layer.name, "rank": layer.rank, "full_rank": layer.full_rank,
                     "input_shape": list(call.input_shape), "macs_dense": macs_dense, "macs_cut": macs_cut,
                     "ms_dense": 1000 * dense_s, "ms_cut": 1000 * cut_s})
    return rows


def summary(rows: list[dict]) -> dict[str, float]:
    macs_saved = sum(r["macs_dense"] - r["macs_cut"] for r in rows)
    ms_saved = sum(r["ms_dense"] - r["ms_cut"] for r in rows)
    return {"macs_dense": sum(r["macs_dense"] for r in rows), "macs_cut": sum(r["macs_cut"] for r in rows),
            "ms_dense": sum(r["ms_dense"] for r in rows), "ms_cut": sum(r["ms_cut"] for r in rows),
            "macs_saved": macs_saved, "ms_saved": ms_saved}


def markdown(name: str, batch: int, layout: str, rows: list[dict], whole: dict[str, float]) -> str:
    total = summary(rows)
    lines = [f"### {name}, batch {batch}, {layout}: the model {whole['dense_ms']:.2f} ms dense, "
             f"{whole['cut_ms']:.2f} ms cut ({whole['dense_ms'] / whole['cut_ms']:.2f}x); its layers alone "
             f"{total['ms_dense']:.2f} ms dense, {total['ms_cut']:.2f} ms cut", "",
             "| layer | input | rank | MACs kept | time kept | share of MACs removed | share of time removed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['input_shape'][1:]))} | {r['rank'] or 'dense'}/{r['full_rank']} | "
            f"{r['macs_cut'] / r['macs_dense']:.0%} | {r['ms_cut'] / r['ms_dense']:.0%} | "
            f"{(r['macs_dense'] - r['macs_cut']) / max(total['macs_saved'], 1):.0%} | "
            f"{(r['ms_dense'] - r['ms_cut']) / total['ms_saved'] if total['ms_saved'] else 0:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="Trained dense models (benchmarks/speed_size.py specs).")
    p.add_argument("--rule", default="macs_reduction", choices=["param_reduction", "macs_reduction"])
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--batch_sizes", type=lambda t: [int(v) for v in t.split(",") if v], default=[1, 64])
    p.add_argument("--image_size", type=int, default=28, help="Input size of image models without a fixed one.")
    p.add_argument("--seq_len", type=int, default=64)
    add_common_arguments(p, threads=2)
    args = p.parse_args(argv)
    apply_threads(args)
    results, sections = [], []
    for spec in args.models:
        name, dense, is_text = load_model(spec)
        priced = example_inputs(dense, is_text, 1, args)["pixel_values"]
        cut = compress(copy.deepcopy(dense), LowRankConfig(**{args.rule: args.budget}), example_inputs=priced)
        for batch in args.batch_sizes:
            x = example_inputs(dense, is_text, batch, args)["pixel_values"]
            for layout in ("contiguous", "channels_last"):
                rows = layer_times(dense, cut, x, layout == "channels_last")
                models = [dense, cut]
                inputs = x
                if layout == "channels_last":
                    models = [copy.deepcopy(m).to(memory_format=torch.channels_last) for m in models]
                    inputs = x.contiguous(memory_format=torch.channels_last)
                whole = {"dense_ms": 1000 * median_latency(models[0], inputs),
                         "cut_ms": 1000 * median_latency(models[1], inputs)}
                results.append({"model": name, "batch": batch, "layout": layout, "rule": args.rule,
                                "budget": args.budget, "whole": whole, "layers": summary(rows), "rows": rows})
                sections.append(markdown(name, batch, layout, rows, whole))
                print(sections[-1] + "\n", flush=True)
    payload = {"meta": run_metadata(__file__, argv, args), "results": results}
    stem = Path(args.output_dir) / f"layer_latency{args.tag}"
    write_json(stem.parent / f"{stem.name}.json", payload)
    (stem.parent / f"{stem.name}.md").write_text("\n\n".join(sections) + "\n")
    return payload


if __name__ == "__main__":
    main()
