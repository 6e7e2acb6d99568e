"""Data-parallel training: gradients averaged over the ranks inside the compiled backward.

The two-rank checks run in one ``torchrun --nproc-per-node 2`` launch on gloo over
loopback (``dist_worker.py``); each test below reads its own case's result. The
in-process checks use a one-rank gloo group.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fx_optim_pass as fop
from fx_optim_pass import _torch_compat
from fx_optim_pass.distributed import collective_error, data_parallel_spec
from fx_optim_pass.passes.all_reduce_grads import ALL_REDUCE_META_KEY
from fx_optim_pass.passes.insert_updates import PASS_META_KEY
from fx_optim_pass.plan import DataParallelSpec, GradientAllReduce, UpdatePlan
from tests.helpers import assert_params_close, snapshot

ROOT = Path(__file__).resolve().parents[1]
WORKER_CASES = [
    "sgd-aot_eager",
    "adamw-aot_eager",
    "adamw-inductor",
    "adamw-inductor-bucketed",
    "eager-optimizer",
    "different-models",
    "ddp-wrapped",
    "sharded-sgd-aot_eager",
    "sharded-adamw-aot_eager",
    "sharded-adamw-inductor",
    "sharded-adamw-inductor-bucketed",
    "rank-dies",  # last: rank 1 leaves
]
LAUNCH_TIMEOUT_S = 150  # generous for a loaded 2-core machine; one launch takes ~30 s here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, str]]:
    """Run every worker case on two gloo ranks; {rank: {case: "ok" or the error}}."""
    out = tmp_path_factory.mktemp("ranks")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(ROOT / "tests" / "dist_worker.py"), str(out), *WORKER_CASES,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as error:  # run() has killed torchrun; its workers die with it
        pytest.fail(f"the two ranks did not finish in {LAUNCH_TIMEOUT_S} s:\n{error.stderr}")
    results = {}
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results (exit {done.returncode}):\n{done.stderr[-4000:]}")
        results[rank] = json.loads(path.read_text())
    return results


def _check(results: dict[int, dict[str, str]], case: str) -> None:
    for rank, outcome in results.items():
        assert outcome.get(case) == "ok", f"rank {rank}, case {case}:\n{outcome.get(case, 'no result')}"


@pytest.mark.parametrize("case", ["sgd-aot_eager", "adamw-aot_eager", "adamw-inductor"])
def test_two_ranks_match_ddp_with_eager_optimizer(two_ranks, case):
    """5 steps, each rank on its own data, from different initializations: parameters equal
    DistributedDataParallel + eager torch.optim's, one all-reduce per parameter in the backward."""
    _check(two_ranks, case)


def test_inductor_buckets_small_all_reduces_and_parity_holds(two_ranks):
    _check(two_ranks, "adamw-inductor-bucketed")


def test_parameters_without_in_backward_optimizer_get_averaged_grad(two_ranks):
    _check(two_ranks, "eager-optimizer")


@pytest.mark.parametrize("case", ["sharded-sgd-aot_eager", "sharded-adamw-aot_eager", "sharded-adamw-inductor"])
def test_sharded_optimizer_state_matches_ddp_and_holds_one_shard_per_rank(two_ranks, case):
    """shard_optimizer_state=True: 5 steps equal DDP + eager torch.optim (and the unsharded run,
    aot_eager) on both ranks; each rank's state tensors have ceil(numel / 2) elements; one
    reduce-scatter and one all-gather per parameter in the backward, no all-reduce."""
    _check(two_ranks, case)


def test_inductor_buckets_reduce_scatters_and_all_gathers_of_sharded_updates_and_parity_holds(two_ranks):
    _check(two_ranks, "sharded-adamw-inductor-bucketed")


def test_ranks_with_different_models_are_refused_before_any_change(two_ranks):
    _check(two_ranks, "different-models")


def test_model_wrapped_in_ddp_is_refused(two_ranks):
    _check(two_ranks, "ddp-wrapped")


def test_a_rank_that_dies_mid_training_does_not_hang_the_others(two_ranks):
    """Rank 0's next backward fails within seconds with a CollectiveError naming the group,
    rank 0, the dead rank 1 (found by a roll call in the group's store) and the process
    group's timeout, chained to gloo's error."""
    _check(two_ranks, "rank-dies")


def test_uninitialized_process_group_is_refused():
    assert not dist.is_initialized()
    model = nn.Linear(4, 2)
    before = snapshot(model.parameters())
    with pytest.raises(fop.DataParallelSetupError, match=r"init_process_group"):
        fop.data_parallel(model)
    with pytest.raises(fop.DataParallelSetupError, match=r"init_process_group"):
        fop.make_backend(process_group=object())
    assert_params_close(model.parameters(), before)


def test_cache_key_names_the_process_group():
    def plan(group: str, size: int) -> UpdatePlan:
        return UpdatePlan((), 1, GradientAllReduce(DataParallelSpec(group, size), ((0, "w"),)))

    keys = {plan("0", 2).cache_key(), plan("1", 2).cache_key(), plan("0", 4).cache_key(), UpdatePlan((), 1).cache_key()}
    assert len(keys) == 4


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-rank gloo group in this process (collectives run, and average over one rank)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_each_gradient_is_all_reduced_right_before_its_update_in_the_backward(one_rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = deepcopy(model)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
    graphs: dict[str, torch.fx.GraphModule] = {}
    backend = fop.data_parallel(model, compiler="aot_eager", observer=lambda kind, gm: graphs.setdefault(kind, gm))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(4, 6)
    compiled(x).pow(2).mean().backward()

    nodes = list(graphs["backward"].graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    for name, _ in model.named_parameters():
        reduce_nodes = [n for n in nodes if n.meta.get(ALL_REDUCE_META_KEY, ("",))[0] == name]
        # all but the per-step scalars moved to the start (they read no gradient: hoist_step_scalars)
        tags = {n: n.meta.get(PASS_META_KEY, ("", "")) for n in nodes}
        update_nodes = [n for n, (param, role, *_) in tags.items() if param == name and role != "step_scalars"]
        assert [n.meta[ALL_REDUCE_META_KEY][1] for n in reduce_nodes] == ["all_reduce", "wait"], name
        assert update_nodes, name
        # the update reads the waited (averaged) gradient, never the local one
        assert max(map(position.__getitem__, reduce_nodes)) < min(map(position.__getitem__, update_nodes)), name
    assert not any(ALL_REDUCE_META_KEY in n.meta for n in graphs["forward"].graph.nodes)

    # one rank: the average is the gradient itself, so this is plain SGD
    reference(x).pow(2).mean().backward()
    reference_opt.step()
    assert_params_close(model.parameters(), reference.parameters())


def _three_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    return model


def test_all_reduces_are_in_flight_while_earlier_layers_gradients_are_computed(one_rank):
    model = _three_layers()
    graphs: dict[str, torch.fx.GraphModule] = {}
    backend = fop.data_parallel(model, compiler="aot_eager", observer=lambda kind, gm: graphs.setdefault(kind, gm))
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(4, 6)).sum().backward()

    nodes = list(graphs["backward"].graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    overlapped = {}
    for wait in (n for n in nodes if n.meta.get(ALL_REDUCE_META_KEY, ("", ""))[1] == "wait"):
        issue = wait.args[0]
        between = nodes[position[issue] + 1 : position[wait]]
        overlapped[wait.meta[ALL_REDUCE_META_KEY][0]] = [
            n.name for n in between if n.target is torch.ops.aten.mm.default
        ]
    # The last layer's weight gradient is all-reduced while the two earlier layers' gradients are
    # computed (grad input, then weight gradient: two matmuls each).
    assert len(overlapped["4.weight"]) >= 2, overlapped
    # The first layer's gradients come last: nothing is left to overlap with.
    assert overlapped["0.weight"] == [] and overlapped["0.bias"] == [], overlapped


def test_inductor_keeps_matmuls_between_an_all_reduce_and_its_wait(one_rank):
    model = _three_layers()
    backend = fop.data_parallel(model, bucket_cap_mb=None)  # one all-reduce per gradient
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    code = _torch_compat.run_and_get_code(lambda: compiled(torch.randn(4, 6)).sum().backward())[-1]

    lines = [line.strip() for line in code.splitlines()]
    issued = {
        m.group(1): i for i, line in enumerate(lines) if (m := re.match(r".*all_reduce_\.default\((.*), 'avg'", line))
    }
    waited = {
        m.group(1): i for i, line in enumerate(lines) if (m := re.match(r".*wait_tensor\.default\((.*)\)$", line))
    }
    assert len(issued) == 6 and issued.keys() == waited.keys(), (issued, waited)
    matmuls_in_flight = {
        buffer: sum("extern_kernels.mm(" in line for line in lines[issued[buffer] : waited[buffer]])
        for buffer in issued
    }
    assert max(matmuls_in_flight.values()) >= 2, matmuls_in_flight


def test_sharded_update_runs_between_reduce_scatter_and_all_gather_in_the_backward(one_rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    graphs: dict[str, torch.fx.GraphModule] = {}
    backend = fop.data_parallel(
        model, compiler="aot_eager", shard_optimizer_state=True, observer=lambda kind, gm: graphs.setdefault(kind, gm)
    )
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(4, 6)).sum().backward()

    nodes = list(graphs["backward"].graph.nodes)
    for name, _ in model.named_parameters():
        roles = [n.meta[PASS_META_KEY][1] for n in nodes if n.meta.get(PASS_META_KEY, ("",))[0] == name]
        collectives = [
            str(n.target) for n in nodes if n.meta.get(PASS_META_KEY, ("",))[0] == name and "c10d" in str(n.target)
        ]
        first = {role: roles.index(role) for role in ("scatter", "update", "gather", "write_param")}
        assert first["scatter"] < first["update"] < first["gather"] < first["write_param"], (name, roles)
        assert max(i for i, r in enumerate(roles) if r == "update") < first["gather"], (name, roles)
        assert [c.split(".")[1] for c in collectives] == [
            "reduce_scatter_tensor", "wait_tensor", "all_gather_into_tensor", "wait_tensor"
        ], (name, collectives)  # fmt: skip
    assert not any(ALL_REDUCE_META_KEY in n.meta for n in nodes)
    state = fop.get_in_backward_optimizers(model)[0].state[model[0].weight]
    assert state["exp_avg"].shape == (48,)  # one rank: its shard is the whole flattened parameter


def test_sharding_refuses_an_optimizer_that_needs_the_whole_parameter(one_rank):
    model = nn.Linear(4, 2, bias=False)
    fop.apply_optimizer_in_backward(torch.optim.Muon, model.parameters(), {"lr": 0.01})  # orthogonalizes the matrix
    before = snapshot(model.parameters())
    with pytest.raises(fop.DataParallelSetupError, match=r"Muon on parameter 'weight' cannot run on a shard"):
        fop.data_parallel(model, compiler="aot_eager", shard_optimizer_state=True)
    assert_params_close(model.parameters(), before)


def test_sharding_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match=r"shard_optimizer_state=True .* pass process_group="):
        fop.make_backend(shard_optimizer_state=True)


def test_full_parameter_state_loaded_into_a_sharded_run_is_refused_before_any_update(one_rank):
    torch.manual_seed(0)
    model = nn.Linear(6, 8)
    unsharded = deepcopy(model)
    eager_opt = torch.optim.AdamW([unsharded.weight], lr=0.1)  # one optimizer per parameter, as in-backward
    unsharded(torch.randn(2, 6)).sum().backward()
    eager_opt.step()
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    backend = fop.data_parallel(model, compiler="aot_eager", shard_optimizer_state=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(torch.randn(2, 6)).sum().backward()  # compiled, with sharded state
    fop.get_in_backward_optimizers(model)[0].load_state_dict(eager_opt.state_dict())  # a full-parameter checkpoint
    before = snapshot(model.parameters())
    with pytest.raises(
        fop.ShardedStateError, match=r"'exp_avg' of parameter 'weight' has shape \(8, 6\).* 48 elements"
    ):
        compiled(torch.randn(2, 6)).sum().backward()
    assert_params_close(model.parameters(), before)


def test_a_gradient_hook_on_a_parameter_of_a_sharded_run_is_refused_before_any_update(one_rank):
    """A user's gradient hook sends its parameter out of the graph's updates, to step eagerly
    (test_semantics.py): on its full gradient, where this rank keeps only a shard of its state."""
    torch.manual_seed(0)
    model = nn.Linear(6, 8)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 0.1})
    backend = fop.data_parallel(model, compiler="aot_eager", shard_optimizer_state=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(torch.randn(2, 6)).sum().backward()
    model.weight.register_hook(lambda grad: grad.clamp(-1, 1))
    before = snapshot(model.parameters())
    with pytest.raises(fop.DataParallelSetupError, match=r"parameter 'weight' has a gradient hook"):
        compiled(torch.randn(2, 6)).sum().backward()
    assert_params_close(model.parameters(), before)


def test_collective_failures_name_this_rank_and_the_peer_where_the_backend_does():
    spec = DataParallelSpec("3", 4, rank=2)
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.7]:6067. Check logs.")
    error = collective_error(gloo, spec)
    assert error is not None
    assert "failed on rank 2 of process group '3' (4 ranks; global rank 2): Connection closed by peer" in str(error)
    nccl = torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1.")
    assert "The backend names rank 1 as the peer" in str(collective_error(nccl, spec))
    assert collective_error(ValueError("Connection closed"), spec) is None  # not a backend error
    assert collective_error(RuntimeError("shape mismatch in mm"), spec) is None


def test_collective_failure_names_the_ranks_that_do_not_answer_in_the_store(one_rank):
    # A one-rank group, told it has three ranks: ranks 1 and 2 never write their keys.
    spec = replace(data_parallel_spec(None), world_size=3)
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6067")
    error = collective_error(gloo, spec)
    assert error is not None
    assert "Ranks 1, 2 did not answer within 2 s (died or hung)." in str(error), error
