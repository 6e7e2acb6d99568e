"""The drop-in for ``torch.distributed.optim._apply_optimizer_in_backward``.

Same signature, same attributes on each parameter (``_in_backward_optimizers``,
``_optimizer_classes``, ``_optimizer_kwargs``), same eager behaviour: once the
gradient is accumulated, a hook steps the parameter's optimizers and drops the gradient.
Compiled with the ``fx_optim`` backend, the same optimizers step inside the graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

from fx_optim_pass import _torch_compat
from fx_optim_pass.optim_lowering import check_supported_optimizer

__all__ = ["apply_optimizer_in_backward", "attach", "detach", "get_in_backward_optimizers", "updates_in_backward"]

K = TypeVar("K")
V = TypeVar("V")


class WeakIdentityMap(Generic[K, V]):
    """Values keyed by an object's identity and holding it weakly: an entry goes with its key.

    A lookup is a dict read. The compiled step looks up every parameter at every call
    (``updates_in_backward``, ``RuntimeInputs``), and a lookup in torch's
    ``WeakTensorKeyDictionary`` builds a Python weak reference object each time (about
    1.5 µs, a third of the per-step cost of reading a parameter's optimizer settings)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[K], V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None

    def __contains__(self, key: K) -> bool:
        entry = self._entries.get(id(key))
        return entry is not None and entry[0]() is key

    def __setitem__(self, key: K, value: V) -> None:
        number, entries = id(key), self._entries
        entries[number] = (weakref.ref(key, lambda _: entries.pop(number, None)), value)

    def pop(self, key: K) -> V | None:
        if key not in self:
            return None
        return self._entries.pop(id(key))[1]


# Weak: metadata must not keep parameters alive nor be serialized with them.
_hook_handles: WeakIdentityMap[torch.Tensor, RemovableHandle] = WeakIdentityMap()

# Bumped by every change this module makes to which optimizers a parameter has or whether
# its hook runs, so the compiled step can tell that nothing of the kind happened since its
# last call without asking each parameter (``setup_generation``).
_setup_changes = 0


def setup_generation() -> int:
    """A number that changes whenever this module adds or removes an in-backward optimizer.

    PyTorch's ``_apply_optimizer_in_backward`` is not counted: it always lengthens the
    parameter's ``_in_backward_optimizers``, which is what callers check for it."""
    return _setup_changes


def apply_optimizer_in_backward(
    optimizer_class: type[torch.optim.Optimizer],
    params: Iterable[torch.nn.Parameter],
    optimizer_kwargs: dict[str, Any],
    register_hook: bool = True,
) -> None:
    """Give each parameter its own ``optimizer_class`` optimizer, stepped during backward.

    Uncompiled, a post-accumulate-grad hook steps the parameter's optimizers as soon as
    its gradient is ready, then sets ``p.grad = None`` (PyTorch's behaviour).
    Under ``torch.compile(model, backend="fx_optim")`` the same optimizers step
    inside the compiled backward and ``p.grad`` is never materialized.

    Example::

        >>> import torch, fx_optim_pass as fop
        >>> model = torch.nn.Linear(4, 2)
        >>> fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
        >>> model(torch.randn(3, 4)).sum().backward()   # parameters are updated here
        >>> model.weight.grad is None
        True
    """
    check_supported_optimizer(optimizer_class, optimizer_kwargs)
    params = list(params)
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor) or not param.is_leaf:
            what = "a tensor computed from others, not a leaf" if isinstance(param, torch.Tensor) else "not a tensor"
            raise TypeError(
                f"apply_optimizer_in_backward({optimizer_class.__name__}, ...): params[{index}] is {what} "
                f"({type(param).__name__}); pass the model's own parameters, e.g. model.parameters(). "
                "No parameter was set up."
            )
    # Every optimizer is made before any parameter is touched, so that torch's own checks
    # of optimizer_kwargs (and of each parameter) raise with nothing set up.
    optimizers = [optimizer_class([param], **optimizer_kwargs) for param in params]
    for param, optimizer in zip(params, optimizers):
        _add_optimizer(param, optimizer, optimizer_kwargs, register_hook)


def _add_optimizer(
    param: torch.Tensor, optimizer: torch.optim.Optimizer, optimizer_kwargs: dict[str, Any], register_hook: bool
) -> None:
    global _setup_changes
    _setup_changes += 1
    if not hasattr(param, "_in_backward_optimizers"):
        param._in_backward_optimizers = []  # type: ignore[attr-defined]
        param._optimizer_classes = []  # type: ignore[attr-defined]
        param._optimizer_kwargs = []  # type: ignore[attr-defined]
    param._in_backward_optimizers.append(optimizer)  # type: ignore[attr-defined]
    param._optimizer_classes.append(type(optimizer))  # type: ignore[attr-defined]
    param._optimizer_kwargs.append(optimizer_kwargs)  # type: ignore[attr-defined]

    # One hook steps every optimizer of the parameter, so one hook per parameter
    # suffices (PyTorch registers one per call; the later ones find no gradient). It sits
    # on the parameter, not on its AccumulateGrad node as PyTorch's does: a node holds its
    # parameter, so keeping one alive for the hook would keep the model and its optimizer
    # state alive after the user dropped them.
    if not register_hook or param in _hook_handles:
        return
    handle = _hook_handles[param] = _register_post_accumulate_grad_hook(param, own_hook(_step_in_backward))
    # DistributedDataParallel steps in-backward optimizers itself, after each all-reduce,
    # once it has removed the hooks PyTorch's map lists: ours must be among them.
    _torch_compat.list_hook_for_torch(param, handle)


def _register_post_accumulate_grad_hook(param: torch.Tensor, hook: Any) -> RemovableHandle:
    """``param.register_post_accumulate_grad_hook(hook)``, also for a frozen parameter
    (``requires_grad=False``), where it takes effect once the parameter is unfrozen."""
    if param.requires_grad:
        return param.register_post_accumulate_grad_hook(hook)
    param.requires_grad_(True)
    try:
        return param.register_post_accumulate_grad_hook(hook)
    finally:
        param.requires_grad_(False)


@torch.compiler.disable  # run from the backward, which Dynamo may be tracing around (dynamo_backend._outside_dynamo)
def _step_in_backward(param: torch.Tensor) -> None:
    # Compiled backward updates in the graph and leaves no gradient here: stepping
    # again would be a second update (a no-op for torch.optim, but not necessarily
    # for a user's optimizer).
    if param.grad is None:
        return
    for opt in param._in_backward_optimizers:  # type: ignore[attr-defined]
        opt.step()
    param.grad = None


def attach(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Run an existing optimizer's update in the backward, for all its parameters.

    Any param groups, each with its own hyperparameters. You keep the one optimizer:
    its ``state_dict()`` is torch's format, an LR scheduler attaches to it directly,
    ``optimizer.step()`` becomes a no-op (no parameter has a gradient left to step)
    and ``zero_grad()`` is harmless. ``detach(optimizer)`` returns to ordinary stepping
    with the same state. Returns ``optimizer``.

    Example::

        >>> import torch, fx_optim_pass as fop
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fop.attach(torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> model(torch.randn(3, 4)).sum().backward()   # AdamW stepped here
        >>> opt.step()                                  # nothing left to do
    """
    check_supported_optimizer(type(optimizer), {})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(optimizer in getattr(p, "_in_backward_optimizers", []) for p in params):
        raise ValueError(
            f"{type(optimizer).__name__} is already attached (its update already runs in the backward); "
            "attach it once, or call fx_optim_pass.detach(optimizer) first."
        )
    for group in optimizer.param_groups:
        kwargs = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            _add_optimizer(param, optimizer, kwargs, register_hook=True)
    return optimizer


def detach(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Undo ``attach``: ``optimizer.step()`` steps its parameters again, from the same state."""
    global _setup_changes
    _setup_changes += 1
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizers = getattr(param, "_in_backward_optimizers", [])
            keep = [i for i, opt in enumerate(optimizers) if opt is not optimizer]
            if len(keep) == len(optimizers):
                continue
            for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
                setattr(param, attr, [getattr(param, attr)[i] for i in keep])
            if not keep:
                for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
                    delattr(param, attr)
                handle = _hook_handles.pop(param)
                if handle is not None:
                    handle.remove()
                    _torch_compat.unlist_hook_for_torch(param, handle)
    return optimizer


def updates_in_backward(param: torch.Tensor) -> bool:
    """Whether ``param`` has in-backward optimizers whose step runs during backward.

    True for parameters set up with ``register_hook=True`` by this package or by
    PyTorch's ``_apply_optimizer_in_backward``.
    """
    if not getattr(param, "_in_backward_optimizers", None):
        return False
    return param in _hook_handles or _torch_compat.hooked_by_torch(param)


def own_hook(hook: Any) -> Any:
    """Mark ``hook``, a gradient hook this package puts on a parameter, as not the user's
    (``has_gradient_hooks``); returns it."""
    hook._fx_optim_pass = True
    return hook


def has_gradient_hooks(param: torch.Tensor) -> bool:
    """Whether ``param`` has gradient hooks of the user's: tensor hooks (``register_hook``),
    which see and may change its gradient, or post-accumulate-grad hooks.

    A compiled backward hands the gradient to the update inside the graph, past them, so
    such a parameter steps eagerly instead, after its hooks, as it does uncompiled."""
    return any(
        not getattr(hook, "_fx_optim_pass", False)
        for hooks in (param._backward_hooks, param._post_accumulate_grad_hooks)
        if hooks
        for hook in hooks.values()
    )


def get_in_backward_optimizers(module: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The in-backward optimizers of ``module``'s parameters, for checkpointing.

    Example::

        >>> import torch, fx_optim_pass as fop
        >>> model = torch.nn.Linear(4, 2)
        >>> fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
        >>> [type(o).__name__ for o in fop.get_in_backward_optimizers(model)]
        ['SGD', 'SGD']
    """
    optimizers: list[torch.optim.Optimizer] = []
    for param in module.parameters():
        optimizers.extend(getattr(param, "_in_backward_optimizers", []))
    return optimizers
