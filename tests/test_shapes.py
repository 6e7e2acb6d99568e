"""Changing batch size and sequence length stays correct, with a bounded number of graphs."""

from copy import deepcopy

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from fx_optim_pass.models import GPT, GPTConfig
from tests.helpers import assert_params_close

ADAMW = {"lr": 0.01}


@pytest.mark.parametrize(("compiler", "dynamic", "max_graphs"), [("aot_eager", None, 2), ("inductor", True, 1)])
def test_batch_size_changes(compiler, dynamic, max_graphs, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    reference = deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), **ADAMW)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), ADAMW)
    backend = fop.make_backend(compiler=compiler)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    for batch in [4, 5, 7, 3, 9, 4]:
        x = torch.randn(batch, 6, device=device)
        compiled(x).sum().backward()
        reference(x).sum().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= max_graphs


def test_sequence_length_changes(device):
    config = GPTConfig(vocab_size=32, seq_len=16, width=16, depth=1, heads=2)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    reference = deepcopy(model)
    kwargs = {"lr": 0.1, "momentum": 0.9}
    reference_opt = torch.optim.SGD(reference.parameters(), **kwargs)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), kwargs)
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    for length in [8, 12, 16, 8, 10]:
        tokens = torch.randint(32, (2, length), device=device)
        targets = torch.randint(32, (2, length), device=device)
        compiled(tokens, targets).backward()
        reference(tokens, targets).backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert_params_close(model.parameters(), reference.parameters())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
