"""Shared helpers: compile a model in one of the three modes, compare parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
