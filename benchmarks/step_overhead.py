"""fx_optim's own Python per step, as parameter tensors grow (issue #4, scale).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.step_overhead 50 200 400 1000
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.step_overhead 100 400 --by-op
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.step_overhead --model gpt-finetune --stages

Builds the scale benchmark's model (tiny Linear(16, 16) layers, AdamW in the backward),
compiles it with Inductor, prints the median unprofiled step, then runs ``--steps`` steps
under cProfile and prints, per step, the time spent in the package's own functions (their
``tottime``: the variant key, the run-time inputs, the backward guard), and the functions
that spend most of it. The profiler slows Python down, so compare sizes with each other,
not with unprofiled steps.

``--two-groups``: one AdamW attached with ``fx_optim_pass.attach``, its weights in a group
with weight decay and its biases in one without (the usual transformer recipe), instead of
an optimizer per parameter.

``--model NAME``: a workload of ``benchmarks.run --quick`` (``gpt-finetune``, ...) instead
of the scale models.

``--stages``: no profiler; the wall time per step of each stage of the package's per-call
work (the variant key, the run-time inputs, the state layout check, the backward guard),
timed in the steps themselves, and for the stages without side effects the same call made
again at once. The step's kernels leave the caches cold for the Python objects each stage
reads (parameters, optimizers, their groups and state): the difference is what the misses
cost.

``--by-op``: the PyTorch profiler instead (``benchmarks.step_profile``), with Inductor's
kernels recorded (``cpp.enable_kernel_profile``), and the self time per step of each op and
region: the generated kernels (``cpp_fused_*``, together), the matmuls, and the Python
regions around them (the compiled region, Inductor's wrapper, Dynamo's guards).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

import fx_optim_pass as fop
from benchmarks.peers import Peer, build_peer
from benchmarks.run import OPTIMIZERS, median_step_s, scale_model, workloads
from benchmarks.step_profile import describe, profile_steps
from fx_optim_pass import _torch_compat, dynamo_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tensors", type=int, nargs="*", help="parameter tensor counts (two per layer)")
    parser.add_argument("--model", help="a workload of benchmarks.run --quick instead (gpt-finetune, ...)")
    parser.add_argument("--stages", action="store_true", help="wall time per stage of the package's per-call work")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lines", type=int, default=6, help="the package's costliest functions to list")
    parser.add_argument("--by-op", action="store_true", help="PyTorch profiler: self time per op and region")
    parser.add_argument(
        "--two-groups", action="store_true", help="one attached AdamW, weights and biases in two groups"
    )
    args = parser.parse_args()
    if args.by_op:
        torch._inductor.config.cpp.enable_kernel_profile = True
    stage_times = time_stages() if args.stages else None  # before compiling: the layout check is made then
    quick = {workload.name: workload for workload in workloads(quick=True)}
    for count in [args.model] if args.model else args.tensors:
        torch._dynamo.reset()
        torch.manual_seed(0)
        if isinstance(count, str):
            model, inputs = quick[count].build(torch.device("cpu"))
        else:
            model, inputs = scale_model(count, torch.device("cpu"))
        peer = (
            two_group_peer(model, inputs)
            if args.two_groups
            else build_peer("fx_optim", model, inputs, *OPTIMIZERS["adamw"])
        )
        for _ in range(3):  # compile, then optimizer state
            peer.step()
        what = count if isinstance(count, str) else f"{count} parameter tensors"
        if args.by_op:
            by_op = profile_steps(peer.step, torch.device("cpu"), args.steps)
            print(describe(what, by_op, args.lines))
            continue
        median_ms = 1e3 * median_step_s(peer.step, torch.device("cpu"), args.steps)
        print(f"{what}: median step {median_ms:.2f} ms")
        if stage_times is not None:
            print_stages(peer.step, args.steps, stage_times)
            continue
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
        per_tensor_us = total / len(list(model.parameters())) * 1e3
        print(f"    {total:.2f} ms per step in fx_optim_pass, profiled ({per_tensor_us:.1f} µs per tensor)")
        for (path, line, function), seconds in sorted(ours.items(), key=lambda item: -item[1])[: args.lines]:
            print(f"    {seconds * per_step_ms:.3f} ms  {path.split('fx_optim_pass/')[-1]}:{line} {function}")


# (where, attribute, whether calling it twice is harmless) -> the stage's name
STAGES = {
    (dynamo_backend.RuntimeSignature, "__call__", True): "variant key (RuntimeSignature)",
    (dynamo_backend.RuntimeInputs, "__call__", True): "run-time inputs (RuntimeInputs)",
    (dynamo_backend, "_watch_parameters", False): "parameter watch (_watch_parameters)",
    (dynamo_backend, "_guard_backward", False): "backward guard (_guard_backward)",
    (dynamo_backend, "_refuse_partial_gradients", False): "partial-gradient check, in the backward",
}


def time_stages() -> dict[str, list[float]]:
    """Wrap each stage of ``STAGES``, and the state layout check each compiled variant makes,
    to add up its wall time per call (ns) and, where harmless, that of the same call again."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def timed(name: str, function: Callable[..., Any], again: bool) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            result = function(*args, **kwargs)
            totals[name][0] += time.perf_counter_ns() - start
            if again:
                start = time.perf_counter_ns()
                function(*args, **kwargs)
                totals[name][1] += time.perf_counter_ns() - start
            return result

        return run

    for (where, attribute, again), name in STAGES.items():
        setattr(where, attribute, timed(name, getattr(where, attribute), again))
    make_check = _torch_compat.tensor_layout_check
    _torch_compat.tensor_layout_check = lambda tensors: timed(
        "state layout check (TensorGuards)", make_check(tensors), True
    )
    return totals


def print_stages(step: Callable[[], None], steps: int, totals: dict[str, list[float]]) -> None:
    totals.clear()
    for _ in range(steps):
        step()
    print("    per step, µs: in the step / the same call again at once (what cold caches cost)")
    for name, (in_step, again) in totals.items():
        repeated = f" / {again / steps / 1e3:6.1f}" if again else ""
        print(f"    {in_step / steps / 1e3:6.1f}{repeated}  {name}")


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
