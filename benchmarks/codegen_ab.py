"""What the fx_optim backend's code generation changes in a step with no optimizer (issue #4).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --rounds 40
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --full --rounds 10

The benchmark's floor for time, ``no_optimizer``, is the forward+backward compiled by the
fx_optim backend: Inductor with the fixes of ``_torch_compat.CODEGEN_FIXES`` (no barrier after
the last loop of a parallel region, max-pool's backward lowered rather than decomposed). This
compiles one workload's forward+backward twice, with the fx_optim backend and with stock
Inductor, and times their steps in interleaved rounds: per round the median step of each, and
over the rounds the median of the per-round differences, which cancels drift that hits both.
What it prints is what a floor compiled by stock Inductor would wrongly count as the
optimizer's cost (or saving).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch

from benchmarks.peers import build_peer, inductor
from benchmarks.run import OPTIMIZERS, median_step_s, workloads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="gpt-finetune", help="a workload of benchmarks.run --quick (or, with --full, of a full run)"
    )
    parser.add_argument("--full", action="store_true", help="the workloads of a full run (the 29M GPT)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps-per-round", type=int, default=10)
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    workload = {w.name: w for w in workloads(quick=not args.full)}[args.model]
    model, inputs = workload.build(device)
    steps = {  # no_optimizer takes no optimizer: any will do
        "fx_optim backend": build_peer("no_optimizer", model, inputs, *OPTIMIZERS["adamw"]).step,
        "stock Inductor": _stock_step(model, inputs),
    }
    for step in steps.values():
        for _ in range(3):  # compile, warm up
            step()
    medians: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            medians[name].append(median_step_s(step, device, args.steps_per_round))
    size = " (full size)" if args.full else ""
    print(f"{args.model}{size}: forward+backward, no optimizer, {args.rounds} rounds x {args.steps_per_round} steps")
    for name, values in medians.items():
        print(f"    {name}: median step {statistics.median(values) * 1e3:.3f} ms")
    ours, stock = medians.values()
    differences = [(a - b) * 1e3 for a, b in zip(ours, stock)]
    below = sum(d < 0 for d in differences)
    print(
        f"    fx_optim backend - stock, per round: median {statistics.median(differences):+.3f} ms "
        f"({below} of {len(differences)} rounds faster)"
    )


def _stock_step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """``no_optimizer``'s step, compiled by stock Inductor (as ``compiled_model``'s forward is)."""
    model = copy.deepcopy(model)
    forward = torch.compile(model, backend=inductor(), fullgraph=True)

    def step() -> None:
        forward(*inputs).backward()
        model.zero_grad()

    return step


if __name__ == "__main__":
    main()
