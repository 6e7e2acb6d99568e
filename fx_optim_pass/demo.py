"""`make demo`: train the built-in GPT with AdamW, eagerly and with fx_optim, side by side.

Prints loss parity, peak memory of one step and median step time for both, and
writes the graphs the pass produced to a folder.

    python -m fx_optim_pass.demo [--steps 30] [--out demo_out]
"""

from __future__ import annotations

import argparse
import statistics
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tqdm import tqdm

import fx_optim_pass as fop
from fx_optim_pass.measure import peak_step_memory
from fx_optim_pass.models import GPT, GPTConfig, synthetic_tokens
from fx_optim_pass.testing import normalize_graph

__all__ = ["main"]

ADAMW: dict[str, Any] = {"lr": 3e-3, "weight_decay": 0.01}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per side (default 40)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1: fine-tuning regime)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the rewritten graphs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPTConfig()
    eager_model = GPT(config).to(args.device)
    fx_model = deepcopy(eager_model)
    eager_opt = torch.optim.AdamW(eager_model.parameters(), **ADAMW)
    fop.apply_optimizer_in_backward(torch.optim.AdamW, fx_model.parameters(), ADAMW)

    graphs: dict[str, fx.GraphModule] = {}

    def keep_graph(kind: str, gm: fx.GraphModule) -> None:
        graphs.setdefault(kind, gm)

    backend = fop.make_backend(compiler="inductor", observer=keep_graph)
    compiled = torch.compile(fx_model, backend=backend, fullgraph=True)

    def eager_step(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = eager_model(tokens, targets)
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad()
        return loss.detach()

    def fx_step(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = compiled(tokens, targets)
        loss.backward()  # the AdamW update runs inside this backward
        return loss.detach()

    n_params = sum(p.numel() for p in eager_model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in eager_model.parameters())
    print(
        f"GPT: {n_params / 1e6:.2f}M parameters ({_mib(grad_bytes)} of gradients), AdamW {ADAMW}, "
        f"batch {args.batch_size}x{config.seq_len} tokens, {args.device}"
    )
    batches = synthetic_tokens(config, args.batch_size, args.steps, device=args.device)
    eager_losses: list[float] = []
    fx_losses: list[float] = []
    eager_times: list[float] = []
    fx_times: list[float] = []
    progress = tqdm(batches, desc="training (eager | fx_optim)", unit="step")
    for tokens, targets in progress:
        for step, losses, times in ((eager_step, eager_losses, eager_times), (fx_step, fx_losses, fx_times)):
            _sync(args.device)
            start = time.perf_counter()
            losses.append(step(tokens, targets).item())
            _sync(args.device)
            times.append(time.perf_counter() - start)
        progress.set_postfix(loss=f"{eager_losses[-1]:.3f} | {fx_losses[-1]:.3f}")

    tokens, targets = batches[-1]
    eager_peak = peak_step_memory(lambda: eager_step(tokens, targets), args.device)
    fx_peak = peak_step_memory(lambda: fx_step(tokens, targets), args.device)
    steady = slice(min(3, len(batches) - 1), None)  # the first fx steps include compilation
    eager_ms = statistics.median(eager_times[steady]) * 1e3
    fx_ms = statistics.median(fx_times[steady]) * 1e3
    loss_diff = max(abs(a - b) for a, b in zip(eager_losses, fx_losses))
    param_diff = max((a - b).abs().max().item() for a, b in zip(fx_model.parameters(), eager_model.parameters()))

    print(f"\nloss: step 1 {eager_losses[0]:.4f} -> step {args.steps} {eager_losses[-1]:.4f} (eager)")
    print(f"      step 1 {fx_losses[0]:.4f} -> step {args.steps} {fx_losses[-1]:.4f} (fx_optim)")
    print(f"loss parity: max |eager - fx_optim| over {args.steps} steps = {loss_diff:.2e}")
    print(f"parameter parity: max |eager - fx_optim| = {param_diff:.2e}")
    print(f"\n{'':22}{'eager AdamW':>14}{'fx_optim':>14}{'ratio':>8}")
    print(f"{'peak memory / step':22}{_mib(eager_peak):>14}{_mib(fx_peak):>14}{fx_peak / eager_peak:>8.2f}")
    print(f"{'median step time':22}{eager_ms:>11.1f} ms{fx_ms:>11.1f} ms{fx_ms / eager_ms:>8.2f}")
    print(f"(peak memory: live tensor bytes above the step's start; step time: median of steps {steady.start + 1}..)")

    args.out.mkdir(parents=True, exist_ok=True)
    for kind, gm in graphs.items():
        (args.out / f"{kind}.txt").write_text(normalize_graph(gm))
    print(f"\nrewritten graphs written to {args.out}/: {', '.join(sorted(f'{k}.txt' for k in graphs))}")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
