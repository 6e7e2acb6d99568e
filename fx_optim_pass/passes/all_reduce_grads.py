"""Average each parameter's gradient over the data-parallel ranks, in the joint graph.

Runs before ``insert_optimizer_updates``, which then updates each parameter from the
averaged gradient, right after the wait: the collective sits between the gradient and its update.

Before (joint graph, two linear layers, backward part)::

    mm_1 = aten.mm(permute_1, relu)                 # gradient of 2.weight
    mm_2 = aten.mm(tangents_1, primals_4)           # gradient of the layer input (reads 2.weight)
    mm_3 = aten.mm(permute_3, primals_1)            # gradient of 0.weight
    return [..., mm_3, ..., mm_1, ...]

After::

    mm_1 = aten.mm(permute_1, relu)
    all_reduce__2_weight = _c10d_functional.all_reduce(mm_1, "avg", "0")   # issued at once
    mm_2 = aten.mm(tangents_1, primals_4)           # runs while 2.weight's gradient is in flight
    mm_3 = aten.mm(permute_3, primals_1)
    all_reduce__0_weight = _c10d_functional.all_reduce(mm_3, "avg", "0")
    wait__2_weight = _c10d_functional.wait_tensor(all_reduce__2_weight)
    wait__0_weight = _c10d_functional.wait_tensor(all_reduce__0_weight)
    return [..., wait__0_weight, ..., wait__2_weight, ...]   # the update (or autograd) reads these

Each collective is issued as soon as its gradient exists; its wait (and so the update
that ``insert_optimizer_updates`` puts right after it) is deferred until the backward
has computed as many bytes of later gradients as this one has (``_wait_anchors``).
The compute of a gradient grows with its size, as does the time to all-reduce it, so
this overlaps each collective with about as much work as it takes, while at most
about two gradients' worth of memory waits instead of one.

With Inductor, its post-grad bucketing pass may merge adjacent collectives, and its
scheduler passes sink the merged waits again (see ``_torch_compat._comm_overlap``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fx_optim_pass import _torch_compat
from fx_optim_pass.plan import UpdatePlan, node_safe_name

__all__ = ["ALL_REDUCE_META_KEY", "all_reduce_gradients"]

# node.meta[ALL_REDUCE_META_KEY] = (parameter name, "all_reduce" | "wait")
ALL_REDUCE_META_KEY = "fx_optim_pass_all_reduce"


def all_reduce_gradients(graph: fx.Graph, plan: UpdatePlan) -> int:
    """Replace each planned gradient output by its average over the plan's process group; returns how many."""
    spec = plan.all_reduce
    output = graph.output_node()
    grad_positions = _torch_compat.grad_output_positions(output)
    if spec is None or not grad_positions:  # not data parallel, or an inference graph
        return 0
    all_reduce, wait_tensor = _torch_compat.all_reduce_ops()
    group_name = spec.group.group_name
    outputs = list(output.args[0])  # type: ignore[arg-type]
    last_placeholder = list(graph.find_nodes(op="placeholder"))[-1]
    issued: dict[fx.Node, fx.Node] = {}  # one collective per gradient node, even if it feeds two outputs
    for input_index, name in spec.inputs:
        position = grad_positions.get(input_index)
        grad = outputs[position] if position is not None else None
        if not isinstance(grad, fx.Node) or grad in issued:  # no gradient for this input, or already issued
            continue
        cursor = grad if grad.op != "placeholder" else last_placeholder
        with graph.inserting_after(cursor):
            node = graph.create_node(
                "call_function", all_reduce, (grad, "avg", group_name), name=f"all_reduce__{node_safe_name(name)}"
            )
        node.meta["val"] = _torch_compat.run_on_fake(lambda t: all_reduce(t, "avg", group_name), grad.meta["val"])
        _tag(node, name, "all_reduce")
        issued[grad] = node

    averaged: dict[fx.Node, fx.Node] = {}
    cursors: dict[fx.Node, fx.Node] = {}  # per anchor, the last wait placed after it (keeps issue order)
    for collective, anchor in _wait_anchors(graph, list(issued.values())).items():
        name = collective.meta[ALL_REDUCE_META_KEY][0]
        with graph.inserting_after(cursors.get(anchor, anchor)):
            waited = graph.create_node(
                "call_function", wait_tensor, (collective,), name=f"wait__{node_safe_name(name)}"
            )
        waited.meta["val"] = _torch_compat.run_on_fake(wait_tensor, collective.meta["val"])
        _tag(waited, name, "wait")
        cursors[anchor] = waited
        averaged[collective.args[0]] = waited  # type: ignore[index]
    for input_index, _ in spec.inputs:
        position = grad_positions.get(input_index)
        if position is not None and outputs[position] in averaged:
            outputs[position] = averaged[outputs[position]]  # type: ignore[index]
    output.args = (outputs if isinstance(output.args[0], list) else tuple(outputs),)
    graph.lint()
    return len(averaged)


def _wait_anchors(graph: fx.Graph, collectives: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """For each collective (in graph order), the collective after whose issue it is waited for:
    the first later one by which later gradients add up to at least its own bytes, else the last."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    in_order = sorted(collectives, key=order.__getitem__)
    sizes = [_nbytes(c.meta["val"]) for c in in_order]
    anchors = {}
    for k, collective in enumerate(in_order):
        later_bytes, anchor = 0, collective
        for later, size in zip(in_order[k + 1 :], sizes[k + 1 :]):
            anchor, later_bytes = later, later_bytes + size
            if later_bytes >= sizes[k]:
                break
        anchors[collective] = anchor
    return anchors


def _nbytes(val: torch.Tensor) -> int:
    numel = val.numel()
    return numel * val.element_size() if isinstance(numel, int) else 0  # a symbolic size: waited for after the next one


def _tag(node: fx.Node, name: str, role: str) -> None:
    node.meta["partitioner_tag"] = _torch_compat.MUST_BE_IN_BACKWARD
    node.meta[ALL_REDUCE_META_KEY] = (name, role)
