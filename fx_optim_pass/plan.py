"""What the pass will do to a graph: which inputs are parameters to update, and how."""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from fx_optim_pass.optim_lowering import OptimizerStep

__all__ = ["DataParallelSpec", "GradientAllReduce", "GradientShard", "ParamUpdate", "UpdatePlan", "node_safe_name"]


def node_safe_name(qualified_name: str) -> str:
    """``layers.0.weight`` -> ``layers_0_weight``, usable inside FX node names."""
    return re.sub(r"\W", "_", qualified_name)


@dataclass(frozen=True)
class DataParallelSpec:
    """Data-parallel settings: the process group (as functional collectives name it), its size,
    the bucket size Inductor merges small all-reduces up to (``None``: one per gradient), and
    whether each rank keeps optimizer state only for its shard of each parameter (then
    ``rank``, this process's rank in the group, picks the shard)."""

    group_name: str
    world_size: int
    bucket_cap_mb: float | None = None
    shard_optimizer_state: bool = False
    rank: int = 0


@dataclass(frozen=True)
class GradientShard:
    """A parameter whose update runs on this rank's shard only (ZeRO-2 style, in the backward).

    Its flattened gradient, zero-padded to ``world_size * shard_numel`` elements, is
    reduce-scattered (averaged) over ``group``; the optimizers update elements
    ``[rank * shard_numel, (rank + 1) * shard_numel)`` of the flattened parameter, with
    state of that shard's shape; the updated shards are all-gathered into the parameter.
    """

    group: DataParallelSpec
    numel: int

    @property
    def shard_numel(self) -> int:
        return -(-self.numel // self.group.world_size)

    @property
    def padding(self) -> int:
        return self.shard_numel * self.group.world_size - self.numel

    @property
    def start(self) -> int:
        """Where this rank's shard begins in the flattened parameter."""
        return self.group.rank * self.shard_numel


@dataclass(frozen=True)
class ParamUpdate:
    """One parameter, updated in the backward by its optimizers in registration order.

    ``input_index`` is its position among the compiled function's inputs;
    ``step_inputs[k]`` are the input positions of optimizer ``k``'s inputs (``lr``, the
    other run-time hyperparameters and the state tensors, see ``OptimizerStep``); the
    positions of run-time floats are shared with every update that reads the same value
    (see ``UpdatePlan.floats``). With ``shard``, the optimizers update only
    this rank's shard of the parameter, and their state tensors have the shard's shape.
    """

    input_index: int
    name: str
    steps: tuple[OptimizerStep, ...]
    step_inputs: tuple[tuple[int, ...], ...]
    shard: GradientShard | None = None


@dataclass(frozen=True)
class GradientAllReduce:
    """Average these inputs' gradients over ``group``, in the backward, before any update.

    ``inputs`` are (input index, qualified name) pairs.
    """

    group: DataParallelSpec
    inputs: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class UpdatePlan:
    """What the pass does to one graph.

    ``floats`` names the run-time floats the updates read as numbers (a float ``lr``,
    ``betas_0``, ...), one graph input each, right after the user's ``num_user_inputs``
    inputs: updates reading equal values (the usual case: one optimizer setting for every
    parameter) share one input, read once per step (see ``DistinctFloats``).
    """

    params: tuple[ParamUpdate, ...]
    num_user_inputs: int
    all_reduce: GradientAllReduce | None = None
    floats: tuple[str, ...] = ()

    def float_inputs(self) -> range:
        """The input positions of ``floats``."""
        return range(self.num_user_inputs, self.num_user_inputs + len(self.floats))

    def written_inputs(self) -> frozenset[int]:
        """Input positions the rewritten backward may write in place: each updated parameter
        and its optimizers' state tensors."""
        steps_inputs = (i for p in self.params for inputs in p.step_inputs for i in inputs)
        return frozenset((*(p.input_index for p in self.params), *steps_inputs)) - frozenset(self.float_inputs())

    def cache_key(self) -> str:
        """Everything that changes the rewritten graph, for Inductor's and AOTAutograd's caches:
        this package's own source, torch's version, the optimizers' code and settings, the plan,
        the process group gradients are averaged over (a graph compiled for one group
        must never run collectives on another) and, sharded, this rank (it picks the shard)."""
        parts = [
            _package_source_hash(),
            torch.__version__,
            str(self.num_user_inputs),
            repr(self.all_reduce),
            repr(self.floats),
        ]
        for p in self.params:
            parts.append(f"{p.input_index}:{p.name}:{p.step_inputs}:{p.shard}")
            for s in p.steps:
                parts.append(
                    f"{_class_key(s.optimizer_class)}:{s.setup}:{s.hyperparameters}:{s.state_keys}:{s.created}"
                )
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@functools.cache
def _package_source_hash() -> str:
    """Hash of every module of this package: a changed pass must never meet a cached graph."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _class_key(cls: type) -> str:
    """Name and source hash of an optimizer class (a user's class can change between runs)."""
    if cls not in _class_keys:
        _class_keys[cls] = _hash_class(cls)
    return _class_keys[cls]


_class_keys: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def _hash_class(cls: type) -> str:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # defined where no source is kept: never reuse a cached graph
        source = f"no source {id(cls)}"
    return f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha256(source.encode()).hexdigest()}"
