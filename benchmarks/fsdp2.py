"""Smooth training under FSDP2 beside DDP on 2 CPU processes: each rank's memory, and what the penalties and rank
projection add to a step in communication and time.

Two gloo processes (torchrun) train a Llama-shaped decoder with random weights (fine for memory, time and bytes,
meaningless for quality) for a few AdamW steps with all three penalties: once under DDP, once with each decoder layer,
the embeddings and the root split by torch's ``fully_shard`` (as Accelerate's FSDP2 config splits a transformers
model). Each process reports

* the bytes of parameters, gradients and optimizer state it holds after training; its resident memory then and before
  the model was built (the growth is the model's, its gradients', its optimizer state's and the training's); and its
  peak resident memory (``ru_maxrss``; one launch per mode, so each peak is its own). Every process builds the whole
  model before splitting it (as ``from_pretrained`` does without Accelerate's ``cpu_ram_efficient_loading``), so the
  peak includes one whole model under FSDP2 too;
* the median time of the penalty (value and backward) at a step that refreshes the nuclear norm's directions and at
  one that uses them cached, and of one rank projection (with DDP's broadcast of the projected weights, as
  ``SmoothTrainer`` does);
* the bytes the penalty and projection hand to collectives (all-reduce, all-gather, broadcast: the tensor each process
  passes), counted by wrapping ``torch.distributed``'s functions, and the time spent in them; beside them the training
  step's own collectives, counted from the parameter count: DDP all-reduces every gradient, FSDP2 all-gathers every
  parameter in the forward and again in the backward and reduce-scatters every gradient.

::

    python benchmarks/fsdp2.py                                          # hidden 1024, 4 layers: the published run
    python benchmarks/fsdp2.py --hidden 64 --layers 1 --vocab 64 --steps 2 --repeats 1 --tag _smoke

Results: ``benchmarks/results/fsdp2{tag}.json``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import add_common_arguments, run_metadata, write_json

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
MODES = ("ddp", "fsdp2")
COLLECTIVES = ("all_reduce", "all_gather", "broadcast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="Hidden size (attention heads of 64).")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2.6875 x hidden, as Llama's).")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="Sequences per process per step.")
    p.add_argument("--steps", type=int, default=3, help="AdamW steps before measuring memory.")
    p.add_argument("--repeats", type=int, default=3, help="Timed repeats of each penalty / projection call (median).")
    p.add_argument("--projection_reduction", type=float, default=0.3, help="The cut rank projection plans for.")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # set by the driver for its torchrun launches
    p.add_argument("--worker_out", type=Path, help=argparse.SUPPRESS)
    add_common_arguments(p, threads=1)
    args = p.parse_args(argv)
    args.intermediate = args.intermediate or int(round(2.6875 * args.hidden / 16)) * 16
    return args


# ---------------------------------------------------------------------------------------------- one process
class Collectives:
    """Wraps torch.distributed's all_reduce / all_gather / broadcast (as smooth_hf calls them) to count the bytes each
    process passes and the seconds spent, while ``counting``."""

    def __init__(self) -> None:
        self.counting = False
        self.bytes = dict.fromkeys(COLLECTIVES, 0)
        self.calls = dict.fromkeys(COLLECTIVES, 0)
        self.seconds = 0.0
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, function):
        def counted(tensor_or_list, *args, **kwargs):
            if not self.counting:
                return function(tensor_or_list, *args, **kwargs)
            tensor = args[0] if name == "all_gather" else tensor_or_list  # all_gather(outputs, input)
            self.bytes[name] += tensor.numel() * tensor.element_size()
            self.calls[name] += 1
            start = time.perf_counter()
            try:
                return function(tensor_or_list, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return counted

    def measure(self, work) -> dict[str, Any]:
        """Run ``work`` once, counting; the bytes, calls and seconds of its collectives."""
        self.bytes, self.calls, self.seconds = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0), 0.0
        self.counting = True
        try:
            work()
        finally:
            self.counting = False
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": sum(self.bytes.values()),
                "seconds": self.seconds}


def build(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def resident_bytes() -> int:
    """The process's resident memory now (Linux ``/proc/self/statm``); large tensors freed are returned to the OS."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        work()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    record = measure(args)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        args.worker_out.write_text(json.dumps(records))
    # The sharded model and its optimizer went with measure() (FSDP2 keeps the last reduce-scatter's buffers); every
    # rank finishes its collectives before the group goes: a gloo thread still holding a tensor at interpreter exit
    # aborts the process ("terminate called without an active exception"), which once failed a CI run.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """This rank's record: memory held, step times, and the bytes each penalty / projection step communicates."""
    from smooth_hf import RankProjection, SmoothnessPenalty

    collectives = Collectives()
    gc.collect()
    resident_before_model = resident_bytes()
    model = build(args)
    parameters = sum(p.numel() for p in model.parameters())
    if args.worker == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.model.embed_tokens, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    penalty = SmoothnessPenalty.for_model(model, first_order_coef=1.0, second_order_coef=1.0, nuclear_norm_coef=1.0,
                                         nuclear_norm_every=args.steps + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed + dist.get_rank())
    step_seconds = []
    for step in range(args.steps):  # penalty refreshed at step 0, cached after
        ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
        start = time.perf_counter()
        loss = trained(input_ids=ids, labels=ids).loss + penalty(step)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients kept allocated, as between steps
        step_seconds.append(time.perf_counter() - start)
    gc.collect()
    resident_after_training = resident_bytes()
    memory = {
        "parameter_bytes": held_bytes(model.parameters()),
        "gradient_bytes": held_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_state_bytes": held_bytes(t for state in optimizer.state.values() for t in state.values()
                                            if torch.is_tensor(t) and t.dim() > 0),
    }

    def penalty_step(refresh: bool):
        def work():
            if refresh:
                penalty.invalidate()
            total, _ = penalty(1)
            total.backward()
        return work

    def project():
        projection(1, 1)
        if args.worker == "ddp":  # SmoothTrainer broadcasts rank 0's projection under DDP
            for _, module in projection.layers:
                dist.broadcast(module.weight.data, src=0)

    projection = RankProjection.for_model(model, param_reduction=args.projection_reduction, start=0.0, end=0.0)
    penalty_step(True)()  # warm-up
    timings = {"penalty_refresh": median_seconds(penalty_step(True), args.repeats),
               "penalty_cached": median_seconds(penalty_step(False), args.repeats),
               "projection": median_seconds(project, args.repeats)}
    communication = {"penalty_refresh": collectives.measure(penalty_step(True)),
                     "penalty_cached": collectives.measure(penalty_step(False)),
                     "projection": collectives.measure(project)}
    world = dist.get_world_size()
    payload = parameters * 4  # float32
    step_collectives = ({"all_reduce_gradients": payload} if args.worker == "ddp" else
                        {"all_gather_parameters_forward": payload // world, "all_gather_parameters_backward":
                         payload // world, "reduce_scatter_gradients": payload})
    return {"rank": dist.get_rank(), "world_size": world, "parameters": parameters, "memory": memory,
            "rss_before_model_bytes": resident_before_model, "rss_after_training_bytes": resident_after_training,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": step_seconds, "seconds": timings, "communication": communication,
            "step_collectives_bytes": step_collectives, "penalty_layers": len(penalty.layers)}


# ---------------------------------------------------------------------------------------------- the driver
def launch(mode: str, args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "records.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1),
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        subprocess.run([TORCHRUN, "--nproc_per_node", "2", __file__, *argv, "--worker", mode, "--worker_out", str(out)],
                       check=True, env=env, cwd=ROOT)
        return json.loads(out.read_text())


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rank 0's figures of each mode side by side, and FSDP2's over DDP's."""
    ddp, fsdp = runs["ddp"][0], runs["fsdp2"][0]
    held = {k: fsdp["memory"][k] / ddp["memory"][k] for k in ddp["memory"]}
    return {
        "fsdp2_over_ddp_held_bytes": held,
        "fsdp2_over_ddp_rss_after_training": fsdp["rss_after_training_bytes"] / ddp["rss_after_training_bytes"],
        "fsdp2_over_ddp_rss_growth": ((fsdp["rss_after_training_bytes"] - fsdp["rss_before_model_bytes"])
                                      / (ddp["rss_after_training_bytes"] - ddp["rss_before_model_bytes"])),
        "fsdp2_over_ddp_max_rss": fsdp["max_rss_bytes"] / ddp["max_rss_bytes"],
        "penalty_bytes_per_step": {mode: {k: runs[mode][0]["communication"][k]["total_bytes"]
                                          for k in ("penalty_refresh", "penalty_cached", "projection")}
                                   for mode in MODES},
        "step_collectives_bytes": {mode: sum(runs[mode][0]["step_collectives_bytes"].values()) for mode in MODES},
        "seconds": {mode: runs[mode][0]["seconds"] for mode in MODES},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads or 1)
        worker(args)
        # The records are written and the group is gone: leave without the interpreter's teardown, where torch's
        # distributed threads have been seen to abort a worker that had finished its work (the failure pytorch/pytorch
        # pull request 179291 describes).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    start = time.perf_counter()
    runs = {mode: launch(mode, args, argv) for mode in MODES}
    result = {"meta": {**run_metadata(__file__, argv, args), "seconds": time.perf_counter() - start},
              "runs": runs, "summary": summarize(runs)}
    path = write_json(args.output_dir / f"fsdp2{args.tag}.json", result)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
