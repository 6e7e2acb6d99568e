"""Targets, the markdown table and the PNG plots of one benchmark run (its JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["round_cost_range", "round_ratio_range", "targets", "write_report"]

# Peers a target compares against: everything but fx_optim and the no-optimizer floor.
_NOT_PEERS = ("fx_optim", "no_optimizer")


def targets(config: dict[str, Any]) -> dict[str, float | None]:
    """The issue's ratios for one (model, optimizer, config); None where a figure is missing."""
    peers = {k: v for k, v in config["peers"].items() if "error" not in v}
    fx = peers.get("fx_optim")
    if fx is None:
        return {}
    others = {k: v for k, v in peers.items() if k not in _NOT_PEERS}
    floor = config["floor"]
    no_opt = peers.get("no_optimizer")
    compiled_opt = peers.get("compiled_opt")
    return {
        "peak_vs_floor": fx["peak_bytes"] / floor["memory_bytes"] if floor["memory_bytes"] else None,
        "peak_vs_best_peer": fx["peak_bytes"] / min(v["peak_bytes"] for v in others.values()) if others else None,
        "time_vs_fastest_peer": (
            fx["median_step_s"] / min(v["median_step_s"] for v in others.values()) if others else None
        ),
        "time_vs_fastest_peer_by_min": (
            fx["min_step_s"] / min(v["min_step_s"] for v in others.values()) if others and "min_step_s" in fx else None
        ),
        "optimizer_cost_vs_bandwidth": (
            (fx["median_step_s"] - no_opt["median_step_s"]) / floor["update_s"] if no_opt else None
        ),
        "compile_vs_compiled_opt": compile_s(fx) / compile_s(compiled_opt) if compiled_opt else None,
    }


def round_ratio_range(config: dict[str, Any]) -> tuple[float, float] | None:
    """The lowest and highest, over the interleaved rounds, of fx_optim's median step in a round
    over that round's median step of the fastest peer (the fastest by median over all rounds).
    It shows whether a step-time ratio near 1 is beyond the run's noise. None for results
    written before rounds were kept."""
    peers = {k: v for k, v in config["peers"].items() if "round_medians_s" in v}
    others = {k: v for k, v in peers.items() if k not in _NOT_PEERS}
    if "fx_optim" not in peers or not others:
        return None
    fastest = min(others.values(), key=lambda peer: peer["median_step_s"])
    ratios = [fx / peer for fx, peer in zip(peers["fx_optim"]["round_medians_s"], fastest["round_medians_s"])]
    return min(ratios), max(ratios)


def round_cost_range(config: dict[str, Any]) -> tuple[float, float] | None:
    """The lowest and highest, over the interleaved rounds, of the optimizer's cost over its
    bandwidth floor, with each round's fx_optim median step less the same round's no-optimizer
    median. The target's figure is a difference of two medians over all rounds, each the size
    of a whole step: where the update is a small part of the step this range shows how far
    that difference moves with the run's noise. None for results written before rounds were kept."""
    peers = config["peers"]
    fx, no_opt = peers.get("fx_optim", {}), peers.get("no_optimizer", {})
    if "round_medians_s" not in fx or "round_medians_s" not in no_opt:
        return None
    update_s = config["floor"]["update_s"]
    ratios = [(f - n) / update_s for f, n in zip(fx["round_medians_s"], no_opt["round_medians_s"])]
    return min(ratios), max(ratios)


def _rounds(results: dict[str, Any]) -> str:
    """How many interleaved timing rounds each config had (``run.bench_config``)."""
    counts = ", ".join(f"{c['model']}/{c['optimizer']} {c['rounds']}" for c in results["configs"] if "rounds" in c)
    if "timing_s" not in results or not counts:
        return f"{results['rounds']} interleaved rounds"
    return (
        f"interleaved rounds, at least {results['rounds']} and more until {results['timing_s']:g} s of timing "
        f"({counts})"
    )


def _range(bounds: tuple[float, float] | None) -> str:
    return "n/a" if bounds is None else f"{bounds[0]:.2f} to {bounds[1]:.2f}"


def compile_s(peer: dict[str, Any]) -> float:
    """A peer's compile time: the first step and the warm-up steps' excess (``run.compile_seconds``);
    results written before that was measured have the first step alone."""
    return float(peer["compile_s"] if "compile_s" in peer else peer["first_call_s"])


_LIMITS = {
    "peak_vs_floor": 1.15,
    "peak_vs_best_peer": 1.0,
    "time_vs_fastest_peer": 1.0,
    "time_vs_fastest_peer_by_min": 1.0,
    "optimizer_cost_vs_bandwidth": 1.2,
    "compile_vs_compiled_opt": 1.25,
}


def _mark(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" + ("" if value <= _LIMITS[key] else " ✗")


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Device: {results['device']} ({results['device_name']}, {results['threads']} threads, "
        f"OMP_WAIT_POLICY {results.get('omp_wait_policy', 'default')}), "
        f"torch {results['torch']}; copy bandwidth {results['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
        f"{_rounds(results)} x {results['steps_per_round']} steps per peer; "
        f"recompiles over {results.get('recompile_steps', 50)} steps with an LR scheduler.",
        f"Command: `{results['command']}`",
        "",
        "### Targets (fx_optim; ✗ = target missed)",
        "",
        "| model | regime | optimizer | params | peak / floor (≤1.15) | peak / best peer (≤1) "
        "| time / fastest peer (≤1) | same, fastest steps (≤1) | optimizer cost / bandwidth floor (≤1.2) "
        "| compile / compiled opt (≤1.25) | recompiles | time / fastest peer, per round "
        "| optimizer cost / bandwidth floor, per round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in results["configs"]:
        ratios = targets(config)
        fx = config["peers"].get("fx_optim", {})
        lines.append(
            f"| {config['model']} | {config['regime']} | {config['optimizer']} | {config['parameters'] / 1e6:.1f}M | "
            + " | ".join(_mark(key, ratios.get(key)) for key in _LIMITS)
            + f" | {fx.get('recompiles', 'n/a')} | {_range(round_ratio_range(config))}"
            + f" | {_range(round_cost_range(config))} |"
        )
    lines += [
        "",
        "### Every peer: peak MiB above step start / median ms per step / compile s / recompiles",
        "",
        "| model | optimizer | floor MiB | " + " | ".join(results["peers"]) + " |",
        "|---|---|---|" + "---|" * len(results["peers"]),
    ]
    for config in results["configs"]:
        cells = []
        for name in results["peers"]:
            peer = config["peers"].get(name, {})
            if "error" in peer:
                cells.append(f"error: {peer['error'][:60]}")
            elif peer:
                cells.append(
                    f"{_mib(peer['peak_bytes'])} / {peer['median_step_s'] * 1e3:.1f} / {compile_s(peer):.1f}"
                    + (f" / {peer['recompiles']}" if "recompiles" in peer else "")
                )
            else:
                cells.append("")
        floor = config["floor"]["memory_bytes"]
        lines.append(
            f"| {config['model']} | {config['optimizer']} | {_mib(floor) if floor else 'n/a'} | "
            + " | ".join(cells)
            + " |"
        )
    if results["scale"]:
        lines += [
            "",
            "### Scale: tiny Linear(16,16) layers, AdamW; compile s / median ms per step",
            "",
            "| parameter tensors | fx_optim | compiled_opt | no_optimizer |",
            "|---|---|---|---|",
        ]
        for row in results["scale"]:
            cells = [
                f"error: {row[n]['error'][:60]}"
                if "error" in row[n]
                else f"{compile_s(row[n]):.1f} / {row[n]['median_step_s'] * 1e3:.2f}"
                for n in ("fx_optim", "compiled_opt", "no_optimizer")
            ]
            lines.append(f"| {row['parameter_tensors']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_memory(results: dict[str, Any], path: Path) -> None:
    """Live-bytes curve of one step, eager foreach vs fx_optim, one panel per config."""
    plt = _pyplot()
    configs = [c for c in results["configs"] if "memory_curve" in c["peers"].get("fx_optim", {})]
    if not configs:
        return
    columns = min(4, len(configs))
    rows = -(-len(configs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False, dpi=80)
    for ax, config in zip(axes.flat, configs):
        for name, style in (("eager_foreach", "C0"), ("compiled_opt", "C2"), ("fx_optim", "C3")):
            curve = config["peers"].get(name, {}).get("memory_curve")
            if curve:
                ax.plot(
                    [i / max(1, len(curve) - 1) for i in range(len(curve))],
                    [b / 2**20 for b in curve],
                    style,
                    label=name,
                    linewidth=1,
                )
        floor = config["floor"]["memory_bytes"]
        if floor:
            ax.axhline(floor / 2**20, color="k", linestyle=":", linewidth=1, label="floor")
        ax.set_title(f"{config['model']} / {config['optimizer']}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("progress through the step (memory events)", fontsize=7)
        ax.set_ylabel("MiB above step start", fontsize=7)
    for ax in list(axes.flat)[len(configs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ratios(results: dict[str, Any], path: Path) -> None:
    """fx_optim's ratios per config: peak vs floor, peak vs best peer, time vs fastest peer."""
    plt = _pyplot()
    keys = ("peak_vs_floor", "peak_vs_best_peer", "time_vs_fastest_peer")
    labels = [f"{c['model']}\n{c['optimizer']}" for c in results["configs"]]
    ratios = [targets(c) for c in results["configs"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels)), 3.0), dpi=80)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        values = [r.get(key) or 0.0 for r in ratios]
        ax.bar([i + (k - 1) * width for i in range(len(labels))], values, width, label=key)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel("fx_optim ratio (lower is better)", fontsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_report(results: dict[str, Any], out: Path, suffix: str) -> str:
    """Write ``{suffix}.md``, ``{suffix}_memory.png``, ``{suffix}_ratios.png``; return the markdown."""
    table = markdown(results)
    (out / f"{suffix}.md").write_text(table)
    try:
        plot_memory(results, out / f"{suffix}_memory.png")
        plot_ratios(results, out / f"{suffix}_ratios.png")
    except ImportError:  # a bare GPU machine without matplotlib: JSON and markdown only
        print("matplotlib is not installed: no plots")
    return table


def main(argv: list[str] | None = None) -> None:
    """Render the markdown and plots again from a run's JSON: ``python -m benchmarks.report RESULTS.json``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    print(write_report(json.loads(args.results.read_text()), args.results.parent, args.results.stem))


if __name__ == "__main__":
    main()
