"""Data-parallel training: one model replica per rank, gradients averaged inside the compiled backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fx_optim_pass.distributed import (
    broadcast_from_first_rank,
    check_not_in_ddp,
    check_same_parameters,
    check_shardable_optimizers,
    resolve_process_group,
)
from fx_optim_pass.dynamo_backend import DEFAULT_BUCKET_CAP_MB, Compiler, GraphObserver, make_backend

__all__ = ["data_parallel"]


def data_parallel(
    model: torch.nn.Module,
    process_group: Any = None,
    *,
    compiler: Compiler = "inductor",
    observer: GraphObserver | None = None,
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
    shard_optimizer_state: bool = False,
) -> Callable[..., Any]:
    """Set ``model`` up for data-parallel training and return the backend to compile it with.

    Checks, before changing anything, that ``torch.distributed`` is initialized, that
    ``model`` is not also wrapped in ``DistributedDataParallel`` and that every rank of
    ``process_group`` (default: all ranks) built a model with the same parameter and
    buffer names, shapes and dtypes; then broadcasts rank 0's parameters and buffers.
    Every rank must call it (it runs collectives). The returned backend averages each
    parameter's gradient over the group inside the compiled backward, right before the
    parameter's in-backward optimizer updates it; parameters without one get the
    averaged gradient in ``.grad``, as under DDP. With Inductor, gradients are all-reduced
    in buckets of up to ``bucket_cap_mb`` MiB (Inductor's own bucketing pass; ``None``:
    one collective per gradient); a bucket's updates wait for its last gradient.

    With ``shard_optimizer_state=True`` each rank keeps optimizer state only for its
    ``1/world_size`` shard of each parameter that has an in-backward optimizer (ZeRO-2
    style, inside the compiled backward): the flattened gradient is reduce-scattered, this
    rank's optimizers update its shard, and the shards are all-gathered into the parameter.
    Parameters stay whole and equal on every rank; ``optimizer.state[p]`` (and so
    ``state_dict()``) holds this rank's flat shard of each state tensor, so save and load
    it per rank. Only elementwise ``torch.optim`` optimizers (SGD, Adam, AdamW, ...) can.

    Example (``torchrun --nproc-per-node 2 train.py``)::

        import torch, torch.distributed as dist, fx_optim_pass as fop

        dist.init_process_group("gloo")
        model = torch.nn.Linear(4, 2)
        fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 1e-3})
        compiled = torch.compile(model, backend=fop.data_parallel(model), fullgraph=True)
        compiled(torch.randn(3, 4)).sum().backward()   # averaged over ranks, then AdamW
    """
    group = resolve_process_group(process_group)
    backend = make_backend(
        compiler=compiler,
        observer=observer,
        process_group=group,
        bucket_cap_mb=bucket_cap_mb,
        shard_optimizer_state=shard_optimizer_state,
    )
    check_not_in_ddp(model)
    check_same_parameters(model, group)
    if shard_optimizer_state:
        check_shardable_optimizers(model)
    broadcast_from_first_rank(model, group)
    return backend
