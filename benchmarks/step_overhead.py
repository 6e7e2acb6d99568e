"""fx_optim's own Python per step, as parameter tensors grow (issue #4, scale).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.step_overhead 50 200 400 1000
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.step_overhead 100 400 --by-op

Builds the scale benchmark's model (tiny Linear(16, 16) layers, AdamW in the backward),
compiles it with Inductor, prints the median unprofiled step, then runs ``--steps`` steps
under cProfile and prints, per step, the time spent in the package's own functions (their
``tottime``: the variant key, the run-time inputs, the backward guard), and the functions
that spend most of it. The profiler slows Python down, so compare sizes with each other,
not with unprofiled steps.

``--two-groups``: one AdamW attached with ``fx_optim_pass.attach``, its weights in a group
with weight decay and its biases in one without (the usual transformer recipe), instead of
an optimizer per parameter.

``--by-op``: the PyTorch profiler instead (``benchmarks.step_profile``), with Inductor's
kernels recorded (``cpp.enable_kernel_profile``), and the self time per step of each op and
region: the generated kernels (``cpp_fused_*``, together), the matmuls, and the Python
regions around them (the compiled region, Inductor's wrapper, Dynamo's guards).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from typing import Any

import torch

import fx_optim_pass as fop
from benchmarks.peers import Peer, build_peer
from benchmarks.run import OPTIMIZERS, median_step_s, scale_model
from benchmarks.step_profile import describe, profile_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tensors", type=int, nargs="+", help="parameter tensor counts (two per layer)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lines", type=int, default=6, help="the package's costliest functions to list")
    parser.add_argument("--by-op", action="store_true", help="PyTorch profiler: self time per op and region")
    parser.add_argument(
        "--two-groups", action="store_true", help="one attached AdamW, weights and biases in two groups"
    )
    args = parser.parse_args()
    if args.by_op:
        torch._inductor.config.cpp.enable_kernel_profile = True
    for count in args.tensors:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, inputs = scale_model(count, torch.device("cpu"))
        peer = (
            two_group_peer(model, inputs)
            if args.two_groups
            else build_peer("fx_optim", model, inputs, *OPTIMIZERS["adamw"])
        )
        for _ in range(3):  # compile, then optimizer state
            peer.step()
        if args.by_op:
            by_op = profile_steps(peer.step, torch.device("cpu"), args.steps)
            print(describe(f"{count} parameter tensors", by_op, args.lines))
            continue
        median_ms = 1e3 * median_step_s(peer.step, torch.device("cpu"), args.steps)
        print(f"{count} parameter tensors: median step {median_ms:.2f} ms")
        python_profile = cProfile.Profile()
        python_profile.enable()
        for _ in range(args.steps):
            peer.step()
        python_profile.disable()
        # pstats' table: (file, line, function) -> (calls, primitive calls, tottime, cumtime, callers)
        table = pstats.Stats(python_profile).stats  # type: ignore[attr-defined]
        ours = {where: row[2] for where, row in table.items() if "fx_optim_pass" in where[0]}
        per_step_ms = 1e3 / args.steps
        total = sum(ours.values()) * per_step_ms
        per_tensor_us = total / count * 1e3
        print(f"    {total:.2f} ms per step in fx_optim_pass, profiled ({per_tensor_us:.1f} µs per tensor)")
        for (path, line, function), seconds in sorted(ours.items(), key=lambda item: -item[1])[: args.lines]:
            print(f"    {seconds * per_step_ms:.3f} ms  {path.split('fx_optim_pass/')[-1]}:{line} {function}")


def two_group_peer(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Peer:
    """fx_optim with one AdamW attached, weights with weight decay and biases without."""
    optimizer_class, kwargs = OPTIMIZERS["adamw"]
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() <= 1]
    groups: list[dict[str, Any]] = [{"params": weights}, {"params": biases, "weight_decay": 0.0}]
    optimizer = fop.attach(optimizer_class(groups, **kwargs))
    forward = torch.compile(model, backend=fop.make_backend(), fullgraph=True)

    def step() -> None:
        forward(*inputs).backward()

    return Peer("fx_optim", step, [optimizer], True)


if __name__ == "__main__":
    main()
