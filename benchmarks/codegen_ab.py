"""What the fx_optim backend's code generation changes in a step with no optimizer (issue #4).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --rounds 40
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --full --rounds 10
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --update-barriers --rounds 30
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.codegen_ab --model gpt-finetune --full --peak-estimate --rounds 10

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

``--peak-estimate``: the same, without ``_torch_compat.peak_estimate_without_removed_buffers``
(Inductor's buffer reuse decided on its estimate counting buffers it never allocates); prints
each one's peak memory too (live tensor bytes above the step's start, as ``benchmarks.run``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.peers import build_peer, inductor
from benchmarks.run import OPTIMIZERS, median_step_s, workloads
from fx_optim_pass import _torch_compat
from fx_optim_pass.measure import peak_step_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="gpt-finetune", help="a workload of benchmarks.run --quick (or, with --full, of a full run)"
    )
    parser.add_argument("--full", action="store_true", help="the workloads of a full run (the 29M GPT)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps-per-round", type=int, default=10)
    fixes = parser.add_mutually_exclusive_group()
    fixes.add_argument(
        "--update-barriers", action="store_true", help="fx_optim's step with and without independent_updates_nowait"
    )
    fixes.add_argument(
        "--peak-estimate",
        action="store_true",
        help="fx_optim's step with and without peak_estimate_without_removed_buffers (and its peak memory)",
    )
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    workload = {w.name: w for w in workloads(quick=not args.full)}[args.model]
    model, inputs = workload.build(device)
    if args.update_barriers or args.peak_estimate:
        optimizer = "sgd" if args.model == "convnet" else "adamw"
        fix, unfixed = (
            ("independent_updates_nowait", lambda source, *_: source)
            if args.update_barriers
            else ("peak_estimate_without_removed_buffers", contextlib.nullcontext)
        )
        with torch._inductor.config.patch(force_disable_caches=True):  # both share one cache key
            steps = {
                "with the fix": _compiled(build_peer("fx_optim", model, inputs, *OPTIMIZERS[optimizer]).step),
                "without": _without(fix, unfixed, build_peer("fx_optim", model, inputs, *OPTIMIZERS[optimizer]).step),
            }
        what = f"fx_optim's step ({optimizer})"
    else:
        steps = {  # no_optimizer takes no optimizer: any will do
            "fx_optim backend": _compiled(build_peer("no_optimizer", model, inputs, *OPTIMIZERS["adamw"]).step),
            "stock Inductor": _compiled(_stock_step(model, inputs)),
        }
        what = "forward+backward, no optimizer"
    peaks = {name: peak_step_memory(step, device) for name, step in steps.items()} if args.peak_estimate else {}
    medians: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            medians[name].append(median_step_s(step, device, args.steps_per_round))
    size = " (full size)" if args.full else ""
    print(f"{args.model}{size}: {what}, {args.rounds} rounds x {args.steps_per_round} steps")
    for name, values in medians.items():
        peak = f", peak {peaks[name] / 2**20:.2f} MiB" if name in peaks else ""
        print(f"    {name}: median step {statistics.median(values) * 1e3:.3f} ms{peak}")
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


def _without(fix: str, replacement: Any, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` compiled (``_compiled``) with ``_torch_compat``'s ``fix`` replaced by ``replacement``."""
    original = getattr(_torch_compat, fix)
    setattr(_torch_compat, fix, replacement)
    try:
        return _compiled(step)
    finally:
        setattr(_torch_compat, fix, original)


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
