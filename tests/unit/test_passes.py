"""Rewrite passes (captum_graph.passes) over captured ATen graphs, and the prepared graph.

Each pass, on every tiny model, captured with torch.export at a real input:
outputs unchanged, the matched operations gone, ``graph.lint()`` passes, a
second run changes nothing, new modules carry qualified names, and nothing of
the user's model (nor of the private copy the graph was captured from) is
modified or reused. Every spelling of an operation in the user's code
(``a + b``, ``a += b``, ``torch.add``, ``a.add_(b)``, ...) is one ATen
pattern, and becomes the same module.
"""
import functools
import operator
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn

import captum_graph
from captum_graph import modules as M
from captum_graph import passes as P
from captum_graph.capture import capture
from captum_graph.cloning import private_copy
from captum_graph.prepare import rewrite_passes
from helpers.models import FUNCTIONAL_OPS, RELU_SPELLINGS, TINY_MODELS, TinyNet, example_input

aten = torch.ops.aten

#: The passes of :func:`captum_graph.prepare.rewrite_passes`, in the order prepare() runs them.
PASS_NAMES = (
    "remove_inplace", "views_to_reshapes", "calls_to_modules", "qualify_names", "unshare_modules",
    "elementwise_functions_to_modules", "functional_to_modules",
)

#: Every operator a pass turns into a module.
CONVERTED = (
    P.ADDITIONS | P.SUBTRACTIONS | P.PRODUCTS | P.DIVISIONS | P.SOFTMAXES | P.MATMULS | P.CONCATENATIONS
    | P.STACKS | P.ATTENTION | P.ACTIVATIONS | P.LINEAR_FUNCTIONS
)

# helpers.models.FUNCTIONAL_OPS names each model's spellings as torch.fx saw them;
# here, the ATen operators those spellings are captured as.
_ATEN_OF = {
    operator.add: (aten.add,), operator.iadd: (aten.add_,), torch.add: (aten.add,),
    "add": (aten.add,), "add_": (aten.add_,),
    F.relu: (aten.relu, aten.relu_), torch.relu: (aten.relu,), torch.relu_: (aten.relu_,),
    "relu": (aten.relu,), "relu_": (aten.relu_,),
    F.max_pool2d: (aten.max_pool2d, aten.max_pool2d_with_indices), F.avg_pool2d: (aten.avg_pool2d,),
    F.adaptive_avg_pool2d: (aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d),
    "mean": (aten.mean,), torch.mean: (aten.mean,),
    torch.cat: (aten.cat,), torch.concat: (aten.concat, aten.cat), torch.stack: (aten.stack,),
    operator.mul: (aten.mul,), operator.truediv: (aten.div,),
}


def _spelled_ops(name: str) -> frozenset:
    return frozenset(op for _, target in FUNCTIONAL_OPS[name] for op in _ATEN_OF[target])


def _model(name: str) -> nn.Module:
    return TINY_MODELS[name]().double()


def _name(run_pass: Callable) -> str:
    return getattr(run_pass, "__name__", None) or run_pass.func.__name__


def _captured(model: nn.Module, x: torch.Tensor) -> Tuple[fx.GraphModule, Dict[str, Callable], nn.Module]:
    """A capture of a private copy (as prepare() does), the passes bound to that copy, and the copy."""
    copy = private_copy(model)
    gm = capture(copy, (x,)).graph_module
    return gm, {_name(p): p for p in rewrite_passes(copy)}, copy


@functools.lru_cache(maxsize=None)
def _capture_of(name: str) -> Tuple[nn.Module, torch.Tensor, nn.Module, fx.GraphModule]:
    """One capture per tiny model for the tests that only run passes (capturing takes most of the time)."""
    model, x = _model(name), example_input()
    gm, _, copy = _captured(model, x)
    return model, x, copy, gm


def _tiny(name: str) -> Tuple[nn.Module, torch.Tensor, fx.GraphModule, Dict[str, Callable]]:
    """A tiny model, its input, a fresh copy of its captured graph and passes bound to a fresh model copy.

    The graph's nodes are new (their ``meta`` dicts copied), so what a pass
    does to them stays in this test.
    """
    model, x, copy, captured = _capture_of(name)
    graph = fx.Graph()
    graph.output(graph.graph_copy(captured.graph, {}))
    gm = fx.GraphModule(captured, graph, type(model).__name__)
    fresh = private_copy(copy)
    return model, x, gm, {_name(p): p for p in rewrite_passes(fresh)}


def _run_passes_before(gm: fx.GraphModule, passes: Dict[str, Callable], pass_name: str) -> None:
    for name, run_pass in passes.items():
        if name == pass_name:
            return
        run_pass(gm)


def _pipeline(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm, passes, _ = _captured(model, x)
    for run_pass in passes.values():
        run_pass(gm)
    return gm


def _tiny_pipeline(name: str) -> Tuple[nn.Module, torch.Tensor, fx.GraphModule]:
    model, x, gm, passes = _tiny(name)
    for run_pass in passes.values():
        run_pass(gm)
    return model, x, gm


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _calls(gm: fx.GraphModule) -> List[fx.Node]:
    """``call_function`` nodes that depend on the input's values."""
    dependent = P.input_dependent_nodes(gm.graph)
    return [n for n in gm.graph.nodes if n in dependent and n.op == "call_function"]


def _mutates(node: fx.Node) -> bool:
    """An ATen operation that writes to one of its arguments (``relu_``, ``add_``, ``copy_``)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _module_calls(gm: fx.GraphModule, kind: type) -> List[fx.Node]:
    return [n for n in gm.graph.find_nodes(op="call_module") if isinstance(gm.get_submodule(n.target), kind)]


def _node(gm: fx.GraphModule, qualname: str) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.meta.get("qualname") == qualname]
    return node


def _assert_same_outputs(gm, model, x):
    with torch.no_grad():
        torch.testing.assert_close(gm(x.clone()), model(x.clone()), rtol=1e-12, atol=1e-14)


def test_rewrite_passes_run_in_the_documented_order():
    model = nn.Linear(2, 2)
    assert tuple(_name(p) for p in rewrite_passes(model)) == PASS_NAMES
    assert tuple(_name(p) for p in rewrite_passes(model, fold_batch_norm=True)) == PASS_NAMES + ("fold_batch_norms",)


# ---------------------------------------------------------------------------
# every pass: same outputs, lint, idempotent, changes nothing of the user's model
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pass_name, alone",
    [(p, False) for p in PASS_NAMES] + [(p, True) for p in PASS_NAMES[1:]],  # remove_inplace comes first anyway
    ids=[f"{p}-in-pipeline" for p in PASS_NAMES] + [f"{p}-alone" for p in PASS_NAMES[1:]],
)
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_pass_keeps_outputs_lints_and_is_idempotent(name, pass_name, alone):
    """After the passes before it (or on a fresh capture), each pass keeps outputs and runs once."""
    model, x, gm, passes = _tiny(name)
    _assert_same_outputs(gm, model, x)  # the capture itself
    if not alone:
        _run_passes_before(gm, passes, pass_name)
    run_pass = passes[pass_name]
    first = run_pass(gm)
    assert isinstance(first, bool)
    gm.graph.lint()
    _assert_same_outputs(gm, model, x)
    code = gm.code
    assert run_pass(gm) is False, f"{pass_name} changed {name!r} a second time"
    assert gm.code == code
    _assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_all_passes_in_order(name):
    model, x, gm, passes = _tiny(name)
    for run_pass in passes.values():
        run_pass(gm)
        gm.graph.lint()
        _assert_same_outputs(gm, model, x)
    assert not [n for n, p in passes.items() if p(gm)], "a pass still found work after the pipeline"
    _assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("name", ["relu: nn.ReLU(inplace=True)", "relu: F.relu(inplace=True)", "shared nn.ReLU", "a + b", "a += b"])
def test_passes_never_modify_the_users_model_nor_its_copy(name, assert_untouched):
    """STYLE.md: a pass adds modules to the GraphModule instead of editing the ones the model holds.

    The graph is captured from a private copy; the passes then take that
    copy's modules into the graph, so they must leave the copy alone too
    (a ``ReLU(inplace=True)`` is replaced by a copy with ``inplace=False``).
    """
    model = _model(name)
    x = example_input()
    with assert_untouched(model, x):
        gm, passes, copy = _captured(model, x)
        with assert_untouched(copy, x):
            for run_pass in passes.values():
                run_pass(gm)
    users = {id(m) for m in model.modules()}
    assert not [q for q, m in gm.named_modules() if id(m) in users]
    assert not [q for q, m in gm.named_modules() if getattr(m, "inplace", False) is True]


# ---------------------------------------------------------------------------
# remove_inplace
# ---------------------------------------------------------------------------
INPLACE_MODELS = [
    "a += b", "a.add_(b)", "relu: Tensor.relu_", "relu: torch.relu_", "relu: F.relu(inplace=True)",
    "relu: nn.ReLU(inplace=True)", "h.relu_() discarded",
]


@pytest.mark.parametrize("name", INPLACE_MODELS)
def test_remove_inplace_leaves_no_inplace_operation(name):
    model = _model(name)
    x = example_input()
    gm, passes, copy = _captured(model, x)
    assert [n for n in _calls(gm) if _mutates(n)], "the capture has an in-place operation to remove"
    assert passes["remove_inplace"](gm)
    assert not [n.format_node() for n in gm.graph.nodes if _mutates(n)]
    assert not [n.name for n in gm.graph.nodes if n.meta.get("inplace_on_view")]
    _assert_same_outputs(gm, model, x)
    for run_pass in passes.values():
        run_pass(gm)
    assert not [q for q, m in gm.named_modules() if getattr(m, "inplace", False) is True]
    if name == "relu: nn.ReLU(inplace=True)":
        assert isinstance(gm.get_submodule("block.act"), nn.ReLU)
        assert copy.block.act.inplace is True, "the model copy's module was edited, not copied"


def _hand_built() -> fx.GraphModule:
    """``h = x * 2; pre = -h; h.relu_(); return h + pre`` as an ATen graph, the mutated ``h`` read again."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_function(aten.mul.Tensor, (x, 2.0))
    before = graph.call_function(aten.neg.default, (h,))  # reads h before the write: the old value
    graph.call_function(aten.relu_.default, (h,))  # result unused: later readers read h
    after = graph.call_function(aten.add.Tensor, (h, before))
    graph.output(graph.call_function(aten.mul.Tensor, (after, h)))
    return fx.GraphModule(nn.Module(), graph)


def test_remove_inplace_redirects_later_readers_only():
    """Readers after the in-place write read its out-of-place result; a reader before it keeps the old value."""
    gm = _hand_built()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = gm(x.clone())
    assert P.remove_inplace(gm)
    gm.graph.lint()
    (relu,) = [n for n in gm.graph.nodes if n.target is aten.relu.default]
    (neg,) = [n for n in gm.graph.nodes if n.target is aten.neg.default]
    (add,) = [n for n in gm.graph.nodes if n.target is aten.add.Tensor]
    (last,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    assert neg.args[0] is relu.args[0], "a reader before the write must read the old value"
    assert add.args[0] is relu and last.args[1] is relu
    torch.testing.assert_close(gm(x.clone()), expected, rtol=0, atol=0)
    assert P.remove_inplace(gm) is False


def test_discarded_inplace_result_is_seen_by_later_readers():
    """``h.relu_()`` with its result unused: the next layer reads the ReLU."""
    model = _model("h.relu_() discarded")
    x = example_input()
    gm = _pipeline(model, x)
    relu, b = _node(gm, "block.relu"), _node(gm, "block.b")
    assert isinstance(gm.get_submodule(relu.target), M.Activation)
    assert b.args[0] is relu
    _assert_same_outputs(gm, model, x)


class _Aliased(TinyNet):
    """TinyNet whose block's output goes through an in-place operation on an alias of it."""

    def __init__(self, kind: str) -> None:
        super().__init__(nn.Conv2d(4, 4, 3, padding=1))
        self.kind = kind

    def forward(self, x):
        h = self.block(self.relu(self.stem(x)))
        if self.kind == "slice written, base read":
            h[:, :2].relu_()
            return self.fc(self.pool(h).flatten(1))
        if self.kind == "view taken, base written":
            v = h.flatten(2)  # a view of h: it sees the write below
            h.relu_()
            return self.fc(v.mean(2))
        v = h.flatten(2)  # "view written, view read"
        v.relu_()
        return self.fc(v.mean(2))


@pytest.mark.parametrize("kind", ["slice written, base read", "view taken, base written", "view written, view read"])
def test_remove_inplace_keeps_writes_through_aliases(kind):
    """An in-place write another alias of the tensor still reads is kept (marked), or made out of place correctly."""
    model = _Aliased(kind).double().eval()
    x = example_input()
    gm, passes, _ = _captured(model, x)
    _assert_same_outputs(gm, model, x)
    passes["remove_inplace"](gm)
    gm.graph.lint()
    _assert_same_outputs(gm, model, x)
    assert passes["remove_inplace"](gm) is False
    kept = [n for n in gm.graph.nodes if _mutates(n)]
    assert all(n.meta.get("inplace_on_view") for n in kept), "an in-place operation kept without a mark"
    for run_pass in passes.values():
        run_pass(gm)
    _assert_same_outputs(gm, model, x)
    assert [n for n in gm.graph.nodes if _mutates(n)] == kept, "a marked in-place operation was converted"
    if kind == "slice written, base read":
        assert len(kept) == 1, "the write to the slice is kept"
        written = kept[0].meta["inplace_on_view"]  # rule assignment reads it to refuse relevance through the write
        assert not isinstance(written, fx.Node) or written in set(gm.graph.nodes), (
            f"the mark names {written.name}, a node a later pass erased"
        )


# ---------------------------------------------------------------------------
# functional_to_modules
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_functional_operations_become_modules(name):
    model, x, gm, passes = _tiny(name)
    spelled = _spelled_ops(name)
    if spelled:
        assert [n for n in _calls(gm) if _packet(n) in spelled], f"{name}: the capture spells none of {spelled}"
    for run_pass in passes.values():
        run_pass(gm)
    left = [n.format_node() for n in _calls(gm) if _packet(n) in spelled | CONVERTED]
    assert not left, f"{name}: functional operations left on the input path: {left}"
    assert not [n.format_node() for n in _calls(gm) if not P.moves_data(n)], "only data movement is left"


@pytest.mark.parametrize("name", ["a + b", "a += b", "torch.add(a, b)", "a.add(b)", "a.add_(b)"])
def test_every_spelling_of_an_addition_becomes_one_addition_module(name):
    model, x, gm = _tiny_pipeline(name)
    (add,) = _module_calls(gm, Addition_Module)
    assert add.target == add.meta["qualname"] == "block.add"
    assert type(gm.get_submodule("block.add")) is M.Addition and gm.get_submodule("block.add").alpha == 1
    assert [a.target for a in add.args] == ["block.a", "block.b"]
    _assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("spelling", list(RELU_SPELLINGS))
def test_every_spelling_of_a_relu_becomes_one_relu_module(spelling):
    """Functional, method and in-place spellings -> one Activation; ``nn.ReLU(inplace=True)`` stays a ReLU."""
    model, x, gm = _tiny_pipeline(f"relu: {spelling}")
    a, b = _node(gm, "block.a"), _node(gm, "block.b")
    (relu,) = b.args
    assert relu.args == (a,) and list(relu.users) == [b]
    module = gm.get_submodule(relu.target)
    if spelling == "nn.ReLU(inplace=True)":
        assert relu.target == "block.act" and type(module) is nn.ReLU and module.inplace is False
    else:
        assert relu.target == relu.meta["qualname"] == "block.relu"
        assert type(module) is M.Activation and module.fn is aten.relu.default
    _assert_same_outputs(gm, model, x)


EXPECTED_MODULES = {
    # model: {qualified name of the new module: (its type, its fx-style original name)}
    "a + b": {"block.add": (M.Addition, "add")},
    "a += b": {"block.add": (M.Addition, "add")},
    "torch.add(a, b)": {"block.add": (M.Addition, "add")},
    "torch.add(a, b, alpha=0.5)": {"block.add": (M.Addition, "add")},
    "a.add(b)": {"block.add": (M.Addition, "add")},
    "a.add_(b)": {"block.add": (M.Addition, "add")},
    "a + b + c": {"block.add": (M.Addition, "add"), "block.add_1": (M.Addition, "add_1")},
    "x + relu(conv(x))": {"block.add": (M.Addition, "add"), "block.relu": (M.Activation, "relu_1")},
    "torch.cat": {"block.cat": (M.Concatenate, "cat")},
    "torch.concat": {"block.concat": (M.Concatenate, "concat")},
    "torch.stack + flatten": {"block.stack": (M.Stack, "stack")},
    "relu: F.relu": {"block.relu": (M.Activation, "relu_1")},
    "relu: torch.relu": {"block.relu": (M.Activation, "relu_1")},
    "relu: Tensor.relu": {"block.relu": (M.Activation, "relu_1")},
    "F.max_pool2d/avg_pool2d + x.mean((2,3))": {
        "block.relu": (M.Activation, "relu_1"),
        "block.max_pool2d": (M.LinearFunction, "max_pool2d"),
        "block.avg_pool2d": (M.LinearFunction, "avg_pool2d"),
        "block.mean": (M.LinearFunction, "mean"),
    },
    "F.max_pool2d/avg_pool2d + F.adaptive_avg_pool2d": {"block.adaptive_avg_pool2d": (M.LinearFunction, "adaptive_avg_pool2d")},
    "x.mean((2,3)) head": {"mean": (M.LinearFunction, "mean"), "relu": (M.Activation, "relu")},
    "a * 0.5 + b / 2 + 2.0 * a": {
        "block.mul": (M.Scale, "mul"), "block.div": (M.Scale, "div"), "block.mul_1": (M.Scale, "mul_1"),
        "block.add": (M.Addition, "add"), "block.add_1": (M.Addition, "add_1"),
    },
}


@pytest.mark.parametrize("name", list(EXPECTED_MODULES))
def test_new_modules_have_qualified_names(name):
    _, _, gm = _tiny_pipeline(name)
    for qualname, (kind, original) in EXPECTED_MODULES[name].items():
        module = gm.get_submodule(qualname)
        assert type(module) is kind, f"{qualname}: {type(module).__name__}, expected {kind.__name__}"
        (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == qualname]
        assert node.meta["qualname"] == qualname
        assert node.meta["original_name"] == original
        assert node.meta.get("replaced", "").startswith("aten."), "the replaced ATen operation is recorded"
        assert node.stack_trace and "models.py" in node.stack_trace, "the user's source line is kept"
    qualnames = [n.meta["qualname"] for n in gm.graph.nodes]
    assert len(qualnames) == len(set(qualnames)), "qualified names are unique"


def test_scalings_by_constants_keep_their_factors():
    model, x, gm = _tiny_pipeline("a * 0.5 + b / 2 + 2.0 * a")
    factors = {q: (_node(gm, q).args[1], gm.get_submodule(q).divide) for q in ("block.mul", "block.div", "block.mul_1")}
    assert factors == {"block.mul": (0.5, False), "block.div": (2, True), "block.mul_1": (2.0, False)}
    _assert_same_outputs(gm, model, x)


def test_addition_alpha_is_kept():
    model, x, gm = _tiny_pipeline("torch.add(a, b, alpha=0.5)")
    add = _node(gm, "block.add")
    assert gm.get_submodule("block.add").alpha == 0.5
    assert [a.target for a in add.args] == ["block.a", "block.b"], "alpha scales the second term"
    _assert_same_outputs(gm, model, x)


class _Products(nn.Module):
    """Products whose second factor is produced by a functional activation."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if self.kind == "relu":
            return self.a(x) * torch.relu(self.b(x))
        if self.kind == "sigmoid-second":
            return self.a(x) * torch.sigmoid(self.b(x))
        if self.kind == "sigmoid-inplace":
            return self.a(x).mul_(torch.sigmoid(self.b(x)))
        return torch.sigmoid(self.b(x)) * self.a(x)


@pytest.mark.parametrize("kind", ["relu", "sigmoid-second", "sigmoid-first", "sigmoid-inplace"])
def test_product_of_two_signals_is_not_a_constant_scaling(kind):
    """Both factors depend on the input, also when one was just turned into a module."""
    model = TinyNet(_Products(kind)).double().eval()
    x = example_input()
    gm = _pipeline(model, x)
    node = _node(gm, "block.mul")
    module = gm.get_submodule(node.target)
    assert not isinstance(module, M.Scale), f"{kind}: a product of two signals became {type(module).__name__}"
    expected = M.Product if kind == "relu" else M.Gate
    assert isinstance(module, expected), type(module).__name__
    if expected is M.Gate:  # the signal comes first, the gate second
        assert node.args[0].target == "block.a"
    _assert_same_outputs(gm, model, x)


class _Normalised(nn.Module):
    """A linear layer, then a division by a norm of its output spelled ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "x / norm":
            h = h / h.norm(dim=-1, keepdim=True)
        elif self.kind == "x / sqrt(mean(x^2) + eps)":
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.kind == "x * rsqrt(mean(x^2) + eps)":
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.kind == "x / (norm + eps)":
            h = h / (h.norm(dim=-1, keepdim=True) + 1e-6)
        else:  # F.normalize: x / norm(x).clamp_min(eps).expand_as(x)
            h = F.normalize(h, dim=-1)
        return self.head(h)


@pytest.mark.parametrize(
    "kind", ["x / norm", "x / sqrt(mean(x^2) + eps)", "x * rsqrt(mean(x^2) + eps)", "x / (norm + eps)", "F.normalize"]
)
def test_division_by_a_norm_becomes_a_scaling(kind):
    """DESIGN.md: for F.normalize and a division by a norm, the normalising factor is a constant."""
    model = _Normalised(kind).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = _pipeline(model, x)
    _assert_same_outputs(gm, model, x)
    (head,) = [n for n in gm.graph.nodes if n.target == "head"]
    scale = head.args[0]
    assert scale.op == "call_module" and isinstance(gm.get_submodule(scale.target), M.Scale), scale.format_node()
    assert scale.args[0].target == "fc", "the signal is the first argument, the factor the constant one"
    unsupported = [n.format_node() for n in P.relevance_carrying_nodes(gm) if n.op == "call_function" and not P.moves_data(n)]
    assert not unsupported, f"{kind}: operations with no rule on the relevance path: {unsupported}"


_SPELLINGS = {
    # an elementwise or data-movement operation in the user's code: after the passes, a module or data movement
    "x.view_as(y)": lambda h: h.view_as(h),
    "x.expand_as(y)": lambda h: h.expand_as(h),
    "x.reshape_as(y)": lambda h: h.reshape_as(h),
    "x.ravel()": lambda h: h.ravel().reshape(h.shape),
    "x.transpose().contiguous()": lambda h: h.transpose(2, 3).contiguous(),
    "x - 1": lambda h: h - 1,
    "1 - x": lambda h: 1 - h,
    "F.relu6": F.relu6,
    "F.hardtanh(inplace=True)": lambda h: F.hardtanh(h, inplace=True),
    "F.silu(inplace=True)": lambda h: F.silu(h, inplace=True),
    "F.threshold": lambda h: F.threshold(h, 0.0, 0.0),
    "interpolate nearest": lambda h: F.interpolate(h, scale_factor=2, mode="nearest"),
    "interpolate nearest-exact": lambda h: F.interpolate(h, scale_factor=2, mode="nearest-exact"),
    "interpolate bilinear": lambda h: F.interpolate(h, scale_factor=2, mode="bilinear"),
}


class _Spelled(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling

    def forward(self, x):
        return _SPELLINGS[self.spelling](x)


@pytest.mark.parametrize("spelling", list(_SPELLINGS))
def test_known_operations_leave_no_unknown_operation_on_the_relevance_path(spelling):
    """An activation, interpolation, subtraction or reshape of DESIGN.md's table has an ATen op in a table."""
    model = TinyNet(_Spelled(spelling)).double().eval()
    x = example_input()
    gm = _pipeline(model, x)
    _assert_same_outputs(gm, model, x)
    unsupported = [n.format_node() for n in P.relevance_carrying_nodes(gm) if n.op == "call_function" and not P.moves_data(n)]
    assert not unsupported, f"{spelling}: operations in no table of captum_graph.passes: {unsupported}"


# ---------------------------------------------------------------------------
# qualify_names
# ---------------------------------------------------------------------------
class _FunctionalBeforeModule(nn.Module):
    """``F.relu`` at top level before the model's own module ``relu`` is called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(F.relu(self.stem(x))))


def test_a_module_call_is_named_by_its_path_before_functional_operations():
    """qualify_names: "A module call is named by the module's path"; an operation takes the next free name."""
    model = _FunctionalBeforeModule().double().eval()
    x = example_input()
    gm = _pipeline(model, x)
    (module_call,) = [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.ReLU]
    assert module_call.meta["qualname"] == "relu", "the module 'relu' is called once: its node is 'relu'"
    (functional,) = _module_calls(gm, M.Activation)
    assert functional.meta["qualname"] != "relu"
    _assert_same_outputs(gm, model, x)


# ---------------------------------------------------------------------------
# unshare_modules
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, original, copy_name",
    [("shared nn.ReLU", "block.act", "block.act_1"), ("shared Conv2d", "block.conv", "block.conv_1")],
)
def test_shared_module_gets_one_copy_per_call_site(name, original, copy_name):
    model, x, gm, passes = _tiny(name)
    _run_passes_before(gm, passes, "unshare_modules")
    calls_before = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert calls_before.count(original) == 2
    assert passes["unshare_modules"](gm)
    gm.graph.lint()
    calls = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert len(calls) == len(set(calls)), f"a module is still called twice: {calls}"
    assert _node(gm, copy_name).target == copy_name
    first, second = gm.get_submodule(original), gm.get_submodule(copy_name)
    assert first is not second and type(first) is type(second)
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), second.named_parameters()):
        assert n1 == n2 and p1 is not p2 and p1.data_ptr() == p2.data_ptr(), f"{n1}: parameters not shared"
    _assert_same_outputs(gm, model, x)
    assert passes["unshare_modules"](gm) is False


def test_unshared_copies_follow_in_place_updates_of_the_weights():
    model = _model("shared Conv2d")
    x = example_input()
    gm = captum_graph.prepare(model, (x,)).graph_module
    with torch.no_grad():
        model.block.conv.weight.mul_(2.0)  # e.g. an optimiser step
    _assert_same_outputs(gm, model, x)


# ---------------------------------------------------------------------------
# prepare: private copies, cache
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_prepared_graph_never_holds_the_users_modules(name, assert_untouched):
    model = _model(name)
    x = example_input()
    with assert_untouched(model, x):
        prepared = captum_graph.prepare(model, (x,))
    gm = prepared.graph_module
    users = {id(m) for m in model.modules()}
    assert id(prepared.model_copy) not in users
    shared = [q for q, m in gm.named_modules() if id(m) in users]
    assert not shared, f"the prepared graph holds the user's modules {shared}"
    user_parameters = {id(p) for p in model.parameters()}
    assert not [q for q, p in gm.named_parameters() if id(p) in user_parameters]
    storage = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in storage for p in gm.parameters()), "parameters are copied, not shared"
    _assert_same_outputs(gm, model, x)
    _assert_same_outputs(gm, model, example_input(batch=3))  # captured with a dynamic batch
    assert not [_name(p) for p in rewrite_passes(prepared.model_copy) if p(gm)], "a pass found work in a prepared graph"


def test_prepare_is_cached_until_the_model_changes():
    model = _model("a + b")
    x = example_input()
    first = captum_graph.prepare(model, (x,))
    assert captum_graph.prepare(model, (x,)) is first
    assert captum_graph.prepare(model, (example_input(batch=3),)) is first, "any batch size: the same graph"
    model.fc = nn.Linear(4, 5).double()
    second = captum_graph.prepare(model, (x,))
    assert second is not first
    _assert_same_outputs(second.graph_module, model, x)
