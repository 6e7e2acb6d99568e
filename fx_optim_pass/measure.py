"""How much memory one training step needs, measured the way DESIGN.md section 3 says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["peak_step_memory", "profile_step_memory"]


def peak_step_memory(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes of live tensors during ``step()``, above what was live when it started."""
    return max(profile_step_memory(step, device), default=0)


def profile_step_memory(step: Callable[[], Any], device: torch.device | str = "cpu") -> list[int]:
    """Live tensor bytes above the step's start, after each allocation or free during ``step()``.

    CPU: the profiler's memory events (+bytes on allocation, -bytes on free), whose
    running sum is the live-bytes curve. CUDA: the caching allocator's counters give
    only the start and the peak, so the curve is ``[0, peak]``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return [0, torch.cuda.max_memory_allocated(device) - start]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        (event.start_ns(), event.nbytes())  # type: ignore[union-attr]
        for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live, curve = 0, []
    for _, nbytes in sorted(events):
        live += nbytes
        curve.append(live)
    return curve
