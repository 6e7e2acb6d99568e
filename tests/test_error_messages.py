"""Bad input gets a clear error that says what to do, before any parameter changes."""

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from tests.helpers import assert_params_close, snapshot


@pytest.mark.parametrize("optimizer_class", [torch.optim.LBFGS, torch.optim.SparseAdam])
def test_untraceable_torch_optimizers_are_refused_at_setup(optimizer_class):
    model = nn.Linear(4, 2)
    with pytest.raises(fop.UnsupportedOptimizerError, match=optimizer_class.__name__ + ".*torch.optim.SGD"):
        fop.apply_optimizer_in_backward(optimizer_class, model.parameters(), {"lr": 0.1})
    assert not any(hasattr(p, "_in_backward_optimizers") for p in model.parameters())


def test_not_an_optimizer_class_is_refused():
    with pytest.raises(fop.UnsupportedOptimizerError, match=r"not a torch\.optim\.Optimizer subclass"):
        fop.apply_optimizer_in_backward(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), [], {})


def test_non_leaf_tensor_is_refused():
    weight = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(TypeError, match="leaf"):
        fop.apply_optimizer_in_backward(torch.optim.SGD, [weight * 2], {"lr": 0.1})


def test_hyperparameters_torch_rejects_get_torchs_error():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fop.apply_optimizer_in_backward(torch.optim.AdamW, nn.Linear(2, 2).parameters(), {"lr": -1.0})


class ItemSGD(torch.optim.Optimizer):
    """Reads the gradient as a Python number: its value would be frozen into a graph."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-float(p.grad.abs().max()))


def test_untraceable_update_is_refused_at_compile_time_before_any_change():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    fop.apply_optimizer_in_backward(ItemSGD, model.parameters(), {"lr": 0.1})
    before = snapshot(model.parameters())
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    with pytest.raises(Exception, match=r"ItemSGD.*'0\.weight'") as error:
        compiled(torch.randn(3, 4)).sum().backward()
    assert "leave this parameter out" in str(error.value) or ".item()" in str(error.value)
    assert_params_close(model.parameters(), before)


def test_unknown_compiler_is_refused():
    with pytest.raises(ValueError, match="'inductor' or 'aot_eager'"):
        fop.make_backend(compiler="tvm")  # type: ignore[arg-type]
