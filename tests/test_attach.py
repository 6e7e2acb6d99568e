"""fx_optim_pass.attach: one existing optimizer, any param groups, run in the backward."""

import copy

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


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_a_parameter_taken_out_of_its_group_after_a_compiled_step_is_refused_before_any_update(change, device):
    """Each parameter's group is found where it last was in the group's list, checked at
    every call (``optim_lowering.param_group``): one no longer in any group is refused."""
    model, opt, _, _ = make(device)
    fop.attach(opt)
    compiled = in_mode(model, "aot_eager")
    compiled(torch.randn(4, 6, device=device)).sum().backward()
    params = opt.param_groups[1]["params"]  # model[2]'s weight and bias
    if change == "removed":
        params.pop(0)
    else:
        params[0] = nn.Parameter(torch.zeros_like(params[0]))
    before = snapshot(model.parameters())
    with pytest.raises(fop.UnsupportedOptimizerError, match=r"'2\.weight' but no longer holds it"):
        compiled(torch.randn(4, 6, device=device)).sum().backward()
    assert_params_close(model.parameters(), before)


# The compiled step skips re-reading every parameter's setup when nothing changed since its
# last call (``dynamo_backend._LastCall``); each test below changes one thing that the
# settings alone do not show, between two steps of one compiled graph.


def _in_backward_model(device, *setups):
    """``model_and_groups``' model with ``setups`` ((apply function, optimizer class, kwargs)) applied in order."""
    model, _ = model_and_groups(device)
    for apply, optimizer_class, kwargs in setups:
        apply(optimizer_class, model.parameters(), kwargs)
    return model


def test_a_setup_redone_without_hooks_leaves_gradients_as_eager_after_a_compiled_step(device):
    """Detached, then set up again with register_hook=False and the same settings: each
    parameter has as many optimizers of the same kind as before, so only the package's
    record of setup changes shows that the backward must not update any more."""
    sgd = {"lr": 0.1}
    model = _in_backward_model(device, (fop.apply_optimizer_in_backward, torch.optim.SGD, sgd))
    loss = torch.compile(lambda x: model(x).sum(), backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    loss(torch.randn(4, 6, device=device)).backward()
    for optimizer in fop.get_in_backward_optimizers(model):
        fop.detach(optimizer)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), sgd, register_hook=False)
    before = snapshot(model.parameters())
    reference = copy.deepcopy(model)
    x = torch.randn(4, 6, device=device)
    loss(x).backward()
    reference(x).sum().backward()
    assert_params_close(model.parameters(), before)
    assert_params_close([p.grad for p in model.parameters()], [p.grad for p in reference.parameters()])


def test_a_second_optimizer_from_torchs_function_after_a_compiled_step_steps_too(device):
    """PyTorch's ``_apply_optimizer_in_backward`` leaves no trace in this package: the second
    optimizer shows only in the length of each parameter's ``_in_backward_optimizers``."""
    from torch.distributed.optim import _apply_optimizer_in_backward

    first = (_apply_optimizer_in_backward, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    second = (_apply_optimizer_in_backward, torch.optim.AdamW, {"lr": 0.01})
    model, reference = _in_backward_model(device, first), _in_backward_model(device, first)
    loss = torch.compile(lambda x: model(x).sum(), backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    for step in range(4):
        if step == 2:
            for target in (model, reference):
                second[0](second[1], target.parameters(), second[2])
        x = torch.randn(4, 6, device=device)
        loss(x).backward()
        reference(x).sum().backward()  # PyTorch's eager hooks
        assert_params_close(model.parameters(), reference.parameters())


def test_a_same_structure_model_without_hooks_gets_ordinary_gradients_from_the_shared_graph(device):
    """Two models of one structure share the graph; the second has the same optimizers and
    settings but no hooks, so only which parameters were passed tells the calls apart."""
    sgd = {"lr": 0.1}
    hooked = _in_backward_model(device, (fop.apply_optimizer_in_backward, torch.optim.SGD, sgd))
    unhooked, _ = model_and_groups(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, unhooked.parameters(), sgd, register_hook=False)
    reference = copy.deepcopy(unhooked)
    loss = torch.compile(
        lambda model, x: model(x).sum(), backend=fop.make_backend(compiler="aot_eager"), fullgraph=True
    )
    for _ in range(2):
        x = torch.randn(4, 6, device=device)
        loss(hooked, x).backward()
        before = snapshot(unhooked.parameters())
        loss(unhooked, x).backward()
        reference(x).sum().backward()
        assert_params_close(unhooked.parameters(), before)
        assert_params_close([p.grad for p in unhooked.parameters()], [p.grad for p in reference.parameters()])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
