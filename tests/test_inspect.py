"""fx_optim_pass.inspect, the fx-optim-pass CLI, and PyTorch's own logging and tracing."""

import os
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import fx_optim_pass as fop
from fx_optim_pass import cli
from fx_optim_pass.measure import peak_step_memory


def three_layer_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def report():
    torch._dynamo.reset()
    return fop.inspect(three_layer_mlp(), torch.randn(8, 32), optimizer=torch.optim.AdamW)


def test_report_names_every_parameter(report):
    assert {p.param for p in report.placements} == {name for name, _ in three_layer_mlp().named_parameters()}
    # the write is our copy_ (write__0_weight), or an update node Inductor folded it into
    assert all(
        p.write_node.endswith(p.param.replace(".", "_")) or p.param.replace(".", "_") in p.write_node
        for p in report.placements
    )
    assert all(p.gradient_bytes == 4 * three_layer_mlp().get_parameter(p.param).numel() for p in report.placements)


def test_each_update_comes_before_the_next_layers_gradient_matmul(report):
    placed = {p.param: p for p in report.placements}
    for later, earlier in (("4", "2"), ("2", "0")):
        for suffix in ("weight", "bias"):
            # in the backward graph ...
            assert placed[f"{later}.{suffix}"].backward_position < placed[f"{earlier}.weight"].gradient_position
            # ... and in the generated code, with the earlier layer's gradient matmul in between
            assert placed[f"{later}.{suffix}"].kernel_position + 1 < placed[f"{earlier}.weight"].kernel_position


def test_report_memory_agrees_with_the_benchmark_method(report):
    torch._dynamo.reset()
    model = three_layer_mlp()
    fop.apply_optimizer_in_backward(torch.optim.AdamW, model.parameters(), {"lr": 1e-3})
    compiled = torch.compile(model, backend=fop.backend, fullgraph=True)
    x = torch.randn(8, 32)

    def step():
        compiled(x).sum().backward()

    step()
    assert peak_step_memory(step) == report.fx_optim_peak
    assert report.fx_optim_peak < report.eager_peak


class Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.scripts = set(), [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1


def test_html_is_self_contained_with_all_sections(report):
    page = report.to_html()
    parser = Sections()
    parser.feed(page)
    assert {"placement", "memory", "joint-diff", "backward", "backward-code"} <= parser.ids
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert parser.scripts == 0 and "http" not in page.split("<body>")[1].split("data:image")[0]
    assert 'class="diff_add"' in page and "adamw_update__0_weight" in page


def test_cli_writes_the_files_it_promises(tmp_path, capsys):
    assert cli.main(["inspect", "mlp", "--optimizer", "sgd", "--lr", "0.1", "--out", str(tmp_path)]) == 0
    expected = {
        "joint_before.txt",
        "joint_after.txt",
        "forward.txt",
        "backward.txt",
        "forward_code.py",
        "backward_code.py",
        "placement.txt",
        "report.html",
    }
    assert expected <= {p.name for p in tmp_path.iterdir()}
    assert "sgd_update__0_weight" in (tmp_path / "joint_after.txt").read_text()
    table = (tmp_path / "placement.txt").read_text()
    assert {line.split()[0] for line in table.splitlines()[1:]} == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    }
    assert table in capsys.readouterr().out


def bad_inputs():
    return nn.Linear(4, 2), (torch.randn(3, 5),)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "no_such_module:factory"], "cannot import 'no_such_module'"),
        (["inspect", "tests.test_inspect:bad_inputs"], "example inputs do not fit the model"),
        (["inspect", "tests.test_inspect:no_factory"], "has no function 'no_factory'"),
        (["inspect", "mlp", "--optimizer", "lbfgs"], "LBFGS cannot run in the backward pass"),
        (["inspect", "resnet"], "unknown model 'resnet'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_model_without_in_backward_optimizers_is_refused():
    with pytest.raises(fop.InspectError, match="no in-backward optimizers"):
        fop.inspect(nn.Linear(4, 2), torch.randn(3, 4))


SCRIPT = textwrap.dedent(
    """
    import torch, fx_optim_pass as fop
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    fop.apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    compiled = torch.compile(model, backend=fop.make_backend(compiler="aot_eager"), fullgraph=True)
    compiled(torch.randn(2, 4)).sum().backward()
    """
)


def run_script(**env):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_joint_graphs_appear_in_the_structured_trace(tmp_path):
    result = run_script(TORCH_TRACE=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    trace = "".join(p.read_text() for p in Path(tmp_path).iterdir())
    assert '"name": "fx_optim_pass_joint_before"' in trace
    assert '"name": "fx_optim_pass_joint_after"' in trace


def test_torch_logs_prints_the_placement_table():
    result = run_script(TORCH_LOGS="fx_optim_pass.placement")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fx_optim_pass placement" in result.stderr
    assert "write__0_weight" in result.stderr and "write__2_bias" in result.stderr


def test_cli_demo_runs_the_demo(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "loss parity" in out and "peak memory / step" in out and "median step time" in out
    assert (tmp_path / "backward.txt").read_text().count("write__") > 0
