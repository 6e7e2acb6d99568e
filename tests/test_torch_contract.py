"""PyTorch's own test of _apply_optimizer_in_backward, in eager, aot_eager and Inductor mode.

Mirrors test/distributed/optim/test_apply_optimizer_in_backward.py: the reference is
ordinary torch.optim stepping after backward; the subject uses our drop-in.
"""

from copy import deepcopy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward, _get_in_backward_optimizers

import fx_optim_pass as fop
from tests.helpers import MODES, assert_params_close, in_mode, snapshot

STEPS = 6


def run_and_compare(inp, reference, reference_optimizers, subject, mode):
    compiled = in_mode(subject, mode)
    # On CUDA, cuBLAS picks other kernels for the compiled backward's matmuls, and
    # torch's lr=1.0 grows their last-bit differences over the steps.
    tolerance = {} if inp.device.type == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
    for _ in range(STEPS):
        reference(inp).sum().backward()
        for opt in reference_optimizers:
            opt.step()
        for opt in reference_optimizers:
            opt.zero_grad(set_to_none=True)
        compiled(inp).sum().backward()
        for actual, expected in zip(subject.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(actual, expected, **tolerance)
        assert all(p.grad is None for p in subject.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("share_params", [False, True], ids=["plain", "shared_params"])
def test_apply_optimizer_in_backward(mode, share_params, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10)).to(device)
    if share_params:
        model[0].weight = model[1].weight
    weights = [m.weight for m in model]
    biases = [m.bias for m in model]
    # A shared weight is listed twice and so stepped twice, one after the other, as
    # the in-backward hooks do; torch's foreach path (the CUDA default) reads both
    # entries before writing either, so the reference takes the for-loop path.
    optim_weight = torch.optim.SGD(weights, lr=1.0, foreach=False)
    optim_bias = torch.optim.SGD(biases, lr=0.5, foreach=False)
    subject = deepcopy(model)
    fop.apply_optimizer_in_backward(torch.optim.SGD, [m.weight for m in subject], {"lr": 1.0})
    fop.apply_optimizer_in_backward(torch.optim.SGD, [m.bias for m in subject], {"lr": 0.5})
    run_and_compare(torch.randn(4, 10, device=device), model, [optim_weight, optim_bias], subject, mode)


@pytest.mark.parametrize("mode", MODES)
def test_no_register_hook(mode, device):
    torch.manual_seed(0)
    with_hook = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10)).to(device)
    initial = deepcopy(with_hook)
    no_hook = deepcopy(with_hook)
    fop.apply_optimizer_in_backward(torch.optim.SGD, with_hook.parameters(), {"lr": 0.03})
    fop.apply_optimizer_in_backward(torch.optim.SGD, no_hook.parameters(), {"lr": 0.03}, register_hook=False)
    inp = torch.randn(4, 10, device=device)
    in_mode(with_hook, mode)(inp).sum().backward()
    in_mode(no_hook, mode)(inp).sum().backward()

    for p, p0 in zip(with_hook.parameters(), initial.parameters()):
        assert not torch.allclose(p, p0)
    assert_params_close(no_hook.parameters(), initial.parameters())
    # register_hook=False: nothing steps, the gradient reaches .grad as usual.
    initial(inp).sum().backward()
    assert_params_close([p.grad for p in no_hook.parameters()], [p.grad for p in initial.parameters()])


@pytest.mark.parametrize("mode", MODES)
def test_multiple_optim_for_params(mode, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10)).to(device)
    opt_0 = torch.optim.SGD(model.parameters(), lr=0.03)
    opt_1 = torch.optim.SGD(model.parameters(), lr=0.01)
    subject = deepcopy(model)
    fop.apply_optimizer_in_backward(torch.optim.SGD, subject.parameters(), {"lr": 0.03})
    fop.apply_optimizer_in_backward(torch.optim.SGD, subject.parameters(), {"lr": 0.01})
    run_and_compare(torch.randn(4, 10, device=device), model, [opt_0, opt_1], subject, mode)


@pytest.mark.parametrize("mode", MODES)
def test_multiple_stateful_optimizers_apply_in_registration_order(mode, device):
    """SGD-momentum then AdamW on the same parameters, all on the same gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)).to(device)
    subject = deepcopy(model)
    sgd_kwargs, adamw_kwargs = {"lr": 0.05, "momentum": 0.9}, {"lr": 0.01, "weight_decay": 0.1}
    references = [
        torch.optim.SGD(model.parameters(), **sgd_kwargs),
        torch.optim.AdamW(model.parameters(), **adamw_kwargs),
    ]
    fop.apply_optimizer_in_backward(torch.optim.SGD, subject.parameters(), sgd_kwargs)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, subject.parameters(), adamw_kwargs)
    run_and_compare(torch.randn(4, 10, device=device), model, references, subject, mode)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(10, 5)
        self.linear2 = nn.Linear(5, 2)


def test_get_in_backward_optimizers():
    model = TwoLinear()
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.01})
    in_backward = fop.get_in_backward_optimizers(model)
    assert len(in_backward) == len(list(model.parameters()))
    assert set(in_backward) == {opt for p in model.parameters() for opt in p._in_backward_optimizers}


def test_ours_are_seen_by_torchs_get_in_backward_optimizers():
    model = TwoLinear()
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.01})
    assert _get_in_backward_optimizers(model) == fop.get_in_backward_optimizers(model)
    for p in model.parameters():
        assert p._optimizer_classes == [torch.optim.SGD]
        assert p._optimizer_kwargs == [{"lr": 0.01}]


def test_torchs_apply_is_picked_up_by_the_backend(device):
    """Parameters set up by PyTorch's own function are updated inside the compiled graph, once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)).to(device)
    reference = deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    _apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})
    graphs = []
    compiled = torch.compile(
        model,
        backend=fop.make_backend(compiler="aot_eager", observer=lambda kind, gm: graphs.append(kind)),
        fullgraph=True,
    )
    inp = torch.randn(4, 10, device=device)
    for _ in range(STEPS):
        compiled(inp).sum().backward()
        reference(inp).sum().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
    assert "joint" in graphs, "the backend did not rewrite the graph"
    before = snapshot(model.parameters())
    model(inp).sum().backward()  # torch's eager hook still works uncompiled
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_eager_ddp_steps_after_the_all_reduce_as_with_torchs_function(device):
    """DistributedDataParallel runs in-backward optimizers itself (its
    ``_setup_in_backward_optimizers``): it removes the hooks PyTorch's map lists and steps
    ``_in_backward_optimizers`` after each gradient's all-reduce. Ours are listed there too,
    so none steps before the all-reduce, on this rank's own gradient. DDP does this on GPUs
    only: there, steps match eager SGD. On CPU, as with PyTorch's function: torch 2.11 to
    2.13 remove the hooks at the first forward (the end-of-backward callback then asks for an
    accelerator), torch 2.14 fails at that forward creating a stream."""
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
        reference = deepcopy(model)
        torch_setup = deepcopy(model)
        reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
        assert all(p._post_accumulate_grad_hooks for p in model.parameters())
        x = torch.randn(4, 6, device=device)
        if device == "cpu":
            _apply_optimizer_in_backward(torch.optim.SGD, torch_setup.parameters(), {"lr": 0.1})
            torchs = _first_ddp_forward_error(torch_setup, x)
            ours = _first_ddp_forward_error(model, x)
            assert (type(ours), str(ours)) == (type(torchs), str(torchs))
            if ours is None:
                assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # DDP steps them now
            return
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
        loss = ddp(x).sum()  # DDP sets up its in-backward stepping at the first forward
        assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # DDP steps them now
        for step in range(3):
            if step:
                x = torch.randn(4, 6, device=device)
                loss = ddp(x).sum()
            loss.backward()
            reference(x).sum().backward()
            reference_opt.step()
            reference_opt.zero_grad()
            assert_params_close(model.parameters(), reference.parameters())
    finally:
        dist.destroy_process_group()


def _first_ddp_forward_error(model: nn.Module, x: torch.Tensor) -> Exception | None:
    """What DDP's first forward of ``model`` raises on CPU, where it sets up in-backward stepping."""
    try:
        nn.parallel.DistributedDataParallel(model)(x)
    except RuntimeError as error:
        return error
    return None
