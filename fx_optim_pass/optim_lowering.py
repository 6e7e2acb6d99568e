"""Optimizer updates traced from PyTorch's own ``torch.optim`` code.

Nothing here restates optimizer math. For one (optimizer, parameter) pair we run
the optimizer's real ``step()`` on a shadow copy whose parameter, gradient, state
and ``lr`` are the tensors we hand it, and trace what it does. Parity with eager
``torch.optim`` follows from running the same code.
"""

from __future__ import annotations

import copy
import inspect
import operator
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fx_optim_pass import _torch_compat

__all__ = [
    "Hyperparameter",
    "OptimizerStep",
    "UnsupportedOptimizerError",
    "check_shardable",
    "check_supported_optimizer",
    "compiled_setup",
    "describe_step",
    "hyperparameter_tensor",
    "initialize_state",
    "run_time_floats",
    "runtime_hyperparameters",
    "setup_key",
    "setup_readers",
    "takes_tensor_lr",
]

# Group keys that only say how torch runs the math, not what it computes; the
# traced shadow overrides them so the step stays tensor-only and traceable.
_TRACE_FLAG_CHOICES = (
    {"foreach": False, "fused": None, "capturable": True, "differentiable": False},
    {"foreach": True, "fused": None, "capturable": True, "differentiable": False},
)
# ``lr`` is a graph input of its own (a tensor on the parameter's device: torch's
# capturable code paths take it as one); the other float hyperparameters are
# ``Hyperparameter`` inputs. Group keys that never reach the graph are ignored.
_IGNORED_GROUP_KEYS = {"params", "initial_lr", "lr"}

# torch.optim's code branches on some float hyperparameters (``weight_decay != 0``,
# ``momentum > 0``); torch's lerp picks its formula by whether its weight, ``1 - beta``,
# is below 0.5 in magnitude; torch's pow (2.11) special-cases a base or exponent of
# 0.5, 1 and 2. A graph traced for one value holds for every value on the same side
# of each of these landmarks; which side is part of the compiled setup (changing it
# compiles anew), and a value on a landmark is compiled in as a constant.
_LANDMARKS = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Hyperparameter:
    """A float of a param group that the graph reads at every step: ``group[key]``, or
    ``group[key][index]`` inside a tuple such as ``betas``."""

    key: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.key if self.index is None else f"{self.key}_{self.index}"

    def read(self, group: dict[str, Any]) -> float:
        value = group[self.key]
        return value if self.index is None else value[self.index]


# A float lr is read at run time like the other hyperparameters (see ``_run_step``).
LR = Hyperparameter("lr")


def _is_runtime_float(value: Any) -> bool:
    return type(value) is float and value not in _LANDMARKS


def _region(value: float) -> tuple[int, ...]:
    """Which side of each landmark ``value`` lies on."""
    return tuple((value > mark) - (value < mark) for mark in _LANDMARKS)


def _compiles_floats_in(param: torch.Tensor) -> bool:
    """Whether ``param``'s update takes its float hyperparameters (all but ``lr``) as constants
    of the graph rather than run-time floats: for float64 parameters, since Inductor hands
    run-time floats to its kernels as 32-bit floats (``const float``), which moved a float64
    RMSprop update by 4.2e-7 in 5 steps, while a constant is written out with every digit.
    Changing such a value compiles a new variant of the step."""
    return param.dtype == torch.float64


def runtime_hyperparameters(group: dict[str, Any], param: torch.Tensor) -> tuple[Hyperparameter, ...]:
    """The floats of ``group`` that ``param``'s update reads at run time, in a fixed order."""
    if _compiles_floats_in(param):
        return ()
    found: list[Hyperparameter] = []
    for key in sorted(k for k in group if k not in _IGNORED_GROUP_KEYS):
        value = group[key]
        if _is_runtime_float(value):
            found.append(Hyperparameter(key))
        elif isinstance(value, tuple):
            found.extend(Hyperparameter(key, i) for i, item in enumerate(value) if _is_runtime_float(item))
    return tuple(found)


def _setup_value(value: Any, floats_compiled_in: bool) -> Any:
    if _is_runtime_float(value) and not floats_compiled_in:
        return ("run-time float", _region(value))
    if isinstance(value, tuple):
        return tuple(_setup_value(item, floats_compiled_in) for item in value)
    return repr(value)  # a float's repr reads back as the same float


_UNTRACEABLE = {
    "LBFGS": "it needs a closure that re-evaluates the model",
    "SparseAdam": "it needs sparse gradients, which compiled graphs do not produce",
}
if not _torch_compat.TRACES_ADAFACTOR:
    _UNTRACEABLE["Adafactor"] = (
        f"on torch {torch.__version__} its traced update does not match eager under Inductor "
        "(it does from torch 2.13 on: upgrade torch to use it)"
    )


class UnsupportedOptimizerError(TypeError):
    """An optimizer whose update cannot run inside a compiled backward."""


def check_supported_optimizer(optimizer_class: type, optimizer_kwargs: dict[str, Any]) -> None:
    """Reject, before any parameter changes, optimizers that cannot be traced."""
    if isinstance(optimizer_class, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(
            f"apply_optimizer_in_backward: got an optimizer instance ({type(optimizer_class).__name__}), not a "
            f"torch.optim.Optimizer subclass; pass the class itself ({type(optimizer_class).__name__}), or run this "
            "existing optimizer in the backward with fx_optim_pass.attach(optimizer)."
        )
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise UnsupportedOptimizerError(
            f"apply_optimizer_in_backward: {optimizer_class!r} is not a torch.optim.Optimizer subclass; "
            "pass the class itself, e.g. torch.optim.AdamW."
        )
    reason = _UNTRACEABLE.get(optimizer_class.__name__)
    if reason is not None and optimizer_class.__module__.startswith("torch.optim"):
        raise UnsupportedOptimizerError(
            f"{optimizer_class.__name__} cannot run in the backward pass: {reason}. "
            "Use a per-parameter optimizer such as torch.optim.SGD, Adam or AdamW, "
            "or keep this optimizer's ordinary optimizer.step()."
        )


# torch.optim optimizers whose update treats every element of a parameter alike, so that
# updating each shard of the flattened parameter gives the unsharded result. Not here:
# Adafactor (factors matrices), Muon (orthogonalizes them), LBFGS, SparseAdam.
_ELEMENTWISE = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop", "Adagrad", "Adadelta", "RMSprop"}
)


def check_shardable(optimizer_class: type, param_name: str) -> None:
    """Refuse, before any parameter changes, an optimizer whose update needs the whole parameter."""
    if optimizer_class.__name__ in _ELEMENTWISE and optimizer_class.__module__.startswith("torch.optim"):
        return
    raise UnsupportedOptimizerError(
        f"shard_optimizer_state=True: {optimizer_class.__qualname__} on parameter {param_name!r} cannot run on a "
        "shard of the parameter: only torch.optim's elementwise optimizers can "
        f"({', '.join(sorted(_ELEMENTWISE))}), whose update of each element reads only that element. "
        "Use one of them, or data parallelism without shard_optimizer_state."
    )


def _run_step(
    shadow: torch.optim.Optimizer,
    param: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    state: dict[str, Any],
    hyperparameters: Mapping[Hyperparameter, torch.Tensor | torch.SymFloat],
    lr_is_tensor: bool,
) -> None:
    """Torch's own ``step()`` of ``shadow`` on exactly these tensors (mutated in place),
    with each run-time hyperparameter read from its 0-d tensor (or already read)."""
    group = shadow.param_groups[0]
    saved = dict(group)
    group.update(_read_hyperparameters(group, hyperparameters))
    group["params"] = [param]
    # A float lr is read like the other hyperparameters, but with no landmarks:
    # torch.optim's updates never branch on it. A tensor lr stays a tensor.
    group["lr"] = lr if lr_is_tensor else _number(lr)
    shadow.state = defaultdict(dict, {param: state})
    # torch's foreach paths may update p.grad in place (SGD nesterov); each step
    # gets its own copy, as on torch's default single-tensor CPU path.
    param.grad = grad.clone()
    try:
        with _torch_compat.optimizer_step_as_if_compiling(type(shadow)):
            _class_step(shadow)
    finally:
        param.grad = None
        group.clear()
        group.update(saved, params=[])
        shadow.state = defaultdict(dict)


def _number(value: torch.Tensor | torch.SymFloat | float) -> Any:
    """A run-time float: read from its 0-d tensor, or already read (a symbol of the joint graph,
    shared by every update that reads the same value; see ``insert_updates``)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _read_hyperparameters(
    group: dict[str, Any], hyperparameters: Mapping[Hyperparameter, torch.Tensor | torch.SymFloat]
) -> dict[str, Any]:
    """Group values with each run-time float replaced by a number read from its tensor.

    Traced, the read is a symbol that torch's code computes with like a float; the
    checks tell the tracer which side of each landmark it lies on (see ``_LANDMARKS``).
    """
    values: dict[str, Any] = {}
    for hyperparameter, tensor in hyperparameters.items():
        number = _number(tensor)
        traced = hyperparameter.read(group)
        for mark in _LANDMARKS:
            torch._check(number > mark if traced > mark else number < mark)
        if hyperparameter.index is None:
            values[hyperparameter.key] = number
        else:
            items = list(values.get(hyperparameter.key, group[hyperparameter.key]))
            items[hyperparameter.index] = number
            values[hyperparameter.key] = tuple(items)
    return values


def _class_step(optimizer: torch.optim.Optimizer) -> None:
    """``step()`` as the optimizer's class defines it, bypassing wrappers that LR
    schedulers install on the instance (they would call the real optimizer)."""
    type(optimizer).step(optimizer)


class _StopAfterInit(Exception):
    pass


def initialize_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, shard_numel: int | None = None) -> None:
    """Create ``optimizer.state[param]`` exactly as torch's first ``step()`` would.

    Runs the optimizer's own ``step()`` up to the end of its ``_init_group`` (the
    method where every torch.optim optimizer creates its state) and stops there,
    so keys, dtypes, devices and initial values are torch's. State that torch
    creates later, inside the update itself (SGD's ``momentum_buffer``), is
    created by the traced update instead. With ``shard_numel`` the state is made
    for a flat shard of that many elements (torch's code run on a stand-in of that
    shape) and stored under ``param``: sharded optimizer state.
    """
    if optimizer.state.get(param) or not hasattr(optimizer, "_init_group"):
        return
    group = param_group(optimizer, param)
    target = param
    if shard_numel is not None:
        target = param.detach().new_zeros(shard_numel)
        group = {**group, "params": [target]}
    init_group = optimizer._init_group

    def init_then_stop(*args: Any, **kwargs: Any) -> Any:
        init_group(*args, **kwargs)
        raise _StopAfterInit

    saved_grad, saved_groups = target.grad, optimizer.param_groups
    target.grad = torch.zeros_like(target)
    optimizer._init_group = init_then_stop  # type: ignore[method-assign]
    optimizer.param_groups = [group]  # the first _init_group is this one
    try:
        with torch.no_grad():
            _class_step(optimizer)
    except _StopAfterInit:
        pass
    except KeyError:
        # Versions whose optimizer creates state in __init__, not in _init_group
        # (Adagrad before torch 2.12): let a fresh instance's __init__ create it.
        optimizer.state[target] = _state_from_constructor(optimizer, target, group)
    finally:
        del optimizer._init_group
        optimizer.param_groups = saved_groups
        target.grad = saved_grad
    if target is not param:  # into the dict callers may hold (optimizer.state is a defaultdict)
        optimizer.state[param].update(optimizer.state.pop(target, {}))


def _state_from_constructor(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict[str, Any]
) -> dict[str, Any]:
    accepted = inspect.signature(type(optimizer).__init__).parameters
    # A tensor setting (lr) would meet fake tensors in the constructor's checks; the
    # state does not depend on it, so its default serves.
    kwargs = {
        k: accepted[k].default if isinstance(v, torch.Tensor) else v
        for k, v in group.items()
        if k in accepted
        and k != "params"
        and not (isinstance(v, torch.Tensor) and accepted[k].default is inspect.Parameter.empty)
    }
    with torch.no_grad():
        fresh = type(optimizer)([param], **kwargs)
    return dict(fresh.state.get(param, {}))


def param_group(optimizer: torch.optim.Optimizer, param: torch.Tensor, param_name: str = "") -> dict[str, Any]:
    """The param group of ``optimizer`` that holds ``param`` (called ``param_name`` in errors)."""
    groups = optimizer.param_groups
    if len(groups) == 1:  # the usual case, and every optimizer apply_optimizer_in_backward makes
        return groups[0]
    # Where ``param`` was (group, place in its list), checked in O(1): with attach() and the
    # usual two groups (decay, no decay), a scan of the group per parameter was O(n^2) a step.
    where = _group_index.get(optimizer, {}).get(id(param))
    if where is None or not _holds(groups, *where, param):
        _group_index[optimizer] = {id(p): (i, k) for i, g in enumerate(groups) for k, p in enumerate(g["params"])}
        where = _group_index[optimizer].get(id(param))
        if where is None:
            what = f"parameter {param_name!r}" if param_name else f"a parameter of shape {tuple(param.shape)}"
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__} runs in the backward for {what} but no longer holds it in its "
                "param_groups. Nothing was updated. Call fx_optim_pass.detach(optimizer) before changing its "
                "param groups, then fx_optim_pass.attach(optimizer) again."
            )
    return groups[where[0]]


def _holds(groups: Sequence[dict[str, Any]], index: int, place: int, param: torch.Tensor) -> bool:
    if index >= len(groups):
        return False
    params = groups[index]["params"]
    return place < len(params) and params[place] is param


# Per optimizer of several groups: each parameter's (group index, place in the group's list), by id.
_group_index: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, tuple[int, int]]] = weakref.WeakKeyDictionary()


def _shadow_optimizer(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, flags: dict[str, Any]
) -> torch.optim.Optimizer:
    """A one-group copy of ``optimizer`` for ``param`` that shares nothing mutable and runs no user hooks."""
    shadow = object.__new__(type(optimizer))
    shadow.__dict__.update(optimizer.__dict__)
    group = {k: v for k, v in param_group(optimizer, param).items() if k != "params"}
    for key, value in flags.items():
        if key in group:
            group[key] = value
    group["params"] = []
    shadow.param_groups = [group]
    shadow.state = defaultdict(dict)
    shadow.defaults = copy.copy(optimizer.defaults)
    for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        if hasattr(shadow, hooks):
            setattr(shadow, hooks, OrderedDict())
    return shadow


def takes_tensor_lr(group: dict[str, Any], param: torch.Tensor) -> bool:
    """Whether the update takes ``lr`` as a tensor rather than a run-time float: a user's
    tensor lr, or a float64 parameter (Inductor hands run-time floats to its kernels as
    32-bit floats, which would round a float64 update's lr)."""
    return isinstance(group["lr"], torch.Tensor) or param.dtype == torch.float64


def compiled_setup(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, param_name: str = ""
) -> tuple[tuple[str, Any], ...]:
    """What of ``param``'s group is compiled into the graph: every value that is not a
    run-time float, and for run-time floats the side of each landmark they lie on.

    Asked for every parameter at every call, so it is memoized on the values it is
    made from (a change of ``lr`` alone, the common one, reuses it)."""
    return _memoized_setup(optimizer, param_group(optimizer, param, param_name), param)


def setup_key(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> tuple[Any, ...]:
    """What ``compiled_setup`` and the run-time floats other than ``lr`` are made from, read at
    C speed: equal keys, equal setups and floats. Hashing it raises ``TypeError`` where a
    setting is unhashable (a list)."""
    return (
        type(optimizer),
        param.dtype,
        isinstance(group["lr"], torch.Tensor),
        _read_fields(group, _is_group_setting_key),
        _read_fields(vars(optimizer), _is_public_attribute),
    )


def setup_readers(
    optimizer: torch.optim.Optimizer, group: dict[str, Any]
) -> tuple[Callable[[dict[str, Any]], Any], Callable[[dict[str, Any]], Any]]:
    """Two ``itemgetter``s that read what ``setup_key`` reads of ``group`` and of
    ``vars(optimizer)`` (their values, by the keys they have now): as long as each mapping
    keeps its length and these keys, equal readings mean equal keys."""
    _, group_reader = _field_readers_of(group, _is_group_setting_key)
    _, attribute_reader = _field_readers_of(vars(optimizer), _is_public_attribute)
    return group_reader, attribute_reader


def _memoized_setup(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor
) -> tuple[tuple[str, Any], ...]:
    """``compiled_setup`` for ``param``'s ``group``, already looked up (``run_time_floats`` needs it too)."""
    try:
        key = setup_key(optimizer, group, param)
        setup = _setups.get(key)
    except TypeError:  # an unhashable value: compute it each time
        return _compiled_setup(optimizer, group, param)
    if setup is None:
        if len(_setups) > 4096:  # values that keep changing (momentum cycling) must not pile up
            _setups.clear()
        setup = _setups[key] = _compiled_setup(optimizer, group, param)
    return setup


_setups: dict[Any, tuple[tuple[str, Any], ...]] = {}


def run_time_floats(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, param_name: str = ""
) -> tuple[tuple[tuple[str, Any], ...], list[tuple[str, float]]]:
    """``compiled_setup`` and the floats the update reads as numbers at run time, in the
    order of its graph inputs, each as (name, value): a float ``lr``, then
    ``runtime_hyperparameters``. Also asked for every parameter at every call."""
    group = param_group(optimizer, param, param_name)
    setup = _memoized_setup(optimizer, group, param)
    read = _floats_of_setup.get(setup)
    if read is None:
        if len(_floats_of_setup) > 4096:
            _floats_of_setup.clear()
        lr = () if takes_tensor_lr(group, param) else (LR,)
        read = _floats_of_setup[setup] = (*lr, *runtime_hyperparameters(group, param))
    return setup, [(h.name, h.read(group)) for h in read]


# Which floats are run-time floats follows from the setup (a landmark value is compiled in).
_floats_of_setup: dict[tuple[tuple[str, Any], ...], tuple[Hyperparameter, ...]] = {}


def _read_fields(mapping: dict[str, Any], wanted: Callable[[str], bool]) -> tuple[Any, ...]:
    """The ``wanted`` keys of ``mapping`` and their values, read at C speed with an
    ``itemgetter`` made once per mapping (and made again when its keys change)."""
    cache_key = (id(mapping), len(mapping), wanted)
    cached = _field_readers.get(cache_key)
    if cached is not None:
        try:
            return cached[0], cached[1](mapping)
        except KeyError:  # another key of the same count: read the keys again
            pass
    keys, reader = _field_readers_of(mapping, wanted)
    if len(_field_readers) > 4096:
        _field_readers.clear()
    _field_readers[cache_key] = (keys, reader)
    return keys, reader(mapping)


def _field_readers_of(
    mapping: dict[str, Any], wanted: Callable[[str], bool]
) -> tuple[tuple[str, ...], Callable[[dict[str, Any]], Any]]:
    keys = tuple(k for k in mapping if wanted(k))
    return keys, operator.itemgetter(*keys) if keys else _nothing


_field_readers: dict[tuple[int, int, Callable[[str], bool]], tuple[tuple[str, ...], Callable[..., Any]]] = {}


def _nothing(mapping: dict[str, Any]) -> tuple[()]:
    return ()


def _is_group_setting_key(key: str) -> bool:
    return key not in _IGNORED_GROUP_KEYS


def _is_public_attribute(name: str) -> bool:
    return name[0] != "_" and name not in _OPTIMIZER_FIELDS


def _compiled_setup(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor
) -> tuple[tuple[str, Any], ...]:
    floats_compiled_in = _compiles_floats_in(param)
    setup = [(k, _setup_value(v, floats_compiled_in)) for k, v in group.items() if k not in _IGNORED_GROUP_KEYS]
    setup.append(("lr", "tensor" if takes_tensor_lr(group, param) else "run-time float"))
    # A user's optimizer may read its own attributes in step() (self.scale): traced, they
    # are constants of the graph, so they are part of its setup too.
    setup.extend((f"self.{k}", repr(v)) for k, v in vars(optimizer).items() if _is_setting(k, v))
    return tuple(sorted(setup))


_OPTIMIZER_FIELDS = {"defaults", "param_groups", "state"}


def _is_setting(name: str, value: Any) -> bool:
    """A public attribute of an optimizer instance holding plain data, which step() may read."""
    return not name.startswith("_") and name not in _OPTIMIZER_FIELDS and _is_plain_data(value)


def _is_plain_data(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain_data(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass(frozen=True)
class CreatedState:
    """A state tensor torch creates inside the update on the first step."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class OptimizerStep:
    """How one optimizer of one parameter runs in the graph.

    Graph inputs, in order: ``lr`` and the other run-time ``hyperparameters``
    (0-d float64 CPU tensors, or in the joint graph the numbers read from them; a tensor
    lr is passed as it is), the state tensors ``state_keys`` (created by
    ``initialize_state``), then for ``created`` state one buffer each plus a 0-d
    bool "state already exists" flag, which the update sets to True.
    """

    optimizer_class: type[torch.optim.Optimizer]
    setup: tuple[tuple[str, Any], ...]
    hyperparameters: tuple[Hyperparameter, ...]
    state_keys: tuple[str, ...]
    state_shapes: tuple[tuple[int, ...], ...]  # of the state tensors, as the update reads them
    created: tuple[CreatedState, ...]
    lr_is_tensor: bool
    shadow: torch.optim.Optimizer = field(compare=False, repr=False)

    @property
    def num_inputs(self) -> int:
        return len(self.input_names())

    def input_names(self) -> list[str]:
        """Names of this step's graph inputs, in order."""
        names = ["lr", *(h.name for h in self.hyperparameters), *self.state_keys, *(c.key for c in self.created)]
        return names + (["state_exists"] if self.created else [])

    def float_slots(self) -> range:
        """Which of its inputs are run-time floats read as numbers (a float ``lr`` and the
        other hyperparameters): inputs that updates reading the same value share."""
        first = 1 if self.lr_is_tensor else 0
        return range(first, 1 + len(self.hyperparameters))

    @property
    def op_name(self) -> str:
        return self.optimizer_class.__name__.lower()

    def step_function(self) -> Callable[..., None]:
        """A function ``(param, grad, lr, *state, *created, [exists]) -> None`` that
        mutates its inputs exactly as torch's ``step()`` would."""
        shadow, state_keys, runtime = self.shadow, self.state_keys, self.hyperparameters
        lr_is_tensor = self.lr_is_tensor
        created_keys = tuple(c.key for c in self.created)

        def update(param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, *tensors: torch.Tensor) -> None:
            hyperparameters = dict(zip(runtime, tensors[: len(runtime)]))
            tensors = tensors[len(runtime) :]
            state = dict(zip(state_keys, tensors[: len(state_keys)]))
            if not created_keys:
                _run_step(shadow, param, grad, lr, state, hyperparameters, lr_is_tensor)
                return
            created = tensors[len(state_keys) : len(state_keys) + len(created_keys)]
            exists = tensors[-1]
            # Torch's first step takes another path (SGD: buffer = grad, not the
            # damped average). Trace both from torch's code and select per step.
            first_param, first_state = param.clone(), {k: v.clone() for k, v in state.items()}
            _run_step(shadow, first_param, grad, lr, first_state, hyperparameters, lr_is_tensor)
            later_param = param.clone()
            later_state = {k: v.clone() for k, v in state.items()}
            later_state.update({k: buf.clone() for k, buf in zip(created_keys, created)})
            _run_step(shadow, later_param, grad, lr, later_state, hyperparameters, lr_is_tensor)
            # The selects read "first step" as a value of its own, computed from the flag
            # before it is set: so the flag's read and write are both 0-d work that
            # ``hoist_step_scalars`` can move ahead of the backward's kernels.
            first = torch.logical_not(exists)
            param.copy_(torch.where(first, first_param, later_param))
            for key, tensor in [*state.items(), *zip(created_keys, created)]:
                tensor.copy_(torch.where(first, first_state[key], later_state[key]))
            # Set to True (it tells the runtime this update ran, see _install_after_backward),
            # computed from the flag and ``first`` rather than filled: a constant write shares
            # nothing with the 0-d nodes before it, and Inductor's scheduler fused it into a
            # later kernel's parallel region, as an omp single (a barrier) per parameter.
            exists.copy_(torch.logical_or(exists, first))

        return update


def describe_step(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    param_name: str,
    shard_numel: int | None = None,
    described: dict[Any, OptimizerStep] | None = None,
) -> OptimizerStep:
    """Work out, on fake tensors, which state the update reads and creates, and check it traces.

    Raises a clear error naming the optimizer and parameter when torch's step
    cannot be traced into a tensor-only graph; nothing real is touched. With
    ``shard_numel`` the update is described for a flat shard of that many elements.

    ``described`` holds the steps already worked out for other parameters (of one plan):
    a parameter with the same optimizer class, compiled setup, run-time hyperparameters
    and tensor layout gets the same description without tracing torch's step again
    (a transformer's 92 parameter tensors have 8 distinct shapes).
    """
    key = None if described is None else _description_key(optimizer, param, param_name, shard_numel)
    if described is None or key is None:
        return _describe_step(optimizer, param, param_name, shard_numel)
    if key not in described:
        described[key] = _describe_step(optimizer, param, param_name, shard_numel)
    return described[key]


def _description_key(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, param_name: str, shard_numel: int | None
) -> Any:
    """What ``_describe_step`` depends on, or None when some of it is unhashable (not cached)."""
    group = param_group(optimizer, param, param_name)
    lr = group["lr"]
    key = (
        type(optimizer),
        compiled_setup(optimizer, param, param_name),
        runtime_hyperparameters(group, param),
        (tuple(param.shape), param.stride(), param.dtype, param.device, shard_numel),
        (lr.dtype, lr.device, tuple(lr.shape)) if isinstance(lr, torch.Tensor) else None,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _describe_step(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, param_name: str, shard_numel: int | None
) -> OptimizerStep:
    name = type(optimizer).__name__
    group = param_group(optimizer, param, param_name)
    # A shape environment turns .item() into a run-time symbol instead of an error.
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_param: torch.Tensor
    if shard_numel is None:
        fake_param = fake_mode.from_tensor(param.detach(), static_shapes=True)
    else:
        with fake_mode:
            fake_param = torch.empty(shard_numel, dtype=param.dtype, device=param.device)
    init_shadow = _shadow_optimizer(optimizer, param, _TRACE_FLAG_CHOICES[0])
    init_shadow.param_groups[0]["params"] = [fake_param]
    runtime = runtime_hyperparameters(group, param)
    with fake_mode:
        initialize_state(init_shadow, fake_param)
        lr = group["lr"]
        lr_is_tensor = takes_tensor_lr(group, param)
        fake_lr: torch.Tensor
        if isinstance(lr, torch.Tensor):
            fake_lr = fake_mode.from_tensor(lr)
        else:  # a float64 scalar: on the parameter's device as a tensor lr, else on the CPU
            fake_lr = torch.empty((), dtype=torch.float64, device=param.device if lr_is_tensor else "cpu")
        fake_grad = torch.empty_like(fake_param)
        # empty, not torch.tensor(value): a fake tensor made from a number is a constant, read as that number
        fake_hyperparameters = [torch.empty((), dtype=torch.float64) for _ in runtime]
    # Fresh fakes: state made from numbers (torch.tensor(0.0)) would be a fake
    # constant, read as that number instead of a run-time value.
    with fake_mode:
        state = {
            k: torch.empty(v.shape, dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else v
            for k, v in init_shadow.state.get(fake_param, {}).items()
        }
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UnsupportedOptimizerError(
                f"{name} on parameter {param_name!r}: state {key!r} is a {type(value).__name__}, "
                "not a tensor, so it cannot live in the compiled graph. Keep optimizer state in tensors "
                "(e.g. torch.tensor(0.0) for a step count), or leave this parameter out of "
                "apply_optimizer_in_backward."
            )

    # Some of torch's code reads tensors as numbers (a user's tensor lr in SGD's
    # single-tensor code; Muon): take the first variant that reads nothing but the
    # hyperparameters, else the first whose reads all happen at run time.
    chosen: tuple[torch.optim.Optimizer, dict[str, torch.Tensor]] | None = None
    error: UnsupportedOptimizerError | None = None
    for flags in _TRACE_FLAG_CHOICES:
        shadow = _shadow_optimizer(optimizer, param, flags)
        after: dict[str, torch.Tensor] = {}

        def probe(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, *tensors: torch.Tensor) -> None:
            step_state = dict(zip(state, tensors[len(runtime) :]))
            _run_step(shadow, p, g, lr, step_state, dict(zip(runtime, tensors)), lr_is_tensor)  # noqa: B023
            after.update(step_state)  # noqa: B023

        example = [fake_param, fake_grad, fake_lr, *fake_hyperparameters, *state.values()]
        try:
            _, reads = _trace_checked(probe, example, name, param_name)
        except UnsupportedOptimizerError as failure:
            error = error or failure
            continue
        reads -= len(runtime) + (not lr_is_tensor)  # the hyperparameters' own reads
        if chosen is None:
            chosen = (shadow, after)
        if reads == 0:
            chosen = (shadow, after)
            break
    if chosen is None:
        assert error is not None, "no trace was tried: this is a bug in fx_optim_pass, please report it"
        raise error
    shadow, after = chosen
    created = tuple(
        CreatedState(key, tuple(value.shape), value.dtype)
        for key, value in after.items()
        if key not in state and isinstance(value, torch.Tensor)
    )
    setup = compiled_setup(optimizer, param, param_name)
    shapes = tuple(tuple(value.shape) for value in state.values())
    return OptimizerStep(type(optimizer), setup, runtime, tuple(state), shapes, created, lr_is_tensor, shadow)


def hyperparameter_tensor(value: float) -> torch.Tensor:
    """The graph input carrying one run-time hyperparameter: a float64 CPU scalar, so
    reading it is exact (it holds the Python float) and never waits for a GPU."""
    return torch.tensor(value, dtype=torch.float64, device="cpu")


def _trace_checked(
    fn: Callable[..., None], args: Sequence[torch.Tensor], name: str, param_name: str
) -> tuple[fx.GraphModule, int]:
    """The traced update and how many numbers it reads at run time; refuses what cannot be traced."""
    try:
        graph = _torch_compat.trace_functional(fn, args)
    except Exception as error:
        raise UnsupportedOptimizerError(
            f"{name}.step() on parameter {param_name!r} cannot be traced into the compiled backward "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Use a torch.optim optimizer whose update is tensor-only, or leave this parameter out "
            "of apply_optimizer_in_backward."
        ) from error
    return graph, runtime_scalar_reads(graph, name, param_name)


def runtime_scalar_reads(graph: fx.GraphModule, name: str, param_name: str) -> int:
    """How many tensors the update reads as numbers at run time (``.item()``).

    A read whose traced value is symbolic is computed at every step; one that
    traced to a plain number would be frozen into the graph, and is refused.
    """
    reads = 0
    for node in graph.graph.nodes:
        if node.target is torch.ops.aten._local_scalar_dense.default:
            value = node.meta.get("val")
            # A symbol is computed at every step. A plain number was frozen at trace
            # time; so was a read whose result nothing uses (the number was inlined).
            if isinstance(value, (bool, int, float)) or (value is None and not node.users):
                raise UnsupportedOptimizerError(
                    f"{name}.step() on parameter {param_name!r} reads a tensor as a Python number "
                    "(.item()) whose value would be frozen into the compiled graph. "
                    "Use an optimizer configuration whose update stays in tensors, or leave this parameter "
                    "out of apply_optimizer_in_backward."
                )
            reads += 1
    return reads


def trace_step(step: OptimizerStep, example_args: Sequence[torch.Tensor], param_name: str) -> fx.GraphModule:
    """The traced update of ``step`` on the joint graph's fake values, profiler ops removed."""
    graph, _ = _trace_checked(step.step_function(), example_args, step.optimizer_class.__name__, param_name)
    for node in reversed(list(graph.graph.nodes)):
        if getattr(node.target, "namespace", None) == "profiler" or (
            node.op == "call_function" and "profiler" in str(node.target) and not node.users
        ):
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph
