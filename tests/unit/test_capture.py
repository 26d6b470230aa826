"""The torch.export front end: captum_graph.capture.capture and captum_graph.prepare.

What is checked: qualified and fx-style names, placeholders, source lines,
non-tensor arguments fixed at their values, the dynamic batch and the cache,
data-dependent control flow (captured along the path taken, never cached),
torch-layer subclasses, register_leaf_module, capture errors, and that the
user's model is never changed.
"""
import inspect
import os
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from captum.attr import InputXGradient
from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
from torch import nn
from torchvision.models.resnet import BasicBlock

import captum_graph
from captum_graph import CaptumGraphError, CaptureError, TracingError, passes, prepare
from captum_graph import modules as M
from captum_graph.attr import LRP
from captum_graph.capture import Captured, capture
from captum_graph.cloning import private_copy
from captum_graph.errors import source_line
from captum_graph.layers import resolve_layer
from helpers.models import ResidualNet, example_input
from helpers.oracles import (
    NEGLIGIBLE_EPSILON,
    assert_conserves,
    assert_matches_input_x_gradient,
    make_meaningful,
    zero_additive_constants,
)

THIS_FILE = os.path.basename(__file__)
aten = torch.ops.aten


def _line_of(function, text):
    """The file line number of the first line of ``function`` containing ``text``."""
    lines, start = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(f"{text!r} not in {function.__qualname__}")


@pytest.fixture
def clean_leaf_registry(monkeypatch):
    """Leaf modules registered by a test vanish with it (the registry is a module-level set)."""
    monkeypatch.setattr(passes, "_LEAF_MODULES", set(passes._LEAF_MODULES))


def _by(gm, key="qualname"):
    return {node.meta.get(key): node for node in gm.graph.nodes}


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 0.5))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * self.scale + x


class TwiceScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Scaled()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.block(self.block(x)))


class AddsAround(nn.Module):
    """Additions at top level before and after one inside a submodule."""

    def __init__(self):
        super().__init__()
        self.inner = Scaled()

    def forward(self, x):
        x = x + 1
        x = self.inner(x)
        return x + 2


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, double=False):
        y = self.lin(x)
        if double:
            return y * 2
        return y


class MaybeOffset(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, offset=None):
        h = self.lin(x)
        if offset is None:
            return torch.relu(h)
        return torch.relu(h + offset)


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, *inputs):
        return self.lin(inputs[0]) + inputs[1]


class Branchy(nn.Module):
    """Data-dependent control flow on a ReLU/linear net."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > 0:
            h = self.relu(self.a(x))
        else:
            h = self.relu(self.b(x)) + self.a(x)
        return self.head(h)


class BNAct(nn.BatchNorm2d):
    """A torch layer subclass with a forward of its own (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return F.relu(super().forward(x)) * 2


class MyConv(nn.Conv2d):
    """A torch layer subclass that keeps torch's forward."""


class SubclassedSequential(nn.Sequential):
    """A container subclass: looked into."""


class SubclassNet(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = MyConv(3, 4, 3, padding=1, bias=bias)
        self.bn = BNAct(4)
        self.body = SubclassedSequential(nn.Conv2d(4, 4, 3, padding=1, bias=bias), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        return self.fc(self.pool(self.body(self.bn(self.conv(x)))).flatten(1))


class Picky(nn.Module):
    """Data-dependent control flow inside a submodule."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


class Squash(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * 3


class Pair(nn.Module):
    """Takes two tensors: never one node, registered or not."""

    def forward(self, x, y):
        return x * 2 + y


class Holds(nn.Module):
    def __init__(self, leaf):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)  # running statistics would move if a forward ran in train mode
        self.inner = nn.Sequential(nn.ReLU(), leaf)
        self.pair = Pair()

    def forward(self, x):
        h = self.inner(self.norm(self.pre(x)))
        return self.pair(h, x) + 1


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(self.norm(x))
        return torch.from_numpy(h.numpy())


class HoldsUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Dropout(0.5), Untraceable())

    def forward(self, x):
        return self.inner(self.pre(x))


class LooksUp(nn.Module):
    """Raises KeyError in forward."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 4)})

    def forward(self, x):
        return self.heads["b"](x)


class OneSpecial(nn.Module):
    """Shape-dependent Python control flow on the batch size (a batch of one is squeezed, say)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.shape[0] == 1:
            return h * 2
        return h


class PairSpecial(nn.Module):
    """Shape-dependent Python control flow on a batch of two."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.shape[0] == 2:
            return h * 2
        return h


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def prepared_resnet(resnet):
    return prepare(resnet, (torch.randn(1, 3, 32, 32),))


# ---------------------------------------------------------------------------
# capture() itself
# ---------------------------------------------------------------------------
def test_capture_returns_an_aten_graph_with_get_attr_parameters():
    model = Scaled().eval()
    x = torch.randn(3, 4)
    captured = capture(private_copy(model), (x,))
    assert isinstance(captured, Captured)
    gm = captured.graph_module
    assert isinstance(gm, fx.GraphModule)
    assert (captured.dynamic_batch, captured.path_specific) == (True, False)
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x"]
    assert sorted(n.target for n in gm.graph.find_nodes(op="get_attr")) == ["lin.bias", "lin.weight", "scale"]
    functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert functions and all(isinstance(t, torch._ops.OpOverload) for t in functions), functions
    assert [t.overloadpacket for t in functions] == [aten.linear, aten.mul, aten.add]
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert list(linear.meta["nn_module_stack"].values())[-1][0] == "lin"
    assert tuple(linear.meta["val"].shape[1:]) == (4,)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        assert gm(torch.randn(7, 4)).shape == (7, 4)  # a dynamic batch


def test_capture_has_one_placeholder_per_positional_argument():
    model = Flagged().eval()
    captured = capture(private_copy(model), (torch.randn(2, 4), True))
    assert [n.name for n in captured.graph_module.graph.find_nodes(op="placeholder")] == ["x", "double"]


def test_capture_rejects_containers_of_tensors():
    with pytest.raises(CaptureError, match=r"argument 0 of the call holds tensors[\s\S]*one by one"):
        capture(private_copy(Scaled()), ((torch.randn(2, 4), torch.randn(2, 4)),))
    with pytest.raises(CaptureError, match=r"argument 'scale' of the call holds tensors[\s\S]*as a keyword"):
        capture(private_copy(Scaled()), (torch.randn(2, 4),), {"scale": torch.randn(1)})


# ---------------------------------------------------------------------------
# qualified names, fx-style names, placeholders, source lines
# ---------------------------------------------------------------------------
def test_resnet_qualnames_by_original_name(prepared_resnet):
    """``meta["original_name"]`` numbers operators as torch.fx did; qualified names are torchvision's."""
    by_original = {n.meta["original_name"]: (n.op, n.meta["qualname"]) for n in prepared_resnet.graph_module.graph.nodes}
    expected = {
        "x": ("placeholder", "x"),
        "conv1": ("call_module", "conv1"),
        "relu": ("call_module", "relu"),
        "layer1_0_conv1": ("call_module", "layer1.0.conv1"),
        "layer1_0_relu": ("call_module", "layer1.0.relu"),
        "add": ("call_module", "layer1.0.add"),
        "layer1_0_relu_1": ("call_module", "layer1.0.relu_1"),  # second call of the same ReLU
        "add_1": ("call_module", "layer1.1.add"),
        "layer2_0_downsample_0": ("call_module", "layer2.0.downsample.0"),
        "add_7": ("call_module", "layer4.1.add"),
        "layer4_1_relu_1": ("call_module", "layer4.1.relu_1"),
        "avgpool": ("call_module", "avgpool"),
        "flatten": ("call_function", "flatten"),
        "fc": ("call_module", "fc"),
    }
    assert {name: by_original.get(name) for name in expected} == expected


def test_resnet_additions_are_modules_named_after_their_block(prepared_resnet):
    gm = prepared_resnet.graph_module
    adds = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), M.Addition)]
    assert [n.meta["qualname"] for n in adds] == [f"layer{i}.{j}.add" for i in range(1, 5) for j in range(2)]
    assert [n.target for n in adds] == [n.meta["qualname"] for n in adds]
    assert [n.meta["original_name"] for n in adds] == ["add"] + [f"add_{k}" for k in range(1, 8)]
    assert all(n.meta["replaced"].startswith("aten.add") for n in adds)


def test_qualnames_are_unique_on_every_node_and_never_another_nodes_name(prepared_resnet):
    nodes = list(prepared_resnet.graph_module.graph.nodes)
    assert [n.name for n in nodes if "qualname" not in n.meta or "original_name" not in n.meta] == []
    qualnames = [n.meta["qualname"] for n in nodes]
    assert len(qualnames) == len(set(qualnames))
    by_name = {n.name: n for n in nodes}
    assert [(n.name, n.meta["qualname"]) for n in nodes if by_name.get(n.meta["qualname"], n) is not n] == []


def test_second_call_of_a_module_gets_its_own_copy(prepared_resnet, resnet):
    gm = prepared_resnet.graph_module
    first, second = gm.get_submodule("layer1.0.relu"), gm.get_submodule("layer1.0.relu_1")
    assert first is not second and type(second) is nn.ReLU
    # the graph's modules are private copies sharing the user's parameter storage
    conv = gm.get_submodule("layer1.0.conv1")
    assert conv is not resnet.layer1[0].conv1
    assert conv.weight.data_ptr() == resnet.layer1[0].conv1.weight.data_ptr()


def test_qualnames_of_a_module_called_twice():
    gm = prepare(TwiceScaled().eval(), (torch.randn(2, 4),)).graph_module
    by_qualname = {n.meta["qualname"]: (n.op, n.meta["original_name"]) for n in gm.graph.nodes}
    assert by_qualname["block.lin"] == ("call_module", "block_lin")
    assert by_qualname["block.lin_1"] == ("call_module", "block_lin_1")
    assert by_qualname["block.mul"] == ("call_module", "mul")
    assert by_qualname["block.mul_1"] == ("call_module", "mul_1")
    assert by_qualname["block.add"] == ("call_module", "add")
    assert by_qualname["block.add_1"] == ("call_module", "add_1")
    assert by_qualname["act"] == ("call_module", "act")
    assert isinstance(gm.get_submodule("block.mul"), M.Scale)  # times a parameter: a constant
    assert isinstance(gm.get_submodule("block.add_1"), M.Addition)


def test_top_level_operations_are_named_by_the_operator():
    gm = prepare(AddsAround().eval(), (torch.randn(2, 4),)).graph_module
    adds = [(n.meta["original_name"], n.meta["qualname"]) for n in gm.graph.nodes if n.meta.get("replaced", "").startswith("aten.add")]
    # numbered over the whole graph as torch.fx does: the second top-level addition is the third one
    assert adds == [("add", "add"), ("add_1", "inner.add"), ("add_2", "add_2")]
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    assert [(n.name, n.meta["qualname"]) for n in nodes if by_name.get(n.meta["qualname"], n) is not n] == []


def test_layer_names_resolve_qualified_and_original_names(prepared_resnet, resnet):
    by_qualname = _by(prepared_resnet.graph_module)
    assert resolve_layer(resnet, prepared_resnet, "layer4.1.add") is by_qualname["layer4.1.add"]
    assert resolve_layer(resnet, prepared_resnet, "add_7") is by_qualname["layer4.1.add"]
    assert resolve_layer(resnet, prepared_resnet, "layer1.0.relu_1") is by_qualname["layer1.0.relu_1"]


def test_get_node_accepts_fx_style_original_names():
    """ModelArchitecture.get_node promises fx names such as 'add_7', as LayerLRP accepts them."""
    model = AddsAround().eval()
    architecture = captum_graph.ModelArchitecture.from_model(model, (torch.randn(2, 4),))
    assert architecture.get_node("add_1").qualname == "inner.add"


def test_qualname_of_a_parameter_is_its_qualified_name():
    gm = prepare(TwiceScaled().eval(), (torch.randn(2, 4),)).graph_module
    (node,) = gm.graph.find_nodes(op="get_attr")
    assert node.target == "block.scale"
    assert node.meta["qualname"] == "block.scale"


def test_placeholders_are_named_after_forward_parameters(prepared_resnet):
    assert [n.name for n in prepared_resnet.graph_module.graph.find_nodes(op="placeholder")] == ["x"]
    gm = prepare(Flagged().eval(), (torch.randn(2, 4), True)).graph_module
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x", "double"]
    gm = prepare(MaybeOffset().eval(), (torch.randn(2, 4), torch.randn(2, 4))).graph_module
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x", "offset"]
    model = VarArgs().eval()
    args = (torch.randn(2, 4), torch.randn(2, 4))
    gm = prepare(model, args).graph_module
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["input_0", "input_1"]
    assert torch.equal(gm(*args), model(*args))


def test_stack_trace_points_at_user_source():
    gm = prepare(TwiceScaled().eval(), (torch.randn(2, 4),)).graph_module
    line = _line_of(Scaled.forward, "return self.lin(x) * self.scale + x")
    for qualname in ("block.mul_1", "block.add", "block.lin_1"):
        node = _by(gm)[qualname]
        assert source_line(node) == f"{THIS_FILE}:{line}: return self.lin(x) * self.scale + x", qualname


def test_stack_trace_points_at_torchvision_source(prepared_resnet):
    node = _by(prepared_resnet.graph_module)["layer1.0.add"]
    line = _line_of(BasicBlock.forward, "out += identity")
    assert source_line(node) == f"resnet.py:{line}: out += identity"


# ---------------------------------------------------------------------------
# non-tensor arguments are fixed at their values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("double", [True, False])
def test_python_flag_captures_the_branch_taken(double):
    model = Flagged().eval()
    x = torch.randn(2, 4)
    prepared = prepare(model, (x, double))
    scales = [n for n in prepared.graph_module.graph.nodes if n.meta.get("replaced", "").startswith("aten.mul")]
    assert len(scales) == (1 if double else 0)
    with torch.no_grad():
        assert torch.equal(prepared.graph_module(x, double), model(x, double))


def test_cache_is_keyed_by_the_value_of_non_tensor_arguments():
    model = Flagged().eval()
    x = torch.randn(2, 4)
    doubled, plain = prepare(model, (x, True)), prepare(model, (x, False))
    assert doubled is not plain
    assert prepare(model, (x, True)) is doubled
    assert prepare(model, (torch.randn(2, 4), False)) is plain
    assert prepare(model, (x, 1.5)) is not doubled


def test_none_argument_captures_the_branch_taken():
    model = MaybeOffset().eval()
    x, offset = torch.randn(2, 4), torch.randn(2, 4)
    without, with_offset = prepare(model, (x, None)), prepare(model, (x, offset))
    assert without is not with_offset
    additions = lambda gm: [n for n in gm.graph.nodes if n.meta.get("replaced", "").startswith("aten.add")]  # noqa: E731
    assert (len(additions(without.graph_module)), len(additions(with_offset.graph_module))) == (0, 1)
    with torch.no_grad():
        assert torch.equal(without.graph_module(x, None), model(x))
        assert torch.equal(with_offset.graph_module(x, offset), model(x, offset))
    assert prepare(model, (x, None)) is without
    assert prepare(model, (x, torch.randn(2, 4))) is with_offset


@pytest.mark.parametrize("double", [True, False])
def test_lrp_with_a_flag_as_additional_forward_arg(double):
    model = Flagged().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    relevance = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=1, additional_forward_args=(double,))
    expected = InputXGradient(model).attribute(x, target=1, additional_forward_args=(double,))
    assert_matches_input_x_gradient(relevance, expected, name=f"Flagged(double={double})")


# ---------------------------------------------------------------------------
# dynamic batch and the cache
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
def test_dynamic_batch_runs_at_any_batch_size(batch):
    """Captured at a batch of two (or one, where capture makes that dynamic too), any batch size runs."""
    model = ResidualNet().eval()
    x = example_input(batch, torch.float32)
    prepared = prepare(model, (x,))
    assert not prepared.path_specific
    assert prepared.dynamic_batch or batch == 1, "a batch of two must give a dynamic batch"
    x5 = example_input(5, torch.float32)
    with torch.no_grad():
        assert torch.equal(prepared.graph_module(x), model(x))
        if prepared.dynamic_batch:
            assert torch.equal(prepared.graph_module(x5), model(x5))
    at_five = prepare(model, (x5,))
    assert (at_five is prepared) == prepared.dynamic_batch  # a different batch size hits the cache when dynamic
    with torch.no_grad():
        assert torch.equal(at_five.graph_module(x5), model(x5))
    if at_five.dynamic_batch:
        assert prepare(model, (example_input(3, torch.float32),)) is at_five


def test_cache_is_keyed_by_dtype_and_feature_shape():
    model = Scaled().eval()
    prepared = prepare(model, (torch.randn(2, 4),))
    assert prepare(model, (torch.randn(2, 4, dtype=torch.float64),)) is not prepared
    assert prepare(model, (torch.randn(2, 3, 4),)) is not prepared
    assert prepare(model, (torch.randn(6, 4),)) is prepared


def test_batch_of_one_takes_the_batch_of_one_path():
    """Captured at a batch of one, the graph computes what the model computes at a batch of one."""
    model = OneSpecial().eval()
    x = torch.randn(1, 4)
    prepared = prepare(model, (x,))
    with torch.no_grad():
        assert torch.equal(prepared.graph_module(x), model(x))


def test_batch_specialised_by_export_is_not_dynamic():
    """A graph export specialised to its batch size is not reused at another batch size."""
    model = PairSpecial().eval()
    x2, x5 = torch.randn(2, 4), torch.randn(5, 4)
    prepared = prepare(model, (x2,))
    assert not prepared.dynamic_batch
    at_five = prepare(model, (x5,))
    with torch.no_grad():
        assert torch.equal(at_five.graph_module(x5), model(x5))


def test_graph_sees_parameters_changed_in_place_and_folded_graphs_are_rebuilt():
    model = Scaled().eval()
    x = torch.randn(2, 4)
    prepared = prepare(model, (x,))
    folded = prepare(model, (x,), fold_batch_norm=True)
    assert prepare(model, (x,)) is prepared
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # an optimiser step
    assert prepare(model, (x,)) is prepared, "the graph shares the storage: no capture for new values"
    with torch.no_grad():
        assert torch.equal(prepared.graph_module(x), model(x))
    updated = prepare(model, (x,), fold_batch_norm=True)
    assert updated is not folded, "folding bakes values in: captured again"
    with torch.no_grad():
        assert torch.equal(updated.graph_module(x), model(x))


def test_cache_invalidated_by_train_eval_and_module_replacement():
    model = Holds(Squash()).eval()
    x = torch.randn(4, 4)
    prepared = prepare(model, (x,))
    model.train()
    in_train = prepare(model, (x,))
    assert in_train is not prepared
    model.eval()
    assert prepare(model, (x,)) is not in_train
    again = prepare(model, (x,))
    model.pre = nn.Linear(4, 4)
    replaced = prepare(model, (x,))
    assert replaced is not again
    with torch.no_grad():
        assert torch.equal(replaced.graph_module(x), model(x))


def test_cache_invalidated_by_registering_a_leaf_module(clean_leaf_registry):
    model = Holds(Squash()).eval()
    x = torch.randn(2, 4)
    traced_into = prepare(model, (x,))
    assert "inner.1" not in {n.target for n in traced_into.graph_module.graph.find_nodes(op="call_module")}
    captum_graph.register_leaf_module(Squash)
    leaf = prepare(model, (x,))
    assert "inner.1" in {n.target for n in leaf.graph_module.graph.find_nodes(op="call_module")}


# ---------------------------------------------------------------------------
# data-dependent control flow
# ---------------------------------------------------------------------------
def _branch_inputs():
    positive = torch.rand(3, 4, dtype=torch.float64) + 0.1
    return {"positive": positive, "negative": -positive}


@pytest.mark.parametrize("branch", ["positive", "negative"])
def test_data_dependent_branch_lrp_equals_input_x_gradient(branch):
    model = Branchy().double().eval()
    x = _branch_inputs()[branch]
    prepared = prepare(model, (x,))
    assert prepared.path_specific
    with torch.no_grad():
        assert torch.equal(prepared.graph_module(x), model(x))
    relevance = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=1)
    expected = InputXGradient(model).attribute(x, target=1)
    assert_matches_input_x_gradient(relevance, expected, name=f"Branchy ({branch} branch)")


def test_data_dependent_graph_is_not_cached_and_guards_its_path():
    model = Branchy().double().eval()
    inputs = _branch_inputs()
    positive = prepare(model, (inputs["positive"],))
    assert prepare(model, (inputs["positive"],)) is not positive
    negative = prepare(model, (inputs["negative"],))
    targets = lambda p: {str(n.target) for n in p.graph_module.graph.find_nodes(op="call_module")}  # noqa: E731
    assert "b" not in targets(positive) and "b" in targets(negative)
    with pytest.raises(RuntimeError, match="assertion"):
        positive.graph_module(inputs["negative"])  # the other branch: the graph refuses, never lies


def test_capture_of_data_dependent_control_flow_is_path_specific():
    captured = capture(private_copy(Branchy().eval()), (torch.rand(2, 4),))
    assert captured.path_specific


# ---------------------------------------------------------------------------
# torch layer subclasses
# ---------------------------------------------------------------------------
def test_is_torch_layer():
    assert passes.is_torch_layer(nn.Conv2d(1, 1, 1)) and passes.is_torch_layer(MyConv(1, 1, 1))
    assert not passes.is_torch_layer(BNAct(2))
    assert not passes.is_torch_layer(SubclassedSequential())
    assert not passes.is_torch_layer(Scaled())


def test_subclass_with_own_forward_is_looked_into_and_keeping_forward_stays_one_node():
    model = SubclassNet().eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare(model, (x,))
    gm = prepared.graph_module
    modules = {n.meta["qualname"]: type(gm.get_submodule(n.target)) for n in gm.graph.find_nodes(op="call_module")}
    assert modules["conv"] is MyConv
    assert "bn" not in modules, "BNAct overrides forward: it must not be one module (it would get batch norm's rule)"
    assert {q for q in modules if q.startswith("bn.")} == {"bn.batch_norm", "bn.relu", "bn.mul"}
    assert modules["body.0"] is nn.Conv2d and modules["body.1"] is nn.ReLU and "body" not in modules
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_subclass_rules():
    model = SubclassNet().eval()
    x = torch.randn(2, 3, 8, 8)
    report = {a.qualname: a for a in LRP(model).rule_report(x)}
    assert report["conv"].module_type == "MyConv" and isinstance(report["conv"].rule, EpsilonRule)
    assert not [a for a in report.values() if a.module_type in ("BNAct", "BatchNorm2d")]
    gamma = LRP(model, rules={(nn.Conv2d,): GammaRule(0.25), (nn.BatchNorm2d,): GammaRule(0.5)})
    report = {a.qualname: a for a in gamma.rule_report(x)}
    assert isinstance(report["conv"].rule, GammaRule) and report["conv"].rule.gamma == 0.25  # isinstance match
    assert not isinstance(report["bn.batch_norm"].rule, GammaRule)


def test_subclass_with_own_forward_conserves_relevance():
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    model = zero_additive_constants(make_meaningful(SubclassNet(bias=False), x))
    relevance = LRP(model).attribute(x, target=2)
    with torch.no_grad():
        output = model(x)[:, 2]
    assert_conserves(relevance, output, name="SubclassNet")


# ---------------------------------------------------------------------------
# register_leaf_module
# ---------------------------------------------------------------------------
def _module_targets(gm):
    return [str(n.target) for n in gm.graph.find_nodes(op="call_module")]


def test_register_leaf_module_keeps_one_node(clean_leaf_registry):
    assert captum_graph.register_leaf_module(Squash) is Squash  # usable as a decorator
    assert Squash in passes.registered_leaf_modules()
    model = Holds(Squash()).eval()
    x = torch.randn(2, 4)
    gm = prepare(model, (x,)).graph_module
    targets = _module_targets(gm)
    assert "inner.1" in targets and not [t for t in targets if t.startswith("inner.1.")], targets
    assert isinstance(gm.get_submodule("inner.1"), Squash)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_register_leaf_module_matches_subclasses(clean_leaf_registry):
    class Squashier(Squash):
        pass

    captum_graph.register_leaf_module(Squash)
    gm = prepare(Holds(Squashier()).eval(), (torch.randn(2, 4),)).graph_module
    assert "inner.1" in _module_targets(gm)


def test_registered_leaf_taking_two_tensors_is_looked_into(clean_leaf_registry):
    captum_graph.register_leaf_module(Pair)
    gm = prepare(Holds(Squash()).eval(), (torch.randn(2, 4),)).graph_module
    targets = _module_targets(gm)
    assert "pair" not in targets and {"pair.mul", "pair.add"} <= set(targets), targets


def test_registered_leaf_with_data_dependent_forward_keeps_both_branches(clean_leaf_registry):
    captum_graph.register_leaf_module(Picky)
    model = Holds(Picky()).eval()
    x = torch.randn(2, 4)
    gm = prepare(model, (x,)).graph_module
    assert "inner.1" in _module_targets(gm)
    with torch.no_grad():
        for inputs in (x, 10 * x.abs(), -10 * x.abs()):
            assert torch.equal(gm(inputs), model(inputs))


def test_registered_leaf_without_a_rule_is_reported():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passes, "_LEAF_MODULES", set(passes._LEAF_MODULES))
        captum_graph.register_leaf_module(Squash)
        with pytest.raises(captum_graph.UnsupportedOperationError, match=r"'inner\.1'[\s\S]*Squash[\s\S]*register_rule"):
            LRP(Holds(Squash()).eval()).attribute(torch.randn(2, 4), target=0)
        assert Squash in passes.registered_leaf_modules()
    assert Squash not in passes.registered_leaf_modules()  # the fixture's mechanism restores the registry


# ---------------------------------------------------------------------------
# capture errors
# ---------------------------------------------------------------------------
def test_capture_error_names_the_source_line_and_is_the_original_type():
    line = _line_of(Untraceable.forward, "h.numpy()")
    with pytest.raises(CaptureError, match=(
        rf"torch\.export cannot capture HoldsUntraceable: [\s\S]*"
        rf"at {re.escape(THIS_FILE)}:{line}: return torch\.from_numpy\(h\.numpy\(\)\)[\s\S]*To fix it"
    )) as caught:
        prepare(HoldsUntraceable().eval(), (torch.randn(2, 4),))
    error = caught.value
    assert isinstance(error, RuntimeError) and isinstance(error.__cause__, RuntimeError)
    assert isinstance(error, TracingError) and isinstance(error, CaptumGraphError)
    assert isinstance(error, captum_graph.TracingError)


def test_except_clause_for_the_original_error_still_catches():
    try:
        prepare(HoldsUntraceable().eval(), (torch.randn(2, 4),))
    except RuntimeError as error:  # code written for plain torch.export
        assert isinstance(error, CaptureError)
    else:
        pytest.fail("capturing HoldsUntraceable should fail")


def test_capture_error_of_another_type_reads_as_a_message():
    line = _line_of(LooksUp.forward, 'self.heads["b"]')
    with pytest.raises(KeyError) as caught:
        prepare(LooksUp().eval(), (torch.randn(2, 4),))
    error = caught.value
    assert isinstance(error, CaptureError)
    assert str(error).startswith("torch.export cannot capture LooksUp: "), str(error)
    assert f"\n  at {THIS_FILE}:{line}: " in str(error)


# ---------------------------------------------------------------------------
# the user's model is untouched
# ---------------------------------------------------------------------------
def _set_mode(model, mode):
    if mode == "mixed":
        model.train()
        model.inner.eval()
        model.norm.train()
    else:
        model.train(mode == "train")
    return model


def _flags(model):
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_prepare_leaves_the_model_untouched(mode, assert_untouched):
    model = _set_mode(Holds(nn.Sequential(nn.Dropout(0.5), Squash())), mode)
    inputs = torch.randn(4, 4)
    flags = _flags(model)
    with assert_untouched(model, inputs if mode == "eval" else None):  # a train-mode forward moves statistics
        prepared = prepare(model, (inputs,))
        if mode == "eval":
            LRP(model).attribute(inputs, target=0)
    assert _flags(model) == flags
    assert prepared.graph_module.get_submodule("pre") is not model.pre


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_failed_capture_leaves_the_model_untouched(mode, assert_untouched):
    model = _set_mode(HoldsUntraceable(), "train" if mode == "train" else "eval")
    if mode == "mixed":
        model.inner[1].norm.train()
    flags = _flags(model)
    with assert_untouched(model):
        with pytest.raises(CaptureError):
            prepare(model, (torch.randn(4, 4),))
    assert _flags(model) == flags


@pytest.mark.parametrize("fails", [False, True])
def test_capture_restores_training_flags(fails):
    model = HoldsUntraceable() if fails else Holds(Squash())
    model.train()
    model.inner.eval()
    flags = _flags(model)
    if fails:
        with pytest.raises(CaptureError):
            capture(model, (torch.randn(4, 4),))
    else:
        capture(model, (torch.randn(4, 4),))
    assert _flags(model) == flags


def test_compiled_model_is_seen_through_and_untouched(assert_untouched):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 4)
    with assert_untouched(model, x):
        prepared = prepare(compiled, (x,))
        through_wrapper = LRP(compiled).attribute(x, target=1)
    assert torch.equal(through_wrapper, LRP(model).attribute(x, target=1))
    assert [n.meta["qualname"] for n in prepared.graph_module.graph.find_nodes(op="call_module")] == ["0", "1", "2"]
    with torch.no_grad():
        assert torch.equal(prepared.graph_module(x), model(x))
