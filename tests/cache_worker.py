"""Compiled training with Inductor's caches, in this process or a fresh one (see test_caches.py).

``python tests/cache_worker.py NAME`` trains ``model()`` for ``STEPS`` steps with the
in-backward optimizer ``CONFIGS[NAME]`` and prints the cache counters and the final
parameters as JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

import fx_optim_pass as fop

STEPS = 3
# Adam and AdamW take the same graph inputs (lr, exp_avg, exp_avg_sq, step): only the
# pass's uuid() tells their graphs apart.
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "Adam": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.5}),
    "AdamW": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.5}),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, generator=generator) for _ in range(STEPS)]


def train_compiled(name: str) -> nn.Module:
    """The same model trained with in-backward optimizers, compiled by Inductor."""
    optimizer_class, kwargs = CONFIGS[name]
    subject = model()
    fop.apply_optimizer_in_backward(optimizer_class, subject.parameters(), kwargs)
    compiled = torch.compile(subject, backend=fop.backend, fullgraph=True)
    for x in inputs():
        compiled(x).pow(2).mean().backward()
    return subject


def train_eager(name: str) -> nn.Module:
    optimizer_class, kwargs = CONFIGS[name]
    reference = model()
    optimizer = optimizer_class(reference.parameters(), **kwargs)
    for x in inputs():
        reference(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return reference


def cache_counters() -> dict[str, int]:
    """Inductor's FX graph cache and AOTAutograd's cache, as counted by torch."""
    counters = torch._dynamo.utils.counters
    return {
        "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }


if __name__ == "__main__":
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        trained = train_compiled(sys.argv[1])
    print(
        json.dumps(
            {
                "counters": cache_counters(),
                "package": fop.__file__,
                "params": [p.detach().tolist() for p in trained.parameters()],
            }
        )
    )
