"""Where each parameter's update landed in a graph the pass produced."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fx_optim_pass import _torch_compat
from fx_optim_pass.passes.insert_updates import PASS_META_KEY

__all__ = ["Placement", "find_placements", "late_updates"]


@dataclass(frozen=True)
class Placement:
    """A parameter's gradient node, its inserted update nodes and the write into the parameter."""

    param: str
    gradient: fx.Node
    update: tuple[fx.Node, ...]
    write: fx.Node


def find_placements(graph: fx.Graph) -> dict[str, Placement]:
    """Placements of every parameter the pass updated in ``graph`` (joint or backward)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    updates: dict[str, list[fx.Node]] = {}
    writes: dict[str, fx.Node] = {}
    for node in graph.nodes:
        tag = node.meta.get(PASS_META_KEY)
        if tag is None:
            continue
        name, role = tag
        if role == "write_param":
            writes[name] = node
        else:
            updates.setdefault(name, []).append(node)
    placements = {}
    for name, write in writes.items():
        inputs = [
            arg
            for node in updates.get(name, [])
            for arg in node.all_input_nodes
            if arg.op != "placeholder" and PASS_META_KEY not in arg.meta
        ]
        if inputs:
            gradient = max(inputs, key=order.__getitem__)
            placements[name] = Placement(name, gradient, tuple(updates[name]), write)
    return placements


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
        param = placement.write.args[0]
        assert isinstance(param, fx.Node)
        allowed = _ancestors([placement.write, *_alias_readers(param)])
        between = [n for n in graph.nodes if order[placement.gradient] < order[n] < order[placement.write]]
        strays = [n.name for n in between if n not in allowed and n.meta.get(PASS_META_KEY, (None,))[0] != name]
        if strays:
            problems.append(f"{name}: {', '.join(strays)} run between its gradient and its update")
    return problems


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
