"""captum_graph.tracing: qualified names, source lines, leaves, and untraceable models."""
import inspect
import operator
import os
import re

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import captum_graph
from captum_graph import tracing
from captum_graph.errors import CaptumGraphError, TracingError, source_line
from captum_graph.tracing import QualnameTracer, register_leaf_function, register_leaf_module, trace

THIS_FILE = os.path.basename(__file__)


def _line_of(function, text):
    """The file line number of the first line of ``function`` containing ``text``."""
    lines, start = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(f"{text!r} not in {function.__qualname__}")


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def traced_resnet(resnet):
    return trace(resnet)


@pytest.fixture
def clean_registries(monkeypatch):
    """Registrations made by a test vanish with it (the registries are module-level sets)."""
    monkeypatch.setattr(tracing, "_LEAF_MODULES", set(tracing._LEAF_MODULES))
    monkeypatch.setattr(tracing, "_LEAF_FUNCTIONS", set(tracing._LEAF_FUNCTIONS))


def _qualnames(gm):
    return {node.name: node.meta.get("qualname") for node in gm.graph.nodes}


# qualified names ---------------------------------------------------------------


def test_qualnames_are_torchvision_style(traced_resnet):
    qualnames = _qualnames(traced_resnet)
    expected = {
        "x": "x",
        "conv1": "conv1",
        "relu": "relu",
        "layer1_0_conv1": "layer1.0.conv1",
        "layer1_0_relu": "layer1.0.relu",
        "add": "layer1.0.add",
        "layer1_0_relu_1": "layer1.0.relu_1",  # second call of the same ReLU
        "add_1": "layer1.1.add",
        "layer2_0_downsample_0": "layer2.0.downsample.0",
        "add_7": "layer4.1.add",
        "layer4_1_relu_1": "layer4.1.relu_1",
        "avgpool": "avgpool",
        "flatten": "flatten",
        "fc": "fc",
    }
    assert {name: qualnames[name] for name in expected} == expected


def test_qualnames_are_unique_and_on_every_node(traced_resnet):
    missing = [node.name for node in traced_resnet.graph.nodes if "qualname" not in node.meta]
    assert missing == [], f"nodes without meta['qualname']: {missing}"
    names = [node.meta["qualname"] for node in traced_resnet.graph.nodes]
    assert len(names) == len(set(names))


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


def test_qualnames_of_a_module_called_twice():
    gm = trace(TwiceScaled())
    by_qualname = {node.meta.get("qualname"): (node.op, node.name) for node in gm.graph.nodes}
    assert by_qualname["block.lin"] == ("call_module", "block_lin")
    assert by_qualname["block.lin_1"] == ("call_module", "block_lin_1")
    assert by_qualname["block.mul"] == ("call_function", "mul")
    assert by_qualname["block.mul_1"] == ("call_function", "mul_1")
    assert by_qualname["block.add"] == ("call_function", "add")
    assert by_qualname["block.add_1"] == ("call_function", "add_1")
    assert by_qualname["act"] == ("call_module", "act")


def test_qualname_of_a_parameter_is_its_qualified_name():
    gm = trace(TwiceScaled())
    (node,) = [node for node in gm.graph.nodes if node.op == "get_attr"]
    assert node.target == "block.scale"
    assert node.meta["qualname"] == "block.scale"


def test_qualname_tracer_directly(resnet):
    graph = QualnameTracer().trace(resnet)
    qualnames = {node.name: node.meta.get("qualname") for node in graph.nodes}
    assert qualnames["add_3"] == "layer2.1.add"
    assert qualnames["layer3_0_relu_1"] == "layer3.0.relu_1"
    # the module docstring: "Every node gets node.meta['qualname']" -- also without trace()
    assert [name for name, qualname in qualnames.items() if qualname is None] == []


def test_record_inplace_keeps_names_and_outputs(resnet):
    gm = trace(resnet, record_inplace=True)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd)]
    assert [(n.name, n.target, n.meta["qualname"]) for n in adds] == [
        (name, operator.iadd, f"layer{i}.{j}.add")
        for name, (i, j) in zip(["add"] + [f"add_{k}" for k in range(1, 8)], [(i, j) for i in range(1, 5) for j in range(2)])
    ]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), resnet(x))


class Aliasing(nn.Module):
    """``b`` aliases ``a``, so the in-place update shows through both names."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        a = self.lin(x)
        b = a
        a += 1
        return a * b


def test_record_inplace_is_exact_for_aliased_tensors():
    model = Aliasing().eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
        gm = trace(model, record_inplace=True)
        assert torch.equal(gm(x), expected)
    (node,) = [n for n in gm.graph.nodes if n.target is operator.iadd]
    assert (node.name, node.meta["qualname"]) == ("add", "add")


class SubclassedLinear(nn.Linear):
    """A torch layer subclass that keeps torch's forward: stays one node."""


class SubclassedReLUWithForward(nn.ReLU):
    """Overrides forward: traced into like any user module."""

    def forward(self, x):
        return super().forward(x) * 2


class SubclassedSequential(nn.Sequential):
    """A container subclass: traced into."""


def test_torch_layer_subclasses():
    model = nn.Sequential(
        SubclassedLinear(4, 4), SubclassedReLUWithForward(), SubclassedSequential(nn.Linear(4, 4), nn.Tanh())
    )
    gm = trace(model)
    calls = [(n.op, str(n.target) if n.op == "call_module" else getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes]
    assert calls == [
        ("placeholder", "input"),
        ("call_module", "0"),
        ("call_function", "relu"),
        ("call_function", "mul"),
        ("call_module", "2.0"),
        ("call_module", "2.1"),
        ("output", "output"),
    ]
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))


# source lines --------------------------------------------------------------------


def test_stack_trace_points_at_torchvision_source(traced_resnet):
    node = next(n for n in traced_resnet.graph.nodes if n.name == "add")
    line = _line_of(BasicBlock.forward, "out += identity")
    last = node.stack_trace.strip().splitlines()
    assert last[-2].strip() == f'File "{inspect.getsourcefile(BasicBlock)}", line {line}, in forward'
    assert last[-1].strip() == "out += identity"
    assert source_line(node) == f"resnet.py:{line}: out += identity"


def test_stack_trace_of_module_call(traced_resnet):
    node = next(n for n in traced_resnet.graph.nodes if n.name == "layer1_0_conv2")
    line = _line_of(BasicBlock.forward, "out = self.conv2(out)")
    assert source_line(node) == f"resnet.py:{line}: out = self.conv2(out)"


def test_stack_trace_points_at_user_source():
    gm = trace(TwiceScaled())
    mul = next(n for n in gm.graph.nodes if n.name == "mul_1")
    line = _line_of(Scaled.forward, "return self.lin(x) * self.scale + x")
    assert source_line(mul) == f"{THIS_FILE}:{line}: return self.lin(x) * self.scale + x"
    assert mul.stack_trace.strip().splitlines()[0].strip() == f'File "{__file__}", line {line}, in forward'


# outputs and sharing ---------------------------------------------------------------


def test_traced_resnet_computes_the_same_output(resnet, traced_resnet):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(traced_resnet(x), resnet(x))


def test_traced_module_shares_modules_and_parameters(resnet, traced_resnet):
    assert isinstance(traced_resnet, fx.GraphModule)
    assert traced_resnet.conv1 is resnet.conv1
    assert traced_resnet.get_submodule("layer4.1.conv2").weight is resnet.layer4[1].conv2.weight
    assert type(traced_resnet).__name__ == "ResNet"


def test_trace_keeps_training_flags_and_equal_outputs_in_train_mode():
    model = TwiceScaled()
    model.train()
    model.block.eval()
    gm = trace(model)
    assert model.training and not model.block.training and model.act.training
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))


# leaf modules and functions ----------------------------------------------------------


class Picky(nn.Module):
    """Data-dependent control flow: untraceable unless kept as a leaf."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


class HoldsPicky(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)  # running statistics would move if a forward ran in train mode
        self.inner = nn.Sequential(nn.ReLU(), Picky())

    def forward(self, x):
        return self.inner(self.norm(self.pre(x))) + 1


def clamp_if_positive(x):
    """Data-dependent control flow: untraceable unless wrapped."""
    if x.sum() > 0:
        return x.clamp(min=0.25)
    return x


class CallsFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        return clamp_if_positive(self.inner(x)) * 2


def _assert_single_leaf(gm, target, qualname):
    nodes = [(n.op, n.target, n.meta.get("qualname")) for n in gm.graph.nodes if n.op == "call_module"]
    assert ("call_module", target, qualname) in nodes
    assert not [t for _, t, _ in nodes if str(t).startswith(target + ".")], f"{target} was traced into: {nodes}"


def test_register_leaf_module(clean_registries):
    assert register_leaf_module(Picky) is Picky  # usable as a decorator
    assert Picky in tracing.registered_leaf_modules()
    model = HoldsPicky().eval()
    gm = trace(model)
    _assert_single_leaf(gm, "inner.1", "inner.1")
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(-x.abs() - 10), model(-x.abs() - 10))  # both branches live on in the leaf


def test_register_leaf_module_is_public_and_matches_subclasses(clean_registries):
    class PickierStill(Picky):
        pass

    captum_graph.register_leaf_module(Picky)
    model = HoldsPicky().eval()
    model.inner[1] = PickierStill()
    gm = trace(model)
    _assert_single_leaf(gm, "inner.1", "inner.1")


def test_leaf_registration_is_undone_with_the_registry(clean_registries):
    # (with clean_registries the registration of other tests is gone)
    assert Picky not in tracing.registered_leaf_modules()
    assert clamp_if_positive not in tracing.registered_leaf_functions()
    with pytest.raises(TracingError):
        trace(HoldsPicky())


def test_leaf_modules_argument(clean_registries):
    model = HoldsPicky().eval()
    gm = trace(model, leaf_modules=(Picky,))
    _assert_single_leaf(gm, "inner.1", "inner.1")
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    # the argument registers nothing
    assert Picky not in tracing.registered_leaf_modules()
    with pytest.raises(TracingError):
        trace(model)


def test_register_leaf_function(clean_registries):
    assert register_leaf_function(clamp_if_positive) is clamp_if_positive
    assert clamp_if_positive in tracing.registered_leaf_functions()
    model = CallsFunction().eval()
    gm = trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is clamp_if_positive]
    assert len(calls) == 1
    assert calls[0].meta["qualname"] == "clamp_if_positive"
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "clamp"]
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))


def test_leaf_functions_argument(clean_registries):
    model = CallsFunction().eval()
    gm = trace(model, leaf_functions=(clamp_if_positive,))
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is clamp_if_positive]
    assert len(calls) == 1
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert clamp_if_positive not in tracing.registered_leaf_functions()
    with pytest.raises(TracingError):
        trace(model)


def shift_2(x):
    """A leaf function whose own name ends in digits."""
    return x + 2


class CallsShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return shift_2(self.inner(x))


class HoldsShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = CallsShift()

    def forward(self, x):
        return self.block(x)


def test_qualname_keeps_digits_that_belong_to_the_function_name():
    gm = trace(HoldsShift(), leaf_functions=(shift_2,))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is shift_2
    assert node.meta["qualname"] == "block.shift_2"


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, double=False):
        y = self.lin(x)
        if double:
            return y * 2
        return y


def test_concrete_args():
    model = Flagged().eval()
    gm = trace(model, concrete_args={"double": True})
    x = torch.randn(2, 4)
    # as with fx.symbolic_trace, the specialised argument stays a checked positional input
    assert torch.equal(gm(x, True), model(x, double=True))
    assert [n.meta["qualname"] for n in gm.graph.nodes if n.op == "call_function"][-1] == "mul"


# untraceable models ------------------------------------------------------------------


def _state(model):
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _assert_same_state(model, before):
    after = _state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for kind in ("parameters", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for name, value in before[kind].items():
            assert torch.equal(after[kind][name], value), f"{kind[:-1]} {name} changed"
    for name, module in model.named_modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, hooks), f"{hooks} left on {name or 'the model'}"


def _set_mode(model, mode):
    if mode == "mixed":
        model.train()
        model.inner.eval()
        model.inner[1].lin.train()
    else:
        model.train(mode == "train")
    return model


def _untraceable_message():
    line = _line_of(Picky.forward, "if x.sum() > 0:")
    return (
        r"cannot trace 'inner\.1' \(Picky\) with torch\.fx: .*control flow"
        rf"[\s\S]*at {re.escape(THIS_FILE)}:{line}: if x\.sum\(\) > 0:"
        r"[\s\S]*register_leaf_module[\s\S]*leaf_modules=[\s\S]*register_leaf_function[\s\S]*concrete_args"
    )


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_untraceable_submodule_error_and_untouched_model(clean_registries, mode):
    model = _set_mode(HoldsPicky(), mode)
    before = _state(model)
    with pytest.raises(TracingError, match=_untraceable_message()) as caught:
        trace(model)
    error = caught.value
    assert isinstance(error, fx.proxy.TraceError)
    assert isinstance(error, ValueError)
    assert isinstance(error, CaptumGraphError)
    assert isinstance(error, captum_graph.TracingError)
    assert isinstance(error.__cause__, fx.proxy.TraceError)
    _assert_same_state(model, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_untraceable_model_via_model_architecture(clean_registries, mode, assert_untouched):
    model = _set_mode(HoldsPicky(), mode)
    before = _state(model)
    with assert_untouched(model):
        with pytest.raises(fx.proxy.TraceError, match=r"cannot trace 'inner\.1' \(Picky\)"):
            captum_graph.ModelArchitecture.from_model(model)
    _assert_same_state(model, before)


def test_except_clause_for_the_original_error_still_catches(clean_registries):
    try:
        trace(HoldsPicky())
    except fx.proxy.TraceError as error:  # code written for plain torch.fx
        assert isinstance(error, TracingError)
    else:
        pytest.fail("tracing HoldsPicky should fail")


class TopLevelLen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * len(x)


def test_untraceable_top_level_forward_names_the_model():
    line = _line_of(TopLevelLen.forward, "len(x)")
    with pytest.raises(TracingError, match=rf"cannot trace the model \(TopLevelLen\)[\s\S]*{THIS_FILE}:{line}:") as caught:
        trace(TopLevelLen())
    # torch.fx raises RuntimeError for len(); the TracingError is one too
    assert isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value, CaptumGraphError)


def test_untraceable_error_in_a_function_names_the_caller_module():
    model = CallsFunction()
    line = _line_of(clamp_if_positive, "if x.sum() > 0:")
    with pytest.raises(TracingError, match=rf"cannot trace the model \(CallsFunction\)[\s\S]*at {THIS_FILE}:{line}: if x"):
        trace(model)


class AddsAround(nn.Module):
    """Additions at top level before and after one inside a submodule."""

    def __init__(self):
        super().__init__()
        self.inner = Scaled()

    def forward(self, x):
        x = x + 1
        x = self.inner(x)
        return x + 2


def test_qualified_names_never_name_another_node():
    # get_node() accepts fx names and qualified names alike, so a qualified name
    # that is the fx name of a different node makes the lookup silently wrong.
    gm = trace(AddsAround())
    adds = [(n.name, n.meta["qualname"]) for n in gm.graph.nodes if n.target is operator.add]
    assert adds[1] == ("add_1", "inner.add")
    by_name = {n.name: n for n in gm.graph.nodes}
    clashes = [(n.name, n.meta["qualname"]) for n in gm.graph.nodes if by_name.get(n.meta.get("qualname"), n) is not n]
    assert clashes == []
    arch = captum_graph.ModelArchitecture.from_model(AddsAround())
    last_add = arch.find_node(lambda n: n.operator is operator.add, all=True)[-1]
    assert arch.get_node(last_add.qualname) == last_add
