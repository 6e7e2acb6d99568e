"""Compiled in-backward updates match eager torch.optim over several steps.

The wide matrix runs on the cheap aot_eager path; a representative set through Inductor.
"""

from copy import deepcopy

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch.utils.checkpoint import checkpoint

import fx_optim_pass as fop
from fx_optim_pass.dynamo_backend import _compiled_backward_node
from tests.helpers import assert_params_close, in_mode, train_side_by_side

STEPS = 6

CONFIGS = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "betas": (0.8, 0.95)}),
    (torch.optim.Adam, {"lr": 0.01, "maximize": True, "eps": 1e-6}),
    (torch.optim.AdamW, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "maximize": True}),
]
INDUCTOR_CONFIGS = [CONFIGS[2], CONFIGS[7], CONFIGS[10]]


def config_id(config):
    cls, kwargs = config
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


def small_model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).to(device)


def check_parity(optimizer_class, kwargs, mode, device):
    torch.manual_seed(1)
    inputs = [torch.randn(5, 6, device=device) for _ in range(STEPS)]
    subject, reference_opt = train_side_by_side(small_model(device), optimizer_class, kwargs, mode, inputs)
    reference_params = list(reference_opt.param_groups[0]["params"])
    # Same state as torch's, in torch's format: keys, dtypes, devices, values.
    for p, ref_p in zip(subject.parameters(), reference_params):
        (opt,) = p._in_backward_optimizers
        state, ref_state = opt.state[p], reference_opt.state[ref_p]
        assert state.keys() == ref_state.keys()
        for key in state:
            assert state[key].dtype == ref_state[key].dtype and state[key].device == ref_state[key].device
            torch.testing.assert_close(state[key], ref_state[key])


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_parity_aot_eager(config, device):
    check_parity(*config, "aot_eager", device)


@pytest.mark.parametrize("config", INDUCTOR_CONFIGS, ids=config_id)
def test_parity_inductor(config, device):
    check_parity(*config, "inductor", device)


def test_tied_weights_updated_once_on_the_summed_gradient(device):
    """An embedding tied to the output projection: one update per step, on both uses' gradients."""
    from fx_optim_pass.models import GPT, GPTConfig, synthetic_tokens

    config = GPTConfig(vocab_size=64, seq_len=8, width=16, depth=1, heads=2)
    torch.manual_seed(0)
    reference = GPT(config).to(device)
    subject = deepcopy(reference)
    assert subject.lm_head.weight is subject.token_embedding.weight
    # SGD, not Adam: the key bias of attention gets a (mathematically zero) gradient of
    # rounding noise, which Adam's normalization would blow up to full-size steps.
    kwargs = {"lr": 0.5, "momentum": 0.9}
    reference_opt = torch.optim.SGD(reference.parameters(), **kwargs)
    fop.apply_optimizer_in_backward(torch.optim.SGD, subject.parameters(), kwargs)
    compiled = in_mode(subject, "aot_eager")
    for tokens, targets in synthetic_tokens(config, batch_size=2, num_batches=STEPS, device=device):
        reference(tokens, targets).backward()
        reference_opt.step()
        reference_opt.zero_grad()
        compiled(tokens, targets).backward()
        assert_params_close(subject.parameters(), reference.parameters())


# torch.optim's coupled weight decay is grad.add(param, alpha=weight_decay); with the
# gradient a matmul, Inductor's add+mm -> addmm rewrite drops alpha (see
# passes/explicit_alpha.py). Two stacked Linear layers make the weight gradient a bare mm.
WEIGHT_DECAY = [
    (cls, {"lr": 0.01, "weight_decay": 0.5})
    for cls in (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax, torch.optim.ASGD)
]


@pytest.mark.parametrize("config", WEIGHT_DECAY, ids=config_id)
def test_coupled_weight_decay_through_inductor(config, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10)).to(device)
    inputs = [torch.randn(4, 10, device=device) for _ in range(3)]
    train_side_by_side(model, *config, "inductor", inputs)


class StateFromInit(torch.optim.Optimizer):
    """A user's optimizer that creates its state in ``__init__`` and only reads it in
    ``_init_group``, as torch 2.11's Adagrad does."""

    def __init__(self, params, lr=0.1, beta=0.9):
        super().__init__(params, {"lr": lr, "beta": beta})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["average"] = torch.zeros_like(p)

    def _init_group(self, group, params, grads, averages):
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                averages.append(self.state[p]["average"])

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads, averages = [], [], []
            self._init_group(group, params, grads, averages)
            for p, g, average in zip(params, grads, averages):
                average.mul_(group["beta"]).add_(g)
                p.sub_(average * group["lr"])


def test_own_optimizer_with_state_made_in_init(device):
    torch.manual_seed(1)
    inputs = [torch.randn(5, 6, device=device) for _ in range(STEPS)]
    train_side_by_side(small_model(device), StateFromInit, {"lr": 0.05}, "aot_eager", inputs)


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_float64_parameters_are_updated_with_the_exact_lr(mode, device):
    """lr=0.1 has no exact float32 value: a float32 lr input would move every float64 update by ~1e-9."""
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    model = nn.Linear(6, 3).to(device, torch.float64)
    subject, _ = train_side_by_side(model, torch.optim.SGD, {"lr": 0.1}, mode, [x, x], rtol=1e-13, atol=1e-15)
    assert all(p.dtype == torch.float64 for p in subject.parameters())


class ConstantTensorSGD(torch.optim.Optimizer):
    """Makes tensors from numbers in its step: traced, they are tensor constants of the update's
    graph (torch 2.14 traces RMSprop's ``lerp_(grad, 1 - alpha)`` with a compiled-in ``alpha``
    so). The joint graph did not have them: "references nonexistent attribute _tensor_constant1"."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    half, two = torch.tensor(0.5, device=p.device), torch.tensor([2.0], device=p.device)
                    p.sub_(p.grad * group["lr"] * half * two)


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_own_optimizer_making_tensor_constants(mode, device):
    torch.manual_seed(1)
    inputs = [torch.randn(5, 6, device=device) for _ in range(STEPS)]
    train_side_by_side(small_model(device), ConstantTensorSGD, {"lr": 0.05}, mode, inputs)


FLOAT64_HYPERPARAMETERS = {
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.99, "momentum": 0.9, "eps": 1e-7, "centered": True}),
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
}


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
@pytest.mark.parametrize("optimizer", FLOAT64_HYPERPARAMETERS.values(), ids=FLOAT64_HYPERPARAMETERS.keys())
def test_float64_parameters_are_updated_with_exact_hyperparameters(optimizer, mode, device):
    """Inductor hands run-time floats to its kernels as 32-bit floats: read that way, momentum
    0.9 and alpha 0.99 moved a float64 RMSprop update by 4.2e-7 over 5 steps."""
    torch.manual_seed(0)
    inputs = [torch.randn(4, 8, dtype=torch.float64, device=device) for _ in range(STEPS)]
    model = nn.Linear(8, 8).to(device, torch.float64)
    optimizer_class, kwargs = optimizer
    train_side_by_side(model, optimizer_class, kwargs, mode, inputs, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_conv_weights_are_updated(mode, device):
    """Inductor's conv layout optimization (channels-last) saves a converted copy of the weight for
    the backward; the update must reach the parameter itself, not that copy (found by the fuzzer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    inputs = [torch.randn(2, 2, 4, 4, device=device) for _ in range(3)]
    train_side_by_side(model.to(device), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, mode, inputs)


POOLS = {
    "inductor-lowering": {"kernel_size": 2},
    "overlapping-windows": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    "aten-kernel": {"kernel_size": 2, "dilation": 2},  # Inductor's lowering has no dilation
}


@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_max_pool_backward_needs_no_saved_pooled_input(pool, device):
    """Max-pool's backward reads only the shape of the pooled input, so the forward saves no
    ReLU output for it (BatchNorm's saved input recomputes it), and it runs as Inductor's own
    lowering, not torch 2.13's scatter decomposition. With dilation Inductor calls ATen's
    kernel instead, given the same shape-only stand-in: parity there too."""
    inputs = [torch.randn(2, 2, 8, 8, device=device) for _ in range(STEPS)]
    check_max_pool_backward(pool, inputs, device)


def test_max_pool_backward_stand_in_with_a_dynamic_batch(device):
    """A symbolic batch size: the stand-in reads it from the pooled input (an integer saved)."""
    inputs = [torch.randn(2 + i, 2, 8, 8, device=device) for i in range(STEPS)]
    for x in inputs:
        torch._dynamo.mark_dynamic(x, 0)
    check_max_pool_backward(POOLS["inductor-lowering"], inputs, device)


def check_max_pool_backward(pool: dict, inputs: list[torch.Tensor], device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(**pool), nn.Flatten()
    ).to(device)
    graphs: dict[str, torch.fx.GraphModule] = {}
    backend = fop.make_backend(observer=lambda kind, gm: graphs.setdefault(kind, gm))
    compile = lambda m: torch.compile(m, backend=backend, fullgraph=True)  # noqa: E731
    train_side_by_side(model, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "inductor", inputs, compile=compile)
    aten = torch.ops.aten
    saved = graphs["forward"].graph.output_node().all_input_nodes
    assert not [node for node in saved if node.target is aten.relu.default]
    assert graphs["backward"].graph.find_nodes(op="call_function", target=aten.max_pool2d_with_indices_backward.default)


def test_conv_weights_are_updated_with_channels_last_convolutions(device):
    """With Inductor's layout optimization on (forced: on CUDA its heuristics skip small convs),
    the convs run channels-last on their own copies of the weights while the updates reach the
    parameters: the backward receives each parameter itself, not a channels-last copy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Flatten()
    ).to(device)
    inputs = [torch.randn(2, 2, 6, 6, device=device) for _ in range(STEPS)]
    with inductor_config.patch(force_layout_optimization=True):
        subject, _ = train_side_by_side(model, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "inductor", inputs)
        output = in_mode(subject, "inductor")(inputs[0])  # alive while its saved tensors are read
        saved = _compiled_backward_node(output).saved_tensors
    channels_last = [t for t in saved if t.dim() == 4 and not t.is_contiguous()]
    assert any(t.is_contiguous(memory_format=torch.channels_last) for t in channels_last), "layout optimization off"
    assert all(any(t.data_ptr() == p.data_ptr() for t in saved) for p in subject.parameters())


@pytest.mark.parametrize("backend", ["fx_optim", "aot_eager"])
def test_torch_compile_defaults_without_fullgraph(backend, device):
    """``torch.compile(model, backend="fx_optim")`` as most users write it, fullgraph left
    False: the updates' ``.item()`` reads of their hyperparameters must compile there too
    (Inductor propagates fake values again, where Dynamo's fake mode refused them). Not a
    silent eager fallback: one graph, no graph break, and no ``.grad`` left behind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).to(device)
    inputs = [torch.randn(2, 3, 6, 6, device=device) for _ in range(STEPS)]
    # fop.backend is what the name "fx_optim" finds once the package is installed
    # (tests/test_entry_point.py); a source tree on PYTHONPATH, as on the GPU machine, has no name.
    by_default = fop.backend if backend == "fx_optim" else fop.make_backend(compiler=backend)
    train_side_by_side(
        model,
        torch.optim.SGD,
        {"lr": 0.01, "momentum": 0.9},
        backend,
        inputs,
        compile=lambda m: torch.compile(m, backend=by_default),
    )
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


class _CheckpointedBlocks(nn.Module):
    """Residual MLP blocks, each under non-reentrant activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + checkpoint(block, x, use_reentrant=False)
        return x


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_activation_checkpointing_inside_the_compiled_model(mode, device):
    """The other memory saver users combine with this one: the checkpointed blocks are
    recomputed in the backward, and each update still comes after its gradient."""
    torch.manual_seed(0)
    model = _CheckpointedBlocks().to(device)
    inputs = [torch.randn(4, 8, device=device) for _ in range(STEPS)]
    train_side_by_side(model, torch.optim.AdamW, {"lr": 0.01}, mode, inputs)
