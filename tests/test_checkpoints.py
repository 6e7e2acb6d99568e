"""Checkpoints move between eager and compiled training with identical results."""

from copy import deepcopy

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from tests.helpers import assert_params_close, in_mode

ADAMW = {"lr": 0.01, "weight_decay": 0.1}


def setup(device, dtype=torch.float32, optimizer_class=torch.optim.AdamW, kwargs=ADAMW):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device, dtype)
    fop.apply_optimizer_in_backward(optimizer_class, model.parameters(), kwargs)
    return model


def checkpoint(model):
    return deepcopy(
        {"model": model.state_dict(), "optim": [o.state_dict() for o in fop.get_in_backward_optimizers(model)]}
    )


def restore(model, saved):
    model.load_state_dict(saved["model"])
    for opt, state in zip(fop.get_in_backward_optimizers(model), saved["optim"]):
        opt.load_state_dict(state)


@pytest.mark.parametrize(("first", "then"), [("eager", "aot_eager"), ("aot_eager", "eager"), ("eager", "inductor")])
def test_checkpoint_resumes_in_the_other_mode_with_identical_results(first, then, device):
    xs = [torch.randn(4, 6, device=device) for _ in range(6)]
    trained = setup(device)
    run_first = in_mode(trained, first)
    for x in xs[:3]:
        run_first(x).sum().backward()
    saved = checkpoint(trained)
    for x in xs[3:]:
        run_first(x).sum().backward()

    resumed = setup(device)
    restore(resumed, saved)
    run_then = in_mode(resumed, then)
    for x in xs[3:]:
        run_then(x).sum().backward()
    assert_params_close(resumed.parameters(), trained.parameters())
    for opt, ref in zip(fop.get_in_backward_optimizers(resumed), fop.get_in_backward_optimizers(trained)):
        for key, value in ref.state_dict()["state"][0].items():
            torch.testing.assert_close(opt.state_dict()["state"][0][key], value)


def test_attached_optimizer_checkpoint_loads_into_a_plain_optimizer(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    plain = deepcopy(model)
    opt = fop.attach(torch.optim.AdamW(model.parameters(), **ADAMW))
    compiled = in_mode(model, "aot_eager")
    xs = [torch.randn(4, 6, device=device) for _ in range(5)]
    for x in xs[:3]:
        compiled(x).sum().backward()
    plain.load_state_dict(model.state_dict())
    plain_opt = torch.optim.AdamW(plain.parameters(), **ADAMW)
    # torch's own format, nothing to convert (deep-copied, as torch.save would: loading
    # a live state_dict makes both optimizers share state tensors)
    plain_opt.load_state_dict(deepcopy(opt.state_dict()))
    for x in xs[3:]:
        compiled(x).sum().backward()
        plain(x).sum().backward()
        plain_opt.step()
        plain_opt.zero_grad()
    assert_params_close(model.parameters(), plain.parameters())


@pytest.mark.parametrize("change", ["float64 state", "column-major state"])
def test_state_of_another_layout_gets_a_step_compiled_for_it(change, device):
    """Optimizer state that the compiled kernels were not built for (cast to float64, or
    laid out column-major, between steps: by the user, or by a checkpoint) gets a step
    compiled for it, and the results match eager AdamW on the same state. The state is not
    among Dynamo's guarded inputs, and Inductor's code checks only sizes and strides: a
    float64 moment read as float32 gave NaN parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    reference = deepcopy(model)
    reference_opts = [torch.optim.AdamW([p], **ADAMW) for p in reference.parameters()]
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), ADAMW)
    compiled = in_mode(model, "inductor")

    def change_layout(state):
        if change == "float64 state":
            state["exp_avg_sq"] = state["exp_avg_sq"].double()
            state["step"] = state["step"].double()
        else:
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].dim() == 2:
                    state[key] = state[key].t().contiguous().t()  # same values, other strides

    for step in range(5):
        if step == 2:
            for opt, ref_opt, p, ref_p in zip(
                fop.get_in_backward_optimizers(model), reference_opts, model.parameters(), reference.parameters()
            ):
                change_layout(opt.state[p])
                change_layout(ref_opt.state[ref_p])
        x = torch.randn(4, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        for ref_opt in reference_opts:
            ref_opt.step()
            ref_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
    for opt, ref_opt, p, ref_p in zip(
        fop.get_in_backward_optimizers(model), reference_opts, model.parameters(), reference.parameters()
    ):
        for key, value in ref_opt.state[ref_p].items():
            assert opt.state[p][key].dtype == value.dtype and opt.state[p][key].stride() == value.stride()
            # float32's tolerances: the moments sum float32 gradients, compiled and eager
            torch.testing.assert_close(opt.state[p][key], value, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("when", ["before the first step", "after two steps"])
def test_state_of_another_shape_is_refused_before_any_update(when, device):
    """A state_dict saved for another model (a first layer of 5 inputs, not 6) loaded into
    one parameter's optimizer: torch's load_state_dict takes it (it checks group sizes, not
    shapes). The step refuses it, naming the parameter and the state, before anything
    changes (before, torch's broadcast error came wrapped in UnsupportedOptimizerError,
    whose advice did not fit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), ADAMW)
    compiled = in_mode(model, "inductor")
    for _ in range(0 if when == "before the first step" else 2):
        compiled(torch.randn(4, 6, device=device)).sum().backward()
    other = nn.Linear(5, 8).to(device)
    other_optimizer = torch.optim.AdamW([other.weight], **ADAMW)
    other(torch.randn(4, 5, device=device)).sum().backward()
    other_optimizer.step()
    optimizers = fop.get_in_backward_optimizers(model)
    optimizers[0].load_state_dict(other_optimizer.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    states_before = [{k: v.clone() for k, v in opt.state[p].items()} for opt, p in zip(optimizers, model.parameters())]
    with pytest.raises(Exception) as raised:
        compiled(torch.randn(4, 6, device=device)).sum().backward()
    error = getattr(raised.value, "inner_exception", raised.value)  # Dynamo's BackendCompilerFailed wraps ours
    assert isinstance(error, fop.OptimizerStateError), repr(raised.value)
    assert "'exp_avg' of parameter '0.weight' has shape (8, 5), but its update reads one of shape (8, 6)" in str(error)
    assert_params_close(model.parameters(), params_before)
    for opt, p, before in zip(optimizers, model.parameters(), states_before):
        for key, value in before.items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=0)
