"""One rank of the data-parallel tests, started by ``torchrun`` from ``test_data_parallel.py``.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT_DIR CASE [CASE ...]

Runs each named case and writes ``OUT_DIR/rank<r>.json``: {case: "ok" or the error}.
Every case is run by every rank; a failing case is recorded and the next one runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from copy import deepcopy
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fx_optim_pass as fop
from fx_optim_pass import _torch_compat

STEPS = 5
OUT_DIR = "."  # set from the command line
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}


def model_of_rank(rank: int, hidden: int = 16) -> nn.Module:
    """A different initialization on every rank: data_parallel and DDP must both start from rank 0's."""
    torch.manual_seed(100 + rank)
    return nn.Sequential(nn.Linear(6, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, 3))


def batches(rank: int) -> list[torch.Tensor]:
    torch.manual_seed(1000 + rank)  # each rank trains on its own data
    return [torch.randn(5, 6) for _ in range(STEPS)]


def count_collectives(graphs: dict[str, list[torch.fx.GraphModule]], kind: str, op: str = "all_reduce") -> int:
    return sum(
        1
        for gm in graphs.get(kind, [])
        for node in gm.graph.nodes
        if node.op == "call_function" and op in str(node.target)
    )


def parity_with_ddp(optimizer: str, compiler: str) -> None:
    """5 steps of data_parallel + in-backward optimizer == DDP + eager torch.optim, on every rank
    (no bucketing: one all-reduce per gradient)."""
    rank = dist.get_rank()
    optimizer_class, kwargs = OPTIMIZERS[optimizer]
    subject = model_of_rank(rank)
    reference = DistributedDataParallel(deepcopy(subject))
    reference_opt = optimizer_class(reference.parameters(), **kwargs)
    fop.apply_optimizer_in_backward(optimizer_class, subject.parameters(), kwargs)
    graphs: dict[str, list[torch.fx.GraphModule]] = {}
    backend = fop.data_parallel(
        subject,
        compiler=compiler,
        observer=lambda kind, gm: graphs.setdefault(kind, []).append(gm),
        bucket_cap_mb=None,
    )
    compiled = torch.compile(subject, backend=backend, fullgraph=True)
    for x in batches(rank):
        reference(x).pow(2).mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        compiled(x).pow(2).mean().backward()
        assert all(p.grad is None for p in subject.parameters()), "a gradient was materialized"
    for (name, actual), expected in zip(subject.named_parameters(), reference.module.parameters()):
        torch.testing.assert_close(actual, expected, msg=lambda m, name=name: f"{name} on rank {rank}: {m}")
    # One collective per parameter, all in the compiled backward, none in the forward.
    num_params = len(list(subject.parameters()))
    assert count_collectives(graphs, "backward") == num_params, count_collectives(graphs, "backward")
    assert count_collectives(graphs, "forward") == 0


def train_bucketed_against_ddp(shard: bool) -> tuple[torch.nn.Module, str]:
    """AdamW through Inductor with 25 MiB buckets, checked against DDP + eager AdamW;
    returns the model and the generated code of its first backward."""
    rank = dist.get_rank()
    subject = model_of_rank(rank)
    reference = DistributedDataParallel(deepcopy(subject))
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, subject.parameters(), {"lr": 0.01})
    compiled = torch.compile(subject, backend=fop.data_parallel(subject, shard_optimizer_state=shard), fullgraph=True)
    codes: list[str] = []
    for step, x in enumerate(batches(rank)):
        reference(x).pow(2).mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        if step == 0:
            codes = _torch_compat.run_and_get_code(lambda x=x: compiled(x).pow(2).mean().backward())
        else:
            compiled(x).pow(2).mean().backward()
    for actual, expected in zip(subject.parameters(), reference.module.parameters()):
        torch.testing.assert_close(actual, expected)
    return subject, codes[-1]


def bucketed_parity_with_ddp() -> None:
    """Inductor's bucketing merges the small all-reduces; parameters still match DDP's."""
    subject, backward_code = train_bucketed_against_ddp(shard=False)
    collectives = backward_code.count("_c10d_functional.all_reduce_.default(")
    assert 1 <= collectives < len(list(subject.parameters())), f"{collectives} all-reduces in the backward"


def eager_optimizer_gets_averaged_grad() -> None:
    """Parameters without an in-backward optimizer get DDP's averaged .grad for an ordinary step."""
    rank = dist.get_rank()
    subject = model_of_rank(rank)
    reference = DistributedDataParallel(deepcopy(subject))
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    fop.apply_optimizer_in_backward(torch.optim.SGD, subject[0].parameters(), {"lr": 0.1})
    rest = [p for p in subject.parameters() if not hasattr(p, "_in_backward_optimizers")]
    rest_opt = torch.optim.SGD(rest, lr=0.1)
    compiled = torch.compile(subject, backend=fop.data_parallel(subject, compiler="aot_eager"), fullgraph=True)
    for x in batches(rank):
        reference(x).pow(2).mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        compiled(x).pow(2).mean().backward()
        rest_opt.step()
        rest_opt.zero_grad()
    for actual, expected in zip(subject.parameters(), reference.module.parameters()):
        torch.testing.assert_close(actual, expected)


def different_models_refused() -> None:
    rank = dist.get_rank()
    model = model_of_rank(rank, hidden=16 + rank)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        fop.data_parallel(model, compiler="aot_eager")
    except fop.DataParallelSetupError as error:
        message = str(error)
        assert "'0.weight' is shape (16, 6)" in message and "(17, 6)" in message and "rank 1" in message, message
    else:
        raise AssertionError("no error for ranks with different models")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "parameters changed"


def ddp_wrapped_refused() -> None:
    wrapped = DistributedDataParallel(model_of_rank(dist.get_rank()))
    try:
        fop.data_parallel(wrapped, compiler="aot_eager")
    except fop.DataParallelSetupError as error:
        assert "DistributedDataParallel" in str(error), error
    else:
        raise AssertionError("data_parallel accepted a DDP-wrapped model")


def surviving_rank_fails_fast(results: dict[str, str]) -> None:
    """Rank 1 leaves mid-training; rank 0's next compiled backward must fail, not hang.

    Runs last: rank 1 writes its results and exits with success (so torchrun does not
    tear rank 0 down first); rank 0 then meets a closed connection in its all-reduce.
    """
    rank = dist.get_rank()
    model = model_of_rank(0)
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    compiled = torch.compile(model, backend=fop.data_parallel(model, compiler="aot_eager"), fullgraph=True)
    compiled(torch.randn(5, 6)).sum().backward()  # one good step together
    dist.barrier()
    if rank == 1:
        results["rank-dies"] = "ok"
        write_results(results)
        os._exit(0)
    time.sleep(1.0)  # let rank 1's sockets close
    start = time.monotonic()
    try:
        compiled(torch.randn(5, 6)).sum().backward()
    except fop.CollectiveError as error:
        elapsed = time.monotonic() - start
        assert elapsed < 20, f"the collective failed only after {elapsed:.0f} s"
        message = str(error)
        assert "failed on rank 0 of process group" in message and "(2 ranks; global rank 0)" in message, message
        assert "timeout (0:00:30;" in message, message  # init_process_group(timeout=30 s) below
        assert "Rank 1 did not answer within 2 s (died or hung)" in message, message
        assert error.__cause__ is not None, "the backend's own error is not chained"
        print(f"rank 0 got: {message}", file=sys.stderr)
    else:
        raise AssertionError("a backward whose peer is gone completed")


def state_numels(optimizers: list[torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> list[int]:
    """The element counts of every non-scalar state tensor of ``params`` (``step`` is a scalar)."""
    return [
        v.numel()
        for opt in optimizers
        for p in params
        for v in opt.state[p].values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]


def sharded_parity(optimizer: str, compiler: str, against_unsharded: bool) -> None:
    """shard_optimizer_state=True: 5 steps give DDP + eager torch.optim's parameters on every
    rank (and, with ``against_unsharded``, the unsharded data_parallel run's), while each rank
    holds 1/world_size of the optimizer state; one reduce-scatter and one all-gather per
    parameter in the backward, no all-reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer_class, kwargs = OPTIMIZERS[optimizer]
    subject = model_of_rank(rank)
    reference = DistributedDataParallel(deepcopy(subject))
    reference_opt = optimizer_class(reference.parameters(), **kwargs)
    fop.apply_optimizer_in_backward(optimizer_class, subject.parameters(), kwargs)
    graphs: dict[str, list[torch.fx.GraphModule]] = {}
    backend = fop.data_parallel(
        subject,
        compiler=compiler,
        observer=lambda kind, gm: graphs.setdefault(kind, []).append(gm),
        bucket_cap_mb=None,  # one reduce-scatter and all-gather per parameter (bucketed: its own case)
        shard_optimizer_state=True,
    )
    compiled = torch.compile(subject, backend=backend, fullgraph=True)
    models = [compiled]
    unsharded: nn.Module | None = None
    if against_unsharded:
        unsharded = deepcopy(subject)
        fop.apply_optimizer_in_backward(optimizer_class, unsharded.parameters(), kwargs)
        unsharded_backend = fop.data_parallel(unsharded, compiler=compiler, bucket_cap_mb=None)
        models.append(torch.compile(unsharded, backend=unsharded_backend, fullgraph=True))
    for x in batches(rank):
        reference(x).pow(2).mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        for model in models:
            model(x).pow(2).mean().backward()
        assert all(p.grad is None for p in subject.parameters()), "a gradient was materialized"
    expected_models = [reference.module] + ([unsharded] if unsharded is not None else [])
    for expected_model in expected_models:
        for (name, actual), expected in zip(subject.named_parameters(), expected_model.parameters()):
            torch.testing.assert_close(actual, expected, msg=lambda m, name=name: f"{name} on rank {rank}: {m}")

    params = list(subject.parameters())
    sharded = state_numels(fop.get_in_backward_optimizers(subject), params)
    full = state_numels([reference_opt], list(reference.module.parameters()))
    per_tensor = [-(-n // world) for n in full]  # this rank's shard, the flattened size padded to a multiple
    assert sharded == per_tensor, f"state element counts {sharded}, expected {per_tensor}"
    assert sum(sharded) * world - sum(full) <= world * len(full), (sum(sharded), sum(full))  # padding only
    assert count_collectives(graphs, "backward", "reduce_scatter") == len(params)
    assert count_collectives(graphs, "backward", "all_gather") == len(params)
    assert count_collectives(graphs, "backward") == 0
    assert count_collectives(graphs, "forward", "_c10d") == 0


def sharded_bucketed_parity() -> None:
    """Sharded, with Inductor's bucketing (25 MiB): fewer reduce-scatters and all-gathers
    than parameters in the generated backward; parameters still match DDP's."""
    subject, backward_code = train_bucketed_against_ddp(shard=True)
    num_params = len(list(subject.parameters()))
    for op in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        count = backward_code.count(f"_c10d_functional.{op}")
        assert 1 <= count < num_params, f"{count} {op} in the backward"


def write_results(results: dict[str, str]) -> None:
    Path(OUT_DIR, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


CASES: dict[str, Callable[[], None]] = {
    "sgd-aot_eager": lambda: parity_with_ddp("sgd", "aot_eager"),
    "adamw-aot_eager": lambda: parity_with_ddp("adamw", "aot_eager"),
    "adamw-inductor": lambda: parity_with_ddp("adamw", "inductor"),
    "adamw-inductor-bucketed": bucketed_parity_with_ddp,
    "eager-optimizer": eager_optimizer_gets_averaged_grad,
    "different-models": different_models_refused,
    "ddp-wrapped": ddp_wrapped_refused,
    "sharded-sgd-aot_eager": lambda: sharded_parity("sgd", "aot_eager", against_unsharded=True),
    "sharded-adamw-aot_eager": lambda: sharded_parity("adamw", "aot_eager", against_unsharded=True),
    "sharded-adamw-inductor": lambda: sharded_parity("adamw", "inductor", against_unsharded=False),
    "sharded-adamw-inductor-bucketed": sharded_bucketed_parity,
}


def main(cases: list[str]) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    results: dict[str, str] = {}
    for case in cases:
        torch._dynamo.reset()
        if case == "rank-dies":  # must be last: rank 1 exits inside it
            try:
                surviving_rank_fails_fast(results)
                results[case] = "ok"
            except Exception:
                results[case] = traceback.format_exc()
            write_results(results)
            os._exit(0)  # the group is broken: no barrier, no destroy
        try:
            CASES[case]()
            results[case] = "ok"
        except Exception:
            results[case] = traceback.format_exc()
        dist.barrier()
    write_results(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    OUT_DIR = sys.argv[1]
    main(sys.argv[2:])
