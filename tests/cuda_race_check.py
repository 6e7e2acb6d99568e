"""Confirm on a GPU the diagnosis of the H200 fuzz failure (README, Known limitations).

Replays the failing example with and without ``tl.debug_barrier()`` before in-place stores
inside Triton reductions, recompiling each time; expected: failures only without it.
Run from the repository root: ``PYTHONPATH=. python3 tests/cuda_race_check.py [runs] [device]``
(``benchmarks/gpu_check.sh`` runs it). Not a pytest test: the race needs a GPU, and it
shows only some of the time.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from fx_optim_pass import _torch_compat
from tests.test_fuzz import ModelSpec, OptimizerConfig, Roles, train_and_compare

SGD = OptimizerConfig("SGD", {"weight_decay": 0.0, "lr": 0.01, "momentum": 0.0, "maximize": False})
SPEC = ModelSpec(family="mlp", dtype=torch.float32, width=3, depth=1, tied=False, batches=(2, 2, 3), seed=0)
ROLES = Roles(configs=[SGD], in_backward=[(0,)] * 6, plain=SGD, frozen=[False] * 6, frozen_before_setup=False)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    with_barrier = _torch_compat.barrier_before_inplace_stores_in_reductions
    torch._inductor.config.force_disable_caches = True  # each run compiles its kernels anew
    for label, patch in (("without", contextlib.nullcontext), ("with", with_barrier)):
        _torch_compat.barrier_before_inplace_stores_in_reductions = patch  # type: ignore[assignment]
        failures = []
        for _ in range(runs):
            try:
                train_and_compare(SPEC, ROLES, "inductor", device)
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
        print(f"{label} barrier: {len(failures)} of {runs} runs failed {failures[:1]}", flush=True)
    _torch_compat.barrier_before_inplace_stores_in_reductions = with_barrier


if __name__ == "__main__":
    main()
