"""Sharded optimizer state: each rank updates only its shard of each parameter (ZeRO-2 style).

``insert_optimizer_updates`` inlines these two traced pieces around a sharded parameter's
optimizer steps, so the steps run on flat shards with shard-shaped state.

Before (joint graph, AdamW on ``0.weight``, 2 ranks, this is rank 1)::

    mm_1 = aten.mm(permute_1, primals_3)                # gradient of 0.weight, shape (16, 6)
    adamw_update__0_weight = ...(primals_1, mm_1, ...)  # the whole parameter, state (16, 6)

After (abridged; node names from the parameter, as printed)::

    mm_1 = aten.mm(permute_1, primals_3)
    scatter__0_weight = aten.view(mm_1, [-1])
    scatter__0_weight_1 = _c10d_functional.reduce_scatter_tensor(scatter__0_weight, "avg", 2, "0")
    scatter__0_weight_2 = _c10d_functional.wait_tensor(scatter__0_weight_1)   # averaged grad shard, (48,)
    scatter__0_weight_3 = aten.view(primals_1, [-1])
    scatter__0_weight_5 = aten.slice_copy(scatter__0_weight_4, 0, 48, 96)    # this rank's shard
    adamw_update__0_weight = ...                                              # on (48,), state (48,)
    gather__0_weight = _c10d_functional.all_gather_into_tensor(adamw_update__0_weight_9, 2, "0")
    gather__0_weight_1 = _c10d_functional.wait_tensor(gather__0_weight)
    gather__0_weight_3 = aten.view(gather__0_weight_2, [16, 6])
    write__0_weight = aten.copy_(primals_1, gather__0_weight_3)

A flattened size that the world size does not divide is zero-padded at the end; the
padding's gradient is zero and its updated value is dropped after the all-gather.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fx_optim_pass import _torch_compat
from fx_optim_pass.plan import GradientShard

__all__ = ["trace_gather", "trace_scatter"]


def trace_scatter(shard: GradientShard, param: torch.Tensor, grad: torch.Tensor) -> fx.GraphModule:
    """``(param, grad) -> (this rank's shard of param, this rank's shard of the averaged grad)``,
    traced on the joint graph's fake values."""
    reduce_scatter, _, wait_tensor = _torch_compat.shard_collective_ops()
    spec = shard.group

    def scatter(param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat_grad = grad.reshape(-1)
        if shard.padding:
            flat_grad = F.pad(flat_grad, (0, shard.padding))
        grad_shard = wait_tensor(reduce_scatter(flat_grad, "avg", spec.world_size, spec.group_name))
        param_shard = param.reshape(-1)[shard.start : shard.start + shard.shard_numel]
        if param_shard.numel() < shard.shard_numel:  # the last rank's shard reaches into the padding
            param_shard = F.pad(param_shard, (0, shard.shard_numel - param_shard.numel()))
        return param_shard, grad_shard

    return _torch_compat.trace_functional(scatter, [param, grad])


def trace_gather(shard: GradientShard, param_shard: torch.Tensor, param: torch.Tensor) -> fx.GraphModule:
    """``(updated shard, param) -> the updated parameter``: every rank's shard, all-gathered,
    unpadded and viewed as the parameter (``param`` gives only the shape)."""
    _, all_gather, wait_tensor = _torch_compat.shard_collective_ops()
    spec = shard.group

    def gather(param_shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        full = wait_tensor(all_gather(param_shard.contiguous(), spec.world_size, spec.group_name))
        return full[: shard.numel].view(param.shape)

    return _torch_compat.trace_functional(gather, [param_shard, param])
