"""Every private PyTorch API the package touches, in one place.

AOTAutograd and Inductor internals move between releases; the rest of the package
imports them only from here, so a torch upgrade touches this file alone.
Checked against torch 2.11 and 2.13.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput, TangentAOTInput
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = [
    "CODEGEN_FIXES",
    "MUST_BE_IN_BACKWARD",
    "MUST_BE_IN_FORWARD",
    "CustomGraphPass",
    "accumulates_into_leaves",
    "all_reduce_ops",
    "barrier_before_inplace_stores_in_reductions",
    "compile_aot_eager",
    "compile_inductor",
    "copy_dynamo_graph",
    "emit_trace_artifact",
    "fake_copies",
    "grad_output_positions",
    "hooked_by_torch",
    "input_index",
    "is_tangent",
    "is_view_op",
    "list_hook_for_torch",
    "may_recompute_in_backward",
    "needs_barrier_before_store",
    "normalize_gm",
    "optimizer_step_as_if_compiling",
    "parameter_source_name",
    "process_group_name",
    "process_group_store",
    "process_group_timeout",
    "qualified_name_from_source",
    "real_scalar_value",
    "refuse_compiled_autograd",
    "resolve_group_name",
    "retains_graph",
    "run_and_get_code",
    "run_on_fake",
    "set_versions",
    "shard_collective_ops",
    "structured_trace_enabled",
    "sync_module_states",
    "tensor_layout_check",
    "trace_functional",
    "translate_backward_errors",
    "unlist_hook_for_torch",
    "will_accumulate_in_this_backward",
    "will_run_in_this_backward",
]

# The min-cut partitioner keeps nodes with this tag in the backward graph; without
# it the write-backs are dropped as dead (parameters never change) or rejected.
MUST_BE_IN_BACKWARD = "must_be_in_backward"
# And this one in the forward graph, whose outputs the backward then receives.
MUST_BE_IN_FORWARD = "must_be_in_forward"


def input_index(node: fx.Node) -> int | None:
    """Index into the compiled function's inputs of a joint-graph placeholder."""
    desc = node.meta.get("desc")
    return desc.idx if isinstance(desc, PlainAOTInput) else None


def is_tangent(node: fx.Node) -> bool:
    """Whether a joint-graph placeholder is a tangent (the incoming gradient of an output)."""
    return isinstance(node.meta.get("desc"), TangentAOTInput)


def may_recompute_in_backward(node: fx.Node) -> bool:
    """Whether the min-cut partitioner may recompute forward node ``node`` in the backward
    instead of saving it: anything but its compute-intensive ops (matmuls, convolutions,
    attention), and those too under an activation memory budget below 1."""
    from torch._functorch import config as functorch_config

    if functorch_config.activation_memory_budget < 1:
        return True
    return not _partitioner_op_types().is_compute_intensive(node)


@functools.cache
def _partitioner_op_types() -> Any:
    from torch._functorch.partitioners import get_default_op_list

    return get_default_op_list()


def grad_output_positions(output_node: fx.Node) -> dict[int, int]:
    """Map input index -> position of its gradient in the joint graph's output."""
    descs = output_node.meta.get("desc") or []
    positions = {}
    for position, desc in enumerate(descs):
        if isinstance(desc, GradAOTOutput) and isinstance(desc.grad_of, PlainAOTInput):
            positions[desc.grad_of.idx] = position
    return positions


def parameter_source_name(placeholder: fx.Node) -> str | None:
    """Dynamo's source expression of a graph input, e.g. ``L['self']._modules['0']._parameters['w']``."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else name  # a method before torch 2.12, a property since


_MODULE_PATH_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)")


def qualified_name_from_source(source_name: str) -> str:
    """``L['self']._modules['0']._parameters['weight']`` -> ``0.weight``."""
    parts = [a or b for a, b in _MODULE_PATH_PART.findall(source_name)]
    return ".".join(parts)


def copy_dynamo_graph(gm: fx.GraphModule, extra_inputs: Sequence[str]) -> fx.GraphModule:
    """A copy of Dynamo's graph with placeholders ``extra_inputs`` appended.

    Dynamo reads its own graph's placeholders after the backend returns, so it is
    never mutated. AOTAutograd recognizes a Dynamo graph by ``meta`` and
    ``_param_name_to_source`` and wants ``_dynamo_source`` on every placeholder;
    ``None`` marks an input with no user-visible source.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    last_placeholder = None
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if node.op == "placeholder":
            env[node]._dynamo_source = getattr(node, "_dynamo_source", None)  # type: ignore[attr-defined]
            last_placeholder = env[node]
    for name in extra_inputs:
        if last_placeholder is None:
            last_placeholder = graph.placeholder(name)
        else:
            with graph.inserting_after(last_placeholder):
                last_placeholder = graph.placeholder(name)
        last_placeholder._dynamo_source = None  # type: ignore[attr-defined]
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source  # type: ignore[assignment]
    return copy


@contextlib.contextmanager
def optimizer_step_as_if_compiling(optimizer_class: type) -> Iterator[None]:
    """Let torch.optim take the paths it takes under torch.compile.

    With the flag set, optimizers keep ``step`` and tensor hyperparameters as
    tensors instead of calling ``.item()``, and skip eager-only device checks.
    Where an update compares numbers read at run time with Python's ``min``/``max``
    (Adafactor), the files defining ``optimizer_class`` see forms that compute the
    same value without a Python comparison, so it happens at run time.
    """
    import torch.compiler as compiler

    # torch renames __module__ to "torch.optim": take the globals of the files themselves.
    namespaces = {
        id(f.__globals__): f.__globals__
        for c in optimizer_class.__mro__
        if (f := vars(c).get("__init__")) is not None and hasattr(f, "__globals__")
    }
    old = compiler._is_compiling_flag
    compiler._is_compiling_flag = True
    try:
        with contextlib.ExitStack() as stack:
            for namespace in namespaces.values():
                for name, choose in (("min", _traced_min), ("max", _traced_max)):
                    if name not in namespace:
                        stack.enter_context(_global(namespace, name, choose))
            stack.enter_context(_InPlaceAsFunctional())
            yield
    finally:
        compiler._is_compiling_flag = old


_NUMBER_BASE_POW_BREAKS_INDUCTOR = torch.torch_version.TorchVersion(torch.__version__) < "2.13"

# Adafactor's traced update (run-time min/max, a run-time lerp weight) matches eager
# under Inductor on torch 2.13; on 2.11 it was 0.42 relative off after 5 steps.
TRACES_ADAFACTOR = not _NUMBER_BASE_POW_BREAKS_INDUCTOR


class _InPlaceAsFunctional(torch.overrides.TorchFunctionMode):
    """Two rewrites that keep an update traceable, each computing the same values:
    ``x.square_()``, which functionalization cannot trace, as ``x.copy_(x.square())``;
    and ``lerp`` with a weight read at run time as a number, as ``lerp`` with a 0-d
    tensor weight (its formula is then chosen at run time, as torch's kernel does)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _NUMBER_BASE_POW_BREAKS_INDUCTOR and func in (torch.Tensor.__rpow__, torch.pow) and len(args) == 2:
            # Before torch 2.13, Inductor's no-op removal asks every pow's base for its
            # size, and a run-time number base (beta ** step) has none: make it a tensor.
            exponent, base = args if func is torch.Tensor.__rpow__ else args[::-1]
            if isinstance(base, torch.SymFloat) and isinstance(exponent, torch.Tensor):
                base = torch.full((), base, dtype=exponent.dtype, device=exponent.device)  # type: ignore[call-overload]
                return torch.pow(base, exponent)
        if func is torch.Tensor.square_:
            (tensor,) = args
            return tensor.copy_(tensor.square())
        if func in (torch.Tensor.lerp_, torch.Tensor.lerp, torch.lerp) and len(args) == 3:
            start, end, weight = args
            if isinstance(weight, torch.SymFloat) and not _formula_known(weight):
                weight = torch.full((), weight, dtype=start.dtype, device=start.device)  # type: ignore[call-overload]
                return func(start, end, weight, **kwargs)
        return func(*args, **kwargs)


def _formula_known(weight: torch.SymFloat) -> bool:
    """Whether torch's lerp formula for ``weight`` (|weight| >= 0.5 or not) is decided at
    trace time (a hyperparameter between landmarks), so the graph keeps one formula."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(weight >= 0.5) or statically_known_true(weight <= -0.5):
        return True
    return statically_known_true(weight < 0.5) and statically_known_true(weight > -0.5)


@contextlib.contextmanager
def _global(namespace: dict[str, Any], name: str, value: Any) -> Iterator[None]:
    namespace[name] = value
    try:
        yield
    finally:
        del namespace[name]


def _traced_choice(builtin: Callable[..., Any], symbolic: Callable[[Any, Any], Any], bound: str) -> Callable[..., Any]:
    """``builtin`` (min or max) that, for two operands of which one is a symbol or a 0-d
    tensor, computes the same value without a Python comparison."""

    def choose(*args: Any, **kwargs: Any) -> Any:
        if len(args) != 2 or kwargs:
            return builtin(*args, **kwargs)
        a, b = args
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            tensor, other = (a, b) if isinstance(a, torch.Tensor) else (b, a)
            return tensor.clamp(**{bound: other})
        if isinstance(a, (torch.SymFloat, torch.SymInt)) or isinstance(b, (torch.SymFloat, torch.SymInt)):
            return symbolic(a, b)
        return builtin(a, b)

    return choose


_traced_min = _traced_choice(min, torch.sym_min, "max")
_traced_max = _traced_choice(max, torch.sym_max, "min")


def trace_functional(fn: Callable[..., Any], example_args: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``fn`` to a functional aten graph (mutations of inputs become a ``copy_`` epilogue).

    ``example_args`` are fake tensors of the joint graph's fake mode, so the traced
    nodes carry ``meta["val"]`` from that same mode. Inductor's decomposition table
    is required: without it Inductor sees both a fallback and a decomposition for
    ops such as ``aten.lerp``.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.func import functionalize

    fake_mode = next((a.fake_mode for a in example_args if isinstance(a, FakeTensor)), None)
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
            # Dynamo allows .item() to become a symbol only with fullgraph=True; the
            # update's own run-time reads (hyperparameters) need it in every graph.
            stack.enter_context(_allow_scalar_outputs(fake_mode))
        traced = make_fx(
            functionalize(fn, remove="mutations_and_views"),
            decomposition_table=select_decomp_table(),
            tracing_mode="real" if fake_mode is not None else "fake",
        )(*example_args)
    if fake_mode is not None and fake_mode.shape_env is not None:
        _forget_float_runtime_asserts(traced, fake_mode.shape_env)
    return traced


def _forget_float_runtime_asserts(traced: fx.GraphModule, shape_env: Any) -> None:
    """Drop the runtime asserts that tracing recorded on the floats ``traced`` reads (``.item()``)
    or takes as inputs.

    They come from the landmark checks on each run-time hyperparameter (``0.5 < lr`` and
    the like, five per float), which tell the tracer which side of each landmark torch's
    code is on. Left in the joint graph's shape environment, Inductor emitted every one of
    them into the compiled backward, checked in Python at every step (25 per AdamW
    parameter; a failed one would raise mid-backward, after earlier updates), and copied
    all of them for each node it lowered (``get_axioms``, a cost that grows with the square
    of the parameter count). The runtime already chooses, before every call, the variant
    compiled for the side each float lies on; the value ranges these checks refined stay in
    the environment.
    """
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    reads = traced.graph.find_nodes(op="call_function", target=torch.ops.aten._local_scalar_dense.default)
    for node in [*reads, *traced.graph.find_nodes(op="placeholder")]:  # read here, or before and passed in
        value = node.meta.get("val")
        symbol = value.node.expr if isinstance(value, torch.SymFloat) else None
        if isinstance(symbol, sympy.Symbol) and symbol_is_type(symbol, SymT.UNBACKED_FLOAT):
            shape_env.deferred_runtime_asserts.pop(symbol, None)


@contextlib.contextmanager
def _allow_scalar_outputs(fake_mode: Any) -> Iterator[None]:
    old = fake_mode.allow_scalar_outputs
    fake_mode.allow_scalar_outputs = True
    try:
        yield
    finally:
        fake_mode.allow_scalar_outputs = old


def is_view_op(node: fx.Node) -> bool:
    """Whether ``node``'s output aliases its first input (a view in aten terms)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return node.target is torch.ops.aten.alias.default
    alias_info = schema.returns[0].alias_info
    return alias_info is not None and not alias_info.is_write


def normalize_gm(text: str) -> str:
    """PyTorch's own normalization of printed graphs for goldens (drops comments and blank runs)."""
    from torch._dynamo.testing import normalize_gm as _normalize_gm

    return _normalize_gm(text)


def structured_trace_enabled() -> bool:
    """Whether ``TORCH_TRACE`` (tlparse's structured trace) is being written."""
    from torch._logging._internal import trace_log

    return bool(trace_log.handlers)


def emit_trace_artifact(name: str, payload_fn: Callable[[], str]) -> None:
    """A string artifact in the structured trace, shown by tlparse next to torch's own."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload_fn)


def run_and_get_code(fn: Callable[[], Any]) -> list[str]:
    """Inductor's generated Python/C++/Triton source for every graph ``fn`` compiles."""
    from torch._inductor.utils import run_and_get_code as _run_and_get_code

    return list(_run_and_get_code(fn)[1])


# ---------------------------------------------------------------- compilation


JointPass = Callable[[fx.Graph], None]
BackwardPass = Callable[[fx.Graph], object]
GraphsObserver = Callable[[str, fx.GraphModule], None]


def _boxed_nop(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    from torch._dynamo.backends.debugging import boxed_nop

    return boxed_nop(gm, list(example_inputs))


def with_scalar_symbols(example_inputs: Sequence[Any]) -> list[Any]:
    """Fake copies (static shapes) of real example inputs, in a fake mode with a shape
    environment, so that run-time ``.item()`` reads trace to symbols.

    Dynamo's inputs already come in such a mode; a graph compiled again at run time,
    outside Dynamo, would otherwise get AOTAutograd's own mode without one.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if detect_fake_mode(example_inputs) is not None:
        return list(example_inputs)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in example_inputs]


def fake_copies(example_inputs: Sequence[Any]) -> list[Any]:
    """``example_inputs`` (from ``with_scalar_symbols``) with every real tensor replaced by a
    fake copy in their fake mode: enough to trace the same graph again, holding no data."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import is_fake

    mode = detect_fake_mode(example_inputs)
    assert mode is not None, "with_scalar_symbols makes the example inputs fake"
    return [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not is_fake(x) else x for x in example_inputs]


def compile_aot_eager(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    joint_pass: JointPass,
    observe: GraphsObserver,
    backward_pass: BackwardPass | None = None,
) -> Callable[..., Any]:
    """AOTAutograd + min-cut partitioner + our joint pass (and ``backward_pass`` on the
    backward graph the partitioner cut), graphs run without Inductor."""

    def partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        joint_pass(joint.graph)
        joint.recompile()
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    def compiler(kind: str) -> Callable[..., Any]:
        def compile_graph(g: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
            if kind == "backward" and backward_pass is not None:
                backward_pass(g.graph)
                g.recompile()
            observe(kind, g)
            return _boxed_nop(g, inputs)

        return compile_graph

    backend = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        partition_fn=partition,
        keep_inference_input_mutations=True,
    )
    return backend(gm, example_inputs)


def compile_inductor(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    joint_pass: CustomGraphPass,
    observe: GraphsObserver,
    backward_pass: BackwardPass | None = None,
    use_caches: bool = True,
    bucket_all_reduces_mb: float | None = None,
    written_inputs: Collection[int] = (),
    overlap_collectives: bool = False,
) -> Callable[..., Any]:
    """Inductor's ``compile_fx`` with our pass chained into ``joint_custom_post_pass``, and
    ``backward_pass`` run on the backward graph the partitioner cut.

    With ``bucket_all_reduces_mb``, Inductor's own post-grad pass merges adjacent
    all-reduces (dependencies respected) into buckets of up to that many MiB (the first
    bucket at most 1 MiB, as DDP does). With ``overlap_collectives``, Inductor's scheduler
    moves each collective's wait later, past independent compute (see ``_comm_overlap``).
    ``written_inputs`` (indices into ``example_inputs``: parameters and optimizer state) are
    written in place by the backward: the forward hands each to the backward as itself, never
    as a copy in another layout (see ``_keep_written_inputs``), so Inductor's layout
    optimization (channels-last convolutions) stays on.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    # Always chained: its cache key also names the codegen fixes applied below, so an
    # artifact cached without them is never reused.
    chained = _ChainedPass(config.joint_custom_post_pass, joint_pass)

    def inner_compile(g: fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
        if kwargs.get("is_backward") and backward_pass is not None:
            backward_pass(g.graph)  # before Inductor's FX-graph cache key is computed from g
            g.recompile()
        observe("backward" if kwargs.get("is_backward") else "forward", g)
        if not kwargs.get("is_backward") and not kwargs.get("is_inference"):
            _keep_written_inputs(g, written_inputs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(barrier_before_inplace_stores_in_reductions())
            stack.enter_context(float_inputs_in_cache_keys())
            stack.enter_context(inplace_decisions_without_set_copies())
            stack.enter_context(cpp_kernels_with_fewer_barriers())
            stack.enter_context(peak_estimate_without_removed_buffers())
            if kwargs.get("is_backward") and hasattr(config, _FUSION_CHECKS):
                stack.enter_context(config.patch({_FUSION_CHECKS: _FUSION_CHECKS_AMONG_UPDATES}))
            fake_mode = torch._guards.detect_fake_mode(inputs)
            if fake_mode is not None:
                # Inductor propagates fake values through the graph again, our updates'
                # .item() reads included: without fullgraph=True, Dynamo's fake mode
                # refuses them (DataDependentOutputException).
                stack.enter_context(_allow_scalar_outputs(fake_mode))
            return compile_fx_inner(g, inputs, **kwargs)

    # compile_fx applies config_patches to the backward too, which AOTAutograd may
    # compile later, outside any `with config.patch(...)` around this call.
    patches: dict[str, Any] = {"joint_custom_post_pass": chained, **_bucketing(bucket_all_reduces_mb)}
    if overlap_collectives:
        patches.update(_comm_overlap())
    if not use_caches:  # a cache hit would skip the passes and graphs being observed
        patches["fx_graph_cache"] = False
    with contextlib.ExitStack() as stack:
        if not use_caches:  # looked up when the forward compiles, inside this block
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        stack.enter_context(partition_inputs_looked_up_in_a_set())
        return compile_fx(  # type: ignore[return-value]
            gm,
            example_inputs,
            inner_compile=inner_compile,
            config_patches=patches,
            decompositions=decompositions_for_inductor(),
        )


# Decompositions Inductor's table applies although Inductor lowers the op itself, with less
# memory. torch 2.13 added a scatter_add decomposition of max-pool backward (pytorch#167318):
# each pooled layer's backward materializes int64 indices twice, a flat copy of the output
# gradient and a zeroed input-sized buffer, then scatters. In the benchmark's convnet
# (batch 32, 32x32 images) that is 5 MiB beside its 4 MiB input gradient, the peak of the
# step; the gather lowering it replaced (torch 2.11, kept in 2.13) writes each input
# gradient in one pass. pytorch#195123 reports the same decomposition's waste.
_LOWERED_RATHER_THAN_DECOMPOSED = (torch.ops.aten.max_pool2d_with_indices_backward,)


class _DecompositionTable(dict[Any, Callable[..., Any]]):
    """Pickled as a call of ``decompositions_for_inductor``: Inductor's cache keys pickle the
    table, and some of its functions cannot be pickled (every cache would be bypassed). The
    name stands for the content: ``CODEGEN_FIXES`` names the change in every cache key."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return decompositions_for_inductor, ()


def decompositions_for_inductor() -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table, less the decompositions of ops in
    ``_LOWERED_RATHER_THAN_DECOMPOSED`` that Inductor also has a lowering for."""
    from torch._inductor.lowering import lowerings

    lowered = {
        overload
        for packet in _LOWERED_RATHER_THAN_DECOMPOSED
        for overload in (getattr(packet, name) for name in packet.overloads())
        if overload in lowerings
    }
    return _DecompositionTable((op, fn) for op, fn in select_decomp_table().items() if op not in lowered)


def pool_backward_reads_only_input_shape(joint: fx.Graph) -> None:
    """Hand each max-pool backward an uninitialized stand-in for the pooled input.

    The op reads only that input's sizes and strides (Inductor's lowering and ATen's CPU and
    CUDA kernels alike), but the partitioner cannot know: the input of an op it cannot fuse
    must be materialized in the backward, so it saves the pooled activation (often a ReLU's
    output it would otherwise recompute from what BatchNorm's backward saves anyway). The
    stand-in depends on the input only through its symbolic sizes and strides, if any
    (integers the partitioner saves), and Inductor drops it as unread.
    """
    aten = torch.ops.aten
    for node in joint.find_nodes(op="call_function", target=aten.max_pool2d_with_indices_backward.default):
        pooled = node.args[1]
        value = pooled.meta.get("val") if isinstance(pooled, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        with joint.inserting_before(node):
            size = [_int_or_node(joint, aten.sym_size.int, pooled, d, n) for d, n in enumerate(value.shape)]
            stride = [_int_or_node(joint, aten.sym_stride.int, pooled, d, n) for d, n in enumerate(value.stride())]
            stand_in = joint.call_function(
                aten.empty_strided.default, (size, stride), {"dtype": value.dtype, "device": value.device}
            )
        stand_in.meta["val"] = value.new_empty_strided(value.shape, value.stride())
        node.replace_input_with(pooled, stand_in)


def _int_or_node(graph: fx.Graph, read: Any, tensor: fx.Node, dim: int, number: Any) -> Any:
    """``number`` (one size or stride of ``tensor``) itself, or a node that reads it if symbolic."""
    if isinstance(number, int):
        return number
    node = graph.call_function(read, (tensor, dim))
    node.meta["val"] = number
    return node


# Inductor looks for fusions among the nodes that read one buffer, checking each against the
# next ``max_fusion_buffer_group_pairwise_attempts`` (64) of them. When the backward read the
# run-time floats itself, every update kernel read that buffer: at 400 parameter tensors,
# 463,000 checks and 155 s of a 410 s compile (``benchmarks/compile_profile.py``). The floats
# now arrive as inputs (``insert_updates._read_floats``), and 8 still compiles faster: the
# scale model's first call at 400 tensors took 119.5 s with 8 and 143.4 s with 64 (at 200,
# 66.5 and 66.9 s). The readers of any one gradient are few, and fusing the updates of
# parameters far apart would keep gradients alive.
_FUSION_CHECKS, _FUSION_CHECKS_AMONG_UPDATES = "max_fusion_buffer_group_pairwise_attempts", 8


def _keep_written_inputs(forward: fx.GraphModule, written_inputs: Collection[int]) -> None:
    """Make the forward hand each input in ``written_inputs`` to the backward as itself.

    With layout optimization, Inductor requires channels-last strides of every 4-d forward
    output on a path into or out of a convolution (``GraphLowering.run_node`` with
    ``find_nodes_prefer_channels_last``, torch/_inductor/graph.py), so a conv weight saved
    for the backward (a graph input returned as is) leaves the forward as a channels-last
    copy: the backward receives that copy in place of the parameter, and the update's
    ``copy_`` writes into it (the parameter never changes). Only the outputs Inductor calls
    user-visible (the model's own) keep their strides exactly; counted among them, these
    saved inputs are returned as themselves, while the conv still reads a channels-last
    copy of its weight made for it alone (``require_channels_last`` in
    torch/_inductor/kernel/conv.py).
    """
    output = forward.graph.output_node()
    values = output.args[0] if isinstance(output.args[0], (list, tuple)) else output.args
    visible = set(output.meta.get("user_visible_output_idxs", ()))  # compile_fx's, set before inner_compile
    for position, value in enumerate(values):
        if isinstance(value, fx.Node) and value.op == "placeholder" and input_index(value) in written_inputs:
            visible.add(position)
    output.meta["user_visible_output_idxs"] = sorted(visible)


def _bucketing(cap_mb: float | None) -> dict[str, Any]:
    """Inductor config for its post-grad bucketing passes of all-reduces, and of the
    reduce-scatters and all-gathers of sharded updates (torch 2.11+; each where it exists)."""
    from torch._inductor import config

    if cap_mb is None:
        return {}
    # A picklable determinator: it is part of Inductor's cache key.
    determinator = functools.partial(_ddp_bucket_cap, cap_mb)
    patches: dict[str, Any] = {}
    for collective in ("all_reduces", "reduce_scatters", "all_gathers"):
        if hasattr(config, f"bucket_{collective}_fx"):
            patches[f"bucket_{collective}_fx"] = "all"
            patches[f"bucket_{collective}_fx_bucket_size_determinator"] = determinator
    return patches


# DDP's first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES): small, so that the
# first collective starts early in the backward and overlaps the rest of it.
_FIRST_BUCKET_MB = 1.0


def _ddp_bucket_cap(cap_mb: float, bucket_index: int) -> float:
    return min(cap_mb, _FIRST_BUCKET_MB) if bucket_index == 0 else cap_mb


def _comm_overlap() -> dict[str, Any]:
    """Inductor config for its scheduler passes that overlap collectives with compute.

    Our joint pass already defers each wait past later gradients' compute, but Inductor's
    scheduler reorders and fuses nodes (an update fused into the next layer's kernel pulls
    the wait back up), and bucketing puts each bucket's wait right after its issue. These
    passes, run on the final scheduler nodes, raise collectives and sink waits without
    raising peak memory: the list config.py recommends. With torch 2.13 they keep parity
    with DDP (``tests/test_data_parallel.py``). On CPU every runtime estimate is 0, so the
    order follows from the graph alone and every rank issues its collectives in the same order.
    """
    from torch._inductor import config

    if not hasattr(config, "reorder_for_compute_comm_overlap_passes"):
        return {}
    passes = [
        "reorder_communication_preserving_peak_memory",
        "sink_waits_iterative",
        "reorder_communication_preserving_peak_memory",
    ]
    return {"reorder_for_compute_comm_overlap": True, "reorder_for_compute_comm_overlap_passes": passes}


class _ChainedPass(CustomGraphPass):
    """Run a user's joint pass (if any) first, then ours, then the max-pool stand-in
    (``pool_backward_reads_only_input_shape``); the cache key covers both passes and the
    fixes (``CODEGEN_FIXES``) that ``compile_inductor`` applies."""

    def __init__(self, first: Any, second: CustomGraphPass) -> None:
        self.first, self.second = first, second

    def __call__(self, graph: fx.Graph) -> None:
        if self.first is not None:
            self.first(graph)
        self.second(graph)
        pool_backward_reads_only_input_shape(graph)

    def uuid(self) -> Any:
        first_uuid = self.first.uuid() if hasattr(self.first, "uuid") else None
        return (first_uuid, self.second.uuid(), CODEGEN_FIXES)


# ---------------------------------------------------------------- Inductor codegen fixes

# Named in the cache key of every graph we compile (see ``_ChainedPass.uuid``).
CODEGEN_FIXES = (
    "inplace-store-barrier-in-reductions",
    "max-pool-backward-lowered",
    "last-omp-for-nowait",
    "independent-update-nowait",
    "peak-estimate-without-removed-buffers",
)


def needs_barrier_before_store(kernel: Any, name: str) -> bool:
    """Whether a Triton kernel's store to buffer ``name`` needs a ``tl.debug_barrier()`` first.

    Inductor fuses a pointwise op that overwrites its input in place (an ``in_out_ptr``, say
    the loss gradient written over a saved activation) into the reduction that consumes it
    (the last Linear's bias gradient, with the update we put there). Inside the reduction
    loop each element is loaded, then stored. When the tile (XBLOCK x R0_BLOCK) is smaller
    than the thread block, Triton holds each element in several warps; one warp can store
    before another loads, and the reduction may sum the copy that was loaded late: an
    element counted as already-transformed (triton-lang/triton#1615). Inductor puts a
    barrier before such stores only when the index is broadcast; torch 2.11 on an H200
    summed one re-read element (gradient of one bias element off by 7/9 of that element's
    term). A barrier before every in-place store inside a reduction makes all warps load
    first. Checked against torch 2.11 and 2.13 (``TritonKernel.store``, ``inside_reduction``,
    ``args.inplace_buffers``).
    """
    return bool(getattr(kernel, "inside_reduction", False)) and name in kernel.args.inplace_buffers


@contextlib.contextmanager
def barrier_before_inplace_stores_in_reductions() -> Iterator[None]:
    """Within: Inductor's Triton kernels put ``tl.debug_barrier()`` before in-place stores
    inside reductions (see ``needs_barrier_before_store``). Process-wide while it lasts, as
    Inductor's own config patches are; restored on exit."""
    try:
        from torch._inductor.codegen.common import DeferredLine
        from torch._inductor.codegen.triton import TritonKernel
    except ImportError:  # pragma: no cover - an Inductor without Triton codegen
        yield
        return

    def with_barrier(original: Callable[..., Any]) -> Callable[..., Any]:
        def store(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            if needs_barrier_before_store(self, name):
                self.stores.writeline(DeferredLine(name, "tl.debug_barrier()"))
            return original(self, name, *args, **kwargs)

        return store

    with _patched_method(TritonKernel, "store", with_barrier):
        yield


def last_loop_of_each_region_nowait(source: str) -> str:
    """``source``, a C++ kernel of Inductor's, with ``nowait`` on the ``#pragma omp for`` or
    ``#pragma omp single`` that is the last statement of its ``#pragma omp parallel`` region.

    Inductor runs a kernel's loop nests in one parallel region, each an ``omp for`` (or, too
    small to share, an ``omp single``), which ends in a barrier; the region's end is one too.
    After the last of them the first barrier waits for what the second waits for anyway, and
    under ``OMP_WAIT_POLICY=PASSIVE`` each costs tens of microseconds on a 2-core machine (the
    threads sleep and are woken). A loop followed by anything else in its region (a
    reduction's merge of per-thread results) keeps its barrier, and so does all of a region
    this does not parse.
    """
    if "/*" in re.sub(r"/\*.*?\*/", "", source):  # a comment over several lines: braces not counted
        return source
    lines = source.split("\n")
    depths = list(itertools.accumulate(_brace_balance(line) for line in lines))  # depth after each line
    for start, line in enumerate(lines):
        if not line.strip().startswith("#pragma omp parallel") or start + 1 >= len(lines):
            continue
        if lines[start + 1].strip() != "{":
            continue
        end = _closing_line(depths, start + 1)
        if end is None or lines[end - 1].strip() != "}":
            continue
        last = _opening_line(depths, end - 1)  # the region's last statement, a block
        if last is None or lines[last].strip() != "{":
            continue
        if lines[last - 1].strip() == "#pragma omp single":  # `#pragma omp single` `{ ... }`
            lines[last - 1] += " nowait"
            continue
        if _lone_omp_for_block(lines, depths, last) and "nowait" not in lines[last + 1]:
            lines[last + 1] += " nowait"
    return "\n".join(lines)


_KERNEL_PARAMETERS = re.compile(r'extern "C"[^(]*\(([^)]*)\)')  # named ``Placeholder.KERNEL_NAME`` here
_POINTER_ALIAS = re.compile(r"^\s*auto (\w+) = (\w+);\s*$")
_THREAD_ID = "int tid = omp_get_thread_num();"
# What Inductor writes in a C++ kernel's body besides its blocks and parallel regions.
_KERNEL_BOOKKEEPING = (
    "std::atomic<int> inductor_cpu_integer_div_error{0};",
    "inductor_cpu_integer_div_error_flag = ",
    "inductor_cpu_throw_if_integer_div_error(",
    "torch::aot_inductor::RAIIAtenRecordFunctionHandle ",
)


class _Loop(NamedTuple):
    """One worksharing statement of a parallel region: its pragma's line, the buffers it
    reads or writes, those it may write, and whether it holds a pragma of its own."""

    pragma: int
    touched: frozenset[str]
    written: frozenset[str]
    nested_pragma: bool


class _Pointers(NamedTuple):
    """A kernel's pointer parameters and the aliases it declares of them: the buffer
    behind each, those not ``const``, and a pattern that finds them in code."""

    buffers: dict[str, str]
    writable: frozenset[str]
    pattern: re.Pattern[str]


def independent_updates_nowait(
    source: str, buffers: dict[str, str], updated: Collection[str], inputs: Collection[str]
) -> str:
    """``source``, a C++ kernel of Inductor's, with ``nowait`` on each loop of a parallel
    region that updates graph inputs in place (``updated``: parameters and their optimizer
    state) when no later loop of that region writes a buffer it touches, or touches a
    buffer it writes. ``buffers``: the buffer behind each pointer parameter
    (``kernel_pointer_buffers``); ``inputs``: every graph input.

    The update of a weight whose gradient a matmul made sits in the next kernel, an
    ``omp for`` among the loops that go on with the backward, each of which ends in a
    barrier: one barrier per updated weight (under ``OMP_WAIT_POLICY=PASSIVE`` tens of
    microseconds each on a 2-core machine). Nothing after an update reads the parameter or
    its state (the pass puts each update after the parameter's last use, views included),
    so the loops after it need not wait for it, unless they write what it reads (its
    gradient's buffer reused in place): compared buffer by buffer, every use of a pointer
    that is not ``const`` counted as a write. Left as it is: a loop that also writes any
    other graph input (a saved activation reused in place may view another's storage), a
    kernel that shares anything between its loops but buffers (``tid`` used, a variable
    declared outside its blocks), a region with any statement besides its loops, and a
    kernel with a pointer whose buffer is not known.
    """
    if "/*" in re.sub(r"/\*.*?\*/", "", source):  # a comment over several lines: braces not counted
        return source
    lines = source.split("\n")
    pointers = _kernel_pointers(source, lines, buffers)
    if pointers is None or sum(line.count("tid") for line in lines) != source.count(_THREAD_ID):
        return source
    depths = list(itertools.accumulate(_brace_balance(line) for line in lines))  # depth after each line
    body = next((i for i, line in enumerate(lines) if line.strip() == "{"), None)
    if body is None or (body_end := _closing_line(depths, body)) is None:
        return source
    # The body's own statements: its blocks, regions and Inductor's bookkeeping, nothing that
    # declares what two loops could share.
    regions = []
    i = body + 1
    while i < body_end:
        statement = lines[i].strip()
        if statement.startswith("#pragma omp parallel") and lines[i + 1].strip() == "{":
            regions.append(i)
            i += 1
        elif statement == "{":
            i = (_closing_line(depths, i) or body_end) + 1
        elif statement and not statement.startswith(_KERNEL_BOOKKEEPING) and not _POINTER_ALIAS.match(statement):
            return source
        else:
            i += 1
    update_only = set(updated)
    other_inputs = set(inputs) - update_only
    for start in regions:
        end = _closing_line(depths, start + 1)
        loops = _region_loops(lines, depths, start + 2, end, pointers) if end is not None else []
        for i, loop in enumerate(loops[:-1]):
            if "nowait" in lines[loop.pragma] or loop.nested_pragma:
                continue
            if not loop.written & update_only or loop.written & other_inputs:
                continue
            if all(not (loop.touched & later.written or loop.written & later.touched) for later in loops[i + 1 :]):
                lines[loop.pragma] += " nowait"
    return "\n".join(lines)


def _kernel_pointers(source: str, lines: Sequence[str], buffers: dict[str, str]) -> _Pointers | None:
    """The pointers of the one kernel in ``source``; None if there is not one kernel, or
    the buffer behind one of its pointers is not known."""
    signatures = _KERNEL_PARAMETERS.findall(source)
    if len(signatures) != 1:
        return None
    known: dict[str, str] = {}
    writable = set()
    for parameter in signatures[0].split(","):
        if "*" not in parameter:
            continue  # a size or a float, passed by value
        name = parameter.split("*")[-1].strip()
        if name not in buffers:
            return None
        known[name] = buffers[name]
        if not parameter.strip().startswith("const"):
            writable.add(name)
    for line in lines:
        if (alias := _POINTER_ALIAS.match(line)) and alias[2] in known:
            known[alias[1]] = known[alias[2]]
            if alias[2] in writable:
                writable.add(alias[1])
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, known)) + r")\b") if known else re.compile(r"(?!)")
    return _Pointers(known, frozenset(writable), pattern)


def _region_loops(
    lines: Sequence[str], depths: Sequence[int], first: int, end: int, pointers: _Pointers
) -> list[_Loop]:
    """The loops of the parallel region whose body runs from line ``first`` to the line
    before ``end``, in order; none if it holds anything else (``independent_updates_nowait``)."""
    loops: list[_Loop] = []
    i = first
    while i < end:
        statement = lines[i].strip()
        if statement in ("", _THREAD_ID):
            i += 1
            continue
        if statement == "{" and lines[i + 1].strip().startswith("#pragma omp for"):
            # Nothing after the loop in its block: every thread would run it as soon as it is done.
            if not _lone_omp_for_block(lines, depths, i):
                return []
            pragma, close = i + 1, _closing_line(depths, i)
        elif statement.startswith("#pragma omp single") and lines[i + 1].strip() == "{":
            pragma, close = i, _closing_line(depths, i + 1)  # `#pragma omp single` `{` ... `}`
        else:
            return []
        if close is None or close >= end:
            return []
        used = {name for line in lines[pragma + 1 : close + 1] for name in pointers.pattern.findall(line)}
        loops.append(
            _Loop(
                pragma,
                frozenset(pointers.buffers[name] for name in used),
                frozenset(pointers.buffers[name] for name in used & pointers.writable),
                any(line.strip().startswith("#pragma omp") for line in lines[pragma + 1 : close + 1]),
            )
        )
        i = close + 1
    return loops


def kernel_pointer_buffers(args: Any) -> dict[str, str]:
    """The buffer behind each pointer argument of a C++ kernel (Inductor's ``KernelArgs``),
    by its name in the graph; the names an in-place buffer has all give its last one."""
    same: dict[str, str] = {}
    for inplaced in args.inplace_buffers.values():
        for name in getattr(inplaced, "other_names", ()):
            same[name] = inplaced.other_names[-1]
    pointers = {
        inplaced.inner_name: inplaced.other_names[-1]
        for inplaced in args.inplace_buffers.values()
        if hasattr(inplaced, "inner_name")
    }
    for outer, inner in [*args.input_buffers.items(), *args.output_buffers.items()]:
        if isinstance(inner, str):  # not a removed argument
            pointers[inner] = same.get(outer, outer)
    return pointers


def _lone_omp_for_block(lines: Sequence[str], depths: Sequence[int], opening: int) -> bool:
    """Whether the block opened on line ``opening`` is one ``omp for`` loop and nothing else:
    `{` `#pragma omp for` `for(...)` `{ loop body }` `}`."""
    close = _closing_line(depths, opening)
    return (
        opening + 3 < len(lines)
        and lines[opening + 1].strip().startswith("#pragma omp for")
        and lines[opening + 2].strip().startswith("for(")
        and lines[opening + 3].strip() == "{"
        and close is not None
        and _closing_line(depths, opening + 3) == close - 1
    )


def _brace_balance(line: str) -> int:
    """Braces opened minus braces closed on ``line``, outside string and character literals
    and comments."""
    code = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|/\*.*?\*/', "", line).split("//")[0]
    return code.count("{") - code.count("}")


def _closing_line(depths: Sequence[int], opening: int) -> int | None:
    """The line that closes the block opened on line ``opening`` (``depths``: the brace
    depth after each line)."""
    outside = depths[opening] - 1
    return next((i for i in range(opening + 1, len(depths)) if depths[i] == outside), None)


def _opening_line(depths: Sequence[int], closing: int) -> int | None:
    """The line that opens the block closed on line ``closing``: the last line before it
    that starts at the depth the block ends at."""
    outside = depths[closing]
    return next((i for i in range(closing - 1, 0, -1) if depths[i - 1] == outside), None)


@contextlib.contextmanager
def cpp_kernels_with_fewer_barriers() -> Iterator[None]:
    """Within: Inductor's C++ kernels take no barrier after the last loop of a parallel
    region (``last_loop_of_each_region_nowait``), nor after an update that the loops after
    it do not depend on (``independent_updates_nowait``). Restored on exit."""
    try:
        from torch._inductor.codegen.cpp import CppScheduling
        from torch._inductor.virtualized import V
    except ImportError:  # pragma: no cover - an Inductor without its C++ backend
        yield
        return

    def with_nowait(original: Callable[..., Any]) -> Callable[..., Any]:
        def define_kernel(self: Any, src_code: str, *args: Any, **kwargs: Any) -> Any:
            kernel_args = args[1] if len(args) > 1 else kwargs.get("kernel_args")
            if kernel_args is None and getattr(self, "kernel_group", None) is not None:
                kernel_args = self.kernel_group.args  # ``flush`` passes none: the group it flushes
            if kernel_args is not None:
                src_code = independent_updates_nowait(
                    src_code,
                    kernel_pointer_buffers(kernel_args),
                    V.graph.mutated_inputs,
                    V.graph.graph_inputs.keys(),
                )
            return original(self, last_loop_of_each_region_nowait(src_code), *args, **kwargs)

        return define_kernel

    with _patched_method(CppScheduling, "define_kernel", with_nowait):
        yield


@contextlib.contextmanager
def peak_estimate_without_removed_buffers() -> Iterator[None]:
    """Within: Inductor's estimate of a graph's peak memory, which decides its buffer reuse,
    counts nothing for a buffer that its code generation removed (``V.graph.removed_buffers``:
    fused away, never allocated).

    Inductor reuses a freed buffer for a later one of the same size only where that does not
    raise its estimate of the graph's peak (``AllocateLine.should_reuse_buffer``, the
    estimate ``EfficientPeakEstimate`` made after code generation). The sizes it sums were
    assigned while scheduling, before any buffer was removed. Each of our updates computes a
    new parameter and new state that its kernel stores straight into the inputs: buffers
    removed, but counted, three times the parameter's size for AdamW. On the 29M GPT's
    backward the estimated peak was 80 MiB, at the embedding's update, against about 36 MiB
    that ever coexist, early in the backward where the activations are; so every reuse
    passed, and each weight-gradient buffer, freed after its update, stayed allocated until
    the same-shaped gradient of the next layer, across the real peak: 39.4 MiB where 36.6
    serve. Restored on exit.
    """
    try:
        from torch._inductor.codegen.wrapper import EfficientPeakEstimate
        from torch._inductor.virtualized import V
    except ImportError:  # pragma: no cover - an Inductor without its peak estimate
        yield
        return

    def without_removed(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            buffers = getattr(V.graph.scheduler, "name_to_buf", {})
            removed = [buffers[name].mpi_buffer for name in V.graph.removed_buffers if name in buffers]
            sizes = [(info.size_alloc, info.size_free) for info in removed]
            for info in removed:
                info.size_alloc = info.size_free = 0
            try:
                original(self, *args, **kwargs)
            finally:  # the scheduler's own record, as it was
                for info, (size_alloc, size_free) in zip(removed, sizes):
                    info.size_alloc, info.size_free = size_alloc, size_free

        return __init__

    with _patched_method(EfficientPeakEstimate, "__init__", without_removed):
        yield


@contextlib.contextmanager
def float_inputs_in_cache_keys() -> Iterator[None]:
    """Within: Inductor's FX-graph cache puts a graph's float inputs in its key by their
    symbol, as it does for int inputs (``FxGraphCachePickler._reduce_symint``).

    Our backward receives the run-time floats the forward read (``insert_updates._read_floats``).
    Inductor 2.13 has no reducer for ``torch.SymFloat`` and bypasses its cache for any graph
    with a float input. A float read by ``.item()`` is unbacked: no guard can name it, and the
    compiled code takes its value as an argument at every call, so its symbol is all the key
    needs, as for an unbacked int. Restored on exit.
    """
    try:
        from torch._inductor.codecache import FxGraphCachePickler
    except ImportError:  # pragma: no cover - an Inductor without an FX graph cache
        yield
        return
    if not hasattr(FxGraphCachePickler, "_reduce_symint"):  # not the pickler we know
        yield
        return

    def with_float_reducer(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            self.dispatch_table.setdefault(torch.SymFloat, self._reduce_symint)

        return __init__

    with _patched_method(FxGraphCachePickler, "__init__", with_float_reducer):
        yield


# Two costs of Inductor and AOTAutograd that grow with the square of the graph, which ours
# make large (a few nodes per parameter tensor). The scale model's first call at 600 tensors,
# fresh caches: 225.1 s without these two, 181.8 s with them; cProfile put 47 s (profiled) in
# the first and 11 s in the second at 600 tensors, 4.6 s and 1.4 s at 200
# (``benchmarks/compile_profile.py``).


class UnionView(AbstractSet[Any]):
    """The union of some sets, read through without copying them: ``a | b`` makes another view."""

    def __init__(self, *parts: AbstractSet[Any]) -> None:
        self.parts = parts

    def __contains__(self, item: object) -> bool:
        return any(item in part for part in self.parts)

    def __iter__(self) -> Iterator[Any]:
        for i, part in enumerate(self.parts):
            yield from (item for item in part if not any(item in earlier for earlier in self.parts[:i]))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __or__(self, other: AbstractSet[Any]) -> UnionView:  # type: ignore[override]
        return UnionView(*self.parts, other)


@contextlib.contextmanager
def inplace_decisions_without_set_copies() -> Iterator[None]:
    """Within: Inductor's scheduler decides in-place buffer reuse without copying sets.

    For each node it generates, ``BaseSchedulerNode.decide_inplace_update`` builds
    ``self.ancestors | V.graph.removed_operations | self.scheduler.completed_operations``,
    only to test a few names against it. Both the node's ancestors and the completed
    operations grow with the graph, so the copies cost the square of its size. While the
    method runs, ``ancestors`` is a ``UnionView``, so the expression is one too: the same
    membership, no copies. Restored on exit.
    """
    try:
        from torch._inductor.scheduler import BaseSchedulerNode
    except ImportError:  # pragma: no cover - a scheduler we do not know
        yield
        return

    def reading_unions_lazily(original: Callable[..., Any]) -> Callable[..., Any]:
        def decide_inplace_update(self: Any) -> Any:
            ancestors = getattr(self, "ancestors", None)
            if not isinstance(ancestors, AbstractSet):
                return original(self)
            self.ancestors = UnionView(ancestors)
            try:
                return original(self)
            finally:
                self.ancestors = ancestors

        return decide_inplace_update

    with _patched_method(BaseSchedulerNode, "decide_inplace_update", reading_unions_lazily):
        yield


class IndexedList(list[Any]):
    """A list whose ``in`` is a set lookup (its items must be hashable and not change)."""

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__(items)
        self._members = set(self)

    def __contains__(self, item: object) -> bool:
        return item in self._members


@contextlib.contextmanager
def partition_inputs_looked_up_in_a_set() -> Iterator[None]:
    """Within: the partitioner's ``_extract_graph_with_inputs_outputs`` gets its ``inputs`` as
    an ``IndexedList``. It asks ``node not in inputs`` of every node tagged to one side of the
    cut (our updates are), a scan of a list of every input: parameters, optimizer state.
    Restored on exit."""
    from torch._functorch import partitioners

    def with_indexed_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
        def _extract_graph_with_inputs_outputs(joint_graph: fx.Graph, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            return original(joint_graph, IndexedList(inputs), *args, **kwargs)

        return _extract_graph_with_inputs_outputs

    with _patched_method(partitioners, "_extract_graph_with_inputs_outputs", with_indexed_inputs):
        yield


@contextlib.contextmanager
def _patched_method(owner: object, name: str, patch: Callable[[Any], Callable[..., Any]]) -> Iterator[None]:
    """Within: ``owner.name`` is ``patch(original)`` (``owner``: a class or a module);
    restored on exit. Left alone where ``owner`` does not define ``name`` itself (not the
    class we know) or an enclosing call patched it already."""
    original = owner.__dict__.get(name)
    if original is None or getattr(original, "_fx_optim_patch", False):
        yield
        return
    patched = patch(original)
    patched._fx_optim_patch = True  # type: ignore[attr-defined]
    setattr(owner, name, patched)
    try:
        yield
    finally:
        setattr(owner, name, original)


# ---------------------------------------------------------------- autograd glue


@functools.cache
def _torch_hook_map() -> Any:
    """PyTorch's own map of parameters whose in-backward optimizers have hooks."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.optim import apply_optimizer_in_backward as torch_impl

    return torch_impl.param_to_optim_hook_handle_map


def hooked_by_torch(param: torch.Tensor) -> bool:
    """Whether ``param``'s in-backward hook is listed in PyTorch's map: PyTorch's
    ``_apply_optimizer_in_backward`` registered it, or ``list_hook_for_torch`` listed ours."""
    hook_map = _torch_hook_map()
    return hook_map is not None and param in hook_map


def list_hook_for_torch(param: torch.Tensor, handle: Any) -> None:
    """List the handle of our in-backward hook on ``param`` where PyTorch lists its own:
    DistributedDataParallel removes the hooks listed there and steps the parameter's
    ``_in_backward_optimizers`` itself, after its gradient's all-reduce."""
    hook_map = _torch_hook_map()
    if hook_map is None:
        return
    if param not in hook_map:
        hook_map[param] = []
    hook_map[param].append(handle)


def unlist_hook_for_torch(param: torch.Tensor, handle: Any) -> None:
    """Undo ``list_hook_for_torch``."""
    hook_map = _torch_hook_map()
    if hook_map is None or param not in hook_map:
        return
    others = [listed for listed in hook_map[param] if listed is not handle]
    if others:
        hook_map[param] = others
    else:
        del hook_map[param]


def retains_graph() -> bool:
    """Inside a backward hook: whether the running backward was called with ``retain_graph=True``."""
    return bool(torch._C._autograd._get_current_graph_task_keep_graph())


def set_versions(tensors: Sequence[torch.Tensor], versions: Sequence[int]) -> None:
    """Set the in-place version counters that autograd checks saved tensors against."""
    torch._C._autograd._unsafe_set_version_counter(tuple(tensors), tuple(versions))


def tensor_layout_check(tensors: Sequence[torch.Tensor]) -> Callable[..., bool]:
    """A check, in C++, that tensors passed later have the dtypes, devices, sizes and strides of
    ``tensors`` (Dynamo's ``TensorGuards``; a few µs for a hundred tensors). It also compares
    dispatch keys and ``requires_grad``, so False is not proof that the layout differs."""
    guards_class = getattr(torch._C._dynamo.guards, "TensorGuards", None)
    if guards_class is None:
        return lambda *_: False
    # Each size and stride to compare, as a number (None would leave that dimension unchecked)
    sizes = [list(t.shape) for t in tensors]
    strides = [list(t.stride()) for t in tensors]
    return guards_class(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides).check


def will_run_in_this_backward(node: Any) -> bool:
    """Inside a backward hook: whether the running backward will execute ``node``."""
    return bool(torch._C._will_engine_execute_node(node))


def accumulates_into_leaves(anchor_node: Any) -> bool:
    """Inside a backward hook of a node with an edge to ``anchor_node`` (a leaf's
    AccumulateGrad node): whether the running backward accumulates into the leaves it
    reaches (``backward()``), not only computes the gradients of given inputs
    (``torch.autograd.grad``, ``backward(inputs=...)``), which runs no AccumulateGrad node
    off the paths to them."""
    try:
        return will_run_in_this_backward(anchor_node)
    except RuntimeError:  # autograd.grad() with this leaf among its inputs: PyTorch does not say
        return False


def will_accumulate_in_this_backward(param: torch.Tensor) -> bool:
    """Inside a backward hook: whether the running backward will run the AccumulateGrad
    node of leaf ``param`` (gradient from an autograd graph that uses it)."""
    # A live AccumulateGrad node holds its tensor. Held by nothing but its Python object,
    # ``param`` has none, so none can run: that reads one count (0.06 µs), where fetching
    # the node costs 1.5 µs per parameter and step.
    use_count = getattr(param, "_use_count", None)  # TensorBase's, untyped; absent: fetch the node
    if use_count is not None and use_count() <= 1:
        return False
    return will_run_in_this_backward(_accumulate_grad_node(param))


def translate_backward_errors(node: Any, translate: Callable[[Exception], Exception | None]) -> None:
    """Make the ``torch.autograd.Function`` behind backward node ``node`` (AOTAutograd's
    ``CompiledFunction``, one class per compiled graph) raise ``translate(error)``, chained
    to ``error``, where its backward raises ``error``; ``None`` re-raises ``error``.

    The autograd engine looks ``backward`` up on the Function class at every call, so this
    covers every later backward of that graph, however it was compiled or cached. Done once
    per class.
    """
    function_class = getattr(type(node), "_forward_cls", None)
    if function_class is None or "_fx_optim_pass_translate" in function_class.__dict__:
        return
    backward = function_class.backward

    def translated_backward(ctx: Any, *grad_outputs: Any) -> Any:
        try:
            return backward(ctx, *grad_outputs)
        except Exception as error:
            replacement = translate(error)
            if replacement is None:
                raise
            raise replacement from error

    function_class._fx_optim_pass_translate = translate
    function_class.backward = staticmethod(translated_backward)


def refuse_compiled_autograd(node: Any, error: Callable[[], Exception]) -> None:
    """Make compiled autograd (``torch._dynamo.compiled_autograd``) raise ``error()`` when a
    backward reaches ``node``, a backward node of AOTAutograd's ``CompiledFunction``.

    Compiled autograd asks each ``autograd.Function`` node for its ``_compiled_autograd_key``
    while it collects the graph, before any node runs; nothing else asks. AOTAutograd's key
    holds the symbols the forward saved for the backward, and ours hold floats (the run-time
    hyperparameters), where PyTorch's engine wants integers: without this, a bare
    ``TypeError: an integer is required``. Done once per class, as ``translate_backward_errors``.
    """
    function_class = getattr(type(node), "_forward_cls", None)
    if (
        function_class is None
        or not hasattr(function_class, "_compiled_autograd_key")
        or "_fx_optim_pass_refuses_compiled_autograd" in function_class.__dict__
    ):
        return

    def refuse(ctx: Any) -> Any:
        raise error()

    function_class._fx_optim_pass_refuses_compiled_autograd = True
    function_class._compiled_autograd_key = staticmethod(refuse)


def _accumulate_grad_node(param: torch.Tensor) -> Any:
    """The AccumulateGrad autograd node of leaf ``param``, which requires grad: the one the
    graphs that use it link to, or a new one (autograd holds it only weakly)."""
    with torch.enable_grad():
        return param.view_as(param).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


# ---------------------------------------------------------------- torch.distributed


def all_reduce_ops() -> tuple[Any, Any]:
    """PyTorch's functional collectives ``(all_reduce, wait_tensor)`` as aten-style overloads.

    ``all_reduce(t, reduce_op, group_name)`` returns a new tensor whose value is ready after
    ``wait_tensor``; AOTAutograd, the partitioner and Inductor (which lowers them to its
    own in-place collective kernels) all understand them. Gloo supports ``"avg"``.
    """
    import torch.distributed._functional_collectives  # registers the ops and their fake impls

    ops = torch.ops._c10d_functional
    return ops.all_reduce.default, ops.wait_tensor.default


def shard_collective_ops() -> tuple[Any, Any, Any]:
    """PyTorch's functional collectives ``(reduce_scatter_tensor, all_gather_into_tensor, wait_tensor)``.

    ``reduce_scatter_tensor(t, reduce_op, group_size, group_name)`` returns this rank's
    ``1/group_size`` of the reduced ``t`` (split along dim 0);
    ``all_gather_into_tensor(t, group_size, group_name)`` concatenates every rank's ``t``
    along dim 0. Both are ready after ``wait_tensor``; Inductor lowers both.
    """
    import torch.distributed._functional_collectives  # registers the ops and their fake impls

    ops = torch.ops._c10d_functional
    return ops.reduce_scatter_tensor.default, ops.all_gather_into_tensor.default, ops.wait_tensor.default


def process_group_name(group: Any) -> str:
    """The name under which functional collectives find ``group`` (a ``ProcessGroup``)."""
    from torch.distributed._functional_collectives import _resolve_group_name

    return str(_resolve_group_name(group))


def resolve_group_name(group_name: str) -> Any:
    """The ``ProcessGroup`` that functional collectives know as ``group_name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)  # type: ignore[arg-type]  # GroupName is a str NewType


def process_group_timeout(group: Any) -> Any:
    """The timeout (a ``timedelta``) of ``group``'s backend, or ``None`` where torch does not say."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def process_group_store(group: Any) -> Any:
    """The key-value store (a ``torch.distributed.Store``) through which ``group``'s ranks met,
    or ``None`` where torch does not say; keys set in it are seen by every rank of ``group``."""
    from torch.distributed.distributed_c10d import _world

    entry = _world.pg_map.get(group)
    return None if entry is None else entry[1]


def run_on_fake(fn: Callable[..., Any], *fake_args: Any) -> Any:
    """``fn(*fake_args)`` under the fake mode the arguments belong to (to get a node's ``meta["val"]``)."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(fake_args)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        return fn(*fake_args)


def real_scalar_value(tensor: torch.Tensor) -> bool | int | float:
    """The number a real 0-d tensor holds, read also where a fake mode is active (inside
    AOTAutograd's passes, where reading a real tensor would be refused)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return tensor.item()


# DistributedDataParallel's own bucket size for its setup broadcast.
_BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024


def sync_module_states(module: torch.nn.Module, group: Any) -> None:
    """DDP's setup step: broadcast parameters and buffers from the group's rank 0, coalesced."""
    from torch.distributed.utils import _sync_module_states

    _sync_module_states(module, group, _BROADCAST_BUCKET_BYTES, 0, (), broadcast_buffers=True)
