"""Where fx_optim's first call spends its time, as parameter tensors grow (issue #4, scale).

    python -m benchmarks.compile_profile 100
    python -m benchmarks.compile_profile 200
    python -m benchmarks.compile_profile 200 --save p200.prof   # pstats file, to compare functions across sizes
    python -m benchmarks.compile_profile 600 --against p200.prof 200

Compiles the scale benchmark's model (tiny Linear(16, 16) layers, AdamW in the backward)
with Inductor under cProfile and prints the cumulative time of the pass's and Inductor's
stages. ``--against`` names a profile of a smaller size and its tensor count, and prints
instead the functions whose own time grew most beyond the tensor count's ratio: the parts
of the compile that grow faster than linearly. Use a fresh ``TORCHINDUCTOR_CACHE_DIR``
for each run: a cache hit skips the compile.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import fx_optim_pass as fop
from benchmarks.run import OPTIMIZERS, scale_model

STAGES = r"(fx_optim_pass|scheduler|graph_compile|compile_fx|partitioners|codegen/cpp)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tensors", type=int, help="parameter tensors (two per layer)")
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--save", help="also write the profile here (pstats format)")
    parser.add_argument("--against", nargs=2, metavar=("PROFILE", "TENSORS"), help="a smaller size's --save file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, inputs = scale_model(args.tensors, torch.device("cpu"))
    optimizer_class, kwargs = OPTIMIZERS["adamw"]
    fop.apply_optimizer_in_backward(optimizer_class, model.parameters(), kwargs)
    step = torch.compile(model, backend=fop.backend, fullgraph=True)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    step(*inputs).backward()
    profile.disable()
    print(f"first call: {time.perf_counter() - started:.1f} s for {args.tensors} parameter tensors")
    if args.save:
        profile.dump_stats(args.save)
    if args.against:
        print_superlinear(pstats.Stats(profile), pstats.Stats(args.against[0]), args.tensors / int(args.against[1]))
    else:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(STAGES, args.lines)


def print_superlinear(large: pstats.Stats, small: pstats.Stats, ratio: float, lines: int = 15) -> None:
    """The functions whose own time (``tottime``) grew most beyond ``ratio`` from ``small`` to ``large``."""
    # pstats' table: (file, line, function) -> (calls, primitive calls, tottime, cumtime, callers)
    before = {where: row[2] for where, row in small.stats.items()}  # type: ignore[attr-defined]
    excess = []
    for where, row in large.stats.items():  # type: ignore[attr-defined]
        if where in before:
            excess.append((row[2] - ratio * before[where], before[where], row[2], where))
    print(f"own time beyond {ratio:.1f}x the smaller size's (s): excess, smaller, larger, function")
    for extra, was, now, (path, line, function) in sorted(excess, reverse=True)[:lines]:
        print(f"  {extra:7.2f} {was:7.2f} {now:7.2f}  {path.split('site-packages/')[-1]}:{line} {function}")


if __name__ == "__main__":
    main()
