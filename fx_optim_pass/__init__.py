"""The optimizer step fused into the backward pass, compiled.

>>> import torch, fx_optim_pass as fop
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 1e-3})
>>> compiled = torch.compile(model, backend="fx_optim", fullgraph=True)
>>> compiled(torch.randn(4, 8)).sum().backward()   # parameters updated; p.grad is None
"""

from fx_optim_pass.api import apply_optimizer_in_backward, attach, detach, get_in_backward_optimizers
from fx_optim_pass.data_parallel import data_parallel
from fx_optim_pass.distributed import CollectiveError, DataParallelSetupError
from fx_optim_pass.dynamo_backend import (
    CompiledAutogradError,
    DoubleBackwardError,
    OptimizerStateError,
    PartialGradientError,
    RestrictedBackwardError,
    SecondBackwardError,
    ShardedStateError,
    backend,
    make_backend,
)
from fx_optim_pass.optim_lowering import UnsupportedOptimizerError
from fx_optim_pass.report import InspectError, Report, inspect

__all__ = [
    "CollectiveError",
    "CompiledAutogradError",
    "DataParallelSetupError",
    "DoubleBackwardError",
    "InspectError",
    "OptimizerStateError",
    "PartialGradientError",
    "Report",
    "RestrictedBackwardError",
    "SecondBackwardError",
    "ShardedStateError",
    "UnsupportedOptimizerError",
    "apply_optimizer_in_backward",
    "attach",
    "backend",
    "data_parallel",
    "detach",
    "get_in_backward_optimizers",
    "inspect",
    "make_backend",
]
