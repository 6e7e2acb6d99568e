"""The pure graph rewrites, on small hand-made graphs."""

import pytest
import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx

import fx_optim_pass as fop
from fx_optim_pass import _torch_compat
from fx_optim_pass.passes.explicit_alpha import make_alpha_explicit
from fx_optim_pass.passes.hoist_step_scalars import hoist_step_scalars
from fx_optim_pass.passes.insert_updates import PASS_META_KEY


def test_make_alpha_explicit_folds_alpha_into_a_mul():
    def f(grad, param):
        return torch.ops.aten.add.Tensor(grad, param, alpha=0.5), torch.ops.aten.add.Tensor(grad, param)

    gm = fx.symbolic_trace(f)
    assert make_alpha_explicit(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.add.Tensor]
    assert all("alpha" not in n.kwargs for n in gm.graph.nodes)
    grad, param = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(gm(grad, param)[0], grad + 0.5 * param)


def _update_graph(fn, *example):
    """``fn`` traced to aten ops, its computed nodes but the first (the gradient) tagged as the
    pass tags the nodes it inserts."""
    gm = make_fx(fn)(*example)
    for node in [n for n in gm.graph.nodes if n.op == "call_function"][1:]:
        node.meta[PASS_META_KEY] = ("w", "update", "w")
    return gm


def _positions(gm: fx.GraphModule) -> dict[str, int]:
    """{node name: position}, the gradient (the only untagged computed node) as ``grad``."""
    position = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    (grad,) = [n for n in gm.graph.nodes if n.op == "call_function" and PASS_META_KEY not in n.meta]
    return {**position, "grad": position[grad.name]}


def test_step_scalars_move_before_the_gradient_and_compute_the_same():
    def adam_like(x, w, step, beta):
        grad = torch.ops.aten.mul.Tensor(x, 2.0)  # the gradient
        new_step = torch.ops.aten.add.Tensor(step, 1)
        correction = torch.ops.aten.sub.Tensor(1, torch.ops.aten.pow.Tensor_Tensor(beta, new_step))
        w.copy_(w - grad / correction)
        step.copy_(new_step)
        return w

    example = (torch.randn(5), torch.randn(5), torch.tensor(3.0), torch.tensor(0.9))
    gm = _update_graph(adam_like, *example)
    scalars = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.meta["val"].dim() == 0]
    assert hoist_step_scalars(gm.graph) == len(scalars) == 4  # add, pow, sub, and the step's copy_
    gm.graph.lint()
    gm.recompile()
    position = _positions(gm)
    first_computed = min(position[n.name] for n in gm.graph.nodes if n.op == "call_function")
    assert sorted(position[name] for name in scalars) == list(range(first_computed, first_computed + 4))
    assert all(position[name] < position["grad"] for name in scalars)

    reference = _update_graph(adam_like, *example)
    args, expected_args = [t.clone() for t in example], [t.clone() for t in example]
    torch.testing.assert_close(gm(*args), reference(*expected_args))
    torch.testing.assert_close(args, expected_args)  # the same writes into w and step


def test_a_state_write_stays_while_a_node_left_behind_reads_the_state():
    # A select over the whole buffer reads the flag itself, before the update writes True
    # into it (how SGD's first-step select read it up to 4c47cae).
    def sgd_like(x, buf, exists):
        grad = torch.ops.aten.mul.Tensor(x, 2.0)
        buf.copy_(torch.where(exists, buf * 0.9 + grad, grad))
        exists.copy_(torch.ops.aten.full.default([], True, dtype=torch.bool))
        return buf

    gm = _update_graph(sgd_like, torch.randn(4), torch.randn(4), torch.tensor(False))
    assert hoist_step_scalars(gm.graph) == 1  # the constant True only
    gm.graph.lint()
    position = _positions(gm)
    (select,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.where.self]
    writes = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
    (flag_write,) = [n for n in writes if n.meta["val"].dim() == 0]
    assert position[select.name] < position[flag_write.name]


def test_a_flag_read_through_a_value_of_its_own_moves_with_its_write():
    # SGD's first-step select as the lowering writes it: the select reads "first step", a
    # 0-d value computed from the flag, so the flag's read and its write both move.
    def sgd_like(x, buf, exists):
        grad = torch.ops.aten.mul.Tensor(x, 2.0)
        first = torch.ops.aten.logical_not.default(exists)
        buf.copy_(torch.where(first, grad, buf * 0.9 + grad))
        exists.copy_(torch.ops.aten.full.default([], True, dtype=torch.bool))
        return buf

    for exists in (False, True):
        example = (torch.randn(4), torch.randn(4), torch.tensor(exists))
        gm = _update_graph(sgd_like, *example)
        assert hoist_step_scalars(gm.graph) == 3  # logical_not, the constant True, the write
        gm.graph.lint()
        gm.recompile()
        position = _positions(gm)
        (select,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.where.self]
        writes = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
        (flag_write,) = [n for n in writes if n.meta["val"].dim() == 0]
        assert position[flag_write.name] < position["grad"] < position[select.name]

        reference = _update_graph(sgd_like, *example)
        args, expected_args = [t.clone() for t in example], [t.clone() for t in example]
        torch.testing.assert_close(gm(*args), reference(*expected_args))
        torch.testing.assert_close(args, expected_args)


def test_scalars_of_the_gradient_or_of_a_tensor_stay_in_place():
    def clipped(x, w):
        grad = torch.ops.aten.mul.Tensor(x, 2.0)
        norm = torch.ops.aten.linalg_vector_norm.default(grad)  # 0-d, but of the gradient
        size = torch.ops.aten.linalg_vector_norm.default(w)  # 0-d, but a reduction over w
        w.copy_(w - grad / (norm + size))
        return w

    gm = _update_graph(clipped, torch.randn(3), torch.randn(3))
    before = [n.name for n in gm.graph.nodes]
    assert hoist_step_scalars(gm.graph) == 0
    assert [n.name for n in gm.graph.nodes] == before


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="Inductor's CPU kernels are serial on one thread")
@pytest.mark.parametrize(
    ("optimizer_class", "kwargs"),
    [(torch.optim.AdamW, {"lr": 1e-3}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})],
    ids=["AdamW", "SGD"],
)
def test_backward_kernels_hold_no_barrier_per_parameter(optimizer_class, kwargs):
    # An omp single inside a parallel kernel is a barrier: about 15 us with
    # OMP_WAIT_POLICY=PASSIVE (the benchmarks'). Left after the gradient, each parameter's step
    # scalars (AdamW) or its momentum buffer's "exists" flag (SGD) made one in a kernel that a
    # LayerNorm's reductions had opened (12 and 8 here).
    torch.manual_seed(0)
    layers = [[torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.ReLU()] for _ in range(3)]
    model = torch.nn.Sequential(*[layer for block in layers for layer in block])
    fop.apply_optimizer_in_backward(optimizer_class, model.parameters(), kwargs)
    compiled = torch.compile(model, backend=fop.backend, fullgraph=True)
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        _, backward = _torch_compat.run_and_get_code(lambda: compiled(torch.randn(64, 256)).sum().backward())
    assert "#pragma omp parallel" in backward  # kernels run threaded, so the check below can fail
    assert "#pragma omp single" not in backward
