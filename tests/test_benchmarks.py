"""The benchmark script runs end to end and reports every peer (figures only, no timed assertions)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from benchmarks import codegen_ab, floors, report, run, step_profile
from benchmarks.peers import PEERS, build_peer
from fx_optim_pass import _torch_compat
from fx_optim_pass import models as fop_models
from fx_optim_pass.measure import peak_step_memory


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
            "--timing-s",  # rounds of a few ms: more of them, up to half a second
            "0.5",
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
        assert peer["peak_bytes"] > 0 and peer["median_step_s"] > 0
        assert peer["compile_s"] >= peer["first_steps_s"][0] > 0 and len(peer["first_steps_s"]) == 3
        assert len(peer["round_medians_s"]) == config["rounds"]  # one median per round (of one step)
    assert 1 < config["rounds"] <= run.MAX_ROUNDS
    assert config["peers"]["fx_optim"]["recompiles"] == 0
    assert config["floor"]["memory_bytes"] > config["floor"]["largest_gradient_bytes"] > 0
    table = (tmp_path / "quick_cpu.md").read_text()
    assert table.count("| tiny-mlp |") == 2
    assert f"at least 1 and more until 0.5 s of timing (tiny-mlp/{optimizer} {config['rounds']})" in table


def test_compile_time_counts_a_recompile_in_the_warm_up_steps() -> None:
    """PyTorch's compiled optimizer compiles its SGD step again in the second step, once the
    momentum buffers exist: that is compile time too. Warm-up steps at or below a steady
    step add nothing."""
    assert run.compile_seconds([20.0, 3.5, 0.01], median_step=0.02) == pytest.approx(23.48)
    assert run.compile_seconds([20.0, 0.01, 0.02], median_step=0.02) == 20.0


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


def test_backward_call_floor_counts_what_must_cross_the_call() -> None:
    def backward(saved: torch.Tensor, other: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        kept = saved.relu()  # independent of the call: before or after it, saved or kept crosses it
        total = other.sum()  # a reduction: run before the call, only its result crosses
        grad_input = torch.mm(grad, weight)  # the call
        return grad_input * kept * total + grad_input * saved.t()  # saved.t(): the same storage

    no_inputs = make_fx(lambda: torch.zeros(1), tracing_mode="fake")()
    graph = make_fx(backward, tracing_mode="fake")(
        torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 8), torch.randn(8, 64)
    )
    call_io = (64 * 8 + 8 * 64 + 64 * 64) * 4  # grad, weight, grad_input
    crossing = 64 * 64 * 4 + 4  # saved (or kept), and the sum
    assert floors.backward_call_bytes(no_inputs, graph) == call_io + crossing
    # The step's inputs (here, the weight) exist before the step: not counted.
    forward = make_fx(lambda weight: weight * 1, tracing_mode="fake")(torch.randn(8, 64))
    (forward_weight,) = forward.graph.find_nodes(op="placeholder")
    backward_weight = graph.graph.find_nodes(op="placeholder")[3]
    backward_weight.meta["val"] = forward_weight.meta["val"]
    assert floors.backward_call_bytes(forward, graph) == call_io + crossing - 8 * 64 * 4
    assert floors.memory_floor(0, nn.Linear(1, 1), call_bytes=123) == 123


def test_backward_call_floor_is_below_the_measured_peak(device: str) -> None:
    # A floor above what a real step reaches would be wrong, not strict: fx_optim's own step on a
    # convnet whose activation gradients (not in the saved-activations floor) set its peak.
    torch.manual_seed(0)
    model = run.WithLoss(fop_models.convnet(channels=(8, 16)), nn.functional.cross_entropy).to(device)
    inputs = (torch.randn(8, 3, 16, 16, device=device), torch.randint(10, (8,), device=device))
    peer = build_peer("fx_optim", model, inputs, *run.OPTIMIZERS["sgd"])
    peer.step()
    parts = floors.memory_floor_parts(peer.graphs, model)
    saved, call, floor = parts["saved_activation_bytes"], parts["backward_call_bytes"], parts["memory_bytes"]
    assert saved is not None and call is not None and floor is not None
    assert call > saved + floors.largest_gradient_bytes(model)  # the moment the old floor missed
    assert floor == call
    assert peak_step_memory(peer.step, device) >= floor


def test_step_profile_counts_the_generated_kernels_of_compiled_peers_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = ["--model", "tiny-mlp", "--optimizer", "sgd", "--device", "cpu"]
    step_profile.main(
        [*workload, "--peers", "eager_foreach", "fx_optim", "--steps", "2", "--lines", "50", "--trace", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    eager, fx_optim = printed.split("\nfx_optim: ")
    assert "eager_foreach: median step" in eager and "median step" in fx_optim
    assert "cpp_fused_*" in fx_optim and "cpp_fused_*" not in eager
    assert "aten::_foreach_" in eager and "aten::_foreach_" not in fx_optim
    for name in ("eager_foreach", "fx_optim"):
        trace = json.loads((tmp_path / f"tiny-mlp_sgd_{name}.json").read_text())
        assert trace["traceEvents"]


def test_codegen_ab_times_both_compilations_of_the_no_optimizer_step(capsys: pytest.CaptureFixture[str]) -> None:
    codegen_ab.main(["--model", "tiny-mlp", "--rounds", "3", "--steps-per-round", "2"])
    printed = capsys.readouterr().out
    assert "tiny-mlp: forward+backward, no optimizer, 3 rounds x 2 steps" in printed
    assert "fx_optim backend: median step" in printed and "stock Inductor: median step" in printed
    assert "rounds faster)" in printed.splitlines()[-1] and "of 3 rounds" in printed


def test_codegen_ab_times_fx_optim_with_and_without_the_update_barrier_fix(capsys: pytest.CaptureFixture[str]) -> None:
    fix = _torch_compat.independent_updates_nowait
    codegen_ab.main(["--model", "tiny-mlp", "--update-barriers", "--rounds", "3", "--steps-per-round", "2"])
    printed = capsys.readouterr().out
    assert "tiny-mlp: fx_optim's step (adamw), 3 rounds x 2 steps" in printed
    assert "with the fix: median step" in printed and "without: median step" in printed
    assert "with the fix - without, per round: median" in printed and "of 3 rounds faster)" in printed
    assert _torch_compat.independent_updates_nowait is fix  # put back once the second step compiled


def test_codegen_ab_times_and_measures_fx_optim_with_and_without_the_peak_estimate_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fix = _torch_compat.peak_estimate_without_removed_buffers
    codegen_ab.main(["--model", "tiny-mlp", "--peak-estimate", "--rounds", "3", "--steps-per-round", "2"])
    printed = capsys.readouterr().out
    assert "tiny-mlp: fx_optim's step (adamw), 3 rounds x 2 steps" in printed
    assert re.search(r"with the fix: median step [0-9.]+ ms, peak [0-9.]+ MiB", printed)
    assert re.search(r"without: median step [0-9.]+ ms, peak [0-9.]+ MiB", printed)
    assert _torch_compat.peak_estimate_without_removed_buffers is fix


def test_per_round_ratio_range_pairs_each_round_of_fx_optim_with_the_same_round_of_the_fastest_peer() -> None:
    """Drift between rounds cancels: fx_optim is 5% slower than eager fused in two of three
    rounds, though its median over all rounds is below eager fused's."""
    config = {
        "peers": {
            "fx_optim": {"median_step_s": 1.05, "round_medians_s": [1.05, 2.1, 1.05]},
            "eager_fused": {"median_step_s": 1.1, "round_medians_s": [1.0, 2.0, 1.1]},
            "compiled_opt": {"median_step_s": 1.2, "round_medians_s": [0.5, 0.5, 0.5]},  # not the fastest by median
            "no_optimizer": {"median_step_s": 0.5, "round_medians_s": [0.5, 0.5, 0.5]},  # not a peer
        }
    }
    bounds = report.round_ratio_range(config)
    assert bounds == (pytest.approx(1.05 / 1.1), pytest.approx(1.05))
    del config["peers"]["eager_fused"]["round_medians_s"], config["peers"]["compiled_opt"]["round_medians_s"]
    assert report.round_ratio_range(config) is None  # results written before rounds were kept


def test_per_round_optimizer_cost_subtracts_the_same_rounds_no_optimizer_step() -> None:
    """A slow second round (every step 1 ms slower) moves the difference of medians over all
    rounds, not the difference within each round."""
    config = {
        "floor": {"update_s": 0.5e-3},
        "peers": {
            "fx_optim": {"median_step_s": 8.6e-3, "round_medians_s": [8.6e-3, 9.6e-3, 8.4e-3]},
            "no_optimizer": {"median_step_s": 7.9e-3, "round_medians_s": [7.9e-3, 8.9e-3, 7.9e-3]},
        },
    }
    assert report.round_cost_range(config) == (pytest.approx(1.0), pytest.approx(1.4))
    del config["peers"]["no_optimizer"]["round_medians_s"]
    assert report.round_cost_range(config) is None  # results written before rounds were kept
