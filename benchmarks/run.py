"""Benchmarks of fx_optim against every peer (issue #4, DESIGN.md section 3).

All peers run in one process on the same model, data and optimizer; step times
are interleaved across rounds so that ratios compare like with like.

    python -m benchmarks.run --quick                 # make bench-quick
    python -m benchmarks.run                         # make bench
    PYTHONPATH=. python3 -m benchmarks.run --quick --device cuda   # on a GPU, nothing installed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

try:
    from tqdm import tqdm
except ImportError:  # a bare GPU machine: no progress bars

    def tqdm(iterable: Any, **_: Any) -> Any:  # type: ignore[no-redef]
        return iterable


from benchmarks import floors
from benchmarks.peers import PEERS, Peer, build_peer, inductor
from benchmarks.report import write_report
from fx_optim_pass.measure import profile_step_memory
from fx_optim_pass.models import GPT, GPTConfig, convnet, mlp, synthetic_tokens

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
}


class WithLoss(nn.Module):
    """``net`` and its loss in one module, so every peer compiles the whole forward."""

    def __init__(self, net: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(self.net(x), target)


@dataclass(frozen=True)
class Workload:
    name: str
    regime: str  # "fine-tuning" (parameters dominate) or "pre-training" (activations dominate)
    build: Callable[[torch.device], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _mlp(batch: int, width: int, depth: int) -> Callable[[torch.device], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(device: torch.device) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        model = WithLoss(mlp(width, depth), F.mse_loss).to(device)
        return model, (torch.randn(batch, width, device=device), torch.randn(batch, width, device=device))

    return build


def _gpt(config: GPTConfig, batch: int) -> Callable[[torch.device], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(device: torch.device) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        return GPT(config).to(device), synthetic_tokens(config, batch, 1, device=device)[0]

    return build


def _convnet(batch: int, size: int) -> Callable[[torch.device], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(device: torch.device) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        model = WithLoss(convnet(), F.cross_entropy).to(device)
        return model, (torch.randn(batch, 3, size, size, device=device), torch.randint(10, (batch,), device=device))

    return build


# The transformer at a CPU size: ~29M parameters (8 blocks of width 512, vocab 8192).
GPT_FULL = GPTConfig(vocab_size=8192, seq_len=256, width=512, depth=8, heads=8)
# --quick: ~0.54M parameters, same shape of model (compiling every peer dominates a quick run).
GPT_QUICK = GPTConfig(vocab_size=1024, seq_len=128, width=128, depth=2, heads=4)


def workloads(quick: bool) -> list[Workload]:
    gpt = GPT_QUICK if quick else GPT_FULL
    finetune = GPTConfig(**{**gpt.__dict__, "seq_len": 64})
    return [
        Workload("tiny-mlp", "fine-tuning", _mlp(batch=4, width=32, depth=2)),  # for tests: run only when named
        Workload("mlp", "fine-tuning", _mlp(batch=64, width=1024, depth=8)),
        Workload("gpt-finetune", "fine-tuning", _gpt(finetune, batch=1)),
        Workload("gpt-pretrain", "pre-training", _gpt(gpt, batch=4 if quick else 8)),
        Workload("convnet", "pre-training", _convnet(batch=32, size=32)),
    ]


# --quick: one optimizer per model, to stay within 5 minutes on 2 cores.
QUICK_CONFIGS = {
    ("mlp", "adamw"),
    ("gpt-finetune", "adamw"),
    ("gpt-pretrain", "adamw"),
    ("convnet", "sgd"),
}

# Timing rounds at most: with ``--timing-s``, a model of millisecond steps stops here.
MAX_ROUNDS = 50


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def median_step_s(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Median seconds of ``steps`` steps, each timed on its own (``timed``)."""
    return statistics.median(timed(step, device) for _ in range(steps))


def first_steps(step: Callable[[], None], device: torch.device, fresh: bool, count: int = 3) -> list[float]:
    """Seconds of each of the first ``count`` steps. The first compiles (each compiled peer from
    cold Inductor caches, so that no peer reuses kernels another built); the next create
    optimizer state, warm autotuning and the allocator, and may compile again: PyTorch's
    compiled optimizer recompiles its step once SGD's momentum buffers exist."""
    with fresh_cache() if fresh else contextlib.nullcontext():
        return [timed(step, device) for _ in range(count)]


def compile_seconds(first: Sequence[float], median_step: float) -> float:
    """Compile time: the first step, plus what each warm-up step took beyond a steady step."""
    return first[0] + sum(max(0.0, seconds - median_step) for seconds in first[1:])


def recompiles(peer: Peer, steps: int) -> int:
    """Dynamo graphs compiled during ``steps`` steps, each followed by an LR scheduler step."""
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99) for opt in peer.optimizers]
    before = counters["stats"]["unique_graphs"]
    for _ in range(steps):
        peer.step()
        for scheduler in schedulers:
            scheduler.step()
    return counters["stats"]["unique_graphs"] - before


def bench_config(
    workload: Workload,
    optimizer: str,
    peer_names: Sequence[str],
    device: torch.device,
    rounds: int,
    steps_per_round: int,
    recompile_steps: int,
    bandwidth: float,
    timing_s: float = 0.0,
) -> dict[str, Any]:
    """Every figure of one (model, optimizer, config), all peers in this one process: ``rounds``
    timing rounds, and more (up to ``MAX_ROUNDS``) until the timing has taken ``timing_s``."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = workload.build(device)
    optimizer_class, kwargs = OPTIMIZERS[optimizer]
    peers: list[Peer] = []
    results: dict[str, dict[str, Any]] = {}
    shared_backend = inductor()
    for name in tqdm(peer_names, desc=f"{workload.name}/{optimizer}: compile", leave=False):
        try:
            peer = build_peer(name, model, inputs, optimizer_class, kwargs, shared_backend)
            first = first_steps(peer.step, device, fresh=peer.compiled)
            curve = profile_step_memory(peer.step, device)
        except Exception as error:  # a peer that cannot run this model is reported, not fatal
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            continue
        peers.append(peer)
        results[name] = {"first_steps_s": first, "peak_bytes": max(curve), "memory_curve": _thin(curve)}

    times: dict[str, list[float]] = {peer.name: [] for peer in peers}
    timing_started = time.perf_counter()
    round_index = 0
    with tqdm(desc=f"{workload.name}/{optimizer}: time", unit="round", leave=False) as progress:
        while round_index < rounds or (round_index < MAX_ROUNDS and time.perf_counter() - timing_started < timing_s):
            # Interleaved, and the order rotates, so that drift hits every peer alike.
            shift = round_index % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                times[peer.name] += [timed(peer.step, device) for _ in range(steps_per_round)]
            round_index += 1
            progress.update()
    for peer in peers:
        median = results[peer.name]["median_step_s"] = statistics.median(times[peer.name])
        results[peer.name]["compile_s"] = compile_seconds(results[peer.name]["first_steps_s"], median)
        # Contention on a shared machine only ever adds time: the minimum is the robust figure there.
        results[peer.name]["min_step_s"] = min(times[peer.name])
        # Per round, for ratios between steps taken minutes apart at most (report.round_ratio_range).
        steps = times[peer.name]
        results[peer.name]["round_medians_s"] = [
            statistics.median(steps[i : i + steps_per_round]) for i in range(0, len(steps), steps_per_round)
        ]
        if peer.compiled:
            results[peer.name]["recompiles"] = recompiles(peer, recompile_steps)

    fx_graphs = next((peer.graphs for peer in peers if peer.name == "fx_optim"), {})
    update = floors.update_bytes(optimizer_class, model)
    return {
        "model": workload.name,
        "regime": workload.regime,
        "optimizer": optimizer,
        "rounds": round_index,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_tensors": len(list(model.parameters())),
        "floor": {
            **floors.memory_floor_parts(fx_graphs, model),
            "update_bytes": update,
            "update_s": update / bandwidth,
        },
        "peers": results,
    }


def _thin(curve: list[int], points: int = 400) -> list[int]:
    """At most ``points`` samples of the live-bytes curve, keeping its peak."""
    if len(curve) <= points:
        return curve
    stride = len(curve) / points
    thinned = [max(curve[int(i * stride) : int((i + 1) * stride)]) for i in range(points)]
    return thinned


def scale_model(count: int, device: torch.device) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The scale points' model with ``count`` parameter tensors (Linear(16, 16) layers) and a batch of 4."""
    model = WithLoss(mlp(width=16, depth=count // 2), F.mse_loss).to(device)
    return model, (torch.randn(4, 16, device=device), torch.randn(4, 16, device=device))


def bench_scale(tensor_counts: Sequence[int], device: torch.device, steps: int) -> list[dict[str, Any]]:
    """Compile time and per-step time of fx_optim (and the compiled optimizer) as parameter tensors grow.

    Tiny layers (Linear(16, 16), batch 4), so the step is Python and launch overhead.
    """
    rows = []
    for count in tqdm(tensor_counts, desc="scale", leave=False):
        torch._dynamo.reset()
        model, inputs = scale_model(count, device)
        row: dict[str, Any] = {"parameter_tensors": count}
        for name in ("fx_optim", "compiled_opt", "no_optimizer"):
            try:
                peer = build_peer(name, model, inputs, *OPTIMIZERS["adamw"])
                first = first_steps(peer.step, device, fresh=True)
                median = median_step_s(peer.step, device, steps)
                row[name] = {
                    "first_steps_s": first,
                    "compile_s": compile_seconds(first, median),
                    "median_step_s": median,
                }
            except Exception as error:
                row[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset, under 5 minutes")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", nargs="*", help="subset of: mlp gpt-finetune gpt-pretrain convnet")
    parser.add_argument("--optimizers", nargs="*", choices=list(OPTIMIZERS), help="default: both (quick: a subset)")
    parser.add_argument(
        "--peers", nargs="*", choices=list(PEERS), help="default: all (quick: all but compiled_autograd, the slowest)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds, at least")
    parser.add_argument(
        "--timing-s",
        type=float,
        default=10.0,
        help=f"more rounds (up to {MAX_ROUNDS}) until a config's timing took this long (default 10)",
    )
    parser.add_argument("--steps-per-round", type=int, default=5, help="timed steps per peer per round")
    parser.add_argument("--recompile-steps", type=int, help="steps with an LR scheduler (default 50; quick 20)")
    parser.add_argument(
        "--scale", type=int, nargs="*", help="parameter tensor counts (default 50 200 1000; quick: none)"
    )
    args = parser.parse_args(argv)
    # Per-parameter optimizers stepped in backward hooks look, to the scheduler, unstepped.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    # Timing costs little next to compiling (seconds of a quick run's ~3 minutes), and a quick
    # run's small models need every sample: their optimizer cost is the difference of two
    # noisy steps. So quick times as many steps as a full run, and a model of short steps
    # gets more rounds: the quick GPT's 5 rounds took 2 s, and its cost moved from 0.70 to
    # 1.84 of its floor between rounds.
    rounds, steps_per_round = args.rounds, args.steps_per_round
    recompile_steps = args.recompile_steps or (20 if args.quick else 50)
    scale = args.scale if args.scale is not None else ([] if args.quick else [50, 200, 1000])
    # Quick fits 5 minutes on 2 cores by leaving out what compiles longest and is never the
    # fastest or leanest peer here (compiled autograd: 2.2 of 7.2 compile minutes), and the
    # scale curve; `make bench` runs both.
    if args.peers is None:
        args.peers = [name for name in PEERS if not (args.quick and name == "compiled_autograd")]
    # Several peers compile the same forward code; each is its own cache entry.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096

    chosen = [
        w for w in workloads(args.quick) if w.name in (args.models or []) or (not args.models and w.name != "tiny-mlp")
    ]
    bandwidth = floors.copy_bandwidth(device, 2**27 if device.type == "cpu" else 2**30)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rounds": rounds,
        "timing_s": args.timing_s,
        "steps_per_round": steps_per_round,
        "recompile_steps": recompile_steps,
        "peers": {name: PEERS[name][0] for name in args.peers},
        "configs": [],
        "scale": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"{'quick' if args.quick else 'full'}_{device.type}"
    for workload in chosen:
        for opt in args.optimizers or OPTIMIZERS:
            if args.optimizers or not args.quick or (workload.name, opt) in QUICK_CONFIGS:
                config = bench_config(
                    workload,
                    opt,
                    args.peers,
                    device,
                    rounds,
                    steps_per_round,
                    recompile_steps,
                    bandwidth,
                    args.timing_s,
                )
                results["configs"].append(config)
                _save(results, args.out / f"{suffix}.json")  # a run cut short keeps what it measured
    if scale:
        results["scale"] = bench_scale(scale, device, steps=10 if args.quick else 30)
    results["wall_s"] = time.perf_counter() - started
    _save(results, args.out / f"{suffix}.json")
    table = write_report(results, args.out, suffix)
    print(table)
    print(f"\nwrote {args.out}/{suffix}.json, {suffix}.md, {suffix}_memory.png, {suffix}_ratios.png")


def _save(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
