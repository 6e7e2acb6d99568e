"""The benchmark script runs end to end and reports every peer (figures only, no timed assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from benchmarks import floors, run
from benchmarks.peers import PEERS


@pytest.mark.parametrize("optimizer", ["sgd"])
def test_benchmark_reports_every_peer_with_sane_fields(tmp_path: Path, optimizer: str) -> None:
    # aot_eager would not exercise Inductor; a 2-layer MLP keeps Inductor's compile short.
    run.main(
        [
            "--quick",
            "--models",
            "tiny-mlp",
            "--optimizers",
            optimizer,
            "--peers",
            "eager_foreach",
            "fx_optim",
            "--rounds",
            "1",
            "--steps-per-round",
            "1",
            "--recompile-steps",
            "2",
            "--scale",
            "--out",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "quick_cpu.json").read_text())
    (config,) = results["configs"]
    assert set(config["peers"]) == {"eager_foreach", "fx_optim"}
    for name, peer in config["peers"].items():
        assert "error" not in peer, (name, peer)
        assert peer["peak_bytes"] > 0 and peer["median_step_s"] > 0 and peer["first_call_s"] > 0
    assert config["peers"]["fx_optim"]["recompiles"] == 0
    assert config["floor"]["memory_bytes"] > config["floor"]["largest_gradient_bytes"] > 0
    assert (tmp_path / "quick_cpu.md").read_text().count("| tiny-mlp |") == 2


def test_every_peer_is_described() -> None:
    assert {"fx_optim", "no_optimizer", "compiled_opt", "compiled_autograd", "torch_hooks"} <= set(PEERS)


def test_saved_activations_count_each_storage_once_and_inputs_never() -> None:
    def forward(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = (x @ weight).split(4, dim=1)  # three views of one projection
        return q, k, v, weight.t(), x.relu()  # weight.t(): a view of an input, free

    graph = make_fx(forward, tracing_mode="fake")(torch.randn(2, 8), torch.randn(8, 12))
    assert floors.saved_activation_bytes(graph) == (2 * 12 + 2 * 8) * 4


def test_memory_floor_counts_a_tied_weights_partial_gradients_together() -> None:
    untied = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100, bias=False))
    tied = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100, bias=False))
    tied[1].weight = tied[0].weight
    gradient = 100 * 8 * 4
    assert floors.memory_floor(10, untied) == 10 + gradient
    # The second partial gradient arrives when the activations may be freed; both coexist.
    assert floors.memory_floor(10, tied) == 2 * gradient
    assert floors.memory_floor(10 * gradient, tied) == 11 * gradient
