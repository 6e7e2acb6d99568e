"""The benchmark script runs end to end and reports every peer (figures only, no timed assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run
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
