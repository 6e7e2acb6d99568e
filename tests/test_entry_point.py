"""`torch.compile(model, backend="fx_optim")` works before `import fx_optim_pass`."""

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest


def _installed() -> bool:
    try:
        importlib.metadata.distribution("fx_optim_pass")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Entry points exist only once the package is installed (`make test` installs it);
# a bare source tree on PYTHONPATH, as on the GPU machine, has none to find.
@pytest.mark.skipif(not _installed(), reason="fx_optim_pass is not installed, so it has no entry point")
def test_backend_is_found_by_name_without_importing_the_package():
    script = textwrap.dedent(
        """
        import sys, copy, torch
        from torch.distributed.optim import _apply_optimizer_in_backward

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        reference = copy.deepcopy(model)
        reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        _apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1, "momentum": 0.9})
        assert "fx_optim_pass" not in sys.modules
        compiled = torch.compile(model, backend="fx_optim", fullgraph=True)
        for _ in range(3):
            x = torch.randn(2, 4)
            compiled(x).sum().backward()
            reference(x).sum().backward()
            reference_opt.step()
            reference_opt.zero_grad()
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, r)
            assert p.grad is None
        assert "fx_optim_pass" in sys.modules  # loaded through the entry point
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
