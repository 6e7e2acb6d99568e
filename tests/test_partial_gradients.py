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


def test_a_call_whose_backward_runs_before_the_refused_one_is_not_updated_either(device):
    """The head's compiled backward runs first, and is fine on its own; the body's two calls
    split their parameters' gradient. The head's check already refuses: nothing changes."""
    torch.manual_seed(0)
    body, head = nn.Linear(4, 4).to(device), nn.Linear(4, 2).to(device)
    for module in (body, head):
        fop.apply_optimizer_in_backward(torch.optim.AdamW, module.parameters(), {"lr": 0.1})
    backend = fop.make_backend(compiler="aot_eager")
    compiled_body = torch.compile(body, backend=backend, fullgraph=True)
    compiled_head = torch.compile(head, backend=backend, fullgraph=True)
    before = snapshot([*body.parameters(), *head.parameters()])
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    loss = compiled_head(compiled_body(x) + compiled_body(y)).sum()
    with pytest.raises(fop.PartialGradientError, match=r"weight.*more than one compiled call.*Nothing was updated"):
        loss.backward()
    assert_params_close([*body.parameters(), *head.parameters()], before)


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


def mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("when", ["after", "before"])
def test_eager_term_on_an_updated_parameter_is_refused_before_any_update(when, compiler, device):
    """An eager regularizer adds gradient that the compiled update would miss. Computed after
    the compiled call its backward runs first (AccumulateGrad's check); before, it runs last
    (the compiled backward's check). Either way nothing is updated."""
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    compiled = torch.compile(model, backend=fop.make_backend(compiler=compiler), fullgraph=True)
    x = torch.randn(3, 4, device=device)
    compiled(x).sum().backward()  # an ordinary step first: compiled updates work
    before = snapshot(model.parameters())
    if when == "before":
        penalty = model[0].weight.pow(2).sum()
        loss = compiled(x).sum() + penalty
    else:
        loss = compiled(x).sum() + model[0].weight.pow(2).sum()
    with pytest.raises(fop.PartialGradientError, match=r"0\.weight get gradient from code outside the compiled"):
        loss.backward()
    assert_params_close(model.parameters(), before)
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters() for opt in p._in_backward_optimizers)


def test_eager_use_of_a_parameter_without_in_backward_optimizer_is_fine(device):
    """Only updated parameters are guarded: an eager term on an ordinary parameter accumulates into .grad."""
    model = mlp(device)
    reference = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model[0].parameters(), {"lr": 0.1})
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    ref_opt = torch.optim.SGD(reference[0].parameters(), lr=0.1)
    x = torch.randn(3, 4, device=device)
    (compiled(x).sum() + model[2].weight.pow(2).sum()).backward()
    (reference(x).sum() + reference[2].weight.pow(2).sum()).backward()
    ref_opt.step()
    assert_params_close(model[0].parameters(), reference[0].parameters())
    torch.testing.assert_close(model[2].weight.grad, reference[2].weight.grad)
