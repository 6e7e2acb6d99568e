"""Every error of ours names the parameter or optimizer and the way out, and is raised before
any parameter or optimizer state changed.

One row per error: a setup, then the call that must fail. Before that call, every parameter,
every in-backward optimizer's state tensor and which optimizers each parameter has are
snapshotted; afterwards all must be exactly as they were. The data-parallel errors
(DataParallelSetupError, CollectiveError, ShardedStateError, shard_optimizer_state refusals)
need several processes and are checked in test_data_parallel.py; the CLI's UsageError in
test_inspect.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import fx_optim_pass as fop

Failing = tuple[nn.Module, Callable[[], Any]]
"""The model whose training state must not change, and the call that must fail."""


def mlp(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(device)


def compiled(model: nn.Module) -> Callable[..., torch.Tensor]:
    return torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)


def in_backward(optimizer_class: type[torch.optim.Optimizer], device: str, **kwargs: Any) -> nn.Sequential:
    model = mlp(device)
    fop.apply_optimizer_in_backward(optimizer_class, model.parameters(), {"lr": 0.1, **kwargs})
    return model


def one_step(model: nn.Module, device: str) -> Callable[[], Any]:
    step = compiled(model)
    return lambda: step(torch.randn(3, 4, device=device)).sum().backward()


class ItemSGD(torch.optim.Optimizer):
    """Reads the gradient as a Python number: its value would be frozen into a graph."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-float(p.grad.abs().max()))


class CountingSGD(ItemSGD):
    """Keeps a Python int in its state, which cannot be an input of the compiled graph."""

    def _init_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is not None and not self.state[p]:
                self.state[p]["count"] = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            self._init_group(group)
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["count"] += 1
                    p.add_(p.grad, alpha=-group["lr"])


def lbfgs(device: str) -> Failing:
    model = mlp(device)
    return model, lambda: fop.apply_optimizer_in_backward(torch.optim.LBFGS, model.parameters(), {"lr": 0.1})


def sparse_adam(device: str) -> Failing:
    model = mlp(device)
    return model, lambda: fop.apply_optimizer_in_backward(torch.optim.SparseAdam, model.parameters(), {"lr": 0.1})


def optimizer_instance_for_class(device: str) -> Failing:
    model = mlp(device)
    instance = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, lambda: fop.apply_optimizer_in_backward(instance, model.parameters(), {})  # type: ignore[arg-type]


def optimizer_name_for_class(device: str) -> Failing:
    model = mlp(device)
    return model, lambda: fop.apply_optimizer_in_backward("adamw", model.parameters(), {})  # type: ignore[arg-type]


def non_leaf_parameter(device: str) -> Failing:
    model = mlp(device)
    params = [model[0].weight, model[0].weight * 2]  # the first is fine, and must stay untouched
    return model, lambda: fop.apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": 0.1})


def attached_twice(device: str) -> Failing:
    model = mlp(device)
    optimizer = fop.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    return model, lambda: fop.attach(optimizer)


def untraceable_update(device: str) -> Failing:
    model = in_backward(ItemSGD, device)
    return model, one_step(model, device)


def non_tensor_state(device: str) -> Failing:
    model = in_backward(CountingSGD, device)
    return model, one_step(model, device)


def attached_with_groups(device: str) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = mlp(device)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}]
    return model, fop.attach(torch.optim.Adam(groups, lr=0.1))


def parameter_removed_from_groups_before_compiling(device: str) -> Failing:
    model, optimizer = attached_with_groups(device)
    del optimizer.param_groups[1]["params"][0]  # 2.weight
    return model, one_step(model, device)


def parameter_removed_from_groups_after_a_step(device: str) -> Failing:
    model, optimizer = attached_with_groups(device)
    step = one_step(model, device)
    step()
    del optimizer.param_groups[1]["params"][0]  # 2.weight
    return model, step


def create_graph(device: str) -> Failing:
    model = in_backward(torch.optim.AdamW, device)
    step = compiled(model)
    step(torch.randn(3, 4, device=device)).sum().backward()
    return model, lambda: step(torch.randn(3, 4, device=device)).sum().backward(create_graph=True)


def two_compiled_calls_in_one_loss(device: str) -> Failing:
    model = in_backward(torch.optim.AdamW, device)
    step = compiled(model)
    step(torch.randn(3, 4, device=device)).sum().backward()
    loss = step(torch.randn(3, 4, device=device)).sum() + step(torch.randn(3, 4, device=device)).sum()
    return model, loss.backward


def eager_term_on_an_updated_parameter(device: str) -> Failing:
    model = in_backward(torch.optim.AdamW, device)
    step = compiled(model)
    step(torch.randn(3, 4, device=device)).sum().backward()
    loss = step(torch.randn(3, 4, device=device)).sum() + model[0].weight.pow(2).sum()
    return model, loss.backward


def input_gradient_through_the_compiled_model(device: str) -> Failing:
    model = in_backward(torch.optim.AdamW, device)
    step = compiled(model)
    step(torch.randn(3, 4, device=device)).sum().backward()
    x = torch.randn(3, 4, device=device, requires_grad=True)
    loss = step(x).sum()
    return model, lambda: torch.autograd.grad(loss, x)


def backward_under_compiled_autograd(device: str) -> Failing:
    """Before, PyTorch's engine failed with a bare ``TypeError: an integer is required``."""
    model = in_backward(torch.optim.AdamW, device)
    step = compiled(model)
    step(torch.randn(3, 4, device=device)).sum().backward()  # a training step without it
    loss = step(torch.randn(3, 4, device=device)).sum()

    def under_compiled_autograd() -> None:
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss.backward()

    return model, under_compiled_autograd


def state_dict_of_another_model(device: str) -> Failing:
    model = in_backward(torch.optim.AdamW, device)
    step = compiled(model)
    step(torch.randn(3, 4, device=device)).sum().backward()
    other = nn.Linear(5, model[0].out_features).to(device)
    other_optimizer = torch.optim.AdamW([other.weight])
    other(torch.randn(3, 5, device=device)).sum().backward()
    other_optimizer.step()
    fop.get_in_backward_optimizers(model)[0].load_state_dict(other_optimizer.state_dict())
    return model, lambda: step(torch.randn(3, 4, device=device)).sum().backward()


def unknown_compiler(device: str) -> Failing:
    return mlp(device), lambda: fop.make_backend(compiler="tvm")  # type: ignore[arg-type]


def sharding_without_process_group(device: str) -> Failing:
    return mlp(device), lambda: fop.make_backend(shard_optimizer_state=True)


def inspect_without_optimizers(device: str) -> Failing:
    model = mlp(device)
    return model, lambda: fop.inspect(model, torch.randn(3, 4, device=device))


def inspect_with_wrong_inputs(device: str) -> Failing:
    model = in_backward(torch.optim.SGD, device)
    return model, lambda: fop.inspect(model, torch.randn(3, 5, device=device))


def inspect_of_a_frozen_model(device: str) -> Failing:
    model = in_backward(torch.optim.SGD, device).requires_grad_(False)
    return model, lambda: fop.inspect(model, torch.randn(3, 4, device=device))


@dataclass(frozen=True)
class Case:
    failing: Callable[[str], Failing]
    error: type[Exception]
    names: str
    """A regular expression for the parameter, optimizer or setting the message must name."""
    way_out: str
    """Words of the message that say what to do."""


CASES = [
    Case(lbfgs, fop.UnsupportedOptimizerError, "LBFGS", "torch.optim.SGD"),
    Case(sparse_adam, fop.UnsupportedOptimizerError, "SparseAdam", "torch.optim.SGD"),
    Case(optimizer_instance_for_class, fop.UnsupportedOptimizerError, r"instance \(SGD\)", "fx_optim_pass.attach"),
    Case(optimizer_name_for_class, fop.UnsupportedOptimizerError, "'adamw'", "pass the class itself"),
    Case(non_leaf_parameter, TypeError, r"SGD.*params\[1\]", "model.parameters()"),
    Case(attached_twice, ValueError, "SGD", "fx_optim_pass.detach(optimizer)"),
    Case(untraceable_update, fop.UnsupportedOptimizerError, r"ItemSGD.*'0\.weight'", "leave this parameter out"),
    Case(non_tensor_state, fop.UnsupportedOptimizerError, r"CountingSGD.*'0\.weight'.*'count'", "state in tensors"),
    Case(parameter_removed_from_groups_before_compiling, fop.UnsupportedOptimizerError, r"Adam.*'2\.weight'", "detach"),
    Case(parameter_removed_from_groups_after_a_step, fop.UnsupportedOptimizerError, r"Adam.*'2\.weight'", "detach"),
    Case(create_graph, fop.DoubleBackwardError, r"0\.weight", "without create_graph"),
    Case(two_compiled_calls_in_one_loss, fop.PartialGradientError, r"0\.weight", "backward() once per forward"),
    Case(eager_term_on_an_updated_parameter, fop.PartialGradientError, r"0\.weight", "inside the compiled function"),
    Case(input_gradient_through_the_compiled_model, fop.RestrictedBackwardError, r"0\.weight", "plain backward()"),
    Case(backward_under_compiled_autograd, fop.CompiledAutogradError, r"0\.weight", "without compiled autograd"),
    Case(state_dict_of_another_model, fop.OptimizerStateError, r"'exp_avg' of parameter '0\.weight'", "state_dict()"),
    Case(unknown_compiler, ValueError, "'tvm'", "'inductor' or 'aot_eager'"),
    Case(sharding_without_process_group, ValueError, "shard_optimizer_state", "pass process_group="),
    Case(inspect_without_optimizers, fop.InspectError, "no in-backward optimizers", "optimizer=torch.optim.AdamW"),
    Case(inspect_with_wrong_inputs, fop.InspectError, "example inputs", "Pass inputs the model accepts"),
    Case(inspect_of_a_frozen_model, fop.InspectError, "does not require grad", "requires_grad=True"),
]


def training_state(model: nn.Module) -> dict[str, Any]:
    """Copies of every parameter and in-backward optimizer state tensor, and each parameter's optimizers."""
    state: dict[str, Any] = {}
    for name, param in model.named_parameters():
        state[name] = param.detach().clone()
        optimizers = getattr(param, "_in_backward_optimizers", [])
        state[f"{name} optimizers"] = [id(optimizer) for optimizer in optimizers]
        for index, optimizer in enumerate(optimizers):
            for key, value in optimizer.state.get(param, {}).items():
                state[f"{name} optimizer {index} {key}"] = value.clone() if isinstance(value, torch.Tensor) else value
    return state


def assert_unchanged(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert after.keys() == before.keys()
    for key, value in before.items():
        same = torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value
        assert same, f"{key} changed"


@pytest.mark.parametrize("case", CASES, ids=[case.failing.__name__ for case in CASES])
def test_error_names_what_and_the_way_out_before_any_change(case, device):
    model, fail = case.failing(device)
    before = training_state(model)
    with pytest.raises(Exception) as raised:
        fail()
    error = getattr(raised.value, "inner_exception", raised.value)  # Dynamo's BackendCompilerFailed wraps ours
    assert isinstance(error, case.error), f"{type(raised.value).__name__}: {raised.value}"
    assert re.search(case.names, str(error)), str(error)
    assert case.way_out in str(error), str(error)
    assert_unchanged(training_state(model), before)


def test_hyperparameters_torch_rejects_get_torchs_error_before_any_setup():
    model = mlp("cpu")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": -1.0})
    assert not any(hasattr(p, "_in_backward_optimizers") for p in model.parameters())
