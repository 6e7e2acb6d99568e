"""Float hyperparameters are read at every step (compiled in for float64 parameters);
structural flags recompile.

Schedulers (OneCycleLR cycles betas or momentum as well as lr, ReduceLROnPlateau)
and hand edits of ``param_groups`` take effect on the next step with no new graph.
A recompile is counted as a new AOTAutograd compile: our backend compiles a new
variant for a changed setup without Dynamo knowing.
"""

from copy import deepcopy

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fx_optim_pass as fop
from fx_optim_pass.optim_lowering import describe_step
from tests.helpers import assert_params_close, in_mode

STEPS = 20


def model_pair(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    return model, reference


def compiles() -> int:
    return torch._dynamo.utils.counters["aot_autograd"]["total"]


def train(model, opt, reference, ref_opt, mode, device, before_step):
    """Train both for STEPS steps; ``before_step(step, opt)`` edits each optimizer alike.
    Returns the number of compiles after the first step."""
    compiled = in_mode(model, mode)
    fop.attach(opt)
    after_first = None
    for step in range(STEPS):
        for optimizer in (opt, ref_opt):
            before_step(step, optimizer)
        x = torch.randn(4, 6, device=device)
        loss = compiled(x).pow(2).mean()
        loss.backward()
        ref_loss = reference(x).pow(2).mean()
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
        if after_first is None:
            after_first = compiles()
    return compiles() - after_first


ADAMW = (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05})  # OneCycleLR cycles betas[0]
SGD = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True})  # it cycles momentum
ONE_CYCLE = [(ADAMW, "aot_eager"), (SGD, "aot_eager"), (ADAMW, "inductor")]


@pytest.mark.parametrize(("config", "mode"), ONE_CYCLE, ids=lambda c: c if isinstance(c, str) else c[0].__name__)
def test_one_cycle_lr_with_momentum_cycling_never_recompiles(config, mode, device):
    cls, kwargs = config
    model, reference = model_pair(device)
    opt, ref_opt = cls(model.parameters(), **kwargs), cls(reference.parameters(), **kwargs)
    schedulers = {
        id(o): torch.optim.lr_scheduler.OneCycleLR(o, max_lr=kwargs["lr"] * 10, total_steps=STEPS, cycle_momentum=True)
        for o in (opt, ref_opt)
    }
    seen_momenta = set()

    def schedule(step, optimizer):
        if step:
            schedulers[id(optimizer)].step()
        group = optimizer.param_groups[0]
        seen_momenta.add(group["betas"][0] if "betas" in group else group["momentum"])

    assert train(model, opt, reference, ref_opt, mode, device, schedule) == 0
    assert len(seen_momenta) > STEPS // 2, "the schedule did not cycle momentum"


def test_hand_edits_of_every_float_take_effect_without_recompiling(device):
    model, reference = model_pair(device)
    kwargs = {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    opt, ref_opt = torch.optim.Adam(model.parameters(), **kwargs), torch.optim.Adam(reference.parameters(), **kwargs)

    def edit(step, optimizer):
        group = optimizer.param_groups[0]
        group["betas"] = (0.8 + 0.01 * step, 0.99 - 0.001 * step)
        group["eps"] = 1e-6 * (step + 1)
        group["weight_decay"] = 0.1 / (step + 1)

    assert train(model, opt, reference, ref_opt, "aot_eager", device, edit) == 0


def test_reduce_lr_on_plateau_takes_effect_without_recompiling(device):
    model, reference = model_pair(device)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, lr_decay=0.01)
    ref_opt = torch.optim.Adagrad(reference.parameters(), lr=0.1, lr_decay=0.01)
    schedulers = {id(o): torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5) for o in (opt, ref_opt)}

    def plateau(step, optimizer):
        schedulers[id(optimizer)].step(1.0)  # a flat metric: lr halves every step

    assert train(model, opt, reference, ref_opt, "aot_eager", device, plateau) == 0
    assert opt.param_groups[0]["lr"] < 0.1 * 0.5**10


def test_crossing_a_branch_of_torchs_code_recompiles_and_stays_correct(device):
    """weight_decay 0 -> 0.1 switches torch's code path (``if weight_decay != 0``): a new graph, right values."""
    model, reference = model_pair(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)

    def switch(step, optimizer):
        optimizer.param_groups[0]["weight_decay"] = 0.1 if step >= STEPS // 2 else 0.0

    assert train(model, opt, reference, ref_opt, "aot_eager", device, switch) == 1


def test_structural_flag_change_recompiles(device):
    model, reference = model_pair(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)

    def amsgrad_later(step, optimizer):
        if step == STEPS // 2:
            optimizer.param_groups[0]["amsgrad"] = True
            for p in optimizer.param_groups[0]["params"]:  # torch creates this state on the first step only
                optimizer.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)

    assert train(model, opt, reference, ref_opt, "aot_eager", device, amsgrad_later) == 1


@pytest.fixture
def float64_sgd_pair(device):
    """``model_pair`` in float64 (train()'s inputs too, made in the default dtype), each with
    SGD and momentum."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, reference = model_pair(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        yield model, opt, reference, ref_opt
    finally:
        torch.set_default_dtype(previous)


def test_float64_hyperparameters_are_compiled_in_and_a_change_recompiles(float64_sgd_pair, device):
    """A float64 update takes its floats as constants (run-time floats reach Inductor's kernels
    as 32 bits; ``test_parity.py::test_float64_parameters_are_updated_with_exact_hyperparameters``):
    a change of momentum compiles a new variant, with the new value."""

    def slow_down(step, optimizer):
        optimizer.param_groups[0]["momentum"] = 0.8 if step >= STEPS // 2 else 0.9

    assert train(*float64_sgd_pair, "aot_eager", device, slow_down) == 1


def test_a_setting_that_keeps_compiling_anew_is_warned_about(float64_sgd_pair, device):
    """Momentum cycling on float64 parameters compiles a variant per step (each value is
    compiled in): the eighth variant of one graph says so, and why."""

    def cycle(step, optimizer):
        optimizer.param_groups[0]["momentum"] = 0.9 - 0.01 * min(step, 9)  # 10 values

    with pytest.warns(UserWarning, match=r"compiled 8 variants of one graph.*float64") as warned:
        train(*float64_sgd_pair, "aot_eager", device, cycle)
    assert len([w for w in warned if "variants of one graph" in str(w.message)]) == 1  # once, not per step


class ScaledSGD(torch.optim.Optimizer):
    """A user's optimizer whose step() reads an attribute of its own, not a param-group entry."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.scale = 1.0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad * (group["lr"] * self.scale))


def test_an_optimizers_own_attribute_is_compiled_in_and_a_change_recompiles(device):
    model, reference = model_pair(device)
    opt, ref_opt = ScaledSGD(model.parameters()), ScaledSGD(reference.parameters())

    def rescale(step, optimizer):
        optimizer.scale = 3.0 if step >= STEPS // 2 else 1.0

    assert train(model, opt, reference, ref_opt, "aot_eager", device, rescale) == 1


def test_parameters_of_one_shape_share_a_description_only_when_their_setup_matches(device):
    """The plan traces torch's step once per (optimizer class, compiled setup, run-time
    floats, layout); parameters of one shape with other setups must not share it."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4))).to(device)
    reference = deepcopy(model)
    layers = list(model)
    settings = [
        {"lr": 0.01},
        {"lr": 0.02},  # another float: shares layer 0's description
        {"lr": 0.01, "amsgrad": True},  # another state key: its own
        {"lr": 0.01, "weight_decay": 0.0},  # a landmark: compiled in, its own
    ]
    for layer, kwargs in zip(layers, settings):
        fop.apply_optimizer_in_backward(torch.optim.AdamW, layer.parameters(), kwargs)
    reference_opts = [torch.optim.AdamW(layer.parameters(), **kwargs) for layer, kwargs in zip(reference, settings)]

    described: dict = {}
    steps = [
        describe_step(layer.weight._in_backward_optimizers[0], layer.weight, f"{i}.weight", None, described)
        for i, layer in enumerate(layers)
    ]
    assert steps[1] is steps[0]
    assert steps[2] is not steps[0] and "max_exp_avg_sq" in steps[2].state_keys
    assert steps[3] is not steps[0] and steps[3].setup != steps[0].setup

    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    for _ in range(3):
        x = torch.randn(5, 8, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        for opt in reference_opts:
            opt.step()
            opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())


def test_the_compiled_backward_reads_each_float_without_rechecking_its_landmarks(device):
    """The landmark checks made while tracing (``0.5 < beta1``, five per float) are not
    emitted into the compiled backward: the runtime picks the variant for the side each
    float is on before every call, so the checks would only cost time at every step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4).to(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})
    compiled = torch.compile(model, backend=fop.backend, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(lambda: compiled(torch.randn(2, 4, device=device)).sum().backward())
    backward = [code for code in codes if ".item()" in code]
    assert len(backward) == 1, "the compiled backward should read the run-time floats with .item()"
    assert "raise RuntimeError" not in backward[0]


def test_updates_reading_equal_floats_share_one_input_and_one_read(device):
    """Per-parameter optimizers with one setting (apply_optimizer_in_backward's usual use)
    pass each run-time float once: one graph input and one ``.item()``, however many
    parameters. Inductor copies every such symbol's value range for each node it lowers, so
    one per parameter made compile time grow with the square of their number. The reads sit
    in the forward and the backward receives the numbers: read in the backward, each would be
    a buffer that every update kernel depends on, which Inductor's scheduler walks per kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(3))).to(device)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01, "weight_decay": 0.05})
    graphs: dict[str, torch.fx.GraphModule] = {}
    backend = fop.make_backend(compiler="aot_eager", observer=graphs.setdefault)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(torch.randn(2, 8, device=device)).sum().backward()

    def reads(kind: str) -> list[torch.fx.Node]:
        return graphs[kind].graph.find_nodes(op="call_function", target=torch.ops.aten._local_scalar_dense.default)

    read_inputs = sorted(node.args[0].name for node in reads("forward"))
    # lr, betas_0, betas_1, eps, weight_decay: read once for the 6 parameters
    assert len(read_inputs) == 5, read_inputs
    assert len(set(read_inputs)) == 5, read_inputs
    assert not reads("backward")
    received = [
        node
        for node in graphs["backward"].graph.find_nodes(op="placeholder")
        if isinstance(node.meta.get("val"), torch.SymFloat)
    ]
    assert len(received) == 5, received


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_a_float_that_stops_being_equal_gets_an_input_of_its_own(mode, device):
    """A parameter whose lr leaves the others' (a scheduler on its optimizer alone) must never
    keep reading the value they share: the next call runs a variant where it has its own
    input. Equal again, the first variant serves without compiling."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    reference = deepcopy(model)
    kwargs = {"lr": 0.05, "momentum": 0.9}
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), kwargs)
    opts = {name: p._in_backward_optimizers[0] for name, p in model.named_parameters()}
    reference_opts = {name: torch.optim.SGD([p], **kwargs) for name, p in reference.named_parameters()}
    compiled = in_mode(model, mode)
    lrs = {3: 0.01, 4: 0.01, 5: 0.05, 6: 0.05}  # the last layer's weight only, from step 3 on
    for step in range(7):
        for optimizer in (opts["2.weight"], reference_opts["2.weight"]):
            optimizer.param_groups[0]["lr"] = lrs.get(step, 0.05)
        x = torch.randn(4, 6, device=device)
        compiled(x).pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        for optimizer in reference_opts.values():
            optimizer.step()
            optimizer.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
        if step == 0:
            after_first = compiles()
    assert compiles() - after_first == 1


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_distinct_lrs_that_change_every_step_each_reach_their_own_parameter(mode, device):
    """The variant key is memoized on everything but the lr values (``RuntimeSignature``):
    with two lrs that trade values and drift at every step, each parameter must still get
    its own lr, from one compile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    reference = deepcopy(model)
    kwargs = {"lr": 0.05, "betas": (0.8, 0.9)}
    fop.apply_optimizer_in_backward(torch.optim.Adam, model.parameters(), kwargs)
    opts = [p._in_backward_optimizers[0] for p in model.parameters()]
    reference_opts = [torch.optim.Adam([p], **kwargs) for p in reference.parameters()]
    compiled = in_mode(model, mode)
    for step in range(6):
        low, high = 0.01 * (1 + step), 0.05 * (1 + step)
        for index, (optimizer, reference_optimizer) in enumerate(zip(opts, reference_opts)):
            lr = low if (index + step) % 2 else high  # neighbours differ, and swap every step
            optimizer.param_groups[0]["lr"] = reference_optimizer.param_groups[0]["lr"] = lr
        x = torch.randn(4, 6, device=device)
        compiled(x).pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        for optimizer in reference_opts:
            optimizer.step()
            optimizer.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
        if step == 0:
            after_first = compiles()
    assert compiles() - after_first == 0
