"""Setup checks for data-parallel training: each raises before any parameter changes.

Every check that needs the other ranks runs one collective that all ranks join, and
every rank raises the same error, so no rank is left waiting in a later collective.
"""

from __future__ import annotations

import itertools
import re
import time
from datetime import timedelta
from typing import Any

import torch

from fx_optim_pass import _torch_compat
from fx_optim_pass.plan import DataParallelSpec

__all__ = [
    "CollectiveError",
    "DataParallelSetupError",
    "broadcast_from_first_rank",
    "check_not_in_ddp",
    "check_same_parameters",
    "check_shardable_optimizers",
    "collective_error",
    "data_parallel_spec",
    "resolve_process_group",
]


class DataParallelSetupError(RuntimeError):
    """Data-parallel training cannot start as set up; nothing has been changed."""


class CollectiveError(RuntimeError):
    """A collective in the compiled backward failed: another rank died or stalled, or the
    network failed. Names the process group, this rank and, where the backend says, the peer."""


# Text in the errors torch's backends raise for a failed collective (gloo, NCCL, c10d).
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|c10d|connection|peer|timed out|timeout|socket|broken pipe", re.I)
_PEER_RANK = re.compile(r"\b(?:peer |remote )?rank\s*\[?(\d+)\]?", re.I)
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*:\d+\]\s*")  # "[.../gloo/transport/tcp/pair.cc:553] "


def collective_error(error: Exception, spec: DataParallelSpec) -> CollectiveError | None:
    """``error``, raised in a compiled backward that runs collectives over ``spec``'s group, as a
    ``CollectiveError`` naming the group and this rank; ``None`` if it is no collective failure."""
    import torch.distributed as dist

    if isinstance(error, CollectiveError):
        return None
    distributed_error = isinstance(error, getattr(dist, "DistError", ()))
    message = str(error)
    if not (distributed_error or (isinstance(error, RuntimeError) and _COLLECTIVE_FAILURE.search(message))):
        return None
    lines = message.strip().splitlines() or [type(error).__name__]
    first_sentence = _SOURCE_LOCATION.sub("", lines[0]).split(". ")[0].rstrip(".")
    rank_match = _PEER_RANK.search(message)
    peer = ""
    if rank_match and int(rank_match.group(1)) != spec.rank:
        peer = f" The backend names rank {rank_match.group(1)} as the peer."
    group = _torch_compat_group(spec.group_name)
    timeout = _torch_compat.process_group_timeout(group) if group is not None else None
    global_rank = dist.get_rank() if dist.is_initialized() else spec.rank
    silent = _roll_call(group, spec) if group is not None else ""
    return CollectiveError(
        f"a collective in the compiled backward failed on rank {spec.rank} of process group {spec.group_name!r} "
        f"({spec.world_size} ranks; global rank {global_rank}): {first_sentence}.{peer}{silent} Another rank of the "
        "group has probably died or stalled: check its log. Each collective waits at most the process group's timeout "
        f"({timeout if timeout is not None else 'unknown'}; set it with init_process_group(timeout=...)). "
        "Parameters updated before the failure stay updated: restart all ranks from a checkpoint."
    )


# How long a rank whose collective failed waits for the group's other ranks to report in.
ROLL_CALL_S = 2.0
_roll_calls = itertools.count()  # one set of keys per failure this process meets


def _roll_call(group: Any, spec: DataParallelSpec) -> str:
    """On a failed collective only: which ranks of ``group`` are gone, as a sentence.

    Every rank that meets the failure writes ``fx_optim_pass/alive/<n>/<rank>`` into the
    group's store (the one its ranks met through, which torchrun's agent hosts), then
    waits at most ``ROLL_CALL_S`` for the others' keys; a rank whose key is missing died
    or hangs. Costs nothing until a collective fails.
    """
    store = _torch_compat.process_group_store(group)
    if store is None:
        return ""
    prefix = f"fx_optim_pass/alive/{next(_roll_calls)}/"
    try:
        store = store.clone()  # its own timeout, so that a dead store host cannot block us longer
        store.set_timeout(timedelta(seconds=ROLL_CALL_S))
        store.set(f"{prefix}{spec.rank}", "alive")
        silent = [rank for rank in range(spec.world_size) if rank != spec.rank]
        deadline = time.monotonic() + ROLL_CALL_S
        while silent and time.monotonic() < deadline:
            time.sleep(0.05)
            silent = [rank for rank in silent if not store.check([f"{prefix}{rank}"])]
    except (RuntimeError, ValueError) as error:  # the store is gone too (its host died)
        return f" Which rank failed is unknown: the process group's store did not answer ({error})."
    if not silent:
        return f" Every rank of the group answered within {ROLL_CALL_S:g} s after the failure: none has died."
    ranks = ", ".join(map(str, silent))
    return f" Rank{'s' if len(silent) > 1 else ''} {ranks} did not answer within {ROLL_CALL_S:g} s (died or hung)."


def _torch_compat_group(group_name: str) -> Any:
    try:
        return _torch_compat.resolve_group_name(group_name)
    except (KeyError, RuntimeError, ValueError):
        return None


def resolve_process_group(process_group: Any) -> Any:
    """``process_group``, or the default (world) group for ``None``; refuses an uninitialized one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DataParallelSetupError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group('gloo' or 'nccl') "
            "first (under torchrun it reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment)."
        )
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup):
        raise DataParallelSetupError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. from dist.new_group), got {group!r}."
        )
    if dist.get_rank(group) < 0:
        raise DataParallelSetupError("this rank is not a member of process_group; pass a group it belongs to.")
    return group


def data_parallel_spec(
    process_group: Any, bucket_cap_mb: float | None = None, shard_optimizer_state: bool = False
) -> DataParallelSpec:
    """The name and size of ``process_group`` and this rank in it, as the compiled graph's collectives use them."""
    import torch.distributed as dist

    if bucket_cap_mb is not None and not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be a positive number of MiB or None, got {bucket_cap_mb!r}")
    group = resolve_process_group(process_group)
    return DataParallelSpec(
        _torch_compat.process_group_name(group),
        dist.get_world_size(group),
        bucket_cap_mb,
        shard_optimizer_state=bool(shard_optimizer_state),
        rank=dist.get_rank(group),
    )


def check_not_in_ddp(module: torch.nn.Module) -> None:
    """Refuse a model that ``DistributedDataParallel`` also wraps: gradients would be averaged twice,
    and DDP's reducer would wait for ``.grad`` that the compiled backward never produces."""
    if any(_is_ddp(m) for m in module.modules()):
        raise DataParallelSetupError(
            "this model is also wrapped in torch.nn.parallel.DistributedDataParallel, which would average "
            "gradients a second time and wait for .grad that the compiled backward never produces. "
            "Compile the unwrapped module: fx_optim_pass.data_parallel already averages gradients across ranks."
        )


def _is_ddp(module: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


def _describe_tensors(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    named = [*module.named_parameters(), *module.named_buffers()]
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in named]


def check_same_parameters(module: torch.nn.Module, process_group: Any) -> None:
    """Refuse ranks whose models differ in parameter or buffer names, shapes or dtypes."""
    import torch.distributed as dist

    group = resolve_process_group(process_group)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, _describe_tensors(module), group=group)
    first = {name: (shape, dtype) for name, shape, dtype in everyone[0]}
    for rank, tensors in enumerate(everyone[1:], start=1):
        theirs = {name: (shape, dtype) for name, shape, dtype in tensors}
        for name in [*first, *(name for name in theirs if name not in first)]:  # in rank 0's model order
            if first.get(name) != theirs.get(name):
                raise DataParallelSetupError(
                    f"the ranks' models differ: {name!r} is {_show(first.get(name))} on rank 0 but "
                    f"{_show(theirs.get(name))} on rank {rank} (ranks in process_group). Build the same model "
                    "on every rank before fx_optim_pass.data_parallel."
                )


def check_shardable_optimizers(module: torch.nn.Module) -> None:
    """Refuse, for ``shard_optimizer_state=True``, in-backward optimizers whose update needs the whole parameter."""
    from fx_optim_pass.optim_lowering import UnsupportedOptimizerError, check_shardable

    for name, param in module.named_parameters():
        for optimizer in getattr(param, "_in_backward_optimizers", ()):
            try:
                check_shardable(type(optimizer), name)
            except UnsupportedOptimizerError as error:
                raise DataParallelSetupError(str(error)) from None


def _show(entry: tuple[tuple[int, ...], str] | None) -> str:
    return "missing" if entry is None else f"shape {entry[0]} {entry[1]}"


def broadcast_from_first_rank(module: torch.nn.Module, process_group: Any) -> None:
    """Copy group rank 0's parameters and buffers to every rank, so all replicas start equal (as DDP does)."""
    _torch_compat.sync_module_states(module, resolve_process_group(process_group))
