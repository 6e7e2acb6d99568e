"""Where fx_optim's first call spends its time, as parameter tensors grow (issue #4, scale).

    python -m benchmarks.compile_profile 100
    python -m benchmarks.compile_profile 200
    python -m benchmarks.compile_profile 400 --save p400.prof   # pstats file, to compare functions across sizes

Compiles the scale benchmark's model (tiny Linear(16, 16) layers, AdamW in the backward)
with Inductor under cProfile and prints the cumulative time of the pass's and Inductor's
stages; run two sizes and compare which stages grow faster than the tensor count.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch import nn

import fx_optim_pass as fop

STAGES = r"(fx_optim_pass|scheduler|graph_compile|compile_fx|partitioners|codegen/cpp)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tensors", type=int, help="parameter tensors (two per layer)")
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--save", help="also write the profile here (pstats format)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(args.tensors // 2)])
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 1e-3})
    step = torch.compile(model, backend=fop.backend, fullgraph=True)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    step(torch.randn(4, 16)).sum().backward()
    profile.disable()
    print(f"first call: {time.perf_counter() - started:.1f} s for {args.tensors} parameter tensors")
    if args.save:
        profile.dump_stats(args.save)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(STAGES, args.lines)


if __name__ == "__main__":
    main()
