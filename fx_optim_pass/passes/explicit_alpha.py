"""Rewrite ``add(a, b, alpha=c)`` as ``add(a, mul(b, c))`` in a traced update.

Inductor's post-grad pattern ``add(mm(x, y), inp) -> addmm(inp, x, y)`` ignores
``alpha`` (torch 2.13; compare pytorch/pytorch#167313 for the reverse rewrite), so
``torch.add(x, a @ b, alpha=-0.5)`` compiles to ``x + a @ b``. torch.optim writes
exactly that shape: ``grad.add(param, alpha=weight_decay)`` with ``grad`` a matmul
(Adam, NAdam, RAdam, Adamax, ASGD). With ``alpha`` folded into a ``mul`` first, the
pattern can only fuse what is really there.

Before::

    add = aten.add.Tensor(mm, primals_1, alpha=0.5)

After::

    mul = aten.mul.Tensor(primals_1, 0.5)
    add = aten.add.Tensor(mm, mul)
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["make_alpha_explicit"]

_WITH_ALPHA = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)


def make_alpha_explicit(graph: fx.Graph) -> int:
    """Fold every non-unit ``alpha`` of add/sub into a ``mul``; returns how many."""
    rewritten = 0
    for node in list(graph.nodes):
        alpha = node.kwargs.get("alpha", 1)
        if node.target not in _WITH_ALPHA or (isinstance(alpha, (int, float)) and alpha == 1):
            continue
        other = node.args[1]
        with graph.inserting_before(node):
            scaled = graph.call_function(torch.ops.aten.mul.Tensor, (other, alpha))
        other_val, alpha_val = (x.meta.get("val") if isinstance(x, fx.Node) else x for x in (other, alpha))
        fake_mode = getattr(node.meta.get("val"), "fake_mode", None)
        if fake_mode is not None and other_val is not None and alpha_val is not None:
            with fake_mode:
                scaled.meta["val"] = torch.ops.aten.mul.Tensor(other_val, alpha_val)
        node.args = (node.args[0], scaled)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
        rewritten += 1
    return rewritten
