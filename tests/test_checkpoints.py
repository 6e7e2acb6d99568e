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
