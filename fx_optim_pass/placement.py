"""Where each parameter's update landed in a graph the pass produced."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.fx as fx

from fx_optim_pass import _torch_compat
from fx_optim_pass.passes.insert_updates import PASS_META_KEY

__all__ = [
    "Placement",
    "find_placements",
    "late_updates",
    "params_read_by_backward",
    "placement_log",
    "placement_table",
]

# `TORCH_LOGS=fx_optim_pass.placement` prints the placement table of every rewrite.
placement_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """A parameter's gradient node, its inserted update nodes and the write into the parameter."""

    param: str
    param_input: fx.Node  # the parameter's placeholder
    gradient: fx.Node
    update: tuple[fx.Node, ...]
    write: fx.Node  # the last node that writes the parameter


def find_placements(graph: fx.Graph) -> dict[str, Placement]:
    """Placements of every parameter the pass updated in ``graph`` (joint, backward or post-grad).

    The write is our ``copy_`` into the parameter, or the in-place update node that
    Inductor folded it into (``_foreach_add_`` on the parameter, for SGD).
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    placeholders = {node.name: node for node in graph.find_nodes(op="placeholder")}
    tagged: dict[str, list[fx.Node]] = {}
    inputs: dict[str, str] = {}
    for node in graph.nodes:
        tag = node.meta.get(PASS_META_KEY)
        if tag is not None:
            tagged.setdefault(tag[0], []).append(node)
            inputs[tag[0]] = tag[2]
    placements = {}
    for name, nodes in tagged.items():
        param = placeholders.get(inputs[name])
        writes = [n for n in nodes if param is not None and param in _written_args(n)]
        update = tuple(n for n in nodes if n.meta[PASS_META_KEY][1] == "update")
        gradients = [
            arg
            for node in update
            for arg in node.all_input_nodes
            if arg.op != "placeholder" and PASS_META_KEY not in arg.meta
        ]
        if param is not None and writes and gradients:
            gradient = max(gradients, key=order.__getitem__)
            placements[name] = Placement(name, param, gradient, update, writes[-1])
    return placements


def _written_args(node: fx.Node) -> list[fx.Node]:
    """The nodes an op writes into, from its schema (``copy_``'s self, ``_foreach_add_``'s list)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    written: list[fx.Node] = []
    for argument, value in zip(schema.arguments, node.args):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, fx.Node)]
    return written


def placement_table(placements: dict[str, Placement]) -> str:
    """One line per parameter: its gradient node, its update, the write into it."""
    rows = [("parameter", "gradient node", "update nodes", "write node")]
    for name, p in placements.items():
        rows.append((name, p.gradient.name, f"{len(p.update)} ({p.update[0].name} ..)", p.write.name))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def late_updates(graph: fx.Graph) -> list[str]:
    """Parameters whose write comes after unrelated backward work.

    Between a parameter's gradient and the write into it, only its own update,
    the nodes that still read the parameter's old value, and what those need
    may run. Anything else there (say the next layer's gradient matmul) means
    the update was delayed and its gradient kept alive longer than needed.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    problems = []
    for name, placement in find_placements(graph).items():
        allowed = _ancestors([placement.write, *_alias_readers(placement.param_input)])
        between = [n for n in graph.nodes if order[placement.gradient] < order[n] < order[placement.write]]
        strays = [n.name for n in between if n not in allowed and n.meta.get(PASS_META_KEY, (None,))[0] != name]
        if strays:
            problems.append(f"{name}: {', '.join(strays)} run between its gradient and its update")
    return problems


def params_read_by_backward(joint: fx.Graph) -> set[str]:
    """Updated parameters whose value the backward may read for the gradients (not only for
    their own update), in a joint graph after the rewrite.

    The backward reads a parameter when a gradient formula needs it (``mm(grad, weight)``
    for the layer input's gradient), or when the partitioner recomputes a forward value
    from it instead of saving that value (``sigmoid(gate)``, a view of the weight). Such
    a backward, run a second time (``retain_graph=True``), would read the value the first
    run's update wrote. Conservative: any forward node but a matmul, convolution or
    attention may be recomputed.
    """
    in_backward: set[fx.Node] = set()
    for node in joint.nodes:
        if (node.op == "placeholder" and _torch_compat.is_tangent(node)) or any(
            arg in in_backward for arg in node.all_input_nodes
        ):
            in_backward.add(node)
    read = set()
    for name, placement in find_placements(joint).items():
        seen: set[fx.Node] = set()
        frontier = [placement.param_input]
        while frontier and name not in read:
            for user in frontier.pop().users:
                if PASS_META_KEY in user.meta or user.op == "output" or user in seen:
                    continue  # the update itself reads the new value on purpose
                seen.add(user)
                if user in in_backward:
                    read.add(name)
                elif _torch_compat.may_recompute_in_backward(user):
                    frontier.append(user)
    return read


def _alias_readers(node: fx.Node) -> list[fx.Node]:
    readers, frontier = [], [node]
    while frontier:
        for user in frontier.pop().users:
            if PASS_META_KEY in user.meta:
                continue
            readers.append(user)
            if _torch_compat.is_view_op(user):
                frontier.append(user)
    return readers


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    frontier = list(nodes)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        frontier.extend(node.all_input_nodes)
    return seen
