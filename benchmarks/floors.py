"""The two floors the targets are stated against (DESIGN.md section 3).

- Memory: what must be alive at the worst moment of the step, the worst of three
  moments read off the graphs AOTAutograd's partitioner produced:
  - a gradient is made while the activations the forward saved for backward exist;
  - a tied weight's partial gradients coexist until summed;
  - a library call of the backward (a convolution's or matmul's backward) runs with its
    inputs and outputs, and the saved activations that later work still needs.
- Bandwidth: the bytes an update must read and write, over this machine's
  copy bandwidth measured in the same run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import networkx as nx  # torch's own dependency (its partitioner's min cut)
import torch
import torch.fx as fx
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import benchmark

__all__ = [
    "backward_call_bytes",
    "copy_bandwidth",
    "largest_gradient_bytes",
    "memory_floor",
    "memory_floor_parts",
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
    inputs = _step_input_storages(forward)
    saved = _storages(*forward.graph.output_node().all_input_nodes)
    return sum(nbytes for storage, nbytes in saved.items() if storage not in inputs)


def _step_input_storages(forward: fx.GraphModule) -> set[StorageWeakRef]:
    """The storages of the step's inputs (parameters, optimizer state, the batch): they exist before it."""
    return set(_storages(*forward.graph.find_nodes(op="placeholder")))


def _storages(*nodes: fx.Node) -> dict[StorageWeakRef, int]:
    """The storages of the tensors ``nodes`` produce (a tuple's too), with their sizes in bytes."""
    values = [v for node in nodes for v in _values(node.meta.get("val"))]
    return {
        StorageWeakRef(v.untyped_storage()): v.untyped_storage().nbytes() for v in values if isinstance(v, torch.Tensor)
    }


def _values(value: Any) -> Iterable[Any]:
    return value if isinstance(value, (tuple, list)) else [value]


# Ops Inductor runs as whole calls into ATen or a library (oneDNN, cuBLAS), in its default
# configuration: their inputs are in memory when they run, and they write their outputs whole.
_aten = torch.ops.aten
LIBRARY_CALLS = {
    _aten.convolution_backward.default,
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    *(
        getattr(_aten, name).default
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu_backward",
            "_scaled_dot_product_flash_attention_backward",
            "_scaled_dot_product_efficient_attention_backward",
            "_scaled_dot_product_cudnn_attention_backward",
        )
        if hasattr(_aten, name)
    ),
}


def backward_call_bytes(forward: fx.GraphModule, backward: fx.GraphModule) -> int:
    """The fewest bytes alive during the backward's worst library call, in any order of its work.

    During a call in ``LIBRARY_CALLS``: its inputs and outputs, plus whatever crosses the call,
    at least the minimum cut between what must run before it (itself and the library calls it
    depends on) and what must run after (what depends on it): a value computed before and read
    after is in memory throughout. Saved activations are computed before. Any other value may
    be recomputed later rather than kept (as Inductor inlines pointwise code), so only library
    calls are pinned before. Storages are counted once (views share them), those of the
    forward's inputs (parameters, optimizer state, the batch) not at all: they exist before
    the step.
    """
    before_step = _step_input_storages(forward)
    nodes = [node for node in backward.graph.nodes if node.op != "get_attr"]
    network = _schedule_network(nodes, before_step)
    worst = 0
    for call in (node for node in nodes if node.target in LIBRARY_CALLS):
        at_call = {s: n for s, n in _storages(call, *call.all_input_nodes).items() if s not in before_step}
        worst = max(worst, sum(at_call.values()) + _min_crossing_bytes(network, call, nodes, at_call))
    return worst


def _schedule_network(nodes: list[fx.Node], free: set[StorageWeakRef]) -> nx.DiGraph:
    """The flow network of every order of ``nodes`` around one moment, without the moment.

    A node on the source side last ran before it, on the sink side it runs (again) after.
    Vertices: ("ran", node) for each node; ("computed", node), on the source side when the
    node ran at least once before; ("held", s) to ("read", s), the one finite edge per
    storage ``s`` (its size, 0 if ``free``), cut when ``s`` is computed before and read after.
    Edges without a capacity are infinite: the implications between these facts.
    """
    network = nx.DiGraph()
    for node in nodes:
        ran, computed = ("ran", node), ("computed", node)
        network.add_edge(ran, computed)  # last ran before: ran before at least once
        if node.target in LIBRARY_CALLS or node.op == "placeholder":
            network.add_edge(computed, ran)  # runs once: if it ran before, that was its last run
        for arg in node.all_input_nodes:
            network.add_edge(computed, ("computed", arg))  # it read its inputs when it ran
            for storage in _storages(arg):
                network.add_edge(("read", storage), ran)
        for storage, nbytes in _storages(node).items():
            network.add_edge(ran, ("held", storage))
            network.add_edge(("held", storage), ("read", storage), capacity=0 if storage in free else nbytes)
        if node.op == "placeholder":
            network.add_edge("source", ran)
        if node.op == "output":
            network.add_edge(ran, "sink")
    return network


def _min_crossing_bytes(
    network: nx.DiGraph, call: fx.Node, nodes: list[fx.Node], at_call: dict[StorageWeakRef, int]
) -> int:
    """Minimum over the orders of ``nodes`` of the bytes computed before ``call`` and read after,
    besides ``at_call`` (counted already): the ``_schedule_network`` with ``call`` pinned before
    and all that depends on it after."""
    network = network.copy()
    network.add_edge("source", ("ran", call))
    after = {call}
    for node in nodes:
        if any(arg in after for arg in node.all_input_nodes):
            after.add(node)
            network.add_edge(("ran", node), "sink")
    for storage in at_call:
        network[("held", storage)][("read", storage)]["capacity"] = 0
    # Boykov-Kolmogorov: half the time of networkx's default on these graphs, same cut.
    crossing, _ = nx.minimum_cut(network, "source", "sink", flow_func=nx.algorithms.flow.boykov_kolmogorov)
    return int(crossing)


def largest_gradient_bytes(model: nn.Module) -> int:
    """The largest single gradient: one parameter's, or one partial gradient of a tied weight."""
    return max(p.numel() * p.element_size() for p in model.parameters())


def tied_gradient_bytes(model: nn.Module) -> int:
    """What a tied weight's partial gradients hold when summed: a parameter used k times has k."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return max(p.numel() * p.element_size() * uses[id(p)] for p in model.parameters())


def memory_floor(saved_bytes: int, model: nn.Module, call_bytes: int = 0) -> int:
    """The bytes alive at the worst of three moments every step has.

    - A gradient is made while the saved activations exist (DESIGN.md section 3: saved
      activations + the largest single gradient).
    - A tied weight's partial gradients are summed: they all exist then, but not with every
      saved activation (its last partial arrives at the end of the backward).
    - The backward's worst library call (``backward_call_bytes``): with its own inputs and
      outputs, the activation gradients among them, which the first moment leaves out.
    """
    return max(saved_bytes + largest_gradient_bytes(model), tied_gradient_bytes(model), call_bytes)


def memory_floor_parts(graphs: dict[str, fx.GraphModule], model: nn.Module) -> dict[str, int | None]:
    """The memory floor and each of its parts, from fx_optim's ``graphs`` (its observer's
    "forward" and "backward"); without them (fx_optim not run), no saved activations and no floor."""
    saved = saved_activation_bytes(graphs["forward"]) if "forward" in graphs else None
    call = backward_call_bytes(graphs["forward"], graphs["backward"]) if "backward" in graphs else 0
    return {
        "saved_activation_bytes": saved,
        "largest_gradient_bytes": largest_gradient_bytes(model),
        "tied_gradient_bytes": tied_gradient_bytes(model),
        "backward_call_bytes": call,
        "memory_bytes": None if saved is None else memory_floor(saved, model, call),
    }


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
        mib = {key: (value or 0) / 2**20 for key, value in memory_floor_parts(peer.graphs, model).items()}
        print(
            f"{name}: floor {mib['memory_bytes']:.2f} MiB (saved activations {mib['saved_activation_bytes']:.2f}, "
            f"largest gradient {mib['largest_gradient_bytes']:.2f}, tied {mib['tied_gradient_bytes']:.2f}, "
            f"worst backward call {mib['backward_call_bytes']:.2f})"
        )


if __name__ == "__main__":
    main()
