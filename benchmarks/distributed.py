"""Data-parallel step time and per-rank memory: 2 processes on CPU (gloo), a small GPT.

    python benchmarks/distributed.py [--out DIR] [--steps N] [--nproc 2]     # or: make bench-dist

Started without torchrun, it starts itself under ``torch.distributed.run``. Every rank
trains the same GPT (``fx_optim_pass.models``) on its own synthetic batches, AdamW, with:

- ``ddp_eager``: ``DistributedDataParallel`` + eager AdamW (``step()``, ``zero_grad()``);
- ``eager_hooks``: PyTorch's eager in-backward AdamW
  (``torch.distributed.optim._apply_optimizer_in_backward``) after a per-parameter
  all-reduce hook (DDP's own in-backward-optimizer integration waits on an accelerator
  stream and fails on CPU in torch 2.13, so the gradient is averaged by a
  ``register_post_accumulate_grad_hook``, which runs before torch's optimizer hook);
- ``fx_optim``: ``fx_optim_pass.data_parallel`` (Inductor): all-reduce + AdamW in the compiled backward;
- ``fx_optim_sharded``: the same with ``shard_optimizer_state=True``: reduce-scatter, AdamW
  on this rank's shard, all-gather.

Reported per variant and rank: median step time (steady state, after warm-up and
compilation), peak live bytes during one step above its start (the PyTorch profiler's
memory events, ``fx_optim_pass.measure``), and bytes of optimizer state held by the rank.
Absolute times are noise on a shared machine: compare variants within one run.
Writes ``DIR/distributed.json`` and ``DIR/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fx_optim_pass as fop
from fx_optim_pass.measure import peak_step_memory
from fx_optim_pass.models import GPT, GPTConfig, synthetic_tokens

CONFIG = GPTConfig(vocab_size=512, seq_len=64, width=128, depth=2, heads=4)
BATCH = 8
ADAMW: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.1}
VARIANTS = ("ddp_eager", "eager_hooks", "fx_optim", "fx_optim_sharded")
MiB = 2**20


def _state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(
        v.numel() * v.element_size()
        for opt in optimizers
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _setup(variant: str, model: GPT) -> tuple[Callable[[tuple[torch.Tensor, torch.Tensor]], None], Callable[[], int]]:
    """(one training step on a batch, the optimizer state bytes this rank holds)."""
    if variant == "ddp_eager":
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), **ADAMW)

        def eager_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            ddp(*batch).backward()
            opt.step()
            opt.zero_grad()

        return eager_step, lambda: _state_bytes([opt])
    if variant == "eager_hooks":
        from torch.distributed.optim import _apply_optimizer_in_backward, _get_in_backward_optimizers

        world = dist.get_world_size()

        def average(param: torch.Tensor) -> None:
            assert param.grad is not None
            dist.all_reduce(param.grad)  # gloo has no ReduceOp.AVG
            param.grad.div_(world)

        for param in model.parameters():
            param.register_post_accumulate_grad_hook(average)
        _apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), ADAMW)

        def hooks_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            model(*batch).backward()

        return hooks_step, lambda: _state_bytes(_get_in_backward_optimizers(model))
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), ADAMW)
    backend = fop.data_parallel(model, shard_optimizer_state=variant == "fx_optim_sharded")
    compiled = torch.compile(model, backend=backend, fullgraph=True)

    def compiled_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        compiled(*batch).backward()

    return compiled_step, lambda: _state_bytes(fop.get_in_backward_optimizers(model))


def _measure(variant: str, base: GPT, steps: int, warmup: int) -> dict[str, Any]:
    rank = dist.get_rank()
    model = deepcopy(base)
    step, state_bytes = _setup(variant, model)
    batches = synthetic_tokens(CONFIG, BATCH, warmup + steps + 1, seed=rank)
    compile_start = time.perf_counter()
    for batch in batches[:warmup]:
        step(batch)
    warmup_s = time.perf_counter() - compile_start
    times = []
    for batch in batches[warmup : warmup + steps]:
        dist.barrier()  # every rank starts the step together: the time includes waiting for the slowest
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    dist.barrier()
    peak = peak_step_memory(lambda: step(batches[-1]))
    with torch.no_grad():
        loss = float(model(*batches[0]))
    return {
        "median_step_ms": 1e3 * statistics.median(times),
        "peak_step_mib": peak / MiB,
        "optimizer_state_mib": state_bytes() / MiB,
        "warmup_s": warmup_s,
        "loss_after": loss,
    }


def _run_rank(out: Path, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = GPT(CONFIG)
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        torch._dynamo.reset()
        results[variant] = _measure(variant, base, steps, warmup)
        if rank == 0:
            print(f"{variant}: {results[variant]}", flush=True)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        report = {
            "torch": torch.__version__,
            "world_size": world,
            "backend": "gloo (CPU)",
            "config": {**CONFIG.__dict__, "batch_per_rank": BATCH, "optimizer": "AdamW", **ADAMW},
            "parameters": sum(p.numel() for p in base.parameters()),
            "steps": steps,
            "ranks": everyone,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "distributed.json").write_text(json.dumps(report, indent=2))
        (out / "distributed.md").write_text(_markdown(report))
        print(_markdown(report))
    dist.destroy_process_group()


def _markdown(report: dict[str, Any]) -> str:
    ranks = report["ranks"]
    base = statistics.median(r["ddp_eager"]["median_step_ms"] for r in ranks)
    lines = [
        f"GPT {report['config']}, {report['parameters']:,} parameters, {report['world_size']} ranks, "
        f"{report['backend']}, torch {report['torch']}; median of {report['steps']} steps.",
        "",
        "| variant | rank | step ms | vs ddp_eager | peak MiB above step start | optimizer state MiB |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for rank, results in enumerate(ranks):
            r = results[variant]
            lines.append(
                f"| {variant} | {rank} | {r['median_step_ms']:.1f} | {r['median_step_ms'] / base:.2f}x "
                f"| {r['peak_step_mib']:.2f} | {r['optimizer_state_mib']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_dist_out"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:  # under torchrun
        _run_rank(args.out, args.steps, args.warmup)
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc), __file__,
        "--out", str(args.out), "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]  # fmt: skip
    raise SystemExit(subprocess.call(command, env=env))


if __name__ == "__main__":
    main()
