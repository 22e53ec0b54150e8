"""SmoothnessPenalty, RankProjection and whole_weights on fully_shard-ed models against the same models held whole.

Every process builds the same models, keeps a whole copy, and splits the other with torch's own FSDP2
(``fully_shard`` on every Linear / Conv2d / Conv1D / Embedding, then the root); each check computes on both and records
the largest difference relative to the largest value. Rank 0 writes ``OUT/checks.json``: check name -> difference, or
the error message of a check that must be refused.

usage: torchrun --nproc_per_node 2 fsdp_checks.py OUT
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_bert  # noqa: E402

from smooth_hf import RankProjection, SmoothnessPenalty  # noqa: E402
from smooth_hf.lowrank.targeting import find_layers  # noqa: E402
from smooth_hf.lowrank.whitening import collect_input_grams  # noqa: E402
from smooth_hf.training.shards import whole_weights  # noqa: E402


class Mixed(nn.Module):
    """A wide conv (8 x 18), a tall Linear (24 x 8), a wide one split unevenly (5 rows: 3 + 2) and one of a single row
    (a process holds an empty block of it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)
        self.up = nn.Linear(8, 24)
        self.down = nn.Linear(24, 5)
        self.tail = nn.Linear(5, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.tail(torch.relu(self.down(torch.relu(self.up(x)))))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def split(model: nn.Module, mesh) -> nn.Module:
    for _, module in find_layers(model, skip_first_last=False, embeddings=True):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = whole(a).detach().double(), whole(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def pair(name: str, mesh) -> tuple[nn.Module, nn.Module]:
    """(the model held whole, the same model split across the processes)."""
    torch.manual_seed(0)
    model = {"mixed": Mixed, "gpt2": tiny_gpt2, "bert": tiny_bert}[name]()
    return copy.deepcopy(model), split(model, mesh)


def inputs(name: str, n: int = 4):
    g = torch.Generator().manual_seed(3)
    if name == "mixed":
        return [torch.randn(n, 2, 6, 6, generator=g) for _ in range(2)]
    return [{"input_ids": torch.randint(0, 40, (n, 7), generator=g)} for _ in range(2)]


def check_penalties(mesh, results):
    pairs = {name: pair(name, mesh) for name in ("mixed", "gpt2", "bert")}
    options = {"first_order_coef": 1.0, "second_order_coef": 0.5, "nuclear_norm_coef": 2.0, "nuclear_norm_every": 1,
               "skip_first_last": False}
    cases = [(name, norm, tail) for name in pairs for norm in ("scale_free", "relative", "sum") for tail in (None, 0.2)]
    for name, normalization, tail in cases:
        kept, held = pairs[name]
        values, states = [], []
        for model in (held, kept):
            model.zero_grad()
            penalty = SmoothnessPenalty.for_model(model, normalization=normalization, nuclear_norm_param_reduction=tail,
                                                  **options)
            total, terms = penalty(0)
            total.backward()
            values.append((total, terms, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
            states.append(penalty.state_dict())
        (total, terms, grads), (ref_total, ref_terms, ref_grads) = values
        key = f"penalty/{name}/{normalization}/{'tail' if tail else 'whole'}"
        results[f"{key}/total"] = difference(total, ref_total)
        results[f"{key}/terms"] = max(abs(terms[k] - ref_terms[k]) / abs(ref_terms[k]) for k in ref_terms)
        assert grads.keys() == ref_grads.keys(), (grads.keys(), ref_grads.keys())
        results[f"{key}/gradients"] = max(difference(grads[k], ref_grads[k]) for k in ref_grads)
        results[f"{key}/state_dict"] = max(difference(states[0][k], states[1][k]) for k in states[1])
    # Directions saved whole load into a penalty on the split model, which uses its blocks of them.
    kept, held = pairs["gpt2"]
    saved = SmoothnessPenalty.for_model(kept, nuclear_norm_coef=1.0, nuclear_norm_every=5)
    ref, _ = saved(0)
    loaded = SmoothnessPenalty.for_model(held, nuclear_norm_coef=1.0, nuclear_norm_every=5)
    loaded.load_state_dict(saved.state_dict())
    value, _ = loaded(1)  # within nuclear_norm_every of the saved refresh: the loaded directions are used
    results["penalty/gpt2/loaded_directions"] = difference(value, ref)


def check_projection(mesh, results):
    for name, options in [("mixed", {"param_reduction": 0.4}), ("gpt2", {"param_reduction": 0.3}),
                          ("mixed", {"macs_reduction": 0.3, "input_shape": (2, 6, 6)}),
                          ("bert", {"param_reduction": 0.3, "embeddings": True})]:
        kept, held = pair(name, mesh)
        before = copy.deepcopy(kept)
        ranks = [RankProjection.for_model(m, skip_first_last=False, start=0.0, end=0.0, **options)(1, 1)
                 for m in (held, kept)]
        key = f"projection/{name}/{'+'.join(sorted(options))}"
        results[f"{key}/ranks_equal"] = float(ranks[0] == ranks[1])
        results[f"{key}/moved"] = max(difference(p, dict(before.named_parameters())[n]) for n, p in kept.named_parameters())
        results[f"{key}/weights"] = max(difference(p, dict(kept.named_parameters())[n]) for n, p in held.named_parameters())


def check_whitened(mesh, results):
    for name, embeddings in [("mixed", False), ("bert", True), ("gpt2", False)]:
        kept, held = pair(name, mesh)
        before = copy.deepcopy(kept)
        layers = find_layers(kept, skip_first_last=False, embeddings=embeddings)
        grams = collect_input_grams(kept, dict(layers), inputs(name)).grams
        projections = [RankProjection.for_model(m, 0.3, skip_first_last=False, embeddings=embeddings, start=0.0, end=0.0,
                                                method="whitened") for m in (held, kept)]
        key = f"whitened/{name}"
        try:
            ranks = projections[0](1, 1, grams)
        except ValueError as err:
            results[f"{key}/refused"] = str(err)
            continue
        results[f"{key}/ranks_equal"] = float(ranks == projections[1](1, 1, grams))
        results[f"{key}/moved"] = max(difference(p, dict(before.named_parameters())[n]) for n, p in kept.named_parameters())
        results[f"{key}/weights"] = max(difference(p, dict(kept.named_parameters())[n]) for n, p in held.named_parameters())


def check_refusals(mesh, results):
    model = Mixed()
    model.up.weight = nn.Parameter(distribute_tensor(model.up.weight.detach(), mesh, [Shard(1)]))  # tensor parallel
    try:
        SmoothnessPenalty.for_model(model, first_order_coef=1.0, skip_first_last=False)(0)
    except ValueError as err:
        results["refused/column_split"] = str(err)


def check_whole_weights(mesh, results):
    kept, held = pair("gpt2", mesh)
    with whole_weights(held) as model:
        if dist.get_rank() == 0:
            params = dict(model.named_parameters())
            results["whole_weights/plain"] = float(not any(isinstance(p, DTensor) for p in params.values()))
            results["whole_weights/values"] = max(difference(params[n], p) for n, p in kept.named_parameters())
    results["whole_weights/restored"] = float(all(isinstance(p, DTensor) for p in held.parameters()))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results: dict[str, object] = {"world_size": dist.get_world_size()}
    for check in (check_penalties, check_projection, check_whitened, check_refusals, check_whole_weights):
        check(mesh, results)
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "checks.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()  # every rank done with its collectives before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
