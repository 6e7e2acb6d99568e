"""The training steps compared by the benchmarks: fx_optim and every peer of DESIGN.md section 3.

Each peer gets its own deep copy of the same model and the same inputs, and
returns a ``Peer``: a zero-argument training step plus the optimizers an LR
scheduler should drive.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fx_optim_pass as fop

__all__ = ["PEERS", "Peer", "build_peer"]


def inductor() -> Callable[..., Any]:
    """Inductor, as ``torch.compile``'s default backend, but a backend object of this peer's own.

    Dynamo shares compiled code between module instances of the same structure
    when the backend is the same; a backend per peer makes each peer compile its
    own graphs, so that its first-call time is its own compile time.
    """
    from torch._inductor.compile_fx import compile_fx

    def compile_with_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        return compile_fx(gm, example_inputs)

    return compile_with_inductor


@dataclass
class Peer:
    name: str
    step: Callable[[], None]
    optimizers: list[torch.optim.Optimizer]
    compiled: bool
    graphs: dict[str, torch.fx.GraphModule] = field(default_factory=dict)


# name -> (description, compiled?)
PEERS: dict[str, tuple[str, bool]] = {
    "eager_foreach": ("eager backward(); step(); zero_grad(), foreach optimizer", False),
    "eager_fused": ("eager backward(); step(); zero_grad(), fused optimizer", False),
    "compiled_model": ("torch.compile(model) + eager foreach optimizer", True),
    "compiled_opt": ("torch.compile(model) + torch.compile(opt.step), tensor lr", True),
    "torch_hooks": ("eager torch.distributed.optim._apply_optimizer_in_backward", False),
    "compiled_autograd": (
        "torch.compile(model) + compiled autograd, post-accumulate-grad hooks step per-parameter optimizers",
        True,
    ),
    "fx_optim": ("torch.compile(model, backend='fx_optim')", True),
    "no_optimizer": (
        "floor for time: forward+backward compiled by the fx_optim backend (its code generation), no optimizer",
        True,
    ),
}


def build_peer(
    name: str,
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    optimizer_class: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    shared_backend: Callable[..., Any] | None = None,
) -> Peer:
    """A fresh copy of ``model`` trained the way peer ``name`` trains it.

    ``shared_backend`` compiles the plain forward+backward of ``compiled_model`` and the
    forward of ``compiled_autograd``: their graphs are identical, so they may share one
    compilation. ``compiled_opt`` and ``fx_optim``, whose compile times are compared,
    always compile everything themselves. ``no_optimizer``, the floor that ``fx_optim``'s
    optimizer cost is measured from, compiles with the fx_optim backend: its code generation
    differs from stock Inductor's in ways that speed up any step (fewer barriers), which
    must not count as the optimizer's.
    """
    model = copy.deepcopy(model)
    shared = shared_backend or inductor()
    compiled = PEERS[name][1]
    params = list(model.parameters())

    if name in ("eager_foreach", "eager_fused", "compiled_model"):
        flag: dict[str, Any] = {"fused": True} if name == "eager_fused" else {"foreach": True}
        opt = optimizer_class(params, **{**kwargs, **flag})
        forward = torch.compile(model, backend=shared) if name == "compiled_model" else model

        def step() -> None:
            forward(*inputs).backward()
            opt.step()
            opt.zero_grad()

        return Peer(name, step, [opt], compiled)

    if name == "compiled_opt":
        # A tensor lr keeps an LR scheduler from recompiling the step (torch's recipe).
        opt = optimizer_class(params, **{**kwargs, "lr": torch.tensor(kwargs["lr"], device=params[0].device)})
        forward = torch.compile(model, backend=inductor())
        opt_step = torch.compile(opt.step, backend=inductor())

        def step() -> None:
            forward(*inputs).backward()
            opt_step()
            opt.zero_grad()

        return Peer(name, step, [opt], compiled)

    if name == "torch_hooks":
        from torch.distributed.optim import _apply_optimizer_in_backward, _get_in_backward_optimizers

        _apply_optimizer_in_backward(optimizer_class, params, kwargs)

        def step() -> None:
            model(*inputs).backward()

        return Peer(name, step, _get_in_backward_optimizers(model), compiled)

    if name == "compiled_autograd":
        from torch._dynamo import compiled_autograd

        lr = {"lr": torch.tensor(kwargs["lr"], device=params[0].device)}
        optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {
            p: optimizer_class([p], **{**kwargs, **lr}) for p in params
        }

        def step_parameter(param: torch.Tensor) -> None:
            optimizers[param].step()
            optimizers[param].zero_grad()

        for param in params:
            param.register_post_accumulate_grad_hook(step_parameter)
        forward = torch.compile(model, backend=shared)

        def compile_backward(gm: torch.fx.GraphModule) -> Any:
            return torch.compile(gm, backend=inductor())

        def step() -> None:
            loss = forward(*inputs)
            with compiled_autograd._enable(compile_backward):
                loss.backward()

        return Peer(name, step, list(optimizers.values()), compiled)

    if name == "fx_optim":
        graphs: dict[str, torch.fx.GraphModule] = {}

        def keep(kind: str, gm: torch.fx.GraphModule) -> None:
            graphs.setdefault(kind, gm)

        fop.apply_optimizer_in_backward(optimizer_class, params, kwargs)
        forward = torch.compile(model, backend=fop.make_backend(observer=keep), fullgraph=True)

        def step() -> None:
            forward(*inputs).backward()  # the update runs inside this backward

        return Peer(name, step, fop.get_in_backward_optimizers(model), compiled, graphs)

    if name == "no_optimizer":
        forward = torch.compile(model, backend=fop.make_backend(), fullgraph=True)

        def step() -> None:
            forward(*inputs).backward()
            model.zero_grad()

        return Peer(name, step, [], compiled)

    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
