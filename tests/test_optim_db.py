"""Every per-parameter optimizer of PyTorch's own optimizer test database, compiled in the backward.

`optim_db` and its `optim_inputs_func` are PyTorch's parity matrix (imported, not
copied). Each configuration for CPU runs on the cheap aot_eager path; one
configuration per optimizer (the last the database yields) runs through Inductor.
"""

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import optim_db

from fx_optim_pass import _torch_compat
from tests.helpers import train_side_by_side

STEPS = 5
# Need a closure or sparse gradients: refused at setup (see test_error_messages.py), as is
# Adafactor before torch 2.13 (its compiled update did not match eager on 2.11).
NOT_PER_PARAMETER = {"LBFGS", "SparseAdam"} | (set() if _torch_compat.TRACES_ADAFACTOR else {"Adafactor"})


def configs(device):
    for info in optim_db:
        name = info.optim_cls.__name__
        if name in NOT_PER_PARAMETER:
            continue
        for optim_input in info.optim_inputs_func(device=device):
            yield pytest.param(info.optim_cls, optim_input.kwargs, id=f"{name}-{optim_input.desc}")


def model_for(optimizer_class, device):
    torch.manual_seed(0)
    bias = optimizer_class.__name__ != "Muon"  # Muon updates 2-D parameters only
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).to(device)


# Muon orthogonalizes in bfloat16 (Newton-Schulz); Inductor's matmuls round differently,
# so compare at bfloat16 tolerance (PyTorch skips this comparison for its own compiled Muon).
TOLERANCE = {"Muon": {"rtol": 1.6e-2, "atol": 1e-5}}


def check_parity(optimizer_class, kwargs, mode, device):
    torch.manual_seed(1)
    inputs = [torch.randn(5, 4, device=device) for _ in range(STEPS)]
    tolerance = TOLERANCE.get(optimizer_class.__name__, {})
    train_side_by_side(model_for(optimizer_class, device), optimizer_class, kwargs, mode, inputs, **tolerance)


@pytest.mark.parametrize(("optimizer_class", "kwargs"), list(configs("cpu")))
def test_optim_db_parity_aot_eager(optimizer_class, kwargs, device):
    check_parity(optimizer_class, kwargs, "aot_eager", device)


INDUCTOR_CONFIGS = [
    pytest.param(info.optim_cls, info.optim_inputs_func(device="cpu")[-1].kwargs, id=info.optim_cls.__name__)
    for info in optim_db
    if info.optim_cls.__name__ not in NOT_PER_PARAMETER
]


@pytest.mark.parametrize(("optimizer_class", "kwargs"), INDUCTOR_CONFIGS)
def test_optim_db_parity_inductor(optimizer_class, kwargs, device):
    check_parity(optimizer_class, kwargs, "inductor", device)
