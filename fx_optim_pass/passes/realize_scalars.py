"""Make a traced update's per-step scalars (bias corrections, step size) separate buffers.

Traced with ``capturable=True``, Adam's bias corrections are 0-d tensor math
(``1 - beta ** step``, its sqrt, ``lr / bc1``). Inductor inlines a pointwise
producer into its consumer, so it recomputed two ``std::pow`` and a ``sqrt`` inside
the vectorized loop of the update, once per vector of elements (DESIGN.md section 3).
A consumer that needs its input realized (``as_strided``) makes Inductor store each
such scalar once per step; the loop then loads it.

Before::

    pow_1 = aten.pow.Scalar(0.9, step)
    sub_1 = aten.sub.Tensor(1, pow_1)
    div = aten.div.Tensor(lr, sub_1)
    addcdiv = aten.addcdiv.default(param, exp_avg, denom, value=div)   # f32[n]

After::

    div = aten.div.Tensor(lr, sub_1)
    realized = aten.as_strided.default(div, [], [])
    addcdiv = aten.addcdiv.default(param, exp_avg, denom, value=realized)
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["realize_step_scalars"]


def realize_step_scalars(graph: fx.Graph) -> int:
    """Route every computed 0-d value that feeds a non-0-d op through ``as_strided``; returns how many."""
    realized = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not _is_scalar_tensor(node):
            continue
        consumers = [user for user in node.users if user.op == "call_function" and not _is_scalar_tensor(user)]
        if not consumers:
            continue
        with graph.inserting_after(node):
            stored = graph.call_function(torch.ops.aten.as_strided.default, (node, [], []))
        stored.meta["val"] = node.meta["val"]
        for user in consumers:
            user.replace_input_with(node, stored)
        realized += 1
    return realized


def _is_scalar_tensor(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 0
