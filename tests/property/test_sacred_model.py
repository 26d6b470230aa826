"""The user's model is sacred: random compositions of odd modules, every entry point, returning or raising.

A model is plain data (:class:`Spec`), so hypothesis can shrink and print it:
a stem, a few blocks of odd kinds, a head. Blocks: a plain convolution, one
held by a module that forwards its attribute reads and writes to a plain
object of the user's (as torch.compile's wrapper does), convolutions under
``torch.nn.utils.parametrize`` (weight norm, spectral norm, orthogonal), two
convolutions with tied weights, two batch norms sharing their buffers, an
in-place ReLU, dropout. Any block may be in train mode, carry a user's hook
or a ``rule``; the head may be orthogonal. Each example then runs LRP,
LayerLRP, LayerGradCam and LayerActivation (or LayerIntegratedGradients), and a
failure is injected into some calls: a bad target, a NaN input, an unknown
layer, a module whose forward raises. After every call, returning or
raising: ``assert_untouched`` (state dict bit for bit, the module tree,
attributes, hooks, flags, tensors' hooks and attributes, global state) and
the forwarding module's plain object unchanged.
"""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS_DIR not in sys.path:  # harmless when tests/conftest.py already put it there
    sys.path.insert(0, _TESTS_DIR)

import dataclasses
from typing import Callable, List, Tuple

import pytest
import torch
from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import captum_graph
from captum_graph.attr import LayerActivation, LayerGradCam, LayerIntegratedGradients, LayerLRP, LRP
from captum_graph.rules import PassThroughRule
from helpers.models import AttributeSink, Forwarding
from helpers.oracles import assert_untouched

pytestmark = pytest.mark.filterwarnings("ignore")  # Captum's and export's warnings about odd modules

C, SIDE, CLASSES = 4, 6, 3
BLOCK_KINDS = ("conv", "forwarding", "weight_norm", "spectral_norm", "orthogonal", "tied", "shared_buffers", "inplace_relu", "dropout", "bomb")
FAILURES = ("none", "bad target", "nan input", "unknown layer", "raising forward")
METHODS = ("LRP", "LayerLRP", "LayerGradCam", "LayerActivation", "LayerIntegratedGradients")


@dataclasses.dataclass(frozen=True)
class Spec:
    """``blocks``: ``(kind, train, user_hook, rule)`` per block; ``head``: ``"plain" | "orthogonal"``."""

    blocks: Tuple[Tuple[str, bool, bool, bool], ...]
    head: str
    method: str
    failure: str
    seed: int


_ARMED = {"on": False}  # global: torch.export snapshots a module's own attributes


class Bomb(nn.Module):
    """``x * 1.0`` until armed; then its forward raises (a leaf module: it runs at every call)."""

    def forward(self, x):
        if _ARMED["on"]:
            raise RuntimeError("bomb")
        return x * 1.0


captum_graph.register_leaf_module(Bomb)
_RULES = {Bomb: PassThroughRule()}


def _conv() -> nn.Conv2d:
    return nn.Conv2d(C, C, 3, padding=1)


class TiedPair(nn.Module):
    """Two convolutions holding one weight parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _conv(), _conv()
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class SharedBuffers(nn.Module):
    """Two batch norms whose running statistics are the same tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.a, self.b = _conv(), nn.BatchNorm2d(C), nn.BatchNorm2d(C)
        self.b.running_mean = self.a.running_mean
        self.b.running_var = self.a.running_var
        with torch.no_grad():
            self.a.running_mean.uniform_(-0.1, 0.1)
            self.a.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return torch.relu(self.b(self.conv(torch.relu(self.a(x)))))


def _block(kind: str, sinks: List[AttributeSink]) -> nn.Module:
    if kind == "conv":
        return nn.Sequential(_conv(), nn.ReLU())
    if kind == "forwarding":
        sinks.append(AttributeSink())
        return Forwarding(nn.Sequential(_conv(), nn.ReLU()), sinks[-1])
    if kind in ("weight_norm", "spectral_norm", "orthogonal"):
        return nn.Sequential(getattr(parametrizations, kind)(_conv()), nn.ReLU())
    if kind == "tied":
        return TiedPair()
    if kind == "shared_buffers":
        return SharedBuffers()
    if kind == "inplace_relu":
        return nn.Sequential(_conv(), nn.ReLU(inplace=True))
    if kind == "dropout":
        return nn.Sequential(_conv(), nn.Dropout(0.25), nn.ReLU())
    return nn.Sequential(_conv(), Bomb())


class Net(nn.Module):
    def __init__(self, blocks: List[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.blocks(torch.relu(self.stem(x)))), 1))


def build(spec: Spec) -> Tuple[nn.Module, List[AttributeSink], list]:
    """The model, the forwarding modules' plain objects, and the handles of the user's own hooks."""
    torch.manual_seed(spec.seed)
    sinks: List[AttributeSink] = []
    blocks = [_block(kind, sinks) for kind, *_ in spec.blocks]
    head = nn.Linear(C, CLASSES)
    model = Net(blocks, parametrizations.orthogonal(head) if spec.head == "orthogonal" else head).double().eval()
    handles = []
    for block, (kind, train, user_hook, rule) in zip(model.blocks, spec.blocks):
        block.train(train)
        if user_hook:
            handles.append(block.register_forward_hook(lambda module, args, output: None))
            handles.append(block.register_forward_pre_hook(lambda module, args, kwargs: None, with_kwargs=True))
        if rule:
            first = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
            first.rule = GammaRule()
    return model, sinks, handles


def _call(spec: Spec, model: nn.Module, failure: str) -> Callable[[], object]:
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    if failure == "nan input":
        x[0, 0, 0, 0] = float("nan")
    target = CLASSES + 7 if failure == "bad target" else 1
    layer = "blocks.nowhere" if failure == "unknown layer" else f"blocks.{len(spec.blocks) - 1}"
    rules = {**_RULES, nn.Linear: EpsilonRule(1e-6)}
    return {
        "LRP": lambda: LRP(model, rules=rules).attribute(x, target=target),
        "LayerLRP": lambda: LayerLRP(model, layer, rules=rules).attribute(x, target=target),
        "LayerGradCam": lambda: LayerGradCam(model, layer).attribute(x, target=target),
        "LayerActivation": lambda: LayerActivation(model, layer).attribute(x),
        "LayerIntegratedGradients": lambda: LayerIntegratedGradients(model, layer).attribute(x, target=target, n_steps=3),
    }[spec.method]


def _check(spec: Spec, model: nn.Module, sinks: List[AttributeSink], call: Callable[[], object], must_raise: bool) -> None:
    sink_states = [dict(vars(sink)) for sink in sinks]
    with assert_untouched(model):  # no inputs: a model in train mode would update its own statistics
        try:
            call()
        except Exception:  # noqa: BLE001 - returning or raising, the model must be as it was
            if not must_raise and all(kind not in ("dropout",) for kind, *_ in spec.blocks):
                raise
        else:
            assert not must_raise, f"the injected failure did not raise: {spec}"
    after = [dict(vars(sink)) for sink in sinks]
    assert after == sink_states, f"written through to the user's object: {sink_states} -> {after}"


blocks = st.tuples(st.sampled_from(BLOCK_KINDS), st.booleans(), st.booleans(), st.booleans())
specs = st.builds(
    Spec,
    blocks=st.lists(blocks, min_size=1, max_size=3).map(tuple),
    head=st.sampled_from(("plain", "orthogonal")),
    method=st.sampled_from(METHODS),
    failure=st.sampled_from(FAILURES),
    seed=st.integers(0, 2**16),
)


@given(specs)
def test_model_is_untouched_by_any_call_returning_or_raising(spec):
    model, sinks, handles = build(spec)
    try:
        _check(spec, model, sinks, _call(spec, model, "none"), must_raise=False)
        failure = spec.failure
        if failure == "unknown layer" and spec.method == "LRP":
            failure = "bad target"  # LRP has no layer to name
        if failure == "raising forward":
            if not any(kind == "bomb" for kind, *_ in spec.blocks):
                return
            _ARMED["on"] = True  # after the capture of the first call: the leaf runs its own forward
        try:
            if failure != "none":
                must_raise = not (failure == "bad target" and spec.method == "LayerActivation")  # takes no target
                _check(spec, model, sinks, _call(spec, model, failure), must_raise=must_raise)
        finally:
            _ARMED["on"] = False
    finally:
        for handle in handles:
            handle.remove()
