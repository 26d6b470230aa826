"""Random small DAG networks: LRP's oracles and the rewrite passes' promises.

A network is plain data (:class:`Arch`, a list of ops over a growing list of
tensors) so that hypothesis can shrink it and print it, and so that a failing
case can be pinned (see ``PINNED`` at the end). :class:`RandomNet` runs it eagerly, with
every spelling the graph passes must handle: ``+``, ``torch.add``, ``x.add``,
``+=``; ReLU as a module (shared by every call site), in-place module,
``F.relu``, ``torch.relu``, ``x.relu()`` and their in-place forms;
``torch.cat``; max/avg pooling as modules (shared) or functions; a conv called
at two places; global average pooling by ``x.mean((2, 3))`` or an adaptive
pool; a Linear head. In-place ops only touch a tensor that was just produced
by an op whose backward does not need its output (conv, addition, cat,
pooling), and nothing has read it yet, so the eager model is valid autograd.
The rewrite passes see the ATen graph torch.export captures at the example
input, where each of these spellings is one operator (``aten.add``,
``aten.add_``, ``aten.relu``, ``aten.relu_``, ...).
"""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS_DIR not in sys.path:  # harmless when tests/conftest.py already put it there
    sys.path.insert(0, _TESTS_DIR)

import collections
import dataclasses
import math
from typing import Callable, List, Tuple

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr import InputXGradient
from captum.attr._utils.lrp_rules import EpsilonRule
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_graph import modules as M
from captum_graph import passes as passes_module
from captum_graph.attr import LRP
from captum_graph.capture import capture
from captum_graph.cloning import private_copy
from captum_graph.prepare import rewrite_passes
from captum_graph.rules import EPSILON_TYPES
from helpers.oracles import assert_untouched

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")

DTYPE = torch.float64
BATCH, SIDE, CLASSES = 2, 8, 3
EPSILON = 1e-12
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# producers whose output an in-place op may change (their backward does not read it)
_MUTABLE_PRODUCERS = ("conv", "add", "cat", "pool")


# ---------------------------------------------------------------------------
# architectures as data
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    """``ops`` build tensors ``t1, t2, ...`` from ``t0`` (the input); the head reads the last one.

    Ops (``i``, ``j`` index earlier tensors):
      ``("conv", i, k)``      conv module ``conv{k}`` (3x3, padding 1); a ``k`` seen before reuses it
      ``("relu", i, how)``    module | module_inplace | functional | functional_inplace | torch |
                              torch_inplace | method | method_inplace
      ``("add", i, j, how)``  op (``+``) | torch (``torch.add``) | method (``.add``) | iadd (``+=``)
      ``("cat", i, j)``       ``torch.cat([ti, tj], 1)``
      ``("pool", i, how)``    max_module | max_functional | avg_module | avg_functional (2x2)
    """

    in_channels: int
    convs: Tuple[Tuple[int, int, bool], ...]  # (in, out, bias) per conv module
    ops: Tuple[tuple, ...]
    head: str  # "mean" | "adaptive"
    head_bias: bool
    seed: int


@st.composite
def architectures(draw) -> Arch:
    in_channels = draw(st.integers(1, 3))
    shapes: List[Tuple[int, int]] = [(in_channels, SIDE)]  # (channels, side) of each tensor
    producers = ["input"]
    convs: List[Tuple[int, int, bool]] = []
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        last = len(shapes) - 1
        mutable = producers[last] in _MUTABLE_PRODUCERS  # an in-place op may change t_last
        same_shape = [(i, j) for i in range(len(shapes)) for j in range(len(shapes)) if shapes[i] == shapes[j]]
        same_side = [
            (i, j)
            for i in range(len(shapes))
            for j in range(len(shapes))
            if shapes[i][1] == shapes[j][1] and shapes[i][0] + shapes[j][0] <= 6
        ]
        poolable = [i for i, (_, side) in enumerate(shapes) if side >= 2]
        reusable = [(i, k) for k, (c_in, c_out, _) in enumerate(convs) if c_in == c_out for i, s in enumerate(shapes) if s[0] == c_in]
        kinds = ["conv", "relu", "add", "cat"] + (["pool"] if poolable else []) + (["reuse"] if reusable else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            i = draw(st.integers(0, last))
            out, bias = draw(st.integers(1, 4)), draw(st.booleans())
            convs.append((shapes[i][0], out, bias))
            ops.append(("conv", i, len(convs) - 1))
            shapes.append((out, shapes[i][1]))
            producers.append("conv")
        elif kind == "reuse":
            i, k = draw(st.sampled_from(reusable))
            ops.append(("conv", i, k))
            shapes.append(shapes[i])
            producers.append("conv")
        elif kind == "relu":
            hows = ["module", "functional", "torch", "method"]
            i = draw(st.one_of(st.just(last), st.integers(0, last)))  # the newest tensor half the time
            if i == last and mutable and draw(st.booleans()):
                hows = [how + "_inplace" for how in hows]
            ops.append(("relu", i, draw(st.sampled_from(hows))))
            shapes.append(shapes[i])
            producers.append("relu")
        elif kind == "add":
            newest_first = [(i, j) for i, j in same_shape if i == last]
            i, j = draw(st.one_of(st.sampled_from(newest_first), st.sampled_from(same_shape)))
            inplace = i == last and mutable and draw(st.booleans())
            ops.append(("add", i, j, "iadd" if inplace else draw(st.sampled_from(["op", "torch", "method"]))))
            shapes.append(shapes[i])
            producers.append("add")
        elif kind == "cat":
            i, j = draw(st.sampled_from(same_side))
            ops.append(("cat", i, j))
            shapes.append((shapes[i][0] + shapes[j][0], shapes[i][1]))
            producers.append("cat")
        else:
            i = draw(st.sampled_from(poolable))
            ops.append(("pool", i, draw(st.sampled_from(["max_module", "max_functional", "avg_module", "avg_functional"]))))
            shapes.append((shapes[i][0], shapes[i][1] // 2))
            producers.append("pool")
    return Arch(
        in_channels=in_channels,
        convs=tuple(convs),
        ops=tuple(ops),
        head=draw(st.sampled_from(["mean", "adaptive"])),
        head_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _channels(arch: Arch) -> List[int]:
    channels = [arch.in_channels]
    for op in arch.ops:
        if op[0] == "conv":
            channels.append(arch.convs[op[2]][1])
        elif op[0] == "cat":
            channels.append(channels[op[1]] + channels[op[2]])
        else:
            channels.append(channels[op[1]])
    return channels


class RandomNet(nn.Module):
    def __init__(self, arch: Arch, biases: bool = True) -> None:
        super().__init__()
        self.ops = arch.ops
        self.head = arch.head
        for k, (c_in, c_out, bias) in enumerate(arch.convs):
            setattr(self, f"conv{k}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias and biases))
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.avgpool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(_channels(arch)[-1], CLASSES, bias=arch.head_bias and biases)
        generator = torch.Generator().manual_seed(arch.seed)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                fan_in = max(1, parameter[0].numel()) if parameter.dim() > 1 else 1
                scale = math.sqrt(2.0 / fan_in) if parameter.dim() > 1 else 0.3
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        self.to(DTYPE).eval()

    def forward(self, x):
        ts = [x]
        for op in self.ops:
            kind = op[0]
            if kind == "conv":
                y = getattr(self, f"conv{op[2]}")(ts[op[1]])
            elif kind == "relu":
                y = self._relu(ts[op[1]], op[2])
            elif kind == "add":
                a, b, how = ts[op[1]], ts[op[2]], op[3]
                if how == "op":
                    y = a + b
                elif how == "torch":
                    y = torch.add(a, b)
                elif how == "method":
                    y = a.add(b)
                else:
                    y = a
                    y += b
            elif kind == "cat":
                y = torch.cat([ts[op[1]], ts[op[2]]], 1)
            else:
                y = self._pool(ts[op[1]], op[2])
            ts.append(y)
        out = ts[-1]
        out = out.mean((2, 3)) if self.head == "mean" else self.gap(out).flatten(1)
        return self.fc(out)

    def _relu(self, x, how):
        if how == "module":
            return self.relu(x)
        if how == "module_inplace":
            return self.relu_inplace(x)
        if how == "functional":
            return F.relu(x)
        if how == "functional_inplace":
            return F.relu(x, inplace=True)
        if how == "torch":
            return torch.relu(x)
        if how == "torch_inplace":
            return torch.relu_(x)
        if how == "method":
            return x.relu()
        return x.relu_()

    def _pool(self, x, how):
        if how == "max_module":
            return self.maxpool(x)
        if how == "max_functional":
            return F.max_pool2d(x, 2)
        if how == "avg_module":
            return self.avgpool(x)
        return F.avg_pool2d(x, 2)


def _inputs(arch: Arch) -> torch.Tensor:
    generator = torch.Generator().manual_seed(arch.seed + 1)
    return torch.randn(BATCH, arch.in_channels, SIDE, SIDE, generator=generator, dtype=DTYPE)


def _target(arch: Arch) -> int:
    return arch.seed % CLASSES


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    atol = rtol * 1e-3 * max(1e-12, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# the four properties, as checks of one architecture
# ---------------------------------------------------------------------------
def check_lrp_equals_input_x_gradient(arch: Arch) -> None:
    """(a) LRP with epsilon -> 0 is Gradient x Input, biases included."""
    model = RandomNet(arch)
    x, target = _inputs(arch), _target(arch)
    # keyed by the epsilon types, so activations keep pass-through and cat keeps move
    lrp = LRP(model, rules={EPSILON_TYPES: EpsilonRule(EPSILON)})
    relevance = lrp.attribute(x.clone(), target=target)
    expected = InputXGradient(model).attribute(x.clone(), target=target)
    _close(relevance, expected, rtol=1e-6)


def _require(condition: bool) -> None:
    assert condition, "degenerate pinned example: pick another seed"


def check_conservation_without_biases(arch: Arch, guard=_require) -> None:
    """(b) Without biases, relevance sums to the target logit (``guard`` rejects |logit| < 1e-6)."""
    model = RandomNet(arch, biases=False)
    x, target = _inputs(arch), _target(arch)
    with torch.no_grad():
        logit = model(x.clone())[:, target]
    guard(bool((logit.abs() > 1e-6).all()))
    relevance = LRP(model, rules={EPSILON_TYPES: EpsilonRule(EPSILON)}).attribute(x.clone(), target=target)
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logit, rtol=1e-6, atol=0.0)


def _pass_name(run_pass: Callable) -> str:
    return getattr(run_pass, "__name__", None) or run_pass.func.__name__


def _captured(model: nn.Module, x: torch.Tensor) -> Tuple[fx.GraphModule, nn.Module]:
    """The ATen graph of a private copy of ``model`` at ``x`` (as prepare() does), and that copy."""
    copy = private_copy(model)  # never the user's modules
    return capture(copy, (x.clone(),)).graph_module, copy


def _fresh(captured: fx.GraphModule, copy: nn.Module) -> Tuple[fx.GraphModule, Tuple[Callable, ...]]:
    """A new graph with the captured nodes (``meta`` copied), and the passes bound to a new model copy.

    What a pass does to it touches neither ``captured`` nor ``copy``: one
    capture serves every pass run below.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(captured.graph, {}))
    return fx.GraphModule(captured, graph, "Captured"), rewrite_passes(private_copy(copy))


def _assert_same_outputs(gm: fx.GraphModule, expected: torch.Tensor, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        actual = gm(x.clone())
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}: {m}")


#: Every ATen operator a pass turns into a module: none may be left on the input path.
_CONVERTED = (
    passes_module.ADDITIONS | passes_module.CONCATENATIONS | passes_module.ACTIVATIONS
    | passes_module.LINEAR_FUNCTIONS | passes_module.PRODUCTS | passes_module.DIVISIONS
)


def _mutates(node: fx.Node) -> bool:
    """An ATen operation that writes to one of its arguments (``relu_``, ``add_``)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _live_ops(arch: Arch) -> List[int]:
    """Indices ``k`` (of ``t_k``) of the ops the output depends on.

    An in-place op makes ``t_k`` the same tensor as the one it changed, so a
    later read of any name of that tensor reads ``t_k``.
    """
    holder = list(range(len(arch.ops) + 1))  # holder[i]: the op whose result t_i now is
    reads = {}
    for k, op in enumerate(arch.ops, start=1):
        args = (op[1], op[2]) if op[0] in ("add", "cat") else (op[1],)
        reads[k] = [holder[i] for i in args]
        if op[-1] == "iadd" or (op[0] == "relu" and op[2].endswith("_inplace")):
            changed = holder[op[1]]
            holder = [k if h == changed else h for h in holder]
    live, frontier = set(), [holder[len(arch.ops)]]
    while frontier:
        k = frontier.pop()
        if k and k not in live:
            live.add(k)
            frontier.extend(reads[k])
    return sorted(live)


def _expected_layers(arch: Arch) -> collections.Counter:
    """One module per call site the output depends on, of the type each op of ``arch`` becomes."""
    kinds = {
        "conv": lambda op: nn.Conv2d,
        "relu": lambda op: nn.ReLU if op[2].startswith("module") else M.Activation,
        "add": lambda op: M.Addition,
        "cat": lambda op: M.Concatenate,
        "pool": lambda op: {"max_module": nn.MaxPool2d, "avg_module": nn.AvgPool2d}.get(op[2], M.LinearFunction),
    }
    layers = collections.Counter(kinds[arch.ops[k - 1][0]](arch.ops[k - 1]) for k in _live_ops(arch))
    layers[M.LinearFunction if arch.head == "mean" else nn.AdaptiveAvgPool2d] += 1
    layers[nn.Linear] += 1
    return layers


def _live_nodes(graph: fx.Graph) -> set:
    live, frontier = set(), list(graph.find_nodes(op="output"))
    while frontier:
        for arg in frontier.pop().all_input_nodes:
            if arg not in live:
                live.add(arg)
                frontier.append(arg)
    return live


def check_passes(arch: Arch) -> None:
    """(c) Each rewrite pass keeps the outputs, and a second run changes nothing.

    Each pass alone on the captured graph, then the pipeline in prepare()'s
    order; the prepared graph has one module per call site, no in-place
    operation and, on the input path, nothing but data movement left as a
    function call.
    """
    model = RandomNet(arch)
    x = _inputs(arch)
    with torch.no_grad():
        expected = model(x.clone())
    captured, copy = _captured(model, x)
    _assert_same_outputs(captured, expected, x, "captured graph, before any pass")

    for i in range(len(rewrite_passes(copy))):  # each pass on its own
        gm, passes = _fresh(captured, copy)
        run_pass = passes[i]
        run_pass(gm)
        gm.graph.lint()
        _assert_same_outputs(gm, expected, x, f"after {_pass_name(run_pass)}")
        assert run_pass(gm) is False, f"{_pass_name(run_pass)} changed the graph a second time"
        _assert_same_outputs(gm, expected, x, f"after {_pass_name(run_pass)} twice")

    gm, passes = _fresh(captured, copy)  # the pipeline, in prepare()'s order
    for run_pass in passes:
        run_pass(gm)
        gm.graph.lint()
        _assert_same_outputs(gm, expected, x, f"pipeline, after {_pass_name(run_pass)}")
        code = gm.code
        assert run_pass(gm) is False, f"{_pass_name(run_pass)} changed the graph a second time in the pipeline"
        assert gm.code == code
    for run_pass in passes:
        assert run_pass(gm) is False, f"{_pass_name(run_pass)} changed the prepared graph"

    dependent = passes_module.input_dependent_nodes(gm.graph)
    modules = [node.target for node in gm.graph.find_nodes(op="call_module")]
    assert len(modules) == len(set(modules)), f"a module is still called at two places: {modules}"
    live = _live_nodes(gm.graph)
    layers = collections.Counter(type(gm.get_submodule(n.target)) for n in gm.graph.find_nodes(op="call_module") if n in live)
    assert layers == _expected_layers(arch), f"modules {dict(layers)} for the ops {arch.ops}"
    for node in gm.graph.nodes:
        assert not _mutates(node), f"{node.format_node()} still in place"
        if node in dependent and node.op == "call_function":
            assert getattr(node.target, "overloadpacket", node.target) not in _CONVERTED, f"{node.format_node()} left functional"
            assert passes_module.moves_data(node), f"{node.format_node()} is not data movement"
    assert not [name for name, m in gm.named_modules() if getattr(m, "inplace", False) is True]


def check_untouched(arch: Arch) -> None:
    """(d) The user's model is as before: state, flags, attributes, no hooks, same outputs."""
    model = RandomNet(arch)
    x, target = _inputs(arch), _target(arch)
    with assert_untouched(model, x.clone()):  # state, flags, attributes, hooks (global too), outputs
        lrp = LRP(model, rules={EPSILON_TYPES: EpsilonRule(EPSILON)})
        lrp.attribute(x.clone(), target=target)
        lrp.rule_report(x.clone())


# ---------------------------------------------------------------------------
# hypothesis over random architectures
# ---------------------------------------------------------------------------
@SETTINGS
@given(arch=architectures())
def test_lrp_epsilon_equals_input_x_gradient(arch):
    check_lrp_equals_input_x_gradient(arch)


@SETTINGS
@given(arch=architectures())
def test_relevance_is_conserved_without_biases(arch):
    check_conservation_without_biases(arch, guard=assume)


@SETTINGS
@given(arch=architectures())
def test_each_pass_keeps_outputs_and_is_idempotent(arch):
    check_passes(arch)


@SETTINGS
@given(arch=architectures())
def test_user_model_is_untouched(arch):
    check_untouched(arch)


# ---------------------------------------------------------------------------
# pinned architectures: spellings the random search reaches only rarely
# ---------------------------------------------------------------------------
PINNED = {
    # nn.ReLU(inplace=True) changes the conv output t1, which the addition reads again as t1
    "relu-module-inplace-then-reread": Arch(
        2, ((2, 3, True),), (("conv", 0, 0), ("relu", 1, "module_inplace"), ("add", 1, 2, "op")), "mean", True, 7
    ),
    "relu-functional-inplace-then-reread": Arch(
        2, ((2, 3, True),), (("conv", 0, 0), ("relu", 1, "functional_inplace"), ("add", 1, 2, "op")), "mean", True, 8
    ),
    "relu-method-inplace-then-reread": Arch(
        2, ((2, 3, True),), (("conv", 0, 0), ("relu", 1, "method_inplace"), ("cat", 1, 2)), "adaptive", True, 9
    ),
    "relu-torch-inplace-then-reread": Arch(
        2, ((2, 3, True),), (("conv", 0, 0), ("relu", 1, "torch_inplace"), ("add", 2, 1, "torch")), "mean", True, 12
    ),
    # t3 = (t2 += t1); t2 is then read again under its old name
    "iadd-then-reread": Arch(
        1,
        ((1, 2, True), (1, 2, True)),
        (("conv", 0, 0), ("conv", 0, 1), ("add", 2, 1, "iadd"), ("add", 2, 3, "op")),
        "mean",
        False,
        10,
    ),
    # a conv and the shared ReLU module each called twice; pools as function and module
    "reused-conv-and-relu": Arch(
        2,
        ((2, 2, True),),
        (
            ("conv", 0, 0),
            ("relu", 1, "module"),
            ("conv", 2, 0),
            ("relu", 3, "module"),
            ("pool", 4, "max_functional"),
            ("pool", 2, "avg_module"),
        ),
        "adaptive",
        True,
        11,
    ),
}

CHECKS = {
    "gradient-x-input": check_lrp_equals_input_x_gradient,
    "conservation": check_conservation_without_biases,
    "passes": check_passes,
    "untouched": check_untouched,
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_architecture(name, check):
    CHECKS[check](PINNED[name])
