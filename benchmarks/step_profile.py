"""Where a steady training step's time goes, peer by peer: the PyTorch profiler (issue #4).

    python -m benchmarks.step_profile --model mlp --optimizer adamw --device cuda
    python -m benchmarks.step_profile --model convnet --optimizer sgd --quick --trace OUT

Builds one workload of ``benchmarks.run`` and, for each peer, after warm-up steps: the median
step unprofiled, then ``--steps`` steps under ``torch.profiler`` and, per step, what a
step-time gap between peers is made of:

- host-side work that scales with the parameter count: kernel launches, host-device copies,
  stream and device synchronizations, ``.item()`` reads (``aten::_local_scalar_dense``);
- the kernels that ran on the device, with their device time;
- the ops and regions with the most self CPU time: Inductor's generated kernels grouped
  (``cpp_fused_*``, ``triton_*``), the compiled region, AOTAutograd's and Inductor's wrappers.

A GPU step at these sizes is bound by the host (the README's H200 section), so the counts per
step say more than device time. ``--trace DIR`` writes a Chrome trace of each peer's profiled
steps (open in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.peers import build_peer
from benchmarks.run import OPTIMIZERS, median_step_s, workloads

# Events counted per step, by a part of their name. The CUDA runtime and driver calls appear only
# when the profiler records CUDA activity; Triton kernels launch through the driver (cuLaunchKernel).
COUNTED = {
    "kernel launches": ("LaunchKernel",),
    "host-device copies": ("Memcpy",),
    "synchronizations": ("Synchronize",),
    ".item() reads": ("aten::_local_scalar_dense",),
}
# Inductor names its kernels by what they fuse: one line for all of them.
GENERATED_KERNELS = {"cpp_fused": "cpp_fused_* (Inductor's C++ kernels)", "triton_": "triton_* (Inductor's kernels)"}


@dataclass
class StepProfile:
    """Per step: the median time unprofiled, then counts and times from the profiler."""

    median_ms: float
    counts: dict[str, float]
    device_kernels: float
    device_ms: float
    self_cpu_ms: dict[str, float]
    calls: dict[str, float]


def profile_steps(
    step: Callable[[], None], device: torch.device, steps: int, trace: Path | None = None, each_kernel: bool = False
) -> StepProfile:
    """``steps`` steady steps of ``step``: timed, then profiled (the caller warmed it up).
    Inductor's generated kernels count as one line, or each as its own with ``each_kernel``."""
    median_ms = 1e3 * median_step_s(step, device, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiled:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace is not None:
        profiled.export_chrome_trace(str(trace))
    counts: Counter[str] = Counter()
    self_cpu_us: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    device_kernels = device_us = 0.0
    for event in profiled.key_averages():
        if event.device_type == DeviceType.CUDA:  # a kernel or copy as the device ran it
            device_kernels += event.count / steps
            device_us += event.self_device_time_total / steps
            continue
        for what, parts in COUNTED.items():
            if any(part in event.key for part in parts):
                counts[what] += event.count / steps
        grouped = (label for prefix, label in GENERATED_KERNELS.items() if prefix in event.key)
        name = event.key if each_kernel else next(grouped, event.key)
        self_cpu_us[name] += event.self_cpu_time_total / steps
        calls[name] += event.count / steps
    return StepProfile(
        median_ms=median_ms,
        counts={what: counts[what] for what in COUNTED},
        device_kernels=device_kernels,
        device_ms=device_us / 1e3,
        self_cpu_ms={name: us / 1e3 for name, us in self_cpu_us.items()},
        calls=dict(calls),
    )


def describe(name: str, result: StepProfile, lines: int) -> str:
    counts = ", ".join(f"{value:.0f} {what}" for what, value in result.counts.items())
    text = [
        f"{name}: median step {result.median_ms:.2f} ms",
        f"    per step: {counts}; {result.device_kernels:.0f} device kernels, {result.device_ms:.3f} ms on the device",
    ]
    for op, ms in sorted(result.self_cpu_ms.items(), key=lambda item: -item[1])[:lines]:
        text.append(f"    {ms:8.3f} ms self CPU  {result.calls[op]:6.0f} calls  {op}")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", help="a workload of benchmarks.run (mlp gpt-finetune ...)")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    parser.add_argument("--quick", action="store_true", help="the workloads of bench-quick (smaller transformer)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--peers", nargs="*", default=["fx_optim", "eager_fused", "compiled_opt", "no_optimizer"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lines", type=int, default=12, help="ops with the most self CPU time to list")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace per peer into this folder")
    parser.add_argument("--each-kernel", action="store_true", help="a line per generated kernel, not one for all")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    (workload,) = [w for w in workloads(args.quick) if w.name == args.model]
    optimizer_class, kwargs = OPTIMIZERS[args.optimizer]
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    print(f"{args.model} / {args.optimizer} on {device} ({torch.__version__}), {args.steps} steps per peer")
    # On the CPU, Inductor's C++ kernels show in the profiler only when built to record themselves.
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": device.type == "cpu"}):
        for name in args.peers:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model, inputs = workload.build(device)
            peer = build_peer(name, model, inputs, optimizer_class, kwargs)
            for _ in range(3):  # compile, optimizer state, a recompile of the compiled optimizer
                peer.step()
            trace = args.trace / f"{args.model}_{args.optimizer}_{name}.json" if args.trace else None
            profiled = profile_steps(peer.step, device, args.steps, trace, args.each_kernel)
            print(describe(name, profiled, args.lines), flush=True)


if __name__ == "__main__":
    main()
