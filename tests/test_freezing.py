"""Freezing (``requires_grad_(False)``) and unfreezing parameters between steps is honoured."""

from copy import deepcopy

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from tests.helpers import MODES, assert_params_close, in_mode

ADAMW = {"lr": 0.01, "weight_decay": 0.1}
# requires_grad of the first layer before each step: trained, frozen twice, trained again
FIRST_LAYER_TRAINS = [True, False, False, True, True]


def mlp(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)


def train_with_freezing(model, compiled, device, *, batches=None):
    """Train ``compiled`` (in-backward AdamW) next to eager AdamW, freezing the first layer
    as in FIRST_LAYER_TRAINS; parameters and optimizer state must match after every step."""
    reference = deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), **ADAMW)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), ADAMW)
    batches = batches or [4] * len(FIRST_LAYER_TRAINS)
    for trains, batch in zip(FIRST_LAYER_TRAINS, batches):
        model[0].requires_grad_(trains)
        reference[0].requires_grad_(trains)
        frozen_before = [p.detach().clone() for p in model[0].parameters()]
        x = torch.randn(batch, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
        if not trains:
            assert all(torch.equal(p, b) for p, b in zip(model[0].parameters(), frozen_before))
        assert all(p.grad is None for p in model.parameters())
    for p, ref in zip(model.parameters(), reference.parameters()):
        (opt,) = p._in_backward_optimizers
        # a frozen step is no step: AdamW's step count and moments match eager's
        for key, value in reference_opt.state[ref].items():
            torch.testing.assert_close(opt.state[p][key], value)
    steps = {name: p._in_backward_optimizers[0].state[p]["step"].item() for name, p in model.named_parameters()}
    assert steps["2.weight"] == len(FIRST_LAYER_TRAINS) and steps["0.weight"] == sum(FIRST_LAYER_TRAINS)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_stay_and_unfrozen_ones_train(mode, device):
    model = mlp(device)
    train_with_freezing(model, in_mode(model, mode), device)
    if mode != "eager":  # one compile per requires_grad pattern, both reused
        assert compiles() == 2


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_freezing_with_dynamic_shapes_keeps_graphs_bounded(compiler, device):
    model = mlp(device)
    backend = fop.make_backend(compiler=compiler)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    batches = [4, 5, 7, 3, 9]
    train_with_freezing(model, compiled, device, batches=batches)
    assert compiles() <= situations(batches)


def test_freezing_after_the_automatic_dynamic_switch_keeps_graphs_bounded(device):
    model = mlp(device)
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    batches = [4, 5, 7, 3, 9]
    train_with_freezing(model, compiled, device, batches=batches)
    # static graph for batch 4, then dynamic ones for both requires_grad patterns
    assert compiles() <= 1 + situations(batches)


def compiles() -> int:
    """Graphs compiled, Dynamo's and the backend's own variants alike."""
    return torch._dynamo.utils.counters["aot_autograd"]["total"]


def situations(batches: list[int]) -> int:
    """The bound on compiles for a dynamic-shape graph: torch 2.13 recompiles per
    requires_grad pattern (2); where Dynamo keeps one graph for both (torch 2.11), the
    backend compiles the other pattern once per batch size it meets."""
    return max(2, 1 + len({(trains, batch) for trains, batch in zip(FIRST_LAYER_TRAINS, batches) if not trains}))


@pytest.mark.parametrize("mode", MODES)
def test_parameters_frozen_before_setup_train_once_unfrozen(mode, device):
    """A frozen backbone given in-backward optimizers up front trains once unfrozen (PyTorch's
    own _apply_optimizer_in_backward fails on frozen parameters)."""
    model = mlp(device)
    model[0].requires_grad_(False)
    reference = deepcopy(model)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    compiled = in_mode(model, mode)
    for step in range(4):
        if step == 2:
            model[0].requires_grad_(True)
            reference[0].requires_grad_(True)
        x = torch.randn(4, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
        assert all(p.grad is None for p in model.parameters())
        if step < 2:
            assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
    assert not any(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
