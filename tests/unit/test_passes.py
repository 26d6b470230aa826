"""Rewrite passes (captum_graph.passes) and the prepared graph (captum_graph.prepare).

Each pass, on every tiny model: outputs unchanged, the matched operations gone,
``graph.lint()`` passes, a second run changes nothing, new modules carry
qualified names, and nothing of the user's model is modified or reused.
"""
import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn

import captum_graph
from captum_graph import modules as M
from captum_graph.passes import functional_to_modules, input_dependent_nodes, remove_inplace, unshare_modules
from helpers.models import FUNCTIONAL_OPS, TINY_MODELS, TinyNet, example_input

PASSES = {  # in the order prepare() runs them
    "unshare_modules": unshare_modules,
    "remove_inplace": remove_inplace,
    "functional_to_modules": functional_to_modules,
}


def _model(name: str) -> nn.Module:
    return TINY_MODELS[name]().double()


def _traced(model: nn.Module) -> fx.GraphModule:
    """A trace of a deep copy: the passes below may then do anything to it."""
    return captum_graph.trace(copy.deepcopy(model))


def _calls(gm: fx.GraphModule):
    dependent = input_dependent_nodes(gm.graph)
    return [(n.op, n.target) for n in gm.graph.nodes if n in dependent and n.op in ("call_function", "call_method")]


def _assert_same_outputs(gm, model, x):
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# every pass: same outputs, lint, idempotent, changes nothing of the user's model
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_pass_keeps_outputs_lints_and_is_idempotent(name, pass_name):
    model = _model(name)
    x = example_input()
    gm = _traced(model)
    run_pass = PASSES[pass_name]
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
    model = _model(name)
    x = example_input()
    gm = _traced(model)
    for run_pass in PASSES.values():
        run_pass(gm)
        gm.graph.lint()
    _assert_same_outputs(gm, model, x)
    assert not any(run_pass(gm) for run_pass in PASSES.values()), "a pass still found work after the pipeline"


@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("name", ["nn.ReLU(inplace=True)", "shared nn.ReLU", "a + b"])
def test_pass_never_modifies_modules_the_user_holds(name, pass_name, assert_untouched):
    """STYLE.md: fx shares submodules with the model; a pass adds modules instead of editing them."""
    model = _model(name if name in TINY_MODELS else f"relu: {name}")
    gm = captum_graph.trace(model)  # shares the user's submodules
    with assert_untouched(model, example_input()):
        PASSES[pass_name](gm)


# ---------------------------------------------------------------------------
# remove_inplace
# ---------------------------------------------------------------------------
_INPLACE_CALLS = {
    ("call_function", torch.relu_), ("call_function", F.relu_), ("call_function", operator.iadd),
    ("call_method", "relu_"), ("call_method", "add_"),
}


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if "_" in n or "inplace" in n or "+=" in n])
def test_remove_inplace_leaves_no_inplace_operation(name):
    model = _model(name)
    gm = _traced(model)
    remove_inplace(gm)
    assert not [c for c in _calls(gm) if c in _INPLACE_CALLS]
    assert not [n for n in gm.graph.nodes if n.kwargs.get("inplace") is True]
    assert not [q for q, m in gm.named_modules() if getattr(m, "inplace", False) is True]


def test_remove_inplace_redirects_later_readers():
    """``h.relu_()`` with its result unused: the next layer must read the ReLU's output."""
    model = _model("h.relu_() discarded")
    gm = _traced(model)
    assert remove_inplace(gm)
    (relu,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "relu"]
    (b,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "block.b"]
    assert b.args[0] is relu
    x = example_input()
    _assert_same_outputs(gm, model, x)


# ---------------------------------------------------------------------------
# functional_to_modules
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_functional_operations_become_modules(name):
    model = _model(name)
    gm = _traced(model)
    remove_inplace(gm)  # in-place spellings are first made out of place
    functional_to_modules(gm)
    left = [c for c in _calls(gm) if c in FUNCTIONAL_OPS[name]]
    assert not left, f"{name}: functional operations left on the input path: {left}"


EXPECTED_MODULES = {
    # model: {qualified name of the new module: its type}
    "a + b": {"block.add": Addition_Module},
    "torch.add(a, b)": {"block.add": Addition_Module},
    "torch.add(a, b, alpha=0.5)": {"block.add": Addition_Module},
    "a.add(b)": {"block.add": Addition_Module},
    "a + b + c": {"block.add": Addition_Module, "block.add_1": Addition_Module},
    "x + relu(conv(x))": {"block.add": Addition_Module, "block.relu": M.Activation},
    "torch.cat": {"block.cat": M.Concatenate},
    "torch.concat": {"block.concat": M.Concatenate},
    "torch.stack + flatten": {"block.stack": M.Stack},
    "relu: F.relu": {"block.relu": M.Activation},
    "relu: torch.relu": {"block.relu": M.Activation},
    "relu: Tensor.relu": {"block.relu": M.Activation},
    "F.max_pool2d/avg_pool2d + x.mean((2,3))": {
        "block.relu": M.Activation,
        "block.max_pool2d": M.LinearFunction,
        "block.avg_pool2d": M.LinearFunction,
        "block.mean": M.LinearFunction,
    },
    "F.max_pool2d/avg_pool2d + F.adaptive_avg_pool2d": {"block.adaptive_avg_pool2d": M.LinearFunction},
    "x.mean((2,3)) head": {"mean": M.LinearFunction, "relu": M.Activation},
    "a * 0.5 + b / 2 + 2.0 * a": {"block.mul": M.Scale, "block.truediv": M.Scale, "block.mul_1": M.Scale},
}


@pytest.mark.parametrize("name", list(EXPECTED_MODULES))
def test_new_modules_have_qualified_names(name):
    gm = _traced(_model(name))
    functional_to_modules(gm)
    for qualname, kind in EXPECTED_MODULES[name].items():
        module = gm.get_submodule(qualname)
        assert isinstance(module, kind), f"{qualname}: {type(module).__name__}, expected {kind.__name__}"
        (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == qualname]
        assert node.meta["qualname"] == qualname
        assert node.meta.get("replaced"), "the replaced operation is recorded for reports"
        assert node.stack_trace and "models.py" in node.stack_trace, "the user's source line is kept"


def test_addition_alpha_is_kept():
    gm = _traced(_model("torch.add(a, b, alpha=0.5)"))
    functional_to_modules(gm)
    assert gm.get_submodule("block.add").alpha == 0.5


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
        return torch.sigmoid(self.b(x)) * self.a(x)


@pytest.mark.parametrize("kind", ["relu", "sigmoid-second", "sigmoid-first"])
def test_product_of_two_signals_is_not_a_constant_scaling(kind):
    """Both factors depend on the input, also when one was just turned into a module."""
    gm = _traced(TinyNet(_Products(kind)).double().eval())
    functional_to_modules(gm)
    (node,) = [n for n in gm.graph.nodes if n.meta.get("qualname") == "block.mul"]
    module = gm.get_submodule(node.target)
    assert not isinstance(module, M.Scale), f"{kind}: a product of two signals became {type(module).__name__}"
    expected = M.Product if kind == "relu" else M.Gate
    assert isinstance(module, expected), type(module).__name__
    if expected is M.Gate:  # the signal comes first, the gate second
        assert node.args[0].target == "block.a"


# ---------------------------------------------------------------------------
# unshare_modules
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, original, copy_name",
    [("shared nn.ReLU", "block.act", "block.act_1"), ("shared Conv2d", "block.conv", "block.conv_1")],
)
def test_shared_module_gets_one_copy_per_call_site(name, original, copy_name):
    model = _model(name)
    gm = _traced(model)
    calls_before = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert calls_before.count(original) == 2
    assert unshare_modules(gm)
    calls = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert len(calls) == len(set(calls)), f"a module is still called twice: {calls}"
    first, second = gm.get_submodule(original), gm.get_submodule(copy_name)
    assert first is not second and type(first) is type(second)
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), second.named_parameters()):
        assert n1 == n2 and p1 is not p2 and p1.data_ptr() == p2.data_ptr(), f"{n1}: parameters not shared"
    _assert_same_outputs(gm, model, example_input())


def test_unshared_copies_follow_in_place_updates_of_the_weights():
    model = _model("shared Conv2d")
    gm = captum_graph.prepare(model).graph_module
    with torch.no_grad():
        model.block.conv.weight.mul_(2.0)  # e.g. an optimiser step
    _assert_same_outputs(gm, model, example_input())


# ---------------------------------------------------------------------------
# prepare: private copies, cache
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_prepared_graph_never_holds_the_users_modules(name, assert_untouched):
    model = _model(name)
    x = example_input()
    with assert_untouched(model, x):
        gm = captum_graph.prepare(model).graph_module
    users = {id(m) for m in model.modules()}
    shared = [q for q, m in gm.named_modules() if id(m) in users]
    assert not shared, f"the prepared graph holds the user's modules {shared}"
    user_parameters = {id(p) for p in model.parameters()}
    assert not [q for q, p in gm.named_parameters() if id(p) in user_parameters]
    storage = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in storage for p in gm.parameters()), "parameters are copied, not shared"
    _assert_same_outputs(gm, model, x)
    for run_pass in PASSES.values():
        assert run_pass(gm) is False


def test_prepare_is_cached_until_the_model_changes():
    model = _model("a + b")
    first = captum_graph.prepare(model)
    assert captum_graph.prepare(model) is first
    model.fc = nn.Linear(4, 5).double()
    second = captum_graph.prepare(model)
    assert second is not first
    _assert_same_outputs(second.graph_module, model, example_input())
