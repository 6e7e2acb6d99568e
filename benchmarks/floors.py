"""The two floors the targets are stated against (DESIGN.md section 3).

- Memory: what must be alive at the worst moment of the step: the activations
  the forward saves for backward plus the largest gradient that must exist at
  once (a tied weight's partial gradients coexist until summed). Read off the
  forward graph that AOTAutograd's partitioner produced.
- Bandwidth: the bytes an update must read and write, over this machine's
  copy bandwidth measured in the same run.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn
from torch.utils import benchmark

__all__ = ["copy_bandwidth", "largest_gradient_bytes", "saved_activation_bytes", "update_bytes"]

# Bytes per parameter element the update must move, in units of the parameter's size.
# AdamW: reads parameter, gradient, exp_avg, exp_avg_sq; writes parameter and both moments.
# SGD with momentum: reads parameter, gradient, momentum buffer; writes parameter and buffer.
_UPDATE_TRAFFIC = {"AdamW": 7, "Adam": 7, "SGD": 5}


def saved_activation_bytes(forward: fx.GraphModule) -> int:
    """Bytes the forward graph hands to backward that it allocated itself.

    Outputs that are (views of) graph inputs, such as parameters saved for
    backward, cost nothing new and are left out.
    """
    seen: set[fx.Node] = set()
    total = 0
    for node in forward.graph.output_node().all_input_nodes:
        base = node
        while base.op == "call_function" and getattr(base.target, "is_view", False) and base.all_input_nodes:
            base = base.all_input_nodes[0]
        if base.op == "placeholder" or node in seen:
            continue
        seen.add(node)
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            total += value.untyped_storage().nbytes() if value._base is None else value.numel() * value.element_size()
    return total


def largest_gradient_bytes(model: nn.Module) -> int:
    """The largest gradient that must exist at once: a parameter used k times has k partial gradients."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return max(p.numel() * p.element_size() * uses[id(p)] for p in model.parameters())


def update_bytes(optimizer_class: type[torch.optim.Optimizer], model: nn.Module) -> int:
    """Bytes the optimizer update must read and write for all of ``model``'s parameters."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return _UPDATE_TRAFFIC[optimizer_class.__name__] * param_bytes


def copy_bandwidth(device: torch.device, nbytes: int = 2**28) -> float:
    """Bytes per second that ``dst.copy_(src)`` moves (one read plus one write per byte copied)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timer = benchmark.Timer("dst.copy_(src)", globals={"dst": dst, "src": src})
    seconds = timer.blocked_autorange(min_run_time=1.0).median
    return 2 * nbytes / seconds
