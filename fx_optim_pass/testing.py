"""Golden graphs: normalized graph text compared against files under ``graphs/``.

``EXPECTTEST_ACCEPT=1`` rewrites the files instead of comparing (atomically:
temp file + rename). Text is normalized so goldens survive unrelated changes:
no stack-trace comments, no file paths, no trailing spaces or blank-line runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
import torch.fx as fx

from fx_optim_pass import _torch_compat

__all__ = ["GOLDEN_TORCH_VERSION", "assert_expected_graph", "goldens_apply", "normalize_graph"]

# Graph text depends on torch's decompositions and naming; goldens are recorded
# with this release and compared only there.
GOLDEN_TORCH_VERSION = "2.13"


def goldens_apply() -> bool:
    """Whether this torch is the one the goldens were recorded with."""
    return torch.__version__.startswith(GOLDEN_TORCH_VERSION + ".")


def normalize_graph(gm: fx.GraphModule) -> str:
    """``print_readable`` text without comments, paths, devices or trailing space."""
    text = _torch_compat.normalize_gm(gm.print_readable(print_output=False, include_stride=False, include_device=False))
    return re.sub(r"device\(type='[a-z]+'(, index=\d+)?\)", "device(...)", text).strip() + "\n"


def assert_expected_graph(actual: str, path: str | os.PathLike[str]) -> None:
    """Compare ``actual`` with the golden file at ``path`` (rewrite it under EXPECTTEST_ACCEPT=1)."""
    path = Path(path)
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(actual)
        os.replace(tmp.name, path)
        return
    if not path.exists():
        raise AssertionError(f"golden file {path} is missing; run `make graphs` (EXPECTTEST_ACCEPT=1) to record it")
    expected = path.read_text()
    if actual != expected:
        import difflib

        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), actual.splitlines(keepends=True), str(path), "actual"
            )
        )
        raise AssertionError(f"graph differs from golden {path} (EXPECTTEST_ACCEPT=1 to accept):\n{diff}")
