"""Shared helpers: compile a model in one of the three modes, compare parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch

import fx_optim_pass as fop

MODES = ["eager", "aot_eager", "inductor"]


def in_mode(model: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """``model`` run eagerly or compiled by our backend (fullgraph: no silent eager fallback)."""
    if mode == "eager":
        return model
    backend = fop.backend if mode == "inductor" else fop.make_backend(compiler="aot_eager")
    return torch.compile(model, backend=backend, fullgraph=True)


def assert_params_close(actual: Iterable[torch.Tensor], expected: Iterable[torch.Tensor]) -> None:
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def assert_params_differ(actual: Iterable[torch.Tensor], expected: Iterable[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        assert not torch.equal(a, e), "parameter did not change"


def snapshot(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def train_side_by_side(
    reference: torch.nn.Module,
    optimizer_class: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    mode: str,
    inputs: Iterable[torch.Tensor],
    compile: Callable[[torch.nn.Module], Callable[..., torch.Tensor]] | None = None,
    **tolerance: float,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Train ``reference`` with eager torch.optim and a copy with in-backward optimizers run in
    ``mode`` (or compiled by ``compile``), on the same inputs; after every step the parameters
    must match and the copy's ``.grad`` stay None. Returns the copy and the reference optimizer."""
    subject = deepcopy(reference)
    reference_opt = optimizer_class(reference.parameters(), **kwargs)
    fop.apply_optimizer_in_backward(optimizer_class, subject.parameters(), kwargs)
    compiled = in_mode(subject, mode) if compile is None else compile(subject)
    for x in inputs:
        reference(x).pow(2).mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        compiled(x).pow(2).mean().backward()
        for actual, expected in zip(subject.parameters(), reference.parameters()):
            torch.testing.assert_close(actual, expected, **tolerance)
        assert all(p.grad is None for p in subject.parameters())
    return subject, reference_opt
