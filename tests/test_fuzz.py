"""Random small models with random in-backward optimizers train exactly like eager torch.optim.

Each example draws a model (a Linear/LayerNorm MLP, a Conv2d/BatchNorm/MaxPool net, or an
Embedding language model whose embedding may be tied to the output projection), its
sizes and batch shapes, and a role for every parameter: one or two in-backward
optimizers with random settings (several optimizers in one model), or a plain
optimizer stepped after ``backward()``; some parameters start frozen, and some are
frozen or unfrozen between steps. The same model trains eagerly with torch.optim;
after every step the parameters, buffers, leftover gradients and optimizer state
must match.

CI runs a fixed, derandomized set of examples; ``FX_OPTIM_FUZZ_EXAMPLES=200`` runs a
deeper, random search (the Inductor sample grows with it); a failure prints the drawn
case and a ``@reproduce_failure`` blob, and ``train_and_compare`` replays a case.
"""

from __future__ import annotations

import os
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn

import fx_optim_pass as fop

STEPS = 3
DEEP_EXAMPLES = int(os.environ.get("FX_OPTIM_FUZZ_EXAMPLES", "0"))
AOT_EAGER_EXAMPLES = DEEP_EXAMPLES or 12
INDUCTOR_EXAMPLES = max(DEEP_EXAMPLES // 10, 2)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
    "Adagrad": torch.optim.Adagrad,
}


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not DEEP_EXAMPLES,  # a deep run explores new examples each time
        database=None,
        print_blob=True,
        # `device` and conftest's autouse fixture are function-scoped; each example resets Dynamo itself.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ---------------------------------------------------------------- what an example is


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    kwargs: dict[str, Any]

    def make(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.name](params, **self.kwargs)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.kwargs.items())})"


@st.composite
def optimizer_configs(draw: st.DrawFn, names: tuple[str, ...] = tuple(OPTIMIZERS)) -> OptimizerConfig:
    name = draw(st.sampled_from(names))
    kwargs: dict[str, Any] = {"weight_decay": draw(st.sampled_from([0.0, 0.01, 0.1]))}
    if name == "SGD":
        kwargs["lr"] = draw(st.sampled_from([0.01, 0.1]))
        kwargs["momentum"] = draw(st.sampled_from([0.0, 0.9]))
        if kwargs["momentum"]:
            kwargs["nesterov"] = draw(st.booleans())
            kwargs["dampening"] = 0.0 if kwargs["nesterov"] else draw(st.sampled_from([0.0, 0.3]))
        kwargs["maximize"] = draw(st.booleans())
    elif name in ("Adam", "AdamW"):
        kwargs["lr"] = draw(st.sampled_from([1e-3, 1e-2]))
        kwargs["amsgrad"] = draw(st.booleans())
        kwargs["betas"] = draw(st.sampled_from([(0.9, 0.999), (0.8, 0.95)]))
        kwargs["maximize"] = draw(st.booleans())
    elif name == "RMSprop":
        kwargs["lr"] = draw(st.sampled_from([1e-3, 1e-2]))
        kwargs["alpha"] = draw(st.sampled_from([0.9, 0.99]))
        kwargs["momentum"] = draw(st.sampled_from([0.0, 0.5]))
        kwargs["centered"] = draw(st.booleans())
    else:
        kwargs["lr"] = draw(st.sampled_from([1e-2, 0.1]))
        kwargs["lr_decay"] = draw(st.sampled_from([0.0, 0.01]))
        kwargs["initial_accumulator_value"] = draw(st.sampled_from([0.0, 0.1]))
    return OptimizerConfig(name, kwargs)


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "mlp" | "conv" | "lm"
    dtype: torch.dtype
    width: int
    depth: int
    tied: bool
    batches: tuple[int, ...]  # batch size of each step
    seed: int


@st.composite
def model_specs(draw: st.DrawFn) -> ModelSpec:
    family = draw(st.sampled_from(["mlp", "conv", "lm"]))
    batch = draw(st.integers(2, 4))
    if draw(st.booleans()):  # a shape change: Dynamo recompiles with dynamic shapes
        batches = tuple(draw(st.lists(st.integers(2, 4), min_size=STEPS, max_size=STEPS)))
    else:
        batches = (batch,) * STEPS
    return ModelSpec(
        family=family,
        dtype=draw(st.sampled_from([torch.float64, torch.float64, torch.float64, torch.float32])),
        width=draw(st.integers(3, 8)),
        depth=draw(st.integers(1, 2)),
        tied=family == "lm" and draw(st.booleans()),
        batches=batches,
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass
class Roles:
    """Per parameter (in ``model.parameters()`` order) what steps it."""

    configs: list[OptimizerConfig]  # in-backward optimizer settings, shared by index
    in_backward: list[tuple[int, ...]]  # indices into configs, in registration order; () = plain optimizer
    plain: OptimizerConfig  # stepped after backward() for parameters without in-backward optimizers
    frozen: list[bool]  # requires_grad False at the start
    frozen_before_setup: bool  # frozen before or after the optimizers are set up
    toggle_step: int | None = None  # before this step, flip requires_grad of `toggled`
    toggled: list[int] = field(default_factory=list)


@st.composite
def roles_for(draw: st.DrawFn, num_params: int, dtype: torch.dtype) -> Roles:
    # Adam, RMSprop and Adagrad divide by the gradient's own size: float32 rounding
    # noise in a near-zero gradient element becomes a visible difference in the update
    # (in either mode). In float64 that noise stays far below the tolerance; float32
    # examples use SGD, whose update is linear in the gradient.
    names = tuple(OPTIMIZERS) if dtype == torch.float64 else ("SGD",)
    configs = draw(st.lists(optimizer_configs(names), min_size=1, max_size=3))
    indices = st.integers(0, len(configs) - 1)
    in_backward = []
    for _ in range(num_params):
        kind = draw(st.sampled_from(["one", "one", "one", "two", "plain"]))
        if kind == "one":
            in_backward.append((draw(indices),))
        elif kind == "two" and len(configs) > 1:  # two optimizers on one parameter, in registration order
            in_backward.append(tuple(sorted(draw(st.lists(indices, min_size=2, max_size=2, unique=True)))))
        elif kind == "two":
            in_backward.append((0,))
        else:
            in_backward.append(())
    frozen = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=num_params, max_size=num_params))
    toggle_step = draw(st.sampled_from([None, None, 1, 2]))
    toggled = draw(st.lists(st.integers(0, num_params - 1), max_size=3, unique=True)) if toggle_step else []
    plain = draw(optimizer_configs(names))
    return Roles(configs, in_backward, plain, frozen, draw(st.booleans()), toggle_step, toggled)


# ---------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = 5
        for _ in range(spec.depth):
            layers += [nn.Linear(width_in, spec.width), nn.LayerNorm(spec.width), nn.ReLU()]
            width_in = spec.width
        layers.append(nn.Linear(width_in, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).pow(2).mean()


class ConvNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels_in = 2
        for depth in range(spec.depth):
            # A parameter whose gradient is zero up to rounding would be stepped on rounding
            # noise, which Adam-like normalization turns into visible steps in either mode. So
            # no conv bias before BatchNorm (BatchNorm removes any shift), and BatchNorm in the
            # first block only: a later one removes the shift a BatchNorm bias before it makes
            # wherever the ReLU between them passes everything (a fuzz example had such a
            # channel: its bias gradient was 1e-16, eager and Inductor's rounding far apart).
            batch_norm = depth == 0
            layers += [
                nn.Conv2d(channels_in, spec.width, kernel_size=3 - depth, padding=1 - depth, bias=not batch_norm),
                *([nn.BatchNorm2d(spec.width)] if batch_norm else []),
                nn.ReLU(),
            ]
            if depth == 0:  # 4x4 to 2x2, so that the second conv (2x2, unpadded) still fits
                layers.append(nn.MaxPool2d(2))
            channels_in = spec.width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(spec.width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).pow(2).mean()


class TinyLM(nn.Module):
    vocab = 11

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embedding = nn.Embedding(self.vocab, spec.width)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(spec.width, spec.width), nn.LayerNorm(spec.width)) for _ in range(spec.depth)]
        )
        self.head = nn.Linear(spec.width, self.vocab, bias=False)
        if spec.tied:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.blocks(self.embedding(tokens[:, :-1])))
        return F.cross_entropy(self.head(hidden).flatten(0, 1), tokens[:, 1:].flatten())


def build(spec: ModelSpec, device: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model and one input per step."""
    torch.manual_seed(spec.seed)
    if spec.family == "mlp":
        model: nn.Module = MLP(spec)
        inputs = [torch.randn(b, 5) for b in spec.batches]
    elif spec.family == "conv":
        model = ConvNet(spec)
        inputs = [torch.randn(b, 2, 4, 4) for b in spec.batches]
    else:
        model = TinyLM(spec)
        inputs = [torch.randint(TinyLM.vocab, (b, 5)) for b in spec.batches]
    return model.to(device, spec.dtype), [
        x.to(device, spec.dtype if x.is_floating_point() else x.dtype) for x in inputs
    ]


# ---------------------------------------------------------------- the check


class Trainer:
    """One copy of the model with its optimizers; ``in_backward`` decides how configs are applied."""

    def __init__(self, model: nn.Module, roles: Roles, in_backward: bool) -> None:
        self.model, self.roles = model, roles
        self.params = list(model.parameters())
        if roles.frozen_before_setup:
            self.freeze()
        self.by_config: list[torch.optim.Optimizer | None] = []
        for k, config in enumerate(roles.configs):
            members = [p for p, ks in zip(self.params, roles.in_backward) if k in ks]
            if not members:
                self.by_config.append(None)
            elif in_backward:
                fop.apply_optimizer_in_backward(OPTIMIZERS[config.name], members, config.kwargs)
                self.by_config.append(None)
            else:
                self.by_config.append(config.make(members))
        plain = [p for p, ks in zip(self.params, roles.in_backward) if not ks]
        self.plain = roles.plain.make(plain) if plain else None
        self.freeze()

    def freeze(self) -> None:
        for p, frozen in zip(self.params, self.roles.frozen):
            p.requires_grad_(not frozen)

    def toggle(self, step: int) -> None:
        if step == self.roles.toggle_step:
            for i in self.roles.toggled:
                self.params[i].requires_grad_(not self.params[i].requires_grad)

    def step_after_backward(self) -> None:
        for opt in [*self.by_config, self.plain]:
            if opt is not None:
                opt.step()

    def zero_grad(self) -> None:
        for opt in [*self.by_config, self.plain]:
            if opt is not None:
                opt.zero_grad()

    def state(self, index: int) -> list[dict[str, Any]]:
        """The optimizer state of parameter ``index``: one dict per optimizer that steps it."""
        p = self.params[index]
        ks = self.roles.in_backward[index]
        if not ks:
            return [self.plain.state[p]] if self.plain is not None else []
        if self.by_config[ks[0]] is None:  # in-backward: the parameter's own optimizers
            return [opt.state[p] for opt in p._in_backward_optimizers]  # type: ignore[attr-defined]
        return [self.by_config[k].state[p] for k in ks]  # type: ignore[union-attr]


def describe(spec: ModelSpec, roles: Roles, model: nn.Module) -> str:
    lines = [repr(spec), f"configs: {roles.configs}", f"plain: {roles.plain}"]
    for i, (name, _) in enumerate(model.named_parameters()):
        ks = roles.in_backward[i]
        role = " + ".join(f"config {k}" for k in ks) or "plain"
        lines.append(f"  {name}: {role}{' (frozen)' if roles.frozen[i] else ''}")
    if any(roles.frozen):
        lines.append(f"frozen {'before' if roles.frozen_before_setup else 'after'} apply_optimizer_in_backward")
    if roles.toggle_step is not None:
        lines.append(f"before step {roles.toggle_step}: flip requires_grad of {roles.toggled}")
    return "\n".join(lines)


def check_against_eager(data: st.DataObject, compiler: str, device: str) -> None:
    spec = data.draw(model_specs(), label="model")
    roles = data.draw(roles_for(len(list(build(spec, "cpu")[0].parameters())), spec.dtype), label="roles")
    note(describe(spec, roles, build(spec, "cpu")[0]))
    train_and_compare(spec, roles, compiler, device)


def train_and_compare(spec: ModelSpec, roles: Roles, compiler: str, device: str) -> None:
    """Train ``spec``'s model eagerly and compiled with ``roles``; everything must match after every step.

    float64 examples run as float64 training does (default dtype float64), so torch.optim
    keeps ``step`` in float64: the traced update computes Adam's bias corrections from that
    tensor, eager torch.optim from a Python float. (A float32 ``step`` would put them ~1e-5
    apart: ``1 - 0.999 ** step`` in float32, as in torch's own capturable path.)
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)
    try:
        _train_and_compare(spec, roles, compiler, device)
    finally:
        torch.set_default_dtype(previous)


def _train_and_compare(spec: ModelSpec, roles: Roles, compiler: str, device: str) -> None:
    torch._dynamo.reset()
    model, inputs = build(spec, device)
    reference_model = deepcopy(model)
    subject = Trainer(model, roles, in_backward=True)
    reference = Trainer(reference_model, roles, in_backward=False)
    compiled = torch.compile(model, backend=fop.make_backend(compiler=compiler), fullgraph=True)  # type: ignore[arg-type]
    initial = [p.detach().clone() for p in subject.params]
    ever_trained = [not f for f in roles.frozen]

    for step, x in enumerate(inputs):
        subject.toggle(step)
        reference.toggle(step)
        ever_trained = [t or p.requires_grad for t, p in zip(ever_trained, subject.params)]

        reference_model(x).backward()
        compiled(x).backward()
        for i, (p, ref) in enumerate(zip(subject.params, reference.params)):
            if roles.in_backward[i] and p.requires_grad:
                assert p.grad is None, f"parameter {i} has in-backward optimizers but got a gradient"
            elif ref.grad is None:
                assert p.grad is None, f"parameter {i}: gradient where eager has none"
            else:
                assert p.grad is not None, f"parameter {i}: no gradient where eager has one"
                torch.testing.assert_close(p.grad, ref.grad, msg=lambda m, i=i: f"gradient of parameter {i}: {m}")
        reference.step_after_backward()
        reference.zero_grad()
        subject.step_after_backward()
        subject.zero_grad()

        for i, (p, ref) in enumerate(zip(subject.params, reference.params)):
            torch.testing.assert_close(p, ref, msg=lambda m, i=i, step=step: f"parameter {i} after step {step}: {m}")
        for b, ref_b in zip(model.buffers(), reference_model.buffers()):
            torch.testing.assert_close(b, ref_b)

    for i, (p, before) in enumerate(zip(subject.params, initial)):
        if not ever_trained[i]:
            assert torch.equal(p, before), f"frozen parameter {i} changed"
        for state, ref_state in zip(subject.state(i), reference.state(i), strict=True):
            if not ref_state:  # torch keeps no state for a parameter it never stepped
                continue
            assert state.keys() == ref_state.keys(), f"state of parameter {i}"
            for key in state:
                torch.testing.assert_close(
                    state[key], ref_state[key], msg=lambda m, i=i, key=key: f"state {key!r} of parameter {i}: {m}"
                )


@fuzz_settings(AOT_EAGER_EXAMPLES)
@given(data=st.data())
def test_random_models_match_eager_aot_eager(data: st.DataObject, device: str) -> None:
    check_against_eager(data, "aot_eager", device)


@fuzz_settings(INDUCTOR_EXAMPLES)
@given(data=st.data())
def test_random_models_match_eager_inductor(data: st.DataObject, device: str) -> None:
    check_against_eager(data, "inductor", device)
