"""Move the updates' per-step scalar math to the start of the backward graph.

Each update computes a few 0-d values from its step count and the hyperparameters alone:
Adam's ``step + 1``, bias corrections and step size, and the write of the new step count.
After the gradient, where the pass inserts them (and where the partitioner's reordering puts
them back, next to their first reader), they land inside one of Inductor's CPU kernels, which
runs its loop nests in one OpenMP parallel region: there each 0-d nest is an ``omp single``,
a barrier per parameter. Under ``OMP_WAIT_POLICY=PASSIVE`` a barrier puts the threads to
sleep and wakes them: about 15 us on the 2-core benchmark machine, against under 1 us spinning
(README, "Benchmarks"). First in the backward, they run on the calling thread before the first
kernel opens its parallel region: no barrier.

Nothing outside the backward can tell: it runs as one call, each moved node reads only 0-d
values that no node left behind writes first, and no node left behind reads the state a moved
write writes. SGD's first-step select reads ``logical_not(state_exists)``, a 0-d value that
moves, so the flag's write moves too (``OptimizerStep.step_function``).

This runs on the backward graph the partitioner cut: in the joint graph, the partitioner's
``reordering_to_mimic_autograd_engine`` would put each node back next to its first reader.

Before (backward, AdamW on ``0.weight``)::

    mm_2 = aten.mm.default(t_6, primals_3)                         # gradient of 0.weight
    ...
    adamw_update__0_weight_1 = aten.add.Tensor(primals_11, 1)      # step + 1
    adamw_update__0_weight_12 = aten.pow.Scalar(read_betas_0, adamw_update__0_weight_1)
    ...
    adamw_write_step__0_weight = aten.copy_.default(primals_11, adamw_update__0_weight_1)

After::

    adamw_update__0_weight_1 = aten.add.Tensor(primals_11, 1)
    adamw_update__0_weight_12 = aten.pow.Scalar(read_betas_0, adamw_update__0_weight_1)
    ...
    adamw_write_step__0_weight = aten.copy_.default(primals_11, adamw_update__0_weight_1)
    ...
    mm_2 = aten.mm.default(t_6, primals_3)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fx_optim_pass.passes.insert_updates import PASS_META_KEY

__all__ = ["hoist_step_scalars"]


def hoist_step_scalars(graph: fx.Graph) -> int:
    """Move each update node (``PASS_META_KEY``) that computes a scalar from scalar inputs,
    or writes one into 0-d state, to right after the graph's inputs, keeping their order, and
    tag it ``step_scalars``; returns how many moved."""
    inputs = list(graph.find_nodes(op="placeholder"))
    if not inputs:
        return 0
    moved: dict[fx.Node, None] = {}  # ordered
    written_before: set[fx.Node] = set()  # inputs written by a node left in place, so far
    for node in list(graph.nodes):
        if PASS_META_KEY in node.meta and _is_scalar(node) and _can_move(node, moved, written_before):
            moved[node] = None
        elif node.target is torch.ops.aten.copy_.default:
            written_before.add(node.args[0])  # type: ignore[arg-type]
    cursor = inputs[-1]
    for node in moved:
        cursor.append(node)
        cursor = node
        param, _, placeholder = node.meta[PASS_META_KEY]
        node.meta[PASS_META_KEY] = (param, "step_scalars", placeholder)  # "update" nodes read the gradient
    return len(moved)


def _can_move(node: fx.Node, moved: dict[fx.Node, None], written_before: set[fx.Node]) -> bool:
    """Whether every input of ``node`` is a scalar available at the start (an input of the
    graph not yet written by a node left in place, or a node that moves too) and, for a
    write, whether every other reader of what it writes moves too."""
    for arg in node.all_input_nodes:
        if not _is_scalar(arg) or (arg not in moved and (arg.op != "placeholder" or arg in written_before)):
            return False
    if node.target is torch.ops.aten.copy_.default:
        # A reader left behind would see the new value. It cannot be handed a copy of the old
        # one: Inductor's post-grad passes remove a clone of an input as a no-op.
        target = node.args[0]
        assert isinstance(target, fx.Node)
        return all(user is node or user in moved for user in target.users)
    return True


def _is_scalar(node: fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))
