"""Rewrite ``detach_copy(x)`` as ``clone(x)`` in a traced update.

Functionalized, torch.optim's ``torch.clone(grad).detach()`` (SGD's first momentum
buffer) becomes ``aten.detach_copy``, which Inductor has no lowering for: it runs
as a fallback kernel that materializes a second full copy of the gradient (peak
memory one gradient higher, plus an extra pass over it). ``clone`` computes the
same values and Inductor fuses it into the update's loop. The update runs without
autograd, so dropping the detach changes nothing.

Before::

    detach_copy = aten.detach_copy.default(clone)

After::

    detach_copy = aten.clone.default(clone)
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["make_copies_fusable"]


def make_copies_fusable(graph: fx.Graph) -> int:
    """Turn every ``detach_copy`` into ``clone``; returns how many."""
    rewritten = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.detach_copy.default):
        node.target = torch.ops.aten.clone.default
        rewritten += 1
    return rewritten
