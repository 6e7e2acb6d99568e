"""Inductor's FX graph cache and AOTAutograd's cache never serve a graph compiled for other optimizers.

Same architecture, different in-backward optimizers: the graphs differ only by the
pass's rewrite, so the pass's ``uuid()`` must separate them, in one process and across
processes sharing a cache directory; with nothing changed, the warm cache is hit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config

import fx_optim_pass as fop
from tests.cache_worker import cache_counters, train_compiled, train_eager
from tests.helpers import assert_params_close, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache directory with both caches on."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        yield tmp_path


def test_same_process_other_optimizer_misses_and_same_one_hits(cache_dir):
    assert_params_close(train_compiled("AdamW").parameters(), train_eager("AdamW").parameters())
    cold = cache_counters()
    assert cold["autograd_miss"] == 1 and cold["autograd_hit"] == 0 and cold["fxgraph_hit"] == 0

    # A second model shares Dynamo's graph; its optimizers get their own compiled variant.
    assert_params_close(train_compiled("Adam").parameters(), train_eager("Adam").parameters())
    variant = cache_counters()
    assert variant["autograd_hit"] == 0 and variant["fxgraph_hit"] == 0

    # Same graph inputs, other optimizer: Adam's coupled weight decay must not reuse AdamW's
    # graph (it may reuse the Adam variant's, which is right): the parameters tell.
    torch._dynamo.reset()  # forget the compiled frames; the caches on disk stay
    assert_params_close(train_compiled("Adam").parameters(), train_eager("Adam").parameters())
    after_adam = cache_counters()

    torch._dynamo.reset()
    assert_params_close(train_compiled("AdamW").parameters(), train_eager("AdamW").parameters())
    warm = cache_counters()
    assert warm["autograd_hit"] == after_adam["autograd_hit"] + 1  # nothing changed: served from the cache
    assert warm["autograd_miss"] == after_adam["autograd_miss"]
    assert warm["fxgraph_miss"] == after_adam["fxgraph_miss"]


def run_fresh_process(name: str, cache_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cache_worker.py"), name],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).resolve().is_relative_to(ROOT), report["package"]  # this checkout's package
    return report


def assert_trained_like_eager(report: dict, name: str) -> None:
    expected = train_eager(name).parameters()
    assert_params_close([torch.tensor(p) for p in report["params"]], expected)


def test_fresh_processes_sharing_a_cache_directory(cache_dir):
    sgd = run_fresh_process("SGD", cache_dir)
    assert sgd["counters"]["autograd_miss"] == 1 and sgd["counters"]["fxgraph_hit"] == 0
    assert_trained_like_eager(sgd, "SGD")

    adamw = run_fresh_process("AdamW", cache_dir)
    assert adamw["counters"]["autograd_hit"] == 0 and adamw["counters"]["fxgraph_hit"] == 0
    assert_trained_like_eager(adamw, "AdamW")

    warm = run_fresh_process("SGD", cache_dir)
    assert warm["counters"]["autograd_hit"] == 1 and warm["counters"]["autograd_miss"] == 0
    assert warm["counters"]["fxgraph_miss"] == 0
    assert_trained_like_eager(warm, "SGD")


def second_backward_outcome(layers: int) -> str:
    """Compile ``layers`` Linear layers, backward twice through one forward (retain_graph=True)."""
    torch._dynamo.reset()  # forget the compiled frames; the caches on disk stay
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(layers)])
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.01})
    loss = torch.compile(model, backend=fop.backend, fullgraph=True)(torch.randn(4, 6)).pow(2).mean()
    loss.backward(retain_graph=True)
    after_first = snapshot(model.parameters())
    try:
        loss.backward()
    except fop.SecondBackwardError:
        assert_params_close(model.parameters(), after_first)
        return "refused"
    assert all(not torch.equal(p, before) for p, before in zip(model.parameters(), after_first))
    return "updated again"


@pytest.mark.parametrize(("layers", "expected"), [(1, "updated again"), (2, "refused")])
def test_retain_graph_check_after_a_cache_hit(cache_dir, layers, expected):
    """Served from AOTAutograd's cache, the pass did not run in this process; a second
    backward still tells a weight the backward reads (refused) from one it does not
    (updated again): the joint graph is traced again. (Inductor's donated buffers, which
    AOTAutograd refuses retain_graph=True with, are off, as tests/test_semantics.py says.)"""
    with functorch_config.patch(donated_buffer=False):
        outcomes = [second_backward_outcome(layers) for _ in range(2)]  # cold, then from the cache
    assert cache_counters()["autograd_hit"] == 1
    assert outcomes == [expected, expected]


def test_float_inputs_are_keyed_by_their_symbol_only_while_we_compile():
    """The backward takes the floats the forward read (``insert_updates._read_floats``).
    Inductor's cache-key pickler has no reducer for them: it pickles a float's whole shape
    environment, whose contents differ from compile to compile or cannot be pickled at all
    (then the backward is never cached). While our compile runs, a float is keyed by its
    symbol alone, as Inductor keys an int; outside, Inductor's pickler is as it was."""
    from torch._inductor.codecache import FxGraphCachePickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fx_optim_pass import _torch_compat

    graph = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    lr, same_symbol_elsewhere = (ShapeEnv().create_unbacked_symfloat() for _ in range(2))
    original = FxGraphCachePickler.__dict__["__init__"]
    with _torch_compat.float_inputs_in_cache_keys():
        key = FxGraphCachePickler(graph).dumps(lr)
        assert FxGraphCachePickler(graph).dumps(same_symbol_elsewhere) == key
        assert str(lr).encode() in key and b"ShapeEnv" not in key
    assert FxGraphCachePickler.__dict__["__init__"] is original
    assert torch.SymFloat not in FxGraphCachePickler(graph).dispatch_table
