"""What the pass did to one model, and whether it paid off: ``fx_optim_pass.inspect``.

The report holds the joint graph before and after the rewrite, the forward and
backward graphs, Inductor's generated code for both, where each parameter's
update landed (graph node, generated kernel), and the live-bytes curve of one
training step, eager vs fx_optim, measured the way ``measure`` (and so the
benchmarks) measure it.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import re
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fx_optim_pass import _torch_compat
from fx_optim_pass.api import apply_optimizer_in_backward, updates_in_backward
from fx_optim_pass.dynamo_backend import make_backend
from fx_optim_pass.measure import profile_step_memory
from fx_optim_pass.placement import find_placements
from fx_optim_pass.testing import normalize_graph

__all__ = ["InspectError", "ParamPlacement", "Report", "inspect"]


class InspectError(ValueError):
    """The model or its inputs cannot be inspected; the message says what to change."""


@dataclass(frozen=True)
class ParamPlacement:
    """Where one parameter's update landed."""

    param: str
    gradient_node: str
    update_nodes: tuple[str, ...]
    write_node: str
    gradient_position: int  # index of the gradient node among the backward graph's nodes
    backward_position: int  # index of the write among the backward graph's nodes
    backward_nodes: int
    kernel: str | None  # generated kernel that writes the parameter
    kernel_position: int | None  # its index among the kernel calls of the backward
    kernels: int
    gradient_bytes: int  # the gradient that dies inside the backward instead of reaching .grad


@dataclass
class Report:
    joint_before: str
    joint_after: str
    forward: str
    backward: str
    forward_code: str
    backward_code: str
    placements: list[ParamPlacement]
    eager_curve: list[int] = field(repr=False)
    fx_optim_curve: list[int] = field(repr=False)

    @property
    def eager_peak(self) -> int:
        return max(self.eager_curve, default=0)

    @property
    def fx_optim_peak(self) -> int:
        return max(self.fx_optim_curve, default=0)

    def placement_table(self) -> str:
        """The placement as aligned text, one parameter per line."""
        rows = [
            ("parameter", "gradient", "update", "write", "backward node", "kernel", "kernel call", "gradient freed")
        ]
        for p in self.placements:
            rows.append(
                (
                    p.param,
                    p.gradient_node,
                    _span(p.update_nodes),
                    p.write_node,
                    f"{p.backward_position + 1}/{p.backward_nodes}",
                    p.kernel or "-",
                    "-" if p.kernel_position is None else f"{p.kernel_position + 1}/{p.kernels}",
                    _bytes(p.gradient_bytes),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + "\n"

    def memory_plot_png(self) -> bytes:
        """The live-bytes curve of one step, eager vs fx_optim, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
        for label, curve in (("eager: backward(); step()", self.eager_curve), ("fx_optim", self.fx_optim_curve)):
            ax.plot([b / 2**20 for b in curve], label=f"{label} (peak {_bytes(max(curve, default=0))})")
        ax.set_xlabel("memory event of one training step")
        ax.set_ylabel("live MiB above step start")
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        return buffer.getvalue()

    def to_html(self) -> str:
        """One self-contained page: no network, no JavaScript."""
        diff = difflib.HtmlDiff(wrapcolumn=100).make_table(
            self.joint_before.splitlines(), self.joint_after.splitlines(), "joint graph before", "after fx_optim_pass"
        )
        png = base64.b64encode(self.memory_plot_png()).decode()
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line.split("\t")) + "</tr>"
            for line in self._placement_rows()
        )
        return _HTML.format(
            diff=diff,
            rows=rows,
            png=png,
            eager_peak=_bytes(self.eager_peak),
            fx_peak=_bytes(self.fx_optim_peak),
            backward=html.escape(self.backward),
            backward_code=html.escape(self.backward_code),
        )

    def _placement_rows(self) -> list[str]:
        return [
            "\t".join(
                (
                    p.param,
                    p.gradient_node,
                    _span(p.update_nodes),
                    p.write_node,
                    f"{p.backward_position + 1} of {p.backward_nodes}",
                    p.kernel or "-",
                    "-" if p.kernel_position is None else f"{p.kernel_position + 1} of {p.kernels}",
                    _bytes(p.gradient_bytes),
                )
            )
            for p in self.placements
        ]

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write every text, the placement table and ``report.html`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "joint_before.txt": self.joint_before,
            "joint_after.txt": self.joint_after,
            "forward.txt": self.forward,
            "backward.txt": self.backward,
            "forward_code.py": self.forward_code,
            "backward_code.py": self.backward_code,
            "placement.txt": self.placement_table(),
            "report.html": self.to_html(),
        }
        for name, text in files.items():
            (out / name).write_text(text)
        return [out / name for name in files]


def inspect(
    model: torch.nn.Module,
    *example_args: Any,
    optimizer: type[torch.optim.Optimizer] | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
    **example_kwargs: Any,
) -> Report:
    """Compile one training step of ``model`` with fx_optim (Inductor) and report what the pass did.

    With ``optimizer``, every parameter gets that in-backward optimizer; without,
    the model must already have in-backward optimizers. The model itself is not
    changed: the report trains copies. The loss is the sum of the model's output.

    Example::

        >>> import torch, fx_optim_pass as fop
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> report = fop.inspect(model, torch.randn(4, 8), optimizer=torch.optim.AdamW)
        >>> [p.param for p in report.placements]
        ['2.weight', '2.bias', '0.weight', '0.bias']
    """
    subject = _copy_with_optimizers(model, optimizer, optimizer_kwargs or {"lr": 1e-3})
    reference, reference_optimizers = _eager_reference(subject)
    graphs: dict[str, fx.GraphModule] = {}

    def keep(kind: str, gm: fx.GraphModule) -> None:
        graphs.setdefault(kind, gm)

    compiled = torch.compile(subject, backend=make_backend(compiler="inductor", observer=keep), fullgraph=True)

    def fx_step() -> None:
        _loss(compiled(*example_args, **example_kwargs)).backward()

    def eager_step() -> None:
        _loss(reference(*example_args, **example_kwargs)).backward()
        for opt in reference_optimizers:
            opt.step()
        for opt in reference_optimizers:
            opt.zero_grad()

    try:
        eager_step()
    except InspectError:
        raise
    except Exception as error:
        raise InspectError(
            f"the example inputs do not fit the model: {_first_line(error)}. "
            "Pass inputs the model accepts: inspect(model, *args, **kwargs) runs model(*args, **kwargs)."
        ) from error
    codes = _torch_compat.run_and_get_code(fx_step)
    if "joint" not in graphs:
        raise InspectError(
            "the compiled step updated no parameter: the output does not depend on any trainable parameter "
            "with an in-backward optimizer. Unfreeze them (requires_grad=True) or pass a model whose output "
            "is computed from its parameters."
        )
    device = next(subject.parameters()).device
    fx_curve = profile_step_memory(fx_step, device)
    eager_curve = profile_step_memory(eager_step, device)
    backward_code = codes[-1] if len(codes) > 1 else ""
    return Report(
        joint_before=normalize_graph(graphs["joint_before"]),
        joint_after=normalize_graph(graphs["joint"]),
        forward=normalize_graph(graphs["forward"]),
        backward=normalize_graph(graphs["backward"]),
        forward_code=codes[0] if codes else "",
        backward_code=backward_code,
        placements=_placements(graphs["backward"], backward_code, dict(subject.named_parameters())),
        eager_curve=eager_curve,
        fx_optim_curve=fx_curve,
    )


def _copy_with_optimizers(
    model: torch.nn.Module, optimizer: type[torch.optim.Optimizer] | None, optimizer_kwargs: dict[str, Any]
) -> torch.nn.Module:
    """A copy of ``model`` whose parameters have their own in-backward optimizers (fresh state)."""
    setups = [
        list(zip(p._optimizer_classes, p._optimizer_kwargs)) if updates_in_backward(p) else []  # type: ignore[attr-defined]
        for p in model.parameters()
    ]
    if optimizer is None and not any(setups):
        raise InspectError(
            "the model has no in-backward optimizers: pass optimizer=torch.optim.AdamW (for example), "
            "or call fx_optim_pass.apply_optimizer_in_backward on it first"
        )
    copy = deepcopy(model)
    for param, setup in zip(copy.parameters(), setups):
        for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
            param.__dict__.pop(attr, None)
        if optimizer is not None:
            setup = [(optimizer, optimizer_kwargs)]
        for optimizer_class, kwargs in setup:
            apply_optimizer_in_backward(optimizer_class, [param], kwargs)
    return copy


def _eager_reference(subject: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    """The same model and optimizers run the ordinary way: backward(), then step()."""
    reference = deepcopy(subject)
    optimizers = []
    for param, ref_param in zip(subject.parameters(), reference.parameters()):
        for cls, kwargs in zip(getattr(param, "_optimizer_classes", []), getattr(param, "_optimizer_kwargs", [])):
            optimizers.append(cls([ref_param], **kwargs))
    return reference, optimizers


def _loss(output: Any) -> torch.Tensor:
    tensors = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tensors:
        raise InspectError(
            "the model's output does not require grad: nothing to train. Make sure some parameters have "
            "requires_grad=True and the forward does not run under torch.no_grad()."
        )
    return sum(t.float().sum() for t in tensors)  # type: ignore[return-value]


def _placements(backward: fx.GraphModule, code: str, params: dict[str, torch.Tensor]) -> list[ParamPlacement]:
    nodes = list(backward.graph.nodes)
    calls = _kernel_calls(code)
    placements = []
    for name, p in find_placements(backward.graph).items():
        kernel = next(((i, k) for i, (k, outputs) in enumerate(calls) if p.param_input.name in outputs), None)
        param = params[name]
        placements.append(
            ParamPlacement(
                param=name,
                gradient_node=p.gradient.name,
                update_nodes=tuple(n.name for n in p.update),
                write_node=p.write.name,
                gradient_position=nodes.index(p.gradient),
                backward_position=nodes.index(p.write),
                backward_nodes=len(nodes),
                kernel=None if kernel is None else kernel[1],
                kernel_position=None if kernel is None else kernel[0],
                kernels=len(calls),
                gradient_bytes=param.numel() * param.element_size(),
            )
        )
    return placements


_CPP_KERNEL = re.compile(r"^(\w+) = async_compile\.cpp_pybinding\(\[([^\]]*)\]", re.M)
_TRITON_KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('\w+', '''.*?def \w+\(([^)]*)\)", re.M | re.S)
_CALL = re.compile(r"^\s+(extern_kernels\.\w+|\w+)(?:\.run)?\((.*)\)\s*$")


def _kernel_calls(code: str) -> list[tuple[str, set[str]]]:
    """The generated kernels in call order, each with the buffers it writes."""
    output_positions: dict[str, list[int]] = {}
    for name, types in _CPP_KERNEL.findall(code):
        kinds = re.findall(r"'([^']*)'", types)
        output_positions[name] = [i for i, kind in enumerate(kinds) if not kind.startswith("const")]
    for name, params in _TRITON_KERNEL.findall(code):
        names = [p.strip() for p in params.split(",")]
        output_positions[name] = [i for i, p in enumerate(names) if p.startswith(("out_ptr", "in_out_ptr"))]
    calls = []
    for line in code[code.find("def call(") :].splitlines():
        match = _CALL.match(line)
        if match and (match[1] in output_positions or match[1].startswith("extern_kernels.")):
            args = [a.strip() for a in match[2].split(",")]
            outputs = {args[i] for i in output_positions.get(match[1], []) if i < len(args)}
            calls.append((match[1], outputs))
    return calls


def _span(nodes: tuple[str, ...]) -> str:
    """``first .. last (n nodes)`` of an update's node names."""
    if not nodes:
        return "-"
    return nodes[0] if len(nodes) == 1 else f"{nodes[0]} .. {nodes[-1]} ({len(nodes)} nodes)"


def _bytes(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>fx_optim_pass report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table.diff {{ font-family: monospace; font-size: 12px; border-collapse: collapse; }}
.diff_add {{ background: #c8f0c8; }} .diff_chg {{ background: #f0e6a0; }} .diff_sub {{ background: #f4c0c0; }}
table.placement td, table.placement th {{ border: 1px solid #aaa; padding: 2px 8px; font-family: monospace; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>fx_optim_pass report</h1>
<h2 id="placement">Where each update landed</h2>
<table class="placement"><tr><th>parameter</th><th>gradient node</th><th>update nodes</th><th>write node</th>
<th>backward node</th><th>kernel</th><th>kernel call</th><th>gradient freed in the backward</th></tr>
{rows}</table>
<h2 id="memory">Memory of one training step</h2>
<p>Peak live tensor bytes above the step's start: eager {eager_peak}, fx_optim {fx_peak}.</p>
<img alt="live bytes of one step, eager vs fx_optim" src="data:image/png;base64,{png}">
<h2 id="joint-diff">Joint graph, before and after the pass (inserted nodes highlighted)</h2>
{diff}
<h2 id="backward">Backward graph</h2>
<pre>{backward}</pre>
<h2 id="backward-code">Generated backward code</h2>
<pre>{backward_code}</pre>
</body></html>
"""
