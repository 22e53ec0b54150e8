"""An independent check of the whitened truncation on all-MiniLM-L6-v2, and what factorising its word embeddings adds.

Written apart from ``smooth_hf.lowrank`` on purpose -- its own input hooks, Grams, Cholesky factors, SVDs and a greedy
global allocator -- and run on the same sentences as ``benchmarks/whitening.py --parts embed`` (its data helpers:
the same 256 calibration sentences, the same held-out sentences, the same embedding and cosine), next to the
library's own ``svd`` and ``whitened`` cuts. Two questions:

1. does the library compute what the method says? (the independent cut should score the same cosine);
2. the word-embedding matrix is half of MiniLM and the library never factorises an ``nn.Embedding``: what if the
   global allocation could cut it too? Its input is one-hot, so its Gram is the diagonal of token counts on the
   calibration sentences; tokens never seen there get ``alpha x`` the mean count, so that they are not dropped.

    pip install -e ".[bench]"
    python benchmarks/whitening_crosscheck.py --num_threads 2

Writes ``benchmarks/results/whitening_crosscheck.{json,md}``. Budgets are fractions of the whole model's parameters.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import heapq
import json
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from _common import machine_info  # noqa: E402
from torch import nn  # noqa: E402
from whitening import embeddings, floats, load_text, model_inputs  # noqa: E402
from whitening import parse_args as whitening_args  # noqa: E402

from smooth_hf.lowrank import LowRankConfig, calibrate, compress, count_parameters  # noqa: E402

EMBEDDING = "embeddings.word_embeddings"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budgets", type=floats, default=floats("0.1,0.25,0.3"), help="Fractions of all parameters removed.")
    p.add_argument("--alphas", type=floats, default=floats("0.01,0.1,1"),
                   help="Weight of a token unseen in calibration, as a multiple of the mean token count.")
    p.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


class Spectra:
    """Per layer: ``(U, s, Vh, right)`` with ``W_r = U[:, :r] diag(s[:r]) Vh[:r] @ right`` (``right`` undoes the
    whitening; None for plain SVD), and the cost of one rank in parameters."""

    def __init__(self) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.cost: dict[str, int] = {}
        self.dense: dict[str, int] = {}

    def add(self, name: str, matrix: torch.Tensor, right=None) -> None:
        """``matrix`` (out x in) is ``W`` or ``W S``; ``right`` is ``S^-1`` (or a vector: a diagonal ``S^-1``)."""
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.factors[name] = (u, s, vh, right)
        self.cost[name] = sum(matrix.shape)
        self.dense[name] = matrix.shape[0] * matrix.shape[1]

    def plus(self, name: str, matrix: torch.Tensor, right=None) -> Spectra:
        """These spectra and one more layer's, sharing the existing factors (no copy of the large matrices)."""
        more = Spectra()
        more.factors, more.cost, more.dense = dict(self.factors), dict(self.cost), dict(self.dense)
        more.add(name, matrix, right)
        return more

    def rebuilt(self, name: str, rank: int) -> torch.Tensor:
        u, s, vh, right = self.factors[name]
        low = (u[:, :rank] * s[:rank]) @ vh[:rank]
        if right is None:
            return low
        return low * right if right.dim() == 1 else low @ right


def allocate(spectra: Spectra, removed: int) -> dict[str, int]:
    """Greedy global allocation: drop, one at a time, the component whose share of its layer's energy per parameter
    saved is smallest, until ``removed`` parameters are saved (a layer counts as saved only below break-even)."""
    energy = {n: f[1] ** 2 / (f[1] ** 2).sum() for n, f in spectra.factors.items()}
    ranks = {n: len(e) for n, e in energy.items()}
    heap = [(float(e[-1]) / spectra.cost[n], n) for n, e in energy.items()]
    heapq.heapify(heap)

    def saved() -> int:
        return sum(max(0, spectra.dense[n] - r * spectra.cost[n]) for n, r in ranks.items())

    while heap and saved() < removed:
        _, name = heapq.heappop(heap)
        ranks[name] -= 1
        if ranks[name] > 1:
            heapq.heappush(heap, (float(energy[name][ranks[name] - 1]) / spectra.cost[name], name))
    return ranks


def cut(dense: nn.Module, spectra: Spectra, ranks: dict[str, int]) -> nn.Module:
    """A copy of ``dense`` whose weights are the rank-limited ones (kept as dense matrices: the cosine is the same)."""
    model = copy.deepcopy(dense)
    for name, rank in ranks.items():
        if rank * spectra.cost[name] >= spectra.dense[name]:
            continue  # no parameters saved: kept dense
        module = model.get_submodule(name)
        weight = spectra.rebuilt(name, rank)
        module.weight.data = (weight.T if isinstance(module, nn.Embedding) else weight).to(module.weight.dtype)
    return model


@torch.no_grad()
def input_statistics(model: nn.Module, batches: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every Linear's input Gram over the real (unpadded) tokens, float64, and the token counts."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    counts = torch.zeros(model.get_submodule(EMBEDDING).num_embeddings, dtype=torch.float64)
    mask = {}

    def hook(name):
        def collect(module, inputs, output):
            x = inputs[0].double()
            x = x[mask["real"]] if x.dim() == 3 else x  # the pooler sees one vector per sentence
            grams[name] += x.T @ x
        return collect

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for batch in batches:
            mask["real"] = batch["attention_mask"].bool()
            counts += torch.bincount(batch["input_ids"][mask["real"]], minlength=len(counts)).double()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return grams, counts


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start = time.time()
    from transformers import AutoModel

    text_args = whitening_args(["--parts", "embed"])
    _, collator, _, test_set, calibration, info = load_text(text_args)
    held_out = test_set.shuffle(seed=text_args.seed).select(range(min(text_args.embed_sentences, len(test_set))))
    held_out = held_out.remove_columns("labels")
    eval_batches = [collator([held_out[i] for i in range(s, min(s + 64, len(held_out)))]) for s in range(0, len(held_out), 64)]
    calibration = [model_inputs(b) for b in calibration]
    dense = AutoModel.from_pretrained(text_args.text_model).eval()
    total = count_parameters(dense)
    reference = embeddings(dense, eval_batches)

    def cosine(model: nn.Module) -> float:
        return float((embeddings(model, eval_batches) * reference).sum(-1).mean())

    grams, counts = input_statistics(dense, calibration)
    plain, whitened = Spectra(), Spectra()
    for name, gram in grams.items():
        weight = dense.get_submodule(name).weight.detach().double()
        damped = gram + 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        root = torch.linalg.cholesky(damped)  # gram = root @ root.T, so ||(W - W') X^T|| = ||(W - W') root||
        plain.add(name, weight)
        whitened.add(name, weight @ root, right=torch.linalg.inv(root))
    words = dense.get_submodule(EMBEDDING).weight.detach().double().T  # dim x vocab: the map from one-hot tokens
    with_words = {"svd": plain.plus(EMBEDDING, words)}
    for alpha in args.alphas:
        scale = torch.sqrt(counts + alpha * counts.mean())
        with_words[f"whitened, alpha {alpha:g}"] = whitened.plus(EMBEDDING, words * scale, right=1 / scale)

    library_grams = calibrate(dense, LowRankConfig(param_reduction=0.1, method="whitened"), calibration)
    rows = []
    for budget in args.budgets:
        removed = int(budget * total)
        row = {"budget": budget}
        for method in ("svd", "whitened"):
            model = copy.deepcopy(dense)
            compress(model, LowRankConfig(param_reduction=budget, method=method),
                     calibration_data=library_grams if method == "whitened" else None)
            row[f"library {method}"] = cosine(model)
        row["independent svd"] = cosine(cut(dense, plain, allocate(plain, removed)))
        row["independent whitened"] = cosine(cut(dense, whitened, allocate(whitened, removed)))
        for label, spectra in with_words.items():
            ranks = allocate(spectra, removed)
            row[f"+ word embeddings, {label}"] = cosine(cut(dense, spectra, ranks))
            row[f"+ word embeddings, {label}: embedding rank"] = ranks[EMBEDDING]
        rows.append(row)
        print(json.dumps(row), flush=True)

    columns = [k for k in rows[0] if k != "budget" and not k.endswith("embedding rank")]
    lines = ["| parameters removed | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {100 * row['budget']:.0f}% | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/whitening_crosscheck.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": machine_info(), "parameters": total, "calibration_sentences": info["calibration_sentences"],
            "held_out_sentences": len(held_out), "tokens_seen_in_calibration": int((counts > 0).sum()),
            "seconds": round(time.time() - start, 1)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "whitening_crosscheck.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    markdown = (f"# Whitened truncation of all-MiniLM-L6-v2: the library against an independent implementation\n\n"
                f"Date {meta['date']}; command `{meta['command']}`; {meta['seconds']} s. Mean cosine between dense and "
                f"compressed sentence embeddings of {len(held_out)} held-out sentences; {info['calibration_sentences']} "
                f"calibration sentences.\n\n" + "\n".join(lines) + "\n")
    (out / "whitening_crosscheck.md").write_text(markdown)
    print(markdown)
    return {**meta, "rows": rows}


if __name__ == "__main__":
    main()
