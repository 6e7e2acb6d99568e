"""fx_optim_pass.attach: one existing optimizer, any param groups, run in the backward."""

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from tests.helpers import MODES, assert_params_close, in_mode, snapshot

STEPS = 6


def model_and_groups(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    groups = [
        {"params": model[0].parameters(), "lr": 0.01, "weight_decay": 0.1},
        {"params": model[2].parameters(), "lr": 0.03},
    ]
    return model, groups


def make(device):
    model, groups = model_and_groups(device)
    reference, ref_groups = model_and_groups(device)
    return model, torch.optim.AdamW(groups, amsgrad=True), reference, torch.optim.AdamW(ref_groups, amsgrad=True)


def eager_step(model, opt, x):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("mode", MODES)
def test_attached_optimizer_with_param_groups_and_scheduler_matches_eager(mode, device):
    model, opt, reference, ref_opt = make(device)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    compiled = in_mode(model, mode)
    assert fop.attach(opt) is opt
    for _ in range(STEPS):
        x = torch.randn(4, 6, device=device)
        compiled(x).sum().backward()
        assert all(p.grad is None for p in model.parameters())
        before = snapshot(model.parameters())
        opt.step()  # a no-op: the update already ran in the backward
        opt.zero_grad()
        assert_params_close(model.parameters(), before)
        scheduler.step()
        eager_step(reference, ref_opt, x)
        ref_scheduler.step()
        assert_params_close(model.parameters(), reference.parameters())
    state, ref_state = opt.state_dict(), ref_opt.state_dict()
    assert state["param_groups"] == ref_state["param_groups"]
    for index, param_state in ref_state["state"].items():
        for key, value in param_state.items():
            torch.testing.assert_close(state["state"][index][key], value)
    if mode != "eager":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_detach_returns_to_ordinary_stepping_with_the_same_state(device):
    model, opt, reference, ref_opt = make(device)
    compiled = in_mode(model, "aot_eager")
    fop.attach(opt)
    for step in range(STEPS):
        if step == 3:
            assert fop.detach(opt) is opt
            assert not any(hasattr(p, "_in_backward_optimizers") for p in model.parameters())
        x = torch.randn(4, 6, device=device)
        if step < 3:
            compiled(x).sum().backward()
        else:
            eager_step(compiled, opt, x)
        eager_step(reference, ref_opt, x)
        assert_params_close(model.parameters(), reference.parameters())


def test_parameter_added_after_compiling_gets_an_ordinary_gradient_and_step():
    """A group grown after attach() holds a parameter that is not in the backward: it steps as usual."""
    model, opt, reference, ref_opt = make("cpu")
    extra = nn.Parameter(torch.ones(3))
    ref_extra = nn.Parameter(torch.ones(3))
    fop.attach(opt)
    compiled = torch.compile(lambda x: model(x) * extra, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    opt.add_param_group({"params": [extra], "lr": 0.1})
    ref_opt.add_param_group({"params": [ref_extra], "lr": 0.1})
    for _ in range(3):
        x = torch.randn(4, 6)
        compiled(x).sum().backward()
        opt.step()  # steps only `extra`, the one parameter with a gradient
        opt.zero_grad()
        (reference(x) * ref_extra).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert_params_close([*model.parameters(), extra], [*reference.parameters(), ref_extra])
