"""The pure graph rewrites, on small hand-made graphs."""

import torch
import torch.fx as fx

from fx_optim_pass.passes.explicit_alpha import make_alpha_explicit


def test_make_alpha_explicit_folds_alpha_into_a_mul():
    def f(grad, param):
        return torch.ops.aten.add.Tensor(grad, param, alpha=0.5), torch.ops.aten.add.Tensor(grad, param)

    gm = fx.symbolic_trace(f)
    assert make_alpha_explicit(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.add.Tensor]
    assert all("alpha" not in n.kwargs for n in gm.graph.nodes)
    grad, param = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(gm(grad, param)[0], grad + 0.5 * param)
