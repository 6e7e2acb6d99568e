"""``fx-optim-pass``: inspect what the pass does to a model, or run the demo.

    fx-optim-pass inspect [mlp | gpt | module:factory] [--optimizer adamw] [--lr 1e-3] [--out DIR]
    fx-optim-pass demo [--steps 40] [--out demo_out]

A factory is a function of no arguments returning ``(model, example_args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]


class UsageError(ValueError):
    """Bad input on the command line; the message says what to change."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo parses its own options
        from fx_optim_pass.demo import main as demo_main

        demo_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="fx-optim-pass", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = commands.add_parser("inspect", help="write the graphs, generated code, placement and an HTML report")
    inspect_cmd.add_argument("model", nargs="?", default="mlp", help="'mlp', 'gpt', or module:factory (default mlp)")
    inspect_cmd.add_argument("--optimizer", default="adamw", help="a torch.optim class, any case (default adamw)")
    inspect_cmd.add_argument("--lr", type=float, default=1e-3)
    inspect_cmd.add_argument("--out", type=Path, default=Path("fx_optim_inspect"), help="output folder")
    inspect_cmd.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands.add_parser("demo", help="train the built-in GPT eagerly and with fx_optim (make demo); demo --help")
    args = parser.parse_args(argv)
    try:
        return _inspect(args)
    except Exception as error:
        if args.traceback:
            raise
        text = str(error).strip().splitlines()
        detail = text[0] if text else type(error).__name__
        if not isinstance(error, UsageError) and type(error).__name__ not in detail:
            detail = f"{type(error).__name__}: {detail}"
        print(f"fx-optim-pass: error: {detail} (--traceback for details)", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    from fx_optim_pass.report import inspect

    model, example_args = _load_model(args.model)
    optimizer = _optimizer_class(args.optimizer)
    report = inspect(model, *example_args, optimizer=optimizer, optimizer_kwargs={"lr": args.lr})
    files = report.write(args.out)
    print(report.placement_table())
    eager_mib, fx_mib = report.eager_peak / 2**20, report.fx_optim_peak / 2**20
    print(f"peak memory of one step: eager {eager_mib:.2f} MiB, fx_optim {fx_mib:.2f} MiB")
    print(f"wrote {len(files)} files to {args.out}/: {', '.join(f.name for f in files)}")
    return 0


def _builtin_mlp() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    from fx_optim_pass.models import mlp

    torch.manual_seed(0)
    return mlp(width=256, depth=3), (torch.randn(32, 256),)


def _builtin_gpt() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    from fx_optim_pass.models import GPT, GPTConfig, synthetic_tokens

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, seq_len=32, width=64, depth=2, heads=4)
    return GPT(config), synthetic_tokens(config, batch_size=2, num_batches=1)[0]


BUILTIN_MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]] = {
    "mlp": _builtin_mlp,
    "gpt": _builtin_gpt,
}


def _load_model(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    if ":" not in spec:
        raise UsageError(f"unknown model {spec!r}: use {' or '.join(BUILTIN_MODELS)}, or module:factory")
    module_name, _, factory_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise UsageError(
            f"cannot import {module_name!r}: {type(error).__name__}: {error}; "
            "run from the folder that holds it, or put that folder on PYTHONPATH"
        ) from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(
            f"{module_name!r} has no function {factory_name!r}; pass module:factory, where factory() returns "
            "(model, example_args)"
        )
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"{spec} must return (model, example_args), got {type(result).__name__}")
    model, example_args = result
    return model, tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    classes = {
        attr.lower(): cls
        for attr, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }
    if name.lower() not in classes:
        raise UsageError(f"unknown optimizer {name!r}: choose one of {', '.join(sorted(classes))}")
    return classes[name.lower()]


if __name__ == "__main__":
    sys.exit(main())
