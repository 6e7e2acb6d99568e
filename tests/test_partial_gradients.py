"""A parameter is never updated on part of its gradient (compiled calls that split it are refused)."""

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from tests.helpers import assert_params_close, snapshot


class TiedAcrossGraphBreak(nn.Module):
    """An embedding whose weight is used again as the output projection, after a graph break."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(8, 4)
        self.hidden = nn.Linear(4, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.hidden(self.embedding(tokens)))
        torch._dynamo.graph_break()
        return hidden @ self.embedding.weight.t()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_graph_break_between_uses_of_a_tied_weight_is_refused_before_any_update(compiler, device):
    model = TiedAcrossGraphBreak().to(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    # fullgraph=False on purpose: the graph break is what this test is about
    compiled = torch.compile(model, backend=fop.make_backend(compiler=compiler))
    before = snapshot(model.parameters())
    loss = compiled(torch.tensor([[1, 2, 3]], device=device)).sum()
    with pytest.raises(fop.PartialGradientError, match=r"embedding\.weight.*fullgraph=True"):
        loss.backward()
    assert_params_close(model.parameters(), before)


def test_two_forward_calls_in_one_loss_are_refused(device):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    before = snapshot(model.parameters())
    loss = compiled(torch.randn(3, 4, device=device)).sum() + compiled(torch.randn(3, 4, device=device)).sum()
    with pytest.raises(fop.PartialGradientError, match=r"weight, bias|bias, weight"):
        loss.backward()
    assert_params_close(model.parameters(), before)


def test_a_pending_call_outside_this_backward_is_not_a_partial_gradient(device):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    first = compiled(torch.randn(3, 4, device=device)).sum()
    second = compiled(torch.randn(3, 4, device=device)).sum()  # pending, but not part of first's backward
    before = snapshot(model.parameters())
    first.backward()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # `second` saved the parameters before this update: its backward now fails on
    # autograd's version check, as it does with PyTorch's eager in-backward hooks.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        second.backward()
