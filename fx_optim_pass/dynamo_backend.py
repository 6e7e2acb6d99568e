"""The ``fx_optim`` torch.compile backend: Dynamo graph in, compiled training step out.

1. Plan: which graph inputs are parameters with in-backward optimizers.
2. Append graph inputs for the optimizers' run-time floats (``lr``, betas, ...: one per
   distinct value) and each optimizer's state tensors.
3. Compile through AOTAutograd (Inductor or plain) with the joint-graph pass
   ``insert_optimizer_updates``.
4. At every call, append the current floats and state tensors, looked up from the
   parameters actually passed in, so schedulers, ``load_state_dict`` and a second
   model instance are honoured.
"""

from __future__ import annotations

import functools
import logging
import operator
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.fx as fx

from fx_optim_pass import _torch_compat
from fx_optim_pass.api import WeakIdentityMap, has_gradient_hooks, own_hook, setup_generation, updates_in_backward
from fx_optim_pass.distributed import DataParallelSetupError, collective_error, data_parallel_spec
from fx_optim_pass.optim_lowering import (
    LR,
    OptimizerStep,
    check_shardable,
    describe_step,
    hyperparameter_tensor,
    initialize_state,
    param_group,
    run_time_floats,
    setup_key,
    setup_readers,
)
from fx_optim_pass.passes import all_reduce_gradients, hoist_step_scalars, insert_optimizer_updates
from fx_optim_pass.placement import find_placements, params_read_by_backward, placement_log, placement_table
from fx_optim_pass.plan import (
    DataParallelSpec,
    GradientAllReduce,
    GradientShard,
    ParamUpdate,
    UpdatePlan,
    node_safe_name,
)
from fx_optim_pass.testing import normalize_graph

__all__ = [
    "DoubleBackwardError",
    "GraphObserver",
    "PartialGradientError",
    "SecondBackwardError",
    "ShardedStateError",
    "backend",
    "make_backend",
]

Compiler = Literal["inductor", "aot_eager"]
DEFAULT_BUCKET_CAP_MB = 25.0
"""DistributedDataParallel's default ``bucket_cap_mb``."""
GraphObserver = Callable[[str, fx.GraphModule], None]
"""Called with ("joint_before" | "joint" | "forward" | "backward" | "inference", graph)."""


def make_backend(
    *,
    compiler: Compiler = "inductor",
    observer: GraphObserver | None = None,
    process_group: Any = None,
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
    shard_optimizer_state: bool = False,
) -> Callable[..., Any]:
    """A torch.compile backend that runs in-backward optimizers inside the compiled backward.

    ``compiler="inductor"`` generates fused kernels; ``"aot_eager"`` runs the same
    rewritten graphs op by op (cheap, for tests and debugging). ``observer`` sees
    every graph the backend produces (for inspection and golden tests); with an
    observer, Inductor's caches are bypassed so that every graph is produced.
    With a ``process_group`` (a ``torch.distributed.ProcessGroup``), every parameter's
    gradient is averaged over it inside the compiled backward, right before its update:
    data-parallel training (``fx_optim_pass.data_parallel`` also checks the ranks' models
    and broadcasts rank 0's parameters). With Inductor, small all-reduces are merged by
    Inductor's own bucketing pass into buckets of up to ``bucket_cap_mb`` MiB (``None``:
    one collective per gradient). With ``shard_optimizer_state=True`` (needs a
    ``process_group``), each rank keeps optimizer state only for its shard of each
    parameter with an in-backward optimizer: the gradient is reduce-scattered, this rank
    updates its shard, and the updated shards are all-gathered into the parameter, all
    inside the compiled backward (ZeRO-2 style); ``optimizer.state[p]`` then holds this
    rank's flat shard of each state tensor.

    Example::

        >>> import torch, fx_optim_pass as fop
        >>> model = torch.nn.Linear(4, 2)
        >>> fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
        >>> compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"))
        >>> compiled(torch.randn(3, 4)).sum().backward()
        >>> model.weight.grad is None
        True
    """
    if compiler not in ("inductor", "aot_eager"):
        raise ValueError(f"make_backend: compiler must be 'inductor' or 'aot_eager', got {compiler!r}")
    if shard_optimizer_state and process_group is None:
        raise ValueError(
            "make_backend: shard_optimizer_state=True shards optimizer state over the ranks of a process group; "
            "pass process_group= as well (or use fx_optim_pass.data_parallel(model, shard_optimizer_state=True))."
        )
    group = None if process_group is None else data_parallel_spec(process_group, bucket_cap_mb, shard_optimizer_state)

    def fx_optim_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return _compile(gm, example_inputs, compiler, observer or _ignore, group)

    fx_optim_backend.__name__ = f"fx_optim_{compiler}"
    return fx_optim_backend


def _ignore(kind: str, gm: fx.GraphModule) -> None:
    pass


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    compiler: Compiler,
    observe: GraphObserver,
    group: DataParallelSpec | None = None,
) -> Callable[..., Any]:
    if not torch.is_grad_enabled():  # an inference graph: no gradients, nothing to update
        inference = _compile_variant(gm, example_inputs, UpdatePlan((), len(example_inputs)), (), compiler, observe)
        return lambda *args: inference(args, ())
    # Dynamo shares this graph between modules of the same structure (parameters are
    # graph inputs), but whether and how each parameter is updated is not among its
    # guards. So the compiled step is chosen per call by the parameters' in-backward
    # optimizers, and compiled again for a combination not seen before.
    pristine = _torch_compat.copy_dynamo_graph(gm, [])
    plan = build_plan(gm, example_inputs, group)
    names = [_input_name(node) for node in gm.graph.find_nodes(op="placeholder")]
    signature = RuntimeSignature(names)
    key, floats = signature(example_inputs)
    variants = {key: _compile_variant(gm, example_inputs, plan, floats, compiler, observe)}
    static_shapes = all(isinstance(x, torch.Tensor) for x in example_inputs)

    # The key and variant of the last call: a step like the last one gets the very key object
    # back (``_LastCall``), and hashing it, a tuple of a thousand leaves for a 26-tensor GPT,
    # cost 25 µs a step.
    last: list[Any] = [None, None]

    def run_compiled_step(*args: Any) -> Any:
        key: Any
        key, floats = signature(args)
        variant = last[1] if key is last[0] else variants.get(key)
        if variant is None and not static_shapes:
            # A variant compiled here sees this call's sizes only (the graph's symbolic
            # sizes become these numbers), so it serves calls of the same sizes.
            key = (key, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
            variant = variants.get(key)
        if variant is None:
            variant = variants[key] = compile_for(args, floats)
            if len(variants) == _MANY_VARIANTS:
                warnings.warn(_MANY_VARIANTS_WARNING, stacklevel=2)
        outputs = variant(args, floats)
        if isinstance(outputs, OtherStateLayout):
            # The optimizer state is not of the dtypes, devices or strides the variant was
            # compiled for (cast by the user, or loaded so): its kernels would misread it. The
            # variant for this state serves this call and, under the same key, the next ones.
            layout_key = (key, outputs.layout)
            variant = variants.get(layout_key) or compile_for(args, floats)
            variants[key] = variants[layout_key] = variant
            outputs = variant(args, floats)
            assert not isinstance(outputs, OtherStateLayout), "compiled for this call's state"
        last[:] = key, variant
        return outputs

    def compile_for(args: Sequence[Any], floats: Sequence[float]) -> Callable[[Sequence[Any], Sequence[float]], Any]:
        fresh = _torch_compat.copy_dynamo_graph(pristine, [])
        return _compile_variant(fresh, args, build_plan(fresh, args, group), floats, compiler, observe)

    return run_compiled_step


# Variants of one Dynamo graph compiled outside Dynamo, so past its recompile limit; this
# many say a setting is changing step after step (Dynamo's own limit is 8 too).
_MANY_VARIANTS = 8
_MANY_VARIANTS_WARNING = (
    f"fx_optim_pass compiled {_MANY_VARIANTS} variants of one graph: the step compiles anew for each new setup of "
    "its in-backward optimizers (a hyperparameter value of a float64 parameter, which is compiled in; a float "
    "crossing 0, 0.5, 1, 1.5 or 2; a flag such as amsgrad; another model instance sharing this graph). If a "
    "schedule changes such a value at every step (momentum cycling on float64 parameters), keep it fixed or "
    "train in float32, where every float hyperparameter is read at run time."
)


class OtherStateLayout(NamedTuple):
    """What a compiled variant returns, without running, for optimizer state of another
    layout than it was compiled for: that layout (``state_layout``)."""

    layout: tuple[Any, ...]


def state_layout(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """What compiled code assumes of its tensor inputs: dtypes, devices, sizes and strides."""
    return tuple((t.dtype, t.device, tuple(t.shape), t.stride()) for t in tensors)


def _compile_variant(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    plan: UpdatePlan,
    floats: Sequence[float],
    compiler: Compiler,
    observe: GraphObserver,
) -> Callable[[Sequence[Any], Sequence[float]], Any]:
    """The step compiled for ``plan``, called with the user's inputs and the run-time floats
    (``runtime_signature``; ``floats``: this call's)."""
    runtime_inputs = RuntimeInputs(plan)
    anchor = [_GRAD_ANCHOR] if plan.params else []
    input_names = [*_extra_input_names(plan), *(["grad_anchor"] if anchor else [])]
    graph = _torch_compat.copy_dynamo_graph(gm, input_names)
    _check_state_shapes(plan, example_inputs)
    example_extra = runtime_inputs(example_inputs, floats, for_compile=True)
    example = _torch_compat.with_scalar_symbols([*example_inputs, *example_extra, *anchor])
    joint_pass = JointPass(plan, observe)
    if compiler == "inductor":
        compiled = _torch_compat.compile_inductor(
            graph,
            example,
            joint_pass,
            observe,
            hoist_step_scalars,
            use_caches=observe is _ignore,
            bucket_all_reduces_mb=plan.all_reduce.group.bucket_cap_mb if plan.all_reduce else None,
            written_inputs=plan.written_inputs(),
            # Sharded: no gain measured, 1 MiB more peak (benchmarks/distributed.py, this machine).
            overlap_collectives=plan.all_reduce is not None and not plan.all_reduce.group.shard_optimizer_state,
        )
    else:
        compiled = _torch_compat.compile_aot_eager(graph, example, joint_pass, observe, hoist_step_scalars)
    if plan.all_reduce is not None:
        compiled = _name_rank_on_collective_failure(compiled, plan.all_reduce.group)
    if not plan.params:
        return lambda args, floats: compiled(*args)
    # Known when the pass ran; after a cache hit, found by tracing the joint graph again
    # (aot_eager), on the first backward that needs it: a second one with retain_graph=True.
    fake_example = [] if joint_pass.read_by_backward is not None else _torch_compat.fake_copies(example)

    def read_by_backward() -> set[str]:
        if joint_pass.read_by_backward is None:
            retrace = JointPass(plan, _ignore)
            with torch.enable_grad():  # called from a backward hook, where grad mode is off
                graph = _torch_compat.copy_dynamo_graph(gm, input_names)
                _torch_compat.compile_aot_eager(graph, fake_example, retrace, _ignore)
            joint_pass.read_by_backward = retrace.read_by_backward
        if joint_pass.read_by_backward is None:  # not traced after all: assume the worst
            return {p.name for p in plan.params}
        return joint_pass.read_by_backward

    names = [p.name for p in plan.params]
    positions = [p.input_index for p in plan.params]
    watches: dict[tuple[int, ...], _ParameterWatch] = {}
    # The optimizer state is not among Dynamo's guarded inputs, and Inductor's code checks
    # only its sizes and strides: state of another dtype would be misread, silently.
    compiled_layout = state_layout(example_extra)
    same_layout = _torch_compat.tensor_layout_check(example_extra)

    def run_with_optimizer_inputs(args: Sequence[Any], floats: Sequence[float]) -> Any:
        # The updated parameters go in detached, so the compiled backward has no
        # autograd edge to their AccumulateGrad nodes: an AccumulateGrad node that
        # still runs in a backward then means gradient from elsewhere (eager code).
        # The anchor keeps the outputs differentiable when no other input requires grad.
        params = [args[i] for i in positions]
        call_args = list(args)
        for i, param in zip(positions, params):
            call_args[i] = param.detach()
        extra = runtime_inputs(args, floats)
        if not same_layout(*extra) and (layout := state_layout(extra)) != compiled_layout:
            runtime_inputs.take_installs()  # nothing runs: no state to install
            return OtherStateLayout(layout)
        outputs = compiled(*call_args, *extra, _GRAD_ANCHOR)
        watch = _watch_parameters(params, names, watches)
        _guard_backward(outputs, params, watch, names, runtime_inputs.take_installs(), extra, read_by_backward)
        return outputs

    return run_with_optimizer_inputs


def _name_rank_on_collective_failure(compiled: Callable[..., Any], spec: DataParallelSpec) -> Callable[..., Any]:
    """``compiled``, whose backward raises ``CollectiveError`` (group, this rank, the peer where
    known) in place of the backend's bare error when one of its collectives fails."""

    def run_naming_rank_on_failure(*args: Any) -> Any:
        outputs = compiled(*args)
        node = _compiled_backward_node(outputs)
        if node is not None:
            _torch_compat.translate_backward_errors(node, lambda error: collective_error(error, spec))
        return outputs

    return run_naming_rank_on_failure


class DoubleBackwardError(RuntimeError):
    """``backward(create_graph=True)`` through a graph that updates parameters."""


class PartialGradientError(RuntimeError):
    """A parameter updated in a compiled backward also gets gradient from elsewhere in the
    same backward (another compiled call, or eager code)."""


# A leaf that requires grad, passed to every compiled call that updates parameters (they
# go in detached); the graph never reads it, so it never gets a gradient. Its AccumulateGrad
# node, held, tells a backward that accumulates into leaves from one restricted to inputs.
_GRAD_ANCHOR = torch.zeros((), requires_grad=True)
_GRAD_ANCHOR_NODE = torch.autograd.graph.get_gradient_edge(_GRAD_ANCHOR).node

_ParameterWatch = tuple[dict[int, str], list[weakref.ref[torch.Tensor]]]
"""Updated parameters' names by id, and the parameters, weakly (``_watch_parameters``)."""
# Compiled calls whose backward has not run yet: their backward node, weakly, and the
# ``_ParameterWatch`` of the parameters they update. Nothing here holds a parameter: a
# forward whose backward never runs must not keep its model alive.
_pending_calls: list[tuple[weakref.ref[Any], dict[int, str], list[weakref.ref[torch.Tensor]]]] = []

# Each updated parameter's hook that refuses eager gradient while a compiled call that
# updates it is pending (``_refuse_eager_gradient``). On the parameter, not on its
# AccumulateGrad node: a node holds its parameter, so keeping one alive would keep the
# model and its optimizer state alive after the user dropped them.
_eager_gradient_checks: WeakIdentityMap[torch.Tensor, Any] = WeakIdentityMap()

_FIX = (
    "Compile with fullgraph=True, keep every use of the parameter inside the compiled model and call "
    "backward() once per forward, or leave these parameters out of apply_optimizer_in_backward."
)


def _watch_parameters(
    params: Sequence[torch.Tensor], names: Sequence[str], watches: dict[tuple[int, ...], _ParameterWatch]
) -> _ParameterWatch:
    """For ``_guard_backward``: the name of each of ``params`` by its ``id`` and weak
    references to them, once each has the hook of ``_refuse_eager_gradient``. Kept per
    set of parameters in ``watches``, and dropped from it as soon as one of them is gone,
    before its id can be another's."""
    ids = tuple(map(id, params))
    watch = watches.get(ids)
    if watch is None:
        if len(watches) > 8:  # one per model instance this graph serves
            watches.clear()
        for param in params:
            if param not in _eager_gradient_checks:
                hook = own_hook(functools.partial(_refuse_eager_gradient, id(param)))
                _eager_gradient_checks[param] = param.register_hook(torch.utils.hooks.unserializable_hook(hook))

        def forget(_: Any) -> None:
            watches.pop(ids, None)

        watch = watches[ids] = (dict(zip(ids, names)), [weakref.ref(param, forget) for param in params])
    return watch


def _guard_backward(
    outputs: Any,
    params: Sequence[torch.Tensor],
    watch: _ParameterWatch,
    names: Sequence[str],
    installs: Sequence[Callable[[], None]],
    optimizer_inputs: Sequence[torch.Tensor],
    read_by_backward: Callable[[], set[str]],
) -> None:
    """Check, right before this call's compiled backward runs (so before it updates anything):

    - no create_graph=True: a higher-order gradient would differentiate through the
      update, and AOTAutograd cannot build it with the update's in-place writes;
    - ``_refuse_partial_gradients`` for every compiled call of this backward, this one
      included: the first compiled backward to run refuses before any of them updates.

    The same check runs when eager gradient reaches an updated parameter, for when the
    eager part arrives first (``_refuse_eager_gradient``). ``installs`` run after the
    compiled backward.

    A backward with ``retain_graph=True`` may be followed by another through the same
    graph; like PyTorch's eager hooks, that one updates again (see ``_allow_another_update``).
    """
    node = _compiled_backward_node(outputs)
    if node is None:
        return
    _torch_compat.refuse_compiled_autograd(node, lambda: _compiled_autograd_error(names))
    _pending_calls[:] = [entry for entry in _pending_calls if entry[0]() is not None]
    entry = (weakref.ref(node), *watch)
    _pending_calls.append(entry)
    written = [*params, *optimizer_inputs]
    saved_versions: list[int] = []  # of ``written``, when a backward retained the graph
    counted_on: list[int] = []  # of ``written``, before another backward set them back

    def check(grad_outputs: Any) -> None:
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise DoubleBackwardError(
                f"backward(create_graph=True) reached a compiled graph that updates {len(names)} parameter(s) "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) with their in-backward optimizers; "
                "they were not updated. Compute higher-order gradients without in-backward optimizers "
                "(fx_optim_pass.detach, or register_hook=False), or call backward() without create_graph."
            )
        if not _torch_compat.accumulates_into_leaves(_GRAD_ANCHOR_NODE):
            raise RestrictedBackwardError(
                f"torch.autograd.grad() or backward(inputs=...) reached a compiled graph that updates {len(names)} "
                f"parameter(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) in its backward: it would "
                "update them, where PyTorch's in-backward hooks do not run for such a backward. Nothing was updated. "
                "For input gradients (adversarial examples, saliency), run that forward eagerly or through a model "
                "compiled with another backend (torch.compile(model)), and call plain backward() to train."
            )
        _refuse_partial_gradients()
        retains_graph = _torch_compat.retains_graph()
        if entry in _pending_calls and not retains_graph:
            _pending_calls.remove(entry)
        if saved_versions:  # an earlier backward through this graph retained it
            counted_on[:] = _allow_another_update(written, saved_versions, names, installs, read_by_backward)
        elif retains_graph:
            saved_versions[:] = [t._version for t in written]

    def after_backward(*_unused: Any) -> None:
        for run in installs:
            run()
        if counted_on:  # count the writes of this backward on top of the ones before it
            now = [t._version for t in written]
            _torch_compat.set_versions(written, [c + n - s for c, n, s in zip(counted_on, now, saved_versions)])
            counted_on.clear()

    node.register_prehook(functools.partial(_outside_dynamo, check))
    node.register_hook(functools.partial(_outside_dynamo, after_backward))


@torch.compiler.disable
def _outside_dynamo(hook: Callable[..., None], *args: Any) -> None:
    """Run ``hook``, one of ours that the backward runs, and what it calls, without Dynamo.

    A training step compiled whole (``model(x).sum().backward()`` inside a compiled function)
    breaks the graph at ``backward()`` and runs it with Dynamo's frame callback still set:
    Dynamo then compiled our hooks, and failed inside them, on the first step."""
    hook(*args)


class RestrictedBackwardError(RuntimeError):
    """``torch.autograd.grad`` or ``backward(inputs=...)`` through a graph that updates parameters."""


class CompiledAutogradError(RuntimeError):
    """A backward under compiled autograd through a graph that updates parameters."""


def _compiled_autograd_error(names: Sequence[str]) -> CompiledAutogradError:
    return CompiledAutogradError(
        f"compiled autograd (torch._dynamo.compiled_autograd) reached a compiled graph that updates {len(names)} "
        f"parameter(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) in its backward, which it cannot "
        "trace. Nothing was updated. Run this backward without compiled autograd: its backward, the update "
        "included, is compiled already."
    )


class SecondBackwardError(RuntimeError):
    """A second backward through a compiled graph (``retain_graph=True``) that would read
    parameters its first backward already updated."""


def _allow_another_update(
    written: Sequence[torch.Tensor],
    saved_versions: Sequence[int],
    names: Sequence[str],
    installs: Sequence[Callable[[], None]],
    read_by_backward: Callable[[], set[str]],
) -> list[int]:
    """Before a second backward through a compiled graph: let it update again, as PyTorch's
    eager hooks do, where that is sound; returns the version counters it set back.

    The first backward's writes bumped the version counters of the parameters and state it
    saved, so autograd would refuse the second. Set back, they let the update run again on
    the current parameter and state, with the gradient of the same saved activations. That
    is sound only if the backward reads the parameters for nothing but their update: where
    it reads one for a gradient (eager hooks fail there too, with autograd's in-place
    error), or the first backward created optimizer state (SGD's first momentum buffer,
    which the graph would create again), this refuses instead.
    """
    read = sorted(read_by_backward())
    if read:
        raise SecondBackwardError(
            f"a second backward (retain_graph=True) through this compiled graph needs the old value of parameter(s) "
            f"{', '.join(read)} for its gradients, but the first backward already updated them with their in-backward "
            "optimizers (PyTorch's eager hooks fail here too). Nothing was updated. Run the forward again before each "
            "backward, or leave these parameters out of apply_optimizer_in_backward."
        )
    if installs:
        raise SecondBackwardError(
            f"a second backward (retain_graph=True) through the first step of parameter(s) {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}: their optimizer created its state in the first backward "
            "(e.g. SGD's momentum_buffer), and this graph would create it again instead of stepping on it. "
            "Nothing was updated. Take one ordinary step (no retain_graph) first, or run the forward again "
            "before each backward."
        )
    counted_on = [t._version for t in written]
    _torch_compat.set_versions(written, saved_versions)
    return counted_on


def _refuse_partial_gradients() -> None:
    """Raise before any compiled call of the running backward updates, if one of them would
    update on a partial gradient:

    - two compiled calls update the same parameter: each would update on its own part of
      the gradient (a graph break between two uses of a weight, or two forward calls
      summed into one loss);
    - eager code also sends gradient to an updated parameter (its AccumulateGrad node
      runs): the update would miss that part.
    """
    running = [
        (updated, param_refs)
        for node_ref, updated, param_refs in _pending_calls
        if (node := node_ref()) is not None and _torch_compat.will_run_in_this_backward(node)
    ]
    seen: set[int] = set()
    shared: set[str] = set()
    for updated, _ in running:
        shared.update(name for param_id, name in updated.items() if param_id in seen)
        seen.update(updated)
    if shared:
        raise PartialGradientError(
            f"parameter(s) {', '.join(sorted(shared))} get gradient from more than one compiled call in this "
            "backward (a graph break between two uses, or several forward calls in one loss); updating in each "
            f"call would use a partial gradient. Nothing was updated. {_FIX}"
        )
    from_eager = [
        name
        for updated, param_refs in running
        for name, param_ref in zip(updated.values(), param_refs)
        if (param := param_ref()) is not None and _torch_compat.will_accumulate_in_this_backward(param)
    ]
    if from_eager:
        raise _eager_contribution_error(from_eager)


def _eager_contribution_error(names: Sequence[str]) -> PartialGradientError:
    return PartialGradientError(
        f"parameter(s) {', '.join(sorted(names))} get gradient from code outside the compiled graph in this "
        "backward (an eager term such as a regularizer, or a use after a graph break), and their in-backward "
        f"optimizers would update them on the compiled part alone. Nothing was updated. {_FIX} "
        "(An eager regularizer belongs inside the compiled function.)"
    )


@torch.compiler.disable  # as _outside_dynamo
def _refuse_eager_gradient(param_id: int, _grad: torch.Tensor) -> None:
    """A tensor hook of each updated parameter: refuse the gradient that eager code sends
    it while a compiled call that updates it is still to run in the same backward."""
    for call_ref, updated, _ in list(_pending_calls):
        call = call_ref()
        if call is not None and param_id in updated and _torch_compat.will_run_in_this_backward(call):
            raise _eager_contribution_error([updated[param_id]])


def _compiled_backward_node(outputs: Any) -> Any:
    """The autograd node of AOTAutograd's compiled function behind ``outputs`` (views included)."""
    # AOTAutograd returns a flat list; walked by pytree only otherwise (it costs ~10 µs a call).
    leaves = outputs if isinstance(outputs, (list, tuple)) else torch.utils._pytree.tree_leaves(outputs)
    frontier = [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    for _ in range(4):
        for node in frontier:
            if "CompiledFunctionBackward" in type(node).__name__:
                return node
        frontier = [n for node in frontier for n, _ in node.next_functions if n is not None]
    return None


class DistinctFloats:
    """The run-time floats of one call, numbered in the order the updates read them: equal
    values of one name (one lr for every parameter) get one number, so one graph input."""

    def __init__(self) -> None:
        self.numbers: dict[tuple[str, float], int] = {}
        self.sharing: list[int] = []  # the number of every float read, in order: part of the variant's key

    def add(self, read: Sequence[tuple[str, float]]) -> list[int]:
        """Number one optimizer's floats, ``(name, value)`` pairs (``run_time_floats``)."""
        numbers = [self.numbers.setdefault(key, len(self.numbers)) for key in read]
        self.sharing.extend(numbers)
        return numbers


def _in_backward_optimizers(
    args: Sequence[Any],
) -> Iterator[tuple[int, torch.Tensor, torch.optim.Optimizer, int]]:
    """Each in-backward optimizer of the parameters among a call's ``args``, in call order,
    with its parameter, that parameter's input position and the optimizer's among the
    parameter's ``_in_backward_optimizers``."""
    for index, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and arg.requires_grad and _updates_in_graph(arg):
            for place, opt in enumerate(arg._in_backward_optimizers):  # type: ignore[attr-defined]
                yield index, arg, opt, place


def _updates_in_graph(param: torch.Tensor) -> bool:
    """Whether a compiled call updates ``param`` in its backward: it has in-backward
    optimizers and no gradient hook of the user's (``has_gradient_hooks``)."""
    return updates_in_backward(param) and not has_gradient_hooks(param)


def runtime_signature(args: Sequence[Any], names: Sequence[str]) -> tuple[tuple[Any, ...], list[float], dict[int, int]]:
    """What decides the rewritten graph, read off the parameters of one call (``names``: the
    inputs' names): each parameter's optimizer setups and which of the floats they read are
    equal; the values of the distinct floats, to pass (``UpdatePlan.floats``); and which of
    them are a float ``lr`` (by number: the first optimizer, in call order, that reads it)."""
    setups = []
    floats = DistinctFloats()
    lr_readers: dict[int, int] = {}
    for ordinal, (index, param, opt, _) in enumerate(_in_backward_optimizers(args)):
        setup, read = run_time_floats(opt, param, names[index])
        setups.append((index, type(opt), setup))
        numbers = floats.add(read)
        if read and read[0][0] == LR.name:  # a float lr is read first
            lr_readers.setdefault(numbers[0], ordinal)
    return (tuple(setups), tuple(floats.sharing)), [value for _, value in floats.numbers], lr_readers


class RuntimeSignature:
    """``runtime_signature`` for the calls of one compiled frame, memoized.

    It runs at every step, for every parameter: computed in full (each optimizer's setup,
    each float numbered), it cost 7 µs per parameter, a third of a millisecond per step on
    a 26-tensor GPT. So it is memoized on what decides it: each updated input's position,
    its optimizers' ``setup_key`` (every setting but ``lr``) and which of their ``lr`` are
    equal. The ``lr`` values, which a scheduler changes at every step, are filled in per
    call. A step of the same parameters as the last one (the usual case) does not even
    build the memo's key: ``_LastCall`` compares what it is made of, list by list.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = names
        # (setup keys, lr sharing) -> (the variant's key, per distinct float: the number of
        # the lr it is, or None and its value)
        self._memo: dict[Any, tuple[tuple[Any, ...], list[tuple[int | None, float]]]] = {}
        self._last: _LastCall | None = None

    def __call__(self, args: Sequence[Any]) -> tuple[tuple[Any, ...], list[float]]:
        if self._last is not None:
            reused = self._last.reuse(args)
            if reused is not None:
                return reused
        pairs = list(_in_backward_optimizers(args))
        groups = [param_group(opt, param, self.names[index]) for index, param, opt, _ in pairs]
        setup_keys = [(index, setup_key(opt, group, param)) for (index, param, opt, _), group in zip(pairs, groups)]
        lr_sharing, distinct_lrs = _lr_sharing([group["lr"] for group in groups])
        memo_key = (tuple(setup_keys), lr_sharing)
        try:
            found = self._memo.get(memo_key)
        except TypeError:  # an unhashable setting (a list): computed in full each time
            self._last = None
            full_key, floats, _ = runtime_signature(args, self.names)
            return full_key, floats
        if found is None:
            full_key, floats, lr_readers = runtime_signature(args, self.names)
            if len(self._memo) > 4096:  # settings that keep changing (momentum cycling) must not pile up
                self._memo.clear()
            template = [(lr_sharing[lr_readers[i]] if i in lr_readers else None, v) for i, v in enumerate(floats)]
            found = self._memo[memo_key] = (full_key, template)
        key, template = found
        self._last = _LastCall(args, self.names, pairs, groups, lr_sharing, key, template)
        return key, _fill_lrs(template, distinct_lrs)


def _lr_sharing(lrs: Sequence[Any]) -> tuple[tuple[int, ...], list[Any]]:
    """Which of ``lrs`` are equal, as the number of each's distinct value; and those values.
    Typed, so that a tensor lr (hashed by identity) never equals a float."""
    numbers: dict[tuple[type, Any], int] = {}
    sharing = tuple([numbers.setdefault((type(lr), lr), len(numbers)) for lr in lrs])
    return sharing, [lr for _, lr in numbers]


def _fill_lrs(template: Sequence[tuple[int | None, float]], distinct_lrs: Sequence[Any]) -> list[float]:
    return [value if lr is None else distinct_lrs[lr] for lr, value in template]


class _LastCall:
    """What ``RuntimeSignature`` read at one call, kept to tell at the next whether it would
    read the same again, with a few list comparisons instead of a key per parameter.

    Which parameters update, and with how many optimizers, changes only through
    ``fx_optim_pass.api`` (its ``setup_generation``), PyTorch's
    ``_apply_optimizer_in_backward``, which lengthens a parameter's
    ``_in_backward_optimizers``, or a gradient hook added or removed, which changes the
    length of its hook dicts. Another model instance served by the same graph passes other
    parameters (compared by ``id``: this holds no reference to them). Every optimizer and
    its settings are read again at each call, and which inputs require grad: Dynamo guards
    on it from torch 2.13 on, but torch 2.11 ran a graph again for a parameter frozen since
    (``requires_grad_(False)``), and the key reused then updated it. Each parameter's dtype
    is not read: Dynamo's guards on the frame's inputs fix it.
    """

    def __init__(
        self,
        args: Sequence[Any],
        names: Sequence[str],
        pairs: Sequence[tuple[int, torch.Tensor, torch.optim.Optimizer, int]],
        groups: Sequence[dict[str, Any]],
        lr_sharing: tuple[int, ...],
        key: tuple[Any, ...],
        template: list[tuple[int | None, float]],
    ) -> None:
        self.generation = setup_generation()
        self.grad_positions = _grad_positions(args)
        self.attachment_counts = self._attachment_counts(args)
        self.positions = [index for index, _, _, _ in pairs]
        self.names = [names[index] for index in self.positions]  # for errors
        self.places = [place for _, _, _, place in pairs]
        self.param_ids = [id(param) for _, param, _, _ in pairs]
        optimizers = [opt for _, _, opt, _ in pairs]
        self.types = list(map(type, optimizers))
        readers = [setup_readers(opt, group) for opt, group in zip(optimizers, groups)]
        self.group_readers = [group_reader for group_reader, _ in readers]
        self.attribute_readers = [attribute_reader for _, attribute_reader in readers]
        self.settings = self._settings(optimizers, groups)
        self.lr_types = [type(group["lr"]) for group in groups]
        self.lr_sharing = lr_sharing
        # Every lr one float, shared (an lr scheduler on identical optimizers): then
        # equal values alone (``list.count``, in C) say the sharing holds.
        self.one_float_lr = bool(groups) and set(self.lr_types) == {float} and set(lr_sharing) == {0}
        self.key = key
        self.template = template

    def _attachment_counts(self, args: Sequence[Any]) -> list[tuple[int, int, int]]:
        # Per parameter: its in-backward optimizers, and its gradient hooks (a user's
        # takes it out of the graph's updates: ``has_gradient_hooks``).
        return [
            (
                len(getattr(param, "_in_backward_optimizers", None) or ()),
                len(param._backward_hooks or ()),
                len(param._post_accumulate_grad_hooks or ()),
            )
            for param in map(args.__getitem__, self.grad_positions)
        ]

    def _settings(self, optimizers: Sequence[torch.optim.Optimizer], groups: Sequence[dict[str, Any]]) -> list[Any]:
        attributes = list(map(vars, optimizers))
        return [
            list(map(len, groups)),
            [read(group) for read, group in zip(self.group_readers, groups)],
            list(map(len, attributes)),
            [read(attributes) for read, attributes in zip(self.attribute_readers, attributes)],
        ]

    def reuse(self, args: Sequence[Any]) -> tuple[tuple[Any, ...], list[float]] | None:
        """This call's key and floats, if it reads what the last call read but the lr values."""
        if (
            setup_generation() != self.generation
            or _grad_positions(args) != self.grad_positions
            or self._attachment_counts(args) != self.attachment_counts
        ):
            return None
        params = [args[i] for i in self.positions]
        if list(map(id, params)) != self.param_ids:
            return None
        optimizers = [param._in_backward_optimizers[place] for param, place in zip(params, self.places)]
        if list(map(type, optimizers)) != self.types:
            return None
        groups = [param_group(opt, param, name) for opt, param, name in zip(optimizers, params, self.names)]
        try:
            if self._settings(optimizers, groups) != self.settings:
                return None
        except (KeyError, RuntimeError):  # a setting gone; a tensor setting compared by value
            return None
        lrs = [group["lr"] for group in groups]
        if list(map(type, lrs)) != self.lr_types:  # a float lr that became a tensor, say
            return None
        if self.one_float_lr and lrs.count(lrs[0]) == len(lrs):
            distinct_lrs = lrs[:1]
        else:
            lr_sharing, distinct_lrs = _lr_sharing(lrs)
            if lr_sharing != self.lr_sharing:
                return None
        return self.key, _fill_lrs(self.template, distinct_lrs)


def _grad_positions(args: Sequence[Any]) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def _extra_input_names(plan: UpdatePlan) -> list[str]:
    """Readable, unique placeholder names: ``lr``, ``betas_0``, then ``adamw_exp_avg__0_weight``."""
    names: list[str] = []

    def add(base: str) -> None:
        name = base
        while name in names:  # another value of one float; the same optimizer class twice on one parameter
            name = f"{base}_{len(names)}"
        names.append(name)

    for name in plan.floats:
        add(name)
    for param_update in plan.params:
        for step in param_update.steps:
            shared = step.float_slots()
            for slot, key in enumerate(step.input_names()):
                if slot not in shared:
                    add(f"{step.op_name}_{key}__{node_safe_name(param_update.name)}")
    return names


def _input_name(placeholder: fx.Node) -> str:
    """A graph input's name for users: the parameter's qualified name (``0.weight``) where known."""
    source = _torch_compat.parameter_source_name(placeholder)
    return (_torch_compat.qualified_name_from_source(source) if source else "") or placeholder.name


def build_plan(gm: fx.GraphModule, example_inputs: Sequence[Any], group: DataParallelSpec | None = None) -> UpdatePlan:
    """Find the parameters with in-backward optimizers among the graph's inputs (and, data
    parallel, every parameter whose gradient is averaged over ``group``)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    found = []
    averaged = []
    described: dict[Any, OptimizerStep] = {}  # parameters of one layout and setup share one description
    floats = DistinctFloats()  # numbered as runtime_signature numbers them
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            continue
        name = _input_name(node)
        in_backward = _updates_in_graph(value)
        if group is not None and group.shard_optimizer_state and not in_backward and updates_in_backward(value):
            raise DataParallelSetupError(
                f"parameter {name!r} has a gradient hook (register_hook or register_post_accumulate_grad_hook): "
                "it would then step eagerly, on its full gradient and state, where shard_optimizer_state=True "
                "keeps only this rank's shard of its state. Remove the hook, or train without shard_optimizer_state."
            )
        shard = None
        if group is not None and group.shard_optimizer_state and in_backward:
            shard = GradientShard(group, value.numel())  # reduce-scattered instead of all-reduced
            for opt in value._in_backward_optimizers:  # type: ignore[attr-defined]
                check_shardable(type(opt), name)
        elif group is not None and (in_backward or isinstance(value, torch.nn.Parameter)):
            averaged.append((index, name))
        if not in_backward:
            continue
        shard_numel = None if shard is None else shard.shard_numel
        steps, step_floats = [], []
        for opt in value._in_backward_optimizers:  # type: ignore[attr-defined]
            steps.append(describe_step(opt, value, name, shard_numel, described))
            step_floats.append(floats.add(run_time_floats(opt, value, name)[1]))
        found.append((index, name, steps, step_floats, shard))
    # The floats' inputs come first, then each optimizer's own (a tensor lr, its state).
    first_float, next_input = len(example_inputs), len(example_inputs) + len(floats.numbers)
    params = []
    for index, name, steps, floats_per_step, shard in found:
        step_inputs = []
        for step, numbers in zip(steps, floats_per_step):
            shared = step.float_slots()
            assert len(shared) == len(numbers), "a step reads other floats than described: a bug in fx_optim_pass"
            positions = []
            for slot in range(step.num_inputs):
                if slot in shared:
                    positions.append(first_float + numbers[slot - shared.start])
                else:
                    positions.append(next_input)
                    next_input += 1
            step_inputs.append(tuple(positions))
        params.append(ParamUpdate(index, name, tuple(steps), tuple(step_inputs), shard))
    all_reduce = None if group is None else GradientAllReduce(group, tuple(averaged))
    return UpdatePlan(
        tuple(params),
        len(example_inputs),
        all_reduce,
        floats=tuple(float_name for float_name, _ in floats.numbers),
    )


class JointPass(_torch_compat.CustomGraphPass):
    """``all_reduce_gradients`` then ``insert_optimizer_updates`` as an Inductor joint-graph pass
    (also used for aot_eager)."""

    def __init__(self, plan: UpdatePlan, observe: GraphObserver) -> None:
        self.plan, self.observe = plan, observe
        self.read_by_backward: set[str] | None = None  # see params_read_by_backward; None until the pass ran

    def __call__(self, graph: fx.Graph) -> None:
        if not self.plan.params and self.plan.all_reduce is None:
            return
        trace = _torch_compat.structured_trace_enabled()
        watched = trace or self.observe is not _ignore
        owner = graph.owning_module or torch.nn.Module()
        if watched:
            before = fx.GraphModule(owner, _copy(graph))
            self.observe("joint_before", before)
            if trace:
                _torch_compat.emit_trace_artifact("fx_optim_pass_joint_before", lambda: normalize_graph(before))
        all_reduce_gradients(graph, self.plan)
        insert_optimizer_updates(graph, self.plan)
        self.read_by_backward = params_read_by_backward(graph)
        if watched:
            after = fx.GraphModule(owner, _copy(graph))
            self.observe("joint", after)
            if trace:
                _torch_compat.emit_trace_artifact("fx_optim_pass_joint_after", lambda: normalize_graph(after))
        if placement_log.isEnabledFor(logging.INFO):  # TORCH_LOGS=fx_optim_pass.placement
            placement_log.info("fx_optim_pass placement:\n%s", placement_table(find_placements(graph)))

    def uuid(self) -> str:
        return self.plan.cache_key()


def _copy(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    copy.graph_copy(graph, {}, return_output_node=False)
    output = graph.output_node()
    env = {n: c for n, c in zip(graph.nodes, copy.nodes)}
    copy.output(fx.map_arg(output.args[0], env.__getitem__))
    return copy


class RuntimeInputs:
    """The optimizer tensors appended to the graph's inputs at every call."""

    def __init__(self, plan: UpdatePlan) -> None:
        self.plan = plan
        # The values of the run-time floats last passed, and their tensors; per optimizer and
        # group, a float lr last passed as a tensor (float64 parameters) and that tensor.
        self._floats: list[tuple[float, torch.Tensor]] = []
        self._tensor_lrs: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[tuple[int, str], Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._installs: list[Callable[[], None]] = []
        # Per parameter and its optimizer's place: the True flag passed once that optimizer's
        # created state exists (see ``_step_inputs``).
        self._exists_flags: WeakIdentityMap[torch.Tensor, dict[int, torch.Tensor]] = WeakIdentityMap()
        # Per optimizer of each parameter, in input order: where it is, and for an update
        # whose inputs are its state tensors alone once they exist (no shard to check, no
        # tensor lr), a reader of them all (``_state_reader``).
        self._steps = [
            (update, place, step, _state_reader(step) if update.shard is None and not step.lr_is_tensor else None)
            for update in plan.params
            for place, step in enumerate(update.steps)
        ]

    def __call__(
        self, args: Sequence[Any], floats: Sequence[float], *, for_compile: bool = False
    ) -> list[torch.Tensor]:
        inputs = self._float_tensors(floats)
        for update, place, step, read_state in self._steps:
            param = args[update.input_index]
            optimizer = param._in_backward_optimizers[place]
            if read_state is not None:
                try:
                    inputs.extend(read_state(optimizer.state[param]))
                except KeyError:  # not created yet: ``_step_inputs`` creates it
                    pass
                else:
                    if step.created:
                        inputs.append(self._exists_flag(param, place))
                    continue
            inputs.extend(self._step_inputs(step, optimizer, param, for_compile, update, place))
        return inputs

    def _float_tensors(self, values: Sequence[float]) -> list[torch.Tensor]:
        """The run-time floats as tensors, each made again only when its value changed.

        A new tensor, never an in-place fill: a graph still waiting for its backward
        keeps the values it was called with."""
        cached = self._floats
        if len(cached) != len(values):
            cached[:] = [(value, hyperparameter_tensor(value)) for value in values]
        for i, value in enumerate(values):
            if cached[i][0] != value:
                cached[i] = (value, hyperparameter_tensor(value))
        return [tensor for _, tensor in cached]

    def _step_inputs(
        self,
        step: OptimizerStep,
        optimizer: torch.optim.Optimizer,
        param: torch.Tensor,
        for_compile: bool,
        param_update: ParamUpdate,
        place: int,
    ) -> list[torch.Tensor]:
        """Its inputs other than the run-time floats: a tensor lr, then the state (``place``:
        the optimizer's position among the parameter's)."""
        state = optimizer.state[param]
        shard = param_update.shard
        try:
            inputs = [state[key] for key in step.state_keys]
        except KeyError:  # a fresh optimizer or model instance
            initialize_state(optimizer, param, None if shard is None else shard.shard_numel)
            inputs = [state[key] for key in step.state_keys]
        if shard is not None:
            _check_sharded_state(optimizer, state, param_update.name, shard)
        if step.lr_is_tensor:
            inputs.insert(0, self._tensor_lr(optimizer, param_group(optimizer, param, param_update.name), param))
        if not step.created:
            return inputs
        if all(c.key in state for c in step.created):
            # The graph writes True into the flag, which leaves a True one as it is, so one
            # per parameter serves all its calls: made again each call, it cost an allocation
            # (and on a GPU a fill kernel) per parameter and step. Not one per input position:
            # the backward saves the flag, so another model's backward (this graph serves every
            # module of the same structure) writing it in between would fail autograd's check.
            return [*inputs, *(state[c.key] for c in step.created), self._exists_flag(param, place)]
        buffers = {c.key: torch.empty(c.shape, dtype=c.dtype, device=param.device) for c in step.created}
        updated = torch.zeros((), dtype=torch.bool, device=param.device)  # the graph sets it
        if not for_compile:
            self._installs.append(functools.partial(_install_created_state, optimizer, param, buffers, updated))
        return [*inputs, *buffers.values(), updated]

    def _exists_flag(self, param: torch.Tensor, place: int) -> torch.Tensor:
        """The True flag of ``param``'s optimizer at ``place``, made on first use, forgotten
        with the parameter."""
        flags = self._exists_flags.get(param)
        if flags is None:
            flags = self._exists_flags[param] = {}
        if place not in flags:
            flags[place] = torch.ones((), dtype=torch.bool, device=param.device)
        return flags[place]

    def take_installs(self) -> list[Callable[[], None]]:
        """What the last call must do once its backward ran (see ``_install_created_state``)."""
        installs, self._installs = self._installs, []
        return installs

    def _tensor_lr(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> Any:
        """A user's tensor lr as it is; a float lr of a float64 parameter as an exact float64
        tensor on its device, made again only when the value changed (as ``_float_tensors``)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr
        device = param.device
        per_optimizer = self._tensor_lrs.setdefault(optimizer, {})
        cached = per_optimizer.get((id(group), str(device)))
        if cached is None or cached[0] != lr:
            cached = (lr, torch.tensor(lr, dtype=torch.float64, device=device))
            per_optimizer[(id(group), str(device))] = cached
        return cached[1]


def _state_reader(step: OptimizerStep) -> Callable[[dict[str, Any]], Sequence[torch.Tensor]]:
    """Reads ``step``'s state tensors and then its created ones out of the optimizer's
    state for one parameter, in one call (raises ``KeyError`` while one does not exist)."""
    keys = (*step.state_keys, *(c.key for c in step.created))
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    return lambda state: [state[key] for key in keys]


def _check_state_shapes(plan: UpdatePlan, args: Sequence[Any]) -> None:
    """Refuse existing optimizer state of another shape than the update reads, before the
    step is compiled for it: it would broadcast into the update, or fail inside it (in the
    compiled backward, after other parameters were updated). Sharded state has its own
    check (``_check_sharded_state``)."""
    for update in plan.params:
        if update.shard is not None:
            continue
        param = args[update.input_index]
        for place, step in enumerate(update.steps):
            optimizer = param._in_backward_optimizers[place]
            state = optimizer.state.get(param, {})
            expected = [*zip(step.state_keys, step.state_shapes), *((c.key, c.shape) for c in step.created)]
            for key, shape in expected:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                    raise OptimizerStateError(
                        f"{type(optimizer).__name__} state {key!r} of parameter {update.name!r} has shape "
                        f"{tuple(value.shape)}, but its update reads one of shape {shape}. Nothing was updated. "
                        "Load the optimizer state_dict() saved for this model, or drop this parameter's state "
                        "(optimizer.state.pop(param)) to start it afresh."
                    )


class OptimizerStateError(RuntimeError):
    """Optimizer state of another shape than its parameter's update reads (a state_dict
    saved for another model, or state set by hand)."""


class ShardedStateError(OptimizerStateError):
    """Optimizer state that does not have this rank's shard shape, with ``shard_optimizer_state=True``."""


def _check_sharded_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], name: str, shard: GradientShard
) -> None:
    """Refuse state of another shape (say, a full-parameter state_dict loaded into a sharded run)
    before the graph runs: it would broadcast, or fail inside the compiled backward."""
    expected = (shard.shard_numel,)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != expected:
            raise ShardedStateError(
                f"{type(optimizer).__name__} state {key!r} of parameter {name!r} has shape {tuple(value.shape)}, "
                f"but with shard_optimizer_state=True each rank keeps only its shard: a flat tensor of "
                f"{shard.shard_numel} elements (rank {shard.group.rank} of {shard.group.world_size}). Load into each "
                "rank the optimizer state_dict() that rank saved, or train without shard_optimizer_state."
            )


def _install_created_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, buffers: dict[str, torch.Tensor], updated: torch.Tensor
) -> None:
    """After a compiled backward: put the state its update created on the first step
    (SGD's ``momentum_buffer``) into ``optimizer.state``, if the update ran (``updated``)."""
    if updated.item():
        state = optimizer.state[param]
        for key, buffer in buffers.items():
            state.setdefault(key, buffer)


backend = make_backend(compiler="inductor")
"""The default ``fx_optim`` backend (Inductor)."""
