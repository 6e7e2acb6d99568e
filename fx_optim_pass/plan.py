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

__all__ = ["DataParallelSpec", "GradientAllReduce", "ParamUpdate", "UpdatePlan", "node_safe_name"]


def node_safe_name(qualified_name: str) -> str:
    """``layers.0.weight`` -> ``layers_0_weight``, usable inside FX node names."""
    return re.sub(r"\W", "_", qualified_name)


@dataclass(frozen=True)
class ParamUpdate:
    """One parameter, updated in the backward by its optimizers in registration order.

    ``input_index`` is its position among the compiled function's inputs;
    ``step_inputs[k]`` are the input positions of optimizer ``k``'s ``lr`` and
    state tensors (see ``OptimizerStep``).
    """

    input_index: int
    name: str
    steps: tuple[OptimizerStep, ...]
    step_inputs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class DataParallelSpec:
    """Data-parallel settings: the process group (as functional collectives name it), its size,
    and the bucket size Inductor merges small all-reduces up to (``None``: one per gradient)."""

    group_name: str
    world_size: int
    bucket_cap_mb: float | None = None


@dataclass(frozen=True)
class GradientAllReduce:
    """Average these inputs' gradients over ``group``, in the backward, before any update.

    ``inputs`` are (input index, qualified name) pairs.
    """

    group: DataParallelSpec
    inputs: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class UpdatePlan:
    params: tuple[ParamUpdate, ...]
    num_user_inputs: int
    all_reduce: GradientAllReduce | None = None

    def signature(self) -> tuple[object, ...]:
        """The per-parameter optimizer setup this plan was made for (see ``runtime_signature``)."""
        return tuple((p.input_index, tuple((s.optimizer_class, s.setup) for s in p.steps)) for p in self.params)

    def cache_key(self) -> str:
        """Everything that changes the rewritten graph, for Inductor's and AOTAutograd's caches:
        this package's own source, torch's version, the optimizers' code and settings, the plan,
        and the process group gradients are averaged over (a graph compiled for one group
        must never run collectives on another)."""
        parts = [_package_source_hash(), torch.__version__, str(self.num_user_inputs), repr(self.all_reduce)]
        for p in self.params:
            parts.append(f"{p.input_index}:{p.name}:{p.step_inputs}")
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
