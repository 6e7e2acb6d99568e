"""Insert each parameter's optimizer update right after its gradient in the joint graph.

Before (joint graph, SGD on ``0.weight``)::

    mm_1 = aten.mm(permute_1, primals_3)           # gradient of 0.weight
    return [addmm, mm_1, ...]

After::

    mm_1 = aten.mm(permute_1, primals_3)
    sgd_update__0_weight = aten.neg(primals_6)     # traced from torch.optim.SGD.step
    ...
    write__0_weight = aten.copy_(primals_1, sgd_update__0_weight_3)
    return [addmm, None, ...]                       # autograd receives no gradient

Every inserted node carries ``partitioner_tag = "must_be_in_backward"`` so the
min-cut partitioner keeps it in the backward graph, but the ``.item()`` reads of the
run-time floats, which go to the forward (``_read_floats``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx

from fx_optim_pass import _torch_compat
from fx_optim_pass.optim_lowering import trace_step
from fx_optim_pass.passes.explicit_alpha import make_alpha_explicit
from fx_optim_pass.passes.fusable_copies import make_copies_fusable
from fx_optim_pass.passes.realize_scalars import realize_step_scalars
from fx_optim_pass.passes.shard_updates import trace_gather, trace_scatter
from fx_optim_pass.plan import ParamUpdate, UpdatePlan, node_safe_name

__all__ = ["PASS_META_KEY", "insert_optimizer_updates"]

# node.meta[PASS_META_KEY] = (parameter name, role, name of the parameter's placeholder);
# roles: "update", "write_state", "write_param", and for a sharded parameter (see
# shard_updates) "scatter" and "gather" around its updates. Inductor may fold a write into an
# in-place update node (SGD's _foreach_add_), which keeps the "update" tag. In the backward
# graph, the per-step scalar math moved to its start is "step_scalars" (hoist_step_scalars).
PASS_META_KEY = "fx_optim_pass"


def insert_optimizer_updates(graph: fx.Graph, plan: UpdatePlan) -> int:
    """Rewrite a joint graph so each planned parameter is updated in the backward; returns how many."""
    output = graph.output_node()
    grad_positions = _torch_compat.grad_output_positions(output)
    if not grad_positions:  # an inference graph: nothing to update
        return 0
    placeholders = {_torch_compat.input_index(node): node for node in graph.find_nodes(op="placeholder")}
    numbers = _read_floats(graph, plan, placeholders)
    inputs = placeholders | numbers  # the floats' placeholders give way to the numbers read from them
    order = {node: i for i, node in enumerate(graph.nodes)}
    outputs = list(output.args[0])  # type: ignore[arg-type]
    updated = 0
    for param_update in plan.params:
        position = grad_positions.get(param_update.input_index)
        grad = outputs[position] if position is not None else None
        if grad is None:  # the output does not depend on this parameter
            continue
        _insert_param_update(graph, param_update, inputs, grad, order)
        outputs[position] = None  # type: ignore[index]
        updated += 1
    output.args = (outputs if isinstance(output.args[0], list) else tuple(outputs),)
    for number in numbers.values():
        if not number.users:  # read for updates of parameters this graph has no gradient for
            graph.erase_node(number)
    graph.lint()
    return updated


def _read_floats(
    graph: fx.Graph, plan: UpdatePlan, placeholders: dict[int | None, fx.Node]
) -> dict[int | None, fx.Node]:
    """Read each run-time float of ``plan`` once, in the forward (``.item()`` of its 0-d
    input), and hand the number to the backward: {its input position: the number}.

    Every update reading that value computes with the same symbol, so the symbols Inductor
    tracks stay as few as the distinct values: it copies every symbol's value range for each
    node it lowers, and a read per parameter (five symbols per AdamW parameter) made compile
    time grow with the square of the parameter count. In the forward, because to the
    backward's scheduler a number that arrives as an input is a kernel argument, while a
    number read there is a buffer that every update kernel depends on: Inductor's scheduler
    walks that buffer's users for each of them (dead-node elimination, in-place decisions,
    fusion checks), again a cost that grows with the square of the parameter count.
    The scale model's first call at 200 / 400 parameter tensors: 90.4 / 178.5 s with the reads
    in the backward, 66.5 / 119.5 s here. The backward's FX-graph-cache key then names float
    inputs (``_torch_compat.float_inputs_in_cache_keys``).
    """
    numbers: dict[int | None, fx.Node] = {}
    cursor = list(graph.find_nodes(op="placeholder"))[-1]
    for position, name in zip(plan.float_inputs(), plan.floats):
        placeholder = placeholders[position]
        traced = _torch_compat.trace_functional(torch.Tensor.item, [_val(placeholder)])
        (read,) = [node for node in traced.graph.nodes if node.op == "call_function"]
        with graph.inserting_after(cursor):
            cursor = graph.create_node("call_function", read.target, (placeholder,), name=f"read_{name}")
        cursor.meta = {**read.meta, "partitioner_tag": _torch_compat.MUST_BE_IN_FORWARD}
        numbers[position] = cursor
    return numbers


def _insert_param_update(
    graph: fx.Graph,
    param_update: ParamUpdate,
    inputs: dict[int | None, fx.Node],
    grad: fx.Node,
    order: dict[fx.Node, int],
) -> None:
    param = inputs[param_update.input_index]
    name = node_safe_name(param_update.name)
    cursor = grad if grad.op != "placeholder" else list(graph.find_nodes(op="placeholder"))[-1]
    current = param  # the parameter's value so far: each optimizer steps on the previous one's result
    computed_at = order.get(grad, -1)  # where the gradient is computed (before it is sharded)
    shard = param_update.shard
    if shard is not None:  # the optimizers step on this rank's shard, with the averaged gradient's shard
        traced = trace_scatter(shard, _val(param), _val(grad))
        _, (current, grad), cursor = _inline(
            graph, traced, [param, grad], cursor, f"scatter__{name}", (param_update.name, "scatter", param.name)
        )
    for step, input_indices in zip(param_update.steps, param_update.step_inputs):
        extras = [inputs[i] for i in input_indices]
        traced = trace_step(step, [_val(current), _val(grad), *map(_val, extras)], param_update.name)
        make_alpha_explicit(traced.graph)  # works around an Inductor miscompile, see explicit_alpha
        make_copies_fusable(traced.graph)  # no fallback kernel copying the gradient
        realize_step_scalars(traced.graph)  # scalar math once per step, not once per element
        new_values, _, cursor = _inline(
            graph,
            traced,
            [current, grad, *extras],
            cursor,
            f"{step.op_name}_update__{name}",
            (param_update.name, "update", param.name),
        )
        current = new_values.get(0, current)  # torch.optim never writes the gradient (see _run_step)
        for slot, key in enumerate(step.input_names()):
            if slot + 2 in new_values:
                cursor = _write(
                    graph,
                    cursor,
                    extras[slot],
                    new_values[slot + 2],
                    f"{step.op_name}_write_{key}__{name}",
                    (param_update.name, "write_state", param.name),
                )
    if shard is not None:
        traced = trace_gather(shard, _val(current), _val(param))
        _, (current,), cursor = _inline(
            graph, traced, [current, param], cursor, f"gather__{name}", (param_update.name, "gather", param.name)
        )
    if current is param:
        return
    last_reader = max(_readers(param), key=order.__getitem__, default=None)
    if last_reader is not None and order[last_reader] > computed_at:
        # The parameter is still read after its gradient (e.g. the gradient of the
        # layer input, mm(grad_out, weight)): those reads must see the old value.
        cursor = last_reader
    _write(graph, cursor, param, current, f"write__{name}", (param_update.name, "write_param", param.name))


def _val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _readers(param: fx.Node) -> Iterable[fx.Node]:
    """Original-graph nodes reading ``param`` directly or through a view of it."""
    seen, frontier = set(), [param]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or PASS_META_KEY in user.meta:
                continue
            seen.add(user)
            if _torch_compat.is_view_op(user):
                frontier.append(user)
    return [n for n in seen if n.op != "output"]


def _inline(
    graph: fx.Graph,
    traced: fx.GraphModule,
    inputs: Sequence[fx.Node],
    cursor: fx.Node,
    node_name: str,
    tag: tuple[str, str, str],
) -> tuple[dict[int, fx.Node], list[fx.Node], fx.Node]:
    """Copy ``traced``'s computation after ``cursor``; return {input slot: new value}, the
    returned values and the new cursor."""
    env: dict[fx.Node, fx.Node] = {}
    traced_placeholders = list(traced.graph.find_nodes(op="placeholder"))
    slot_of = {p: i for i, p in enumerate(traced_placeholders)}
    env.update(zip(traced_placeholders, inputs))
    new_values: dict[int, fx.Node] = {}
    for node in traced.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.target is torch.ops.aten.copy_.default and node.args[0] in slot_of:
            # functionalize's epilogue: "input k now holds this value"
            new_values[slot_of[node.args[0]]] = env[node.args[1]]  # type: ignore[index]
            continue
        with graph.inserting_after(cursor):
            if node.op == "get_attr":
                new = _constant(graph, getattr(traced, node.target), node_name)  # type: ignore[arg-type]
            else:
                new = graph.create_node(
                    node.op,
                    node.target,
                    fx.map_arg(node.args, env.__getitem__),
                    fx.map_arg(node.kwargs, env.__getitem__),
                    name=node_name,
                )
        # Keep make_fx's meta (val, tensor_meta, and unbacked_bindings for a run-time
        # .item()), but not its stack trace, which points into torch.optim.
        new.meta = {k: v for k, v in node.meta.items() if k != "stack_trace"}
        new.meta.update({"partitioner_tag": _torch_compat.MUST_BE_IN_BACKWARD, PASS_META_KEY: tag})
        env[node] = new
        cursor = new
    returned = fx.map_arg(traced.graph.output_node().args[0], env.__getitem__)
    values = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    return new_values, [v for v in values if isinstance(v, fx.Node)], cursor


def _constant(graph: fx.Graph, value: torch.Tensor, name: str) -> fx.Node:
    """A tensor constant of the traced update (torch 2.14 traces RMSprop's ``lerp_(grad, 1 -
    alpha)`` with a compiled-in ``alpha`` as ``tensor(1 - alpha)``), as a node of ``graph``: the
    traced module's attribute it reads is not the joint graph's. A 0-d one is computed, so
    the compiler sees its value; another is set on the joint graph's module."""
    if value.dim() == 0:
        return graph.call_function(
            torch.ops.aten.full.default,
            ([], _torch_compat.real_scalar_value(value)),
            {"dtype": value.dtype, "device": value.device},
            name=name,
        )
    module = graph.owning_module
    assert module is not None, "a tensor constant in an update outside a GraphModule: please report this bug"
    number = 0
    while hasattr(module, f"_fx_optim_pass_constant_{number}"):
        number += 1
    attribute = f"_fx_optim_pass_constant_{number}"
    module.register_buffer(attribute, value)
    return graph.create_node("get_attr", attribute, name=name)


def _write(
    graph: fx.Graph, cursor: fx.Node, target: fx.Node, value: fx.Node, name: str, tag: tuple[str, str, str]
) -> fx.Node:
    with graph.inserting_after(cursor):
        node = graph.create_node("call_function", torch.ops.aten.copy_.default, (target, value), name=name)
    node.meta = {
        "val": target.meta["val"],
        "partitioner_tag": _torch_compat.MUST_BE_IN_BACKWARD,
        PASS_META_KEY: tag,
    }
    return node
