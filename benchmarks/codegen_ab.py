"""What the fx_optim backend's code generation changes in a step with no optimizer (issue #4).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --rounds 40
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --full --rounds 10
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --update-barriers --rounds 30

The benchmark's floor for time, ``no_optimizer``, is the forward+backward compiled by the
fx_optim backend: Inductor with the fixes of ``_torch_compat.CODEGEN_FIXES`` (no barrier after
the last loop of a parallel region, max-pool's backward lowered rather than decomposed). This
compiles one workload's forward+backward twice, with the fx_optim backend and with stock
Inductor, and times their steps in interleaved rounds: per round the median step of each, and
over the rounds the median of the per-round differences, which cancels drift that hits both.
What it prints is what a floor compiled by stock Inductor would wrongly count as the
optimizer's cost (or saving).

``--update-barriers``: fx_optim's step itself (AdamW; SGD on the convnet, as in ``--quick``),
compiled with our fixes and again without ``_torch_compat.independent_updates_nowait`` (each
update keeps the barrier after its loop): what that fix saves per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch

from benchmarks.peers import build_peer, inductor
from benchmarks.run import OPTIMIZERS, median_step_s, workloads
from fx_optim_pass import _torch_compat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="gpt-finetune", help="a workload of benchmarks.run --quick (or, with --full, of a full run)"
    )
    parser.add_argument("--full", action="store_true", help="the workloads of a full run (the 29M GPT)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument(
        "--update-barriers", action="store_true", help="fx_optim's step with and without independent_updates_nowait"
    )
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    workload = {w.name: w for w in workloads(quick=not args.full)}[args.model]
    model, inputs = workload.build(device)
    if args.update_barriers:
        optimizer = "sgd" if args.model == "convnet" else "adamw"
        with torch._inductor.config.patch(force_disable_caches=True):  # both share one cache key
            steps = {
                "with the fix": _compiled(build_peer("fx_optim", model, inputs, *OPTIMIZERS[optimizer]).step),
                "without": _without_update_nowait(build_peer("fx_optim", model, inputs, *OPTIMIZERS[optimizer]).step),
            }
        what = f"fx_optim's step ({optimizer})"
    else:
        steps = {  # no_optimizer takes no optimizer: any will do
            "fx_optim backend": _compiled(build_peer("no_optimizer", model, inputs, *OPTIMIZERS["adamw"]).step),
            "stock Inductor": _compiled(_stock_step(model, inputs)),
        }
        what = "forward+backward, no optimizer"
    medians: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            medians[name].append(median_step_s(step, device, args.steps_per_round))
    size = " (full size)" if args.full else ""
    print(f"{args.model}{size}: {what}, {args.rounds} rounds x {args.steps_per_round} steps")
    for name, values in medians.items():
        print(f"    {name}: median step {statistics.median(values) * 1e3:.3f} ms")
    (first, ours), (second, other) = medians.items()
    differences = [(a - b) * 1e3 for a, b in zip(ours, other)]
    below = sum(d < 0 for d in differences)
    print(
        f"    {first} - {second}, per round: median {statistics.median(differences):+.3f} ms "
        f"({below} of {len(differences)} rounds faster)"
    )


def _compiled(step: Callable[[], None]) -> Callable[[], None]:
    """``step``, once it has compiled and warmed up."""
    for _ in range(3):
        step()
    return step


def _without_update_nowait(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` compiled (``_compiled``) with every update keeping the barrier after its loop."""
    fix = _torch_compat.independent_updates_nowait
    _torch_compat.independent_updates_nowait = lambda source, *_: source
    try:
        return _compiled(step)
    finally:
        _torch_compat.independent_updates_nowait = fix


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
