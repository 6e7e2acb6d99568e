"""Average each parameter's gradient over the data-parallel ranks, in the joint graph.

Runs before ``insert_optimizer_updates``, which then updates each parameter from the
averaged gradient: the collective sits between the gradient and its update.

Before (joint graph, ``0.weight``)::

    mm_1 = aten.mm(permute_1, primals_3)           # gradient of 0.weight
    return [addmm, mm_1, ...]

After::

    mm_1 = aten.mm(permute_1, primals_3)
    all_reduce__0_weight = _c10d_functional.all_reduce(mm_1, "avg", "0")
    wait__0_weight = _c10d_functional.wait_tensor(all_reduce__0_weight)
    return [addmm, wait__0_weight, ...]             # the update (or autograd) reads this

The collective is issued as soon as the gradient exists and waited for right away;
Inductor's post-grad bucketing pass may merge adjacent ones (see ``_torch_compat._bucketing``).
Not used: Inductor's ``reorder_for_compute_comm_overlap`` passes, which in torch 2.13 moved
nodes of these graphs so that the parameters no longer matched DDP's.
"""

from __future__ import annotations

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
    averaged: dict[fx.Node, fx.Node] = {}  # one collective per gradient node, even if it feeds two outputs
    for input_index, name in spec.inputs:
        position = grad_positions.get(input_index)
        grad = outputs[position] if position is not None else None
        if not isinstance(grad, fx.Node):  # the output does not depend on this parameter
            continue
        if grad not in averaged:
            safe = node_safe_name(name)
            cursor = grad if grad.op != "placeholder" else last_placeholder
            with graph.inserting_after(cursor):
                issued = graph.create_node(
                    "call_function", all_reduce, (grad, "avg", group_name), name=f"all_reduce__{safe}"
                )
            with graph.inserting_after(issued):
                waited = graph.create_node("call_function", wait_tensor, (issued,), name=f"wait__{safe}")
            val = grad.meta["val"]
            issued.meta["val"] = _torch_compat.run_on_fake(lambda t: all_reduce(t, "avg", group_name), val)
            waited.meta["val"] = _torch_compat.run_on_fake(wait_tensor, issued.meta["val"])
            for node, role in ((issued, "all_reduce"), (waited, "wait")):
                node.meta["partitioner_tag"] = _torch_compat.MUST_BE_IN_BACKWARD
                node.meta[ALL_REDUCE_META_KEY] = (name, role)
            averaged[grad] = waited
        outputs[position] = averaged[grad]  # type: ignore[index]
    output.args = (outputs if isinstance(output.args[0], list) else tuple(outputs),)
    graph.lint()
    return len(averaged)
