"""What a compiled step does and does not do, beyond parity."""

import gc
import weakref
from copy import deepcopy

import pytest
import torch
from torch import nn
from torch._functorch import config as functorch_config
from torch.distributed.optim import _apply_optimizer_in_backward

import fx_optim_pass as fop
from tests.helpers import assert_params_close, in_mode, snapshot

COMPILED = ["aot_eager", "inductor"]


def mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)


@pytest.mark.parametrize("mode", COMPILED)
def test_forward_under_no_grad_updates_nothing(mode, device):
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    before = snapshot(model.parameters())
    compiled = in_mode(model, mode)
    with torch.no_grad():
        compiled(torch.randn(4, 6, device=device))
    assert_params_close(model.parameters(), before)
    assert all(not opt.state for opt in fop.get_in_backward_optimizers(model))


@pytest.mark.parametrize("mode", COMPILED)
def test_forward_under_inference_mode_updates_nothing(mode, device):
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    before = snapshot(model.parameters())
    with torch.inference_mode():
        in_mode(model, mode)(torch.randn(4, 6, device=device))
    assert_params_close(model.parameters(), before)


WHOLE_STEP_BACKENDS = {
    "fx_optim-aot_eager": lambda: fop.make_backend(compiler="aot_eager"),
    "fx_optim-inductor": lambda: fop.make_backend(compiler="inductor"),
    "another-backend": lambda: "aot_eager",  # no pass: each parameter steps in our eager hook
}


@pytest.mark.parametrize("backend", WHOLE_STEP_BACKENDS.values(), ids=WHOLE_STEP_BACKENDS.keys())
def test_a_training_step_compiled_whole_with_backward_inside_matches_eager(backend, device):
    """``@torch.compile def train_step(x): model(x).sum().backward()``: Dynamo breaks the graph
    at ``backward()`` and still runs the backward with its frame callback set. It compiled
    what our hooks run: with fx_optim, the checks of our backward node, and failed inside
    them (AttributeError from Dynamo, on the first step); with another backend,
    ``optimizer.step()`` in our post-accumulate-grad hook, as graphs of their own (4 more
    for this MLP). Both now run as they do uncompiled. A graph break is what this test is
    about, so no fullgraph."""
    model = mlp(device)
    reference = deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})

    @torch.compile(backend=backend())
    def train_step(x):
        model(x).pow(2).mean().backward()

    for _ in range(3):
        x = torch.randn(4, 6, device=device)
        train_step(x)
        reference(x).pow(2).mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
        assert all(p.grad is None for p in model.parameters())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the forward's


@pytest.mark.parametrize("mode", COMPILED)
def test_compiled_autograd_is_refused_before_any_update(mode, device):
    """Compiled autograd cannot take our compiled backward (it holds run-time floats where
    PyTorch's engine wants integers); it failed with a bare TypeError."""
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    compiled = in_mode(model, mode)
    compiled(torch.randn(4, 6, device=device)).sum().backward()
    before = snapshot(model.parameters())
    loss = compiled(torch.randn(4, 6, device=device)).sum()
    with pytest.raises(fop.CompiledAutogradError, match=r"updates 4 parameter\(s\) \(0\.weight.*Nothing was updated"):
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss.backward()
    assert_params_close(model.parameters(), before)


@pytest.mark.parametrize("mode", COMPILED)
def test_create_graph_gets_our_error_before_any_parameter_changes(mode, device):
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    compiled = in_mode(model, mode)
    compiled(torch.randn(4, 6, device=device)).sum().backward()
    before = snapshot(model.parameters())
    with pytest.raises(fop.DoubleBackwardError, match=r"create_graph=True.*0\.weight"):
        compiled(torch.randn(4, 6, device=device)).sum().backward(create_graph=True)
    assert_params_close(model.parameters(), before)


@pytest.mark.parametrize("setup", ["apply_optimizer_in_backward", "attach"])
@pytest.mark.parametrize("mode", ["eager", *COMPILED])
def test_a_dropped_model_and_its_optimizer_state_are_freed(mode, setup, device):
    """A notebook cell run again, a sweep of trials: the new model must not find the last
    one still alive with its optimizer state (on a GPU, out of memory by the second trial).
    An AccumulateGrad node holds its parameter, so none may be kept for the hooks."""
    model = mlp(device)
    if setup == "attach":
        fop.attach(torch.optim.AdamW(model.parameters(), lr=0.1))
    else:
        fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    compiled = in_mode(model, mode)
    for _ in range(2):
        compiled(torch.randn(4, 6, device=device)).sum().backward()
    compiled(torch.randn(4, 6, device=device))  # a forward whose backward never runs
    optimizer = fop.get_in_backward_optimizers(model)[0]
    moment = optimizer.state[model[0].weight]["exp_avg"]
    assert moment.abs().sum() > 0  # it stepped
    dropped = [weakref.ref(model[0].weight), weakref.ref(moment), weakref.ref(optimizer)]
    del model, compiled, optimizer, moment
    gc.collect()
    assert [ref() is None for ref in dropped] == [True, True, True]


@pytest.mark.parametrize("hook", ["register_hook", "register_post_accumulate_grad_hook"])
@pytest.mark.parametrize("mode", COMPILED)
def test_a_parameter_with_a_gradient_hook_steps_after_it_as_uncompiled(hook, mode, device):
    """A user's gradient hook on an updated parameter: a mask (register_hook, here one that
    zeroes 0.weight's gradient) or a post-accumulate-grad hook (here one that counts). The
    compiled backward hands the gradient to the update inside the graph, past both: the
    mask was ignored and the count stayed 0. Such a parameter steps eagerly instead, after
    its hooks, as uncompiled, the others still in the graph: from the step the hook comes,
    and back in the graph once it is removed. Parity with the model uncompiled, same hooks."""
    model = mlp(device)
    reference = deepcopy(model)
    for each in (model, reference):
        fop.apply_optimizer_in_backward(torch.optim.AdamW, each.parameters(), {"lr": 0.1})
    compiled = in_mode(model, mode)
    calls = {"compiled": 0, "reference": 0}

    def add_hook(each, name):
        if hook == "register_hook":
            return each[0].weight.register_hook(lambda grad: grad * 0)
        return each[0].weight.register_post_accumulate_grad_hook(lambda _: calls.__setitem__(name, calls[name] + 1))

    handles = []
    for step in range(6):
        if step == 2:
            handles = [add_hook(model, "compiled"), add_hook(reference, "reference")]
        if step == 4:
            for handle in handles:
                handle.remove()
        x = torch.randn(4, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        assert_params_close(model.parameters(), reference.parameters())
        assert model[0].weight.grad is None and model[2].weight.grad is None
    if hook == "register_post_accumulate_grad_hook":
        assert calls == {"compiled": 2, "reference": 2}  # steps 2 and 3


@pytest.mark.parametrize("mode", COMPILED)
def test_micro_batches_summed_inside_one_compiled_call_step_once_on_the_summed_gradient(mode, device):
    """The README's way to accumulate gradient: one compiled function runs the micro-batches
    and sums their losses, so each parameter steps once, on the sum, as eager AdamW does
    after one backward of the summed loss."""
    model = mlp(device)
    reference = deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})

    def accumulate(micro_batches):
        return sum(model(batch).pow(2).mean() for batch in micro_batches)

    step = in_mode(accumulate, mode)
    for _ in range(3):
        micro_batches = list(torch.randn(3, 4, 6, device=device))
        step(micro_batches).backward()
        sum(reference(batch).pow(2).mean() for batch in micro_batches).backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("call", ["torch.autograd.grad", "backward(inputs=...)"])
@pytest.mark.parametrize("mode", COMPILED)
def test_a_backward_restricted_to_inputs_is_refused_before_any_update(call, mode, device):
    """The gradient of the input alone (adversarial examples, saliency maps) runs the
    compiled backward without accumulating into the parameters, and PyTorch's in-backward
    hooks do not run for it: the compiled update did, moving every parameter."""
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    compiled = in_mode(model, mode)
    compiled(torch.randn(4, 6, device=device)).sum().backward()  # a training step, compiled
    before = snapshot(model.parameters())
    x = torch.randn(4, 6, device=device, requires_grad=True)
    loss = compiled(x).sum()
    with pytest.raises(fop.RestrictedBackwardError, match=r"updates 4 parameter\(s\) \(0\.weight.*Nothing was updated"):
        if call == "torch.autograd.grad":
            torch.autograd.grad(loss, x)
        else:
            loss.backward(inputs=[x])
    assert_params_close(model.parameters(), before)
    compiled(torch.randn(4, 6, device=device)).sum().backward()  # training goes on
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.fixture
def no_donated_buffers():
    """Inductor lets a compiled backward reuse saved activations' memory ("donated
    buffers"), and AOTAutograd then refuses retain_graph=True, with or without this
    package, saying to turn them off: done here, as a user needing retain_graph would."""
    with functorch_config.patch(donated_buffer=False):
        yield


def retain_graph_steps(model, steps, device, first_plain_step=False):
    """Train ``model`` (compiled or with eager hooks) with two backwards per forward."""
    torch.manual_seed(1)
    if first_plain_step:
        model(torch.randn(4, 6, device=device)).pow(2).mean().backward()
    for _ in range(steps):
        loss = model(torch.randn(4, 6, device=device)).pow(2).mean()
        loss.backward(retain_graph=True)
        loss.backward()


@pytest.mark.parametrize("mode", COMPILED)
@pytest.mark.parametrize(
    ("optimizer_class", "kwargs"), [(torch.optim.AdamW, {"lr": 0.01}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})]
)
def test_retain_graph_second_backward_updates_again_as_eager_hooks_do(
    mode, device, optimizer_class, kwargs, no_donated_buffers
):
    """One Linear layer on an input without gradient: its backward reads no weight, and
    PyTorch's eager hooks step once per backward; so do we."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(device)
    reference = deepcopy(model)
    _apply_optimizer_in_backward(optimizer_class, reference.parameters(), kwargs)
    fop.apply_optimizer_in_backward(optimizer_class, model.parameters(), kwargs)
    # SGD creates its momentum buffer in its first step, which a second backward refuses.
    first_plain_step = optimizer_class is torch.optim.SGD
    retain_graph_steps(reference, 3, device, first_plain_step)
    retain_graph_steps(in_mode(model, mode), 3, device, first_plain_step)
    assert_params_close(model.parameters(), reference.parameters())
    for p, ref in zip(model.parameters(), reference.parameters()):
        (optimizer,), (ref_optimizer,) = p._in_backward_optimizers, ref._in_backward_optimizers
        torch.testing.assert_close(optimizer.state[p], ref_optimizer.state[ref])


def assert_second_backward_refused(model, mode, device, match):
    """One backward with retain_graph=True, then a second one: refused, and nothing changed."""
    loss = in_mode(model, mode)(torch.randn(4, 6, device=device)).pow(2).mean()
    loss.backward(retain_graph=True)
    after_first = snapshot(model.parameters())
    with pytest.raises(fop.SecondBackwardError, match=match):
        loss.backward()
    assert_params_close(model.parameters(), after_first)


@pytest.mark.parametrize("mode", COMPILED)
def test_retain_graph_second_backward_refused_where_the_backward_reads_a_weight(mode, device, no_donated_buffers):
    """Two layers: the first layer's input gradient reads 2.weight. Eager hooks fail with
    autograd's in-place error; we refuse before anything changes, naming the weight."""
    reference = mlp(device)
    _apply_optimizer_in_backward(torch.optim.AdamW, reference.parameters(), {"lr": 0.01})
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        retain_graph_steps(reference, 1, device)

    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})
    assert_second_backward_refused(model, mode, device, r"retain_graph=True.*2\.weight.*Nothing was updated")


@pytest.mark.parametrize("mode", COMPILED)
def test_retain_graph_second_backward_on_a_first_step_creating_state_is_refused(mode, device, no_donated_buffers):
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    assert_second_backward_refused(model, mode, device, r"weight.*created its state.*momentum_buffer")


@pytest.mark.parametrize("mode", COMPILED)
def test_parameters_without_in_backward_optimizers_get_ordinary_gradients(mode, device):
    model = mlp(device)
    reference = deepcopy(model)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model[0].parameters(), {"lr": 0.1})
    x = torch.randn(4, 6, device=device)
    in_mode(model, mode)(x).sum().backward()
    reference(x).sum().backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert_params_close([model[2].weight.grad, model[2].bias.grad], [reference[2].weight.grad, reference[2].bias.grad])
    assert_params_close(model[2].parameters(), reference[2].parameters())


def test_second_instance_uses_its_own_optimizers(device):
    """Dynamo shares one graph between same-shaped modules; each call must read its own state and lr."""
    first, second = mlp(device), mlp(device)
    references = [deepcopy(first), deepcopy(second)]
    ref_opts = [
        torch.optim.Adam(references[0].parameters(), lr=0.01),
        torch.optim.Adam(references[1].parameters(), lr=0.05),
    ]
    fop.apply_optimizer_in_backward(torch.optim.Adam, first.parameters(), {"lr": 0.01})
    fop.apply_optimizer_in_backward(torch.optim.Adam, second.parameters(), {"lr": 0.05})
    loss = torch.compile(
        lambda model, x: model(x).sum(), backend=fop.make_backend(compiler="aot_eager"), fullgraph=True
    )
    for _ in range(4):
        x = torch.randn(4, 6, device=device)
        for model, reference, opt in zip((first, second), references, ref_opts):
            loss(model, x).backward()
            reference(x).sum().backward()
            opt.step()
            opt.zero_grad()
            assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("mode", COMPILED)
def test_same_structure_models_with_pending_backwards_step_as_eager_hooks_do(mode, device):
    """Two models share one compiled graph; both forwards run before either backward. Each
    backward steps its own SGD momentum (a created-state flag, saved for the backward, per
    parameter and not per graph input), as PyTorch's eager hooks do."""
    kwargs = {"lr": 0.05, "momentum": 0.9}
    models = [mlp(device), mlp(device)]
    references = deepcopy(models)
    for model, reference in zip(models, references):
        fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), kwargs)
        _apply_optimizer_in_backward(torch.optim.SGD, reference.parameters(), kwargs)
    backend = fop.backend if mode == "inductor" else fop.make_backend(compiler="aot_eager")
    loss = torch.compile(lambda model, x: model(x).pow(2).sum(), backend=backend, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 6, device=device)
        for losses in ([loss(model, x) for model in models], [r(x).pow(2).sum() for r in references]):
            for each in losses:
                each.backward()
        for model, reference in zip(models, references):
            assert_params_close(model.parameters(), reference.parameters())


def test_a_steady_momentum_step_makes_no_tensor_per_parameter(device):
    """Once SGD's momentum buffers exist, a step passes the graph the tensors it already has:
    nothing is made per parameter and call (on a GPU, an allocation and a kernel each)."""
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.05, "momentum": 0.9})
    compiled = in_mode(model, "aot_eager")
    x = torch.randn(4, 6, device=device)
    for _ in range(2):
        compiled(x).sum().backward()
    with torch.profiler.profile() as prof:
        loss = compiled(x).sum()
    made = [e.name for e in prof.events() if e.name in ("aten::ones", "aten::zeros", "aten::empty", "aten::full")]
    assert made == []
    loss.backward()


def test_lr_changes_take_effect_without_recompiling(device):
    model = mlp(device)
    reference = deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) for opt in fop.get_in_backward_optimizers(model)
    ]
    compiled = in_mode(model, "aot_eager")
    for _ in range(5):
        x = torch.randn(4, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
        for scheduler in schedulers:
            scheduler.step()
        assert_params_close(model.parameters(), reference.parameters())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_load_state_dict_is_honoured(device):
    """Restoring a checkpoint replaces the state tensors; the next compiled step reads the new ones."""
    model = mlp(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})
    compiled = in_mode(model, "aot_eager")
    xs = [torch.randn(4, 6, device=device) for _ in range(4)]
    for x in xs[:2]:
        compiled(x).sum().backward()
    checkpoint = deepcopy(
        {"model": model.state_dict(), "optim": [o.state_dict() for o in fop.get_in_backward_optimizers(model)]}
    )
    for x in xs[2:]:
        compiled(x).sum().backward()
    after_four = snapshot(model.parameters())

    model.load_state_dict(checkpoint["model"])
    for opt, state in zip(fop.get_in_backward_optimizers(model), checkpoint["optim"]):
        opt.load_state_dict(state)
    for x in xs[2:]:
        compiled(x).sum().backward()
    assert_params_close(model.parameters(), after_four)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # new state tensors, no recompile


def test_changed_optimizer_setting_recompiles_instead_of_running_a_stale_graph(device):
    model = mlp(device)
    reference = deepcopy(model)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    compiled = in_mode(model, "aot_eager")
    for step in range(4):
        if step == 2:
            for opt in [*fop.get_in_backward_optimizers(model), ref_opt]:
                opt.param_groups[0]["nesterov"] = True
        x = torch.randn(4, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())


def test_eager_hook_does_not_step_again_after_compiled_backward(device):
    """Once compiled, the optimizer's Python step() is not called again: the graph does the update."""
    calls = []

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            calls.append(1)
            return super().step(closure)

    model = mlp(device)
    fop.apply_optimizer_in_backward(CountingSGD, model.parameters(), {"lr": 0.1})
    compiled = in_mode(model, "aot_eager")
    compiled(torch.randn(4, 6, device=device)).sum().backward()
    traced_calls = len(calls)
    assert traced_calls > 0, "the update was not traced from the optimizer's step()"
    compiled(torch.randn(4, 6, device=device)).sum().backward()
    assert len(calls) == traced_calls, "the eager hook stepped after the compiled backward"
    assert all(p.grad is None for p in model.parameters())
