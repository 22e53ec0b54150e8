"""Compressing billion-parameter LLMs on one machine: time and peak memory against model size, streamed and whole.

Random-weight models of the shapes people use (weights and tokens are random: the numbers are time and memory,
not quality), compressed at ``--param_reduction`` with ``method="svd"`` and ``method="whitened"`` (calibration:
``--calibration_sequences`` random sequences of ``--sequence_length`` tokens), block-streamed (the default, see
smooth_hf.lowrank.streaming) and, where it fits, whole (``compress(..., streaming=False)``, the path before
streaming). Each configuration runs in its own process, so that its peak resident memory (``ru_maxrss``) is its own.

    python benchmarks/llm_scale.py --threads 2                                   # every shape here, CPU
    python benchmarks/llm_scale.py --shapes llama-58m --methods whitened --paths streamed,whole --dtypes float32
    python benchmarks/llm_scale.py --shapes llama2-7b --dtypes bfloat16 --methods whitened --device cuda \\
        --calibration_sequences 128 --sequence_length 2048 --tag h100   # a GPU: the model stays in CPU memory

Writes ``benchmarks/results/llm_scale[_TAG].{json,md}``: per run the parameters, the model's bytes, the time, the
peak resident memory, and the peak against the targets ``1.3 x model + 1 GB`` (whitened) and ``1.2 x model + 1 GB``
(svd); per method the time per parameter against the 134M model's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from _common import RESULTS_DIR, machine_summary, run_metadata, write_json

# name -> (LlamaConfig / Qwen2Config keyword arguments); vocabularies and widths of the real models.
SHAPES = {
    "llama-58m": dict(family="llama", hidden_size=512, num_hidden_layers=8, intermediate_size=1376,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
    "llama-134m": dict(family="llama", hidden_size=768, num_hidden_layers=12, intermediate_size=2048,
                       num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "llama-374m": dict(family="llama", hidden_size=1024, num_hidden_layers=24, intermediate_size=2816,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "tinyllama-1.1b": dict(family="llama", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "qwen2-0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama2-7b": dict(family="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2-70b": dict(family="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
ARITHMETIC_SHAPES = ["llama2-7b", "llama2-70b"]  # not built here: the report's arithmetic for them
CPU_SHAPES = ["llama-58m", "llama-134m", "llama-374m", "tinyllama-1.1b", "qwen2-0.5b"]
REFERENCE = "llama-134m"  # time per parameter is compared with this shape's
GB = 1 << 30
# Whole-model compression of a shape is skipped when its measured need (about 8x the model for whitened) would
# not fit this machine: it is the path streaming replaces.
WHOLE_MAX_PARAMETERS = 400_000_000


def build(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    """The random-weight model, built directly in ``dtype`` (no float32 copy of a bf16 model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(SHAPES[shape])
    family = kwargs.pop("family")
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(**kwargs)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def calibration(vocab: int, sequences: int, length: int, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sequences, length), generator=g)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch)]


def one(spec: dict) -> dict:
    """One configuration, in this process (the parent starts one process per configuration)."""
    from smooth_hf.lowrank import LowRankConfig, compress, count_parameters

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    dtype = getattr(torch, spec["dtype"])
    model = build(spec["shape"], dtype)
    if spec["device"]:
        torch.cuda.reset_peak_memory_stats() if spec["device"].startswith("cuda") else None
    params = count_parameters(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = LowRankConfig(param_reduction=spec["param_reduction"], method=spec["method"])
    data = None
    if spec["method"] == "whitened":
        data = calibration(model.config.vocab_size, spec["sequences"], spec["length"], spec["batch"])
    start = time.perf_counter()
    compress(model, config, calibration_data=data, streaming=spec["path"] == "streamed", device=spec["device"] or None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {**spec, "parameters": params, "model_bytes": model_bytes, "seconds": round(seconds, 2),
           "peak_rss_bytes": peak, "rss_after_build_bytes": rss_built,
           "reduction": round(model.lowrank_report.reduction, 4), "layers_factorised": len(model.lowrank_config.ranks)}
    if spec["device"].startswith("cuda"):
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=",".join(CPU_SHAPES), help=f"Comma-separated, of {sorted(SHAPES)}.")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--methods", default="svd,whitened")
    p.add_argument("--paths", default="streamed,whole", help="streamed (the default of compress) and/or whole "
                   f"(skipped above {WHOLE_MAX_PARAMETERS:,} parameters: it does not fit this machine).")
    p.add_argument("--param_reduction", type=float, default=0.3)
    p.add_argument("--calibration_sequences", type=int, default=16)
    p.add_argument("--sequence_length", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="Calibration sequences per forward pass.")
    p.add_argument("--device", default="", help="e.g. cuda: the passes run there, the model stays in CPU memory.")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default).")
    p.add_argument("--tag", default="", help="Suffix of the result file names.")
    p.add_argument("--resume", action="store_true", help="Keep the runs the result file already holds; run the others.")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration (JSON)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(json.loads(args.one))))
        return {}
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}: choose from {sorted(SHAPES)}")
    name = "llm_scale" + (f"_{args.tag}" if args.tag else "")
    done = json.loads((RESULTS_DIR / f"{name}.json").read_text())["rows"] if args.resume else []
    done = [r for r in done if "error" not in r]
    rows = list(done)
    payload = _write(rows, argv, args) if done else {}
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for method in args.methods.split(","):
                for path in args.paths.split(","):
                    spec = {"shape": shape, "dtype": dtype, "method": method, "path": path, "device": args.device,
                            "param_reduction": args.param_reduction, "sequences": args.calibration_sequences,
                            "length": args.sequence_length, "batch": args.batch, "threads": args.threads}
                    if path == "whole" and _parameters(shape) > WHOLE_MAX_PARAMETERS:
                        continue
                    if any(all(r.get(k) == v for k, v in spec.items()) for r in done):
                        continue
                    row = _in_own_process(spec)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    payload = _write(rows, argv, args)  # after every run: a long sweep cut short keeps what finished
    print(markdown(payload) if payload else "nothing ran")
    return payload


def _write(rows: list[dict], argv: list[str] | None, args: argparse.Namespace) -> dict:
    _add_ratios(rows)
    rates = fit_time(rows)
    shapes = list(dict.fromkeys([r["shape"] for r in rows] + ARITHMETIC_SHAPES))
    payload = {**run_metadata(__file__, argv, args), "rows": rows, "seconds_per_operation": rates,
               "arithmetic": {shape: arithmetic(shape, args.calibration_sequences, args.sequence_length)
                              for shape in shapes}}
    name = "llm_scale" + (f"_{args.tag}" if args.tag else "")
    write_json(RESULTS_DIR / f"{name}.json", payload)
    (RESULTS_DIR / f"{name}.md").write_text(markdown(payload) + "\n")
    return payload


def _parameters(shape: str) -> int:
    s = SHAPES[shape]
    h, i, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # the projections and the two RMSNorms
    if s["family"] == "qwen2":
        per_layer += h + 2 * kv  # Qwen2's q, k and v projections have biases
    return layers * per_layer + h + vocab * h * (1 if s.get("tie_word_embeddings") else 2)  # + the final norm


def _in_own_process(spec: dict) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
                "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _add_ratios(rows: list[dict]) -> None:
    for row in rows:
        if "error" in row:
            continue
        slope = 1.3 if row["method"] == "whitened" else 1.2
        row["target_bytes"] = int(slope * row["model_bytes"] + GB)
        row["peak_over_model"] = round(row["peak_rss_bytes"] / row["model_bytes"], 2)
        # What compressing added to the process (Python, torch and transformers take about 1 GB before any model):
        row["compress_bytes"] = row["peak_rss_bytes"] - row["rss_after_build_bytes"]
        row["compress_over_model"] = round(row["compress_bytes"] / row["model_bytes"], 2)
        row["meets_memory_target"] = row["peak_rss_bytes"] <= row["target_bytes"]
        row["seconds_per_million_parameters"] = round(row["seconds"] / row["parameters"] * 1e6, 4)
    for row in rows:
        if "error" in row:
            continue
        reference = next((r for r in rows if "error" not in r and r["shape"] == REFERENCE and
                          all(r[k] == row[k] for k in ("dtype", "method", "path"))), None)
        if reference is not None:
            row["time_per_parameter_vs_134m"] = round(row["seconds_per_million_parameters"]
                                                      / reference["seconds_per_million_parameters"], 2)


# ---------------------------------------------------------------------------------------------- arithmetic
# What streaming a shape holds and computes, from its widths alone: the 7B and 70B rows of the report, and a check of
# the same arithmetic against the shapes measured here. Float64 statistics and decompositions, as compress keeps them.
def _linears(shape: str) -> list[tuple[int, int]]:
    """The (out, in) of every Linear compress targets by default (the blocks' projections, an untied LM head)."""
    s = SHAPES[shape]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    block = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    head = [] if s.get("tie_word_embeddings") else [(s["vocab_size"], h)]
    return block * layers + head


def _paying_rank(out: int, inp: int) -> int:
    return min(out, inp, -(-out * inp // (out + inp)) - 1)


def arithmetic(shape: str, sequences: int, length: int) -> dict:
    """Bytes and operation counts of block-streamed compression of ``shape`` (float64 math, bf16 model).

    * one block's Grams: one ``in x in`` matrix per distinct input (attention, its output projection, the MLP, the
      down projection), the most streaming holds at once;
    * the largest eigen-problem (the widest input);
    * calibration activations: one block's input and output for every calibration token, in the model's dtype;
    * set aside between the passes (offloaded to disk beyond 64 MB): every layer's vectors up to its paying rank, in
      float32 (:mod:`smooth_hf.lowrank.offload`);
    * operations: ``sum m n min(m, n) + min(m, n)^3`` over the layers (+ ``in^3`` per Gram for whitened), the cost
      model fitted to the measured times in :func:`fit_time`.
    """
    s = SHAPES[shape]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    linears = _linears(shape)
    svd_aside = sum(min(o, n) * _paying_rank(o, n) * 4 for o, n in linears)
    whitened_aside = sum((n + min(o, n)) * _paying_rank(o, n) * 4 for o, n in linears)
    decompositions = sum(o * n * min(o, n) + min(o, n) ** 3 for o, n in linears)
    grams = layers * (3 * h**3 + i**3) + (0 if s.get("tie_word_embeddings") else h**3)
    return {"parameters": _parameters(shape), "bf16_bytes": 2 * _parameters(shape),
            "block_gram_bytes": 8 * (3 * h * h + i * i), "largest_eigenproblem": max(h, i),
            "calibration_activation_bytes": 2 * 2 * sequences * length * h,
            "set_aside_bytes": {"svd": svd_aside, "whitened": whitened_aside},
            "operations": {"svd": decompositions, "whitened": decompositions + grams}}


def fit_time(rows: list[dict]) -> dict[str, float]:
    """Seconds per operation of :func:`arithmetic`'s count, per method, least squares through the origin over the
    streamed float32 runs measured here."""
    rates = {}
    for method in ("svd", "whitened"):
        measured = [r for r in rows if "error" not in r and r["method"] == method and r["path"] == "streamed"
                    and r["dtype"] == "float32" and not r["device"] and r["shape"] in SHAPES]
        ops = [arithmetic(r["shape"], r["sequences"], r["length"])["operations"][method] for r in measured]
        if measured:
            rates[method] = sum(o * r["seconds"] for o, r in zip(ops, measured, strict=True)) / sum(o * o for o in ops)
    return rates


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", "", f"Machine: {machine_summary(payload['machine'])}; {payload['date']}.",
             "", "Peak RSS: the process's (ru_maxrss), Python and the libraries included; added: the peak less the peak "
             "once the model was built (what compressing took beyond building).", "",
             "| shape | parameters | dtype | method | path | model GB | time (s) | s / M params | vs 134M | peak RSS GB "
             "| added GB | added / model | target GB | meets |", "|" + "---|" * 14]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | | {r['dtype']} | {r['method']} | {r['path']} | | failed: {r['error']} |"
                         + " |" * 7)
            continue
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e6:,.0f}M | {r['dtype']} | {r['method']} | {r['path']} | "
            f"{r['model_bytes'] / GB:.2f} | {r['seconds']:.1f} | {r['seconds_per_million_parameters']:.3f} | "
            f"{r.get('time_per_parameter_vs_134m', '')} | {r['peak_rss_bytes'] / GB:.2f} | {r['compress_bytes'] / GB:.2f} | "
            f"{r['compress_over_model']} | {r['target_bytes'] / GB:.2f} | {'yes' if r['meets_memory_target'] else 'no'} |")
    return "\n".join(lines + ["", arithmetic_markdown(payload)])


def arithmetic_markdown(payload: dict) -> str:
    """The arithmetic table: what streaming holds per shape, and the time the fitted cost model predicts here."""
    rates = payload.get("seconds_per_operation", {})
    measured = {(r["shape"], r["method"]): r["seconds"] for r in payload["rows"]
                if "error" not in r and r["path"] == "streamed" and r["dtype"] == "float32" and not r["device"]}
    lines = ["Arithmetic (`arithmetic()`, float64 statistics, bf16 model): one block's Grams, the widest eigen-problem, "
             "the calibration activations of one block (input and output), the vectors set aside between the passes "
             "(float32, on disk beyond 64 MB), and the time of the decompositions at the seconds per operation fitted to the "
             "streamed float32 runs above (measured in brackets).", "",
             "| shape | parameters | bf16 GB | block Grams GB | widest eigen-problem | activations GB | set aside GB "
             "(svd / whitened) | time here, svd | time here, whitened |", "|" + "---|" * 9]
    for shape, a in payload.get("arithmetic", {}).items():
        times = []
        for method in ("svd", "whitened"):
            predicted = a["operations"][method] * rates[method] if method in rates else None
            seen = measured.get((shape, method))
            times.append(_duration(predicted) + (f" ({_duration(seen)})" if seen else ""))
        lines.append(f"| {shape} | {a['parameters'] / 1e9:.2f}B | {a['bf16_bytes'] / GB:.1f} | {a['block_gram_bytes'] / GB:.2f} | "
                     f"{a['largest_eigenproblem']:,} | {a['calibration_activation_bytes'] / GB:.3f} | "
                     f"{a['set_aside_bytes']['svd'] / GB:.1f} / {a['set_aside_bytes']['whitened'] / GB:.1f} | "
                     f"{times[0]} | {times[1]} |")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:,.0f} s" if seconds < 7200 else f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
