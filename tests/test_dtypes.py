"""float32, bfloat16 and float16 parameters, at the tolerance torch's own optimizer
tests use for each dtype (common_optimizers: atol = rtol = 5e-3 for the reduced
precisions when two implementations of the same optimizer are compared)."""

import pytest
import torch
from torch import nn

from tests.helpers import train_side_by_side

STEPS = 5
TOLERANCE = {
    torch.float32: {},
    torch.bfloat16: {"atol": 5e-3, "rtol": 5e-3},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}
CONFIGS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 0.01}),
    (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.RMSprop, {"lr": 0.01}),
]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0].__name__)
def test_parameters_of_each_dtype_match_eager(config, dtype, device):
    optimizer_class, kwargs = config
    if dtype == torch.float16 and optimizer_class is not torch.optim.SGD:
        # The default eps (1e-8, Adagrad 1e-10) is 0 in float16: eager torch.optim
        # itself turns every zero gradient into NaN (0 / 0); fp16 users raise eps.
        kwargs = {**kwargs, "eps": 1e-4}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device, dtype)
    inputs = [torch.randn(5, 6, device=device, dtype=dtype) for _ in range(STEPS)]
    subject, reference_opt = train_side_by_side(model, optimizer_class, kwargs, "aot_eager", inputs, **TOLERANCE[dtype])
    # State in the dtype torch keeps it in (the parameter's, and float32 for `step`).
    for p, ref_p in zip(subject.parameters(), reference_opt.param_groups[0]["params"]):
        (opt,) = p._in_backward_optimizers
        for key, value in reference_opt.state[ref_p].items():
            assert opt.state[p][key].dtype == value.dtype, key
