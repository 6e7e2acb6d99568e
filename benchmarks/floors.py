"""The two floors the targets are stated against (DESIGN.md section 3).

- Memory: what must be alive at the worst moment of the step: the activations
  the forward saves for backward plus the largest single gradient, or a tied
  weight's partial gradients, which coexist until summed. The saved activations
  are read off the forward graph that AOTAutograd's partitioner produced.
- Bandwidth: the bytes an update must read and write, over this machine's
  copy bandwidth measured in the same run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import benchmark

__all__ = [
    "copy_bandwidth",
    "largest_gradient_bytes",
    "memory_floor",
    "saved_activation_bytes",
    "tied_gradient_bytes",
    "update_bytes",
]

# Bytes per parameter element the update must move, in units of the parameter's size.
# AdamW: reads parameter, gradient, exp_avg, exp_avg_sq; writes parameter and both moments.
# SGD with momentum: reads parameter, gradient, momentum buffer; writes parameter and buffer.
_UPDATE_TRAFFIC = {"AdamW": 7, "Adam": 7, "SGD": 5}


def saved_activation_bytes(forward: fx.GraphModule) -> int:
    """Bytes the forward graph hands to backward that it allocated itself, each storage once.

    Outputs that view the graph's inputs, such as parameters saved for backward, cost
    nothing new and are left out; outputs that view one another (q, k and v split from
    one projection) are one storage, counted once.
    """
    graph = forward.graph
    inputs = {StorageWeakRef(value.untyped_storage()) for value in _fake_tensors(graph.find_nodes(op="placeholder"))}
    saved = {
        StorageWeakRef(value.untyped_storage()): value.untyped_storage().nbytes()
        for value in _fake_tensors(graph.output_node().all_input_nodes)
    }
    return sum(nbytes for storage, nbytes in saved.items() if storage not in inputs)


def _fake_tensors(nodes: Iterable[fx.Node]) -> list[torch.Tensor]:
    return [value for node in nodes if isinstance(value := node.meta.get("val"), torch.Tensor)]


def largest_gradient_bytes(model: nn.Module) -> int:
    """The largest single gradient: one parameter's, or one partial gradient of a tied weight."""
    return max(p.numel() * p.element_size() for p in model.parameters())


def tied_gradient_bytes(model: nn.Module) -> int:
    """What a tied weight's partial gradients hold when summed: a parameter used k times has k."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return max(p.numel() * p.element_size() * uses[id(p)] for p in model.parameters())


def memory_floor(saved_bytes: int, model: nn.Module) -> int:
    """The bytes alive at the worse of two moments every step has.

    - A gradient is made while the saved activations exist (DESIGN.md section 3: saved
      activations + the largest single gradient).
    - A tied weight's partial gradients are summed: they all exist then, but not with every
      saved activation (its last partial arrives at the end of the backward).
    """
    return max(saved_bytes + largest_gradient_bytes(model), tied_gradient_bytes(model))


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


def main() -> None:
    """Print each workload's memory floor and its parts, from fx_optim's graphs (no timing)."""
    import argparse

    from benchmarks.peers import build_peer
    from benchmarks.run import OPTIMIZERS, workloads

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models", nargs="+", help="workload names (benchmarks.run)")
    parser.add_argument("--quick", action="store_true", help="the --quick sizes")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    args = parser.parse_args()
    chosen = {workload.name: workload for workload in workloads(args.quick)}
    for name in args.models:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, inputs = chosen[name].build(torch.device("cpu"))
        peer = build_peer("fx_optim", model, inputs, *OPTIMIZERS[args.optimizer])
        peer.step()
        saved = saved_activation_bytes(peer.graphs["forward"])
        mib = 2**20
        print(
            f"{name}: floor {memory_floor(saved, model) / mib:.2f} MiB (saved activations {saved / mib:.2f}, "
            f"largest gradient {largest_gradient_bytes(model) / mib:.2f}, tied {tied_gradient_bytes(model) / mib:.2f})"
        )


if __name__ == "__main__":
    main()
