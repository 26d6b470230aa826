"""The untouched-model guarantee (DESIGN.md section 1), in success and in failure.

After any call, returning or raising, the user's model is exactly as before:
same parameters and buffers bit for bit, no hooks left on any module, no
leftover ``rule``/``activations`` attributes, same ``inplace``, ``training`` and
``requires_grad`` flags, same outputs. ``assert_untouched`` (conftest) checks
all of that; the first tests make sure it notices each kind of change.
"""
import copy
import functools

import captum.attr as ca
import pytest
import torch
from captum.attr._utils.lrp_rules import GammaRule
from torch import nn
from torch.nn.utils import parametrize

import captum_graph
from captum_graph.rules import PassThroughRule
from captum_graph.attr import LayerGradCam, LayerLRP, LRP
from helpers.models import TINY_MODELS, AttributeSink, Forwarding, SequentialNet, TinyNet, example_input

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")


@functools.lru_cache(maxsize=1)
def _pristine_resnet18():
    from torchvision.models import resnet18

    return resnet18(weights=None).double().eval()


def _resnet18():
    return copy.deepcopy(_pristine_resnet18())


MODELS = {
    "resnet18": (_resnet18, lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64)),
    "tiny residual": (lambda: TINY_MODELS["x + relu(conv(x))"]().double(), example_input),
    "tiny inplace relu": (lambda: TINY_MODELS["relu: nn.ReLU(inplace=True)"]().double(), example_input),
    "tiny shared conv": (lambda: TINY_MODELS["shared Conv2d"]().double(), example_input),
}
LAYERS = {"resnet18": ["layer1.0.add", "fc"], "tiny residual": ["block.add", "block.conv"],
          "tiny inplace relu": ["block.act", "block"], "tiny shared conv": ["block.conv_1", "block.relu"]}


# ---------------------------------------------------------------------------
# the checker itself
# ---------------------------------------------------------------------------
CHANGES = {
    "hook": lambda m: m.fc.register_forward_hook(lambda *a: None),
    "pre-hook": lambda m: m.block.register_forward_pre_hook(lambda *a: None),
    "backward hook": lambda m: m.fc.register_full_backward_hook(lambda *a: None),
    "global hook": lambda m: nn.modules.module.register_module_forward_hook(lambda *a: None),
    "rule": lambda m: setattr(m.fc, "rule", GammaRule()),
    "inplace": lambda m: setattr(m.block.act, "inplace", False),
    "training": lambda m: m.block.train(),
    "requires_grad": lambda m: m.stem.weight.requires_grad_(False),
    "weight value": lambda m: m.stem.weight.data.add_(1e-12),
    "weight rebound": lambda m: setattr(m.stem.weight, "data", m.stem.weight.data.clone()),
    "buffer": lambda m: m.register_buffer("extra", torch.zeros(1)),
    "grad": lambda m: setattr(m.fc.weight, "grad", torch.ones_like(m.fc.weight)),
    "submodule": lambda m: setattr(m, "fc", nn.Linear(4, 5).double()),
    "tensor hook": lambda m: m.stem.weight.register_hook(lambda grad: grad),
    "flag on a tensor": lambda m: setattr(m.fc.bias, "hook_registered", True),  # Captum flags tensors so
    "parametrization": lambda m: parametrize.register_parametrization(m.fc, "weight", _Double()),
    "grad mode": lambda m: _GradModeOff(),
}


class _Double(nn.Module):
    def forward(self, weight):
        return 2 * weight


class _GradModeOff:
    """Switches gradients off until removed (a leaked ``torch.no_grad``)."""

    def __init__(self) -> None:
        torch.set_grad_enabled(False)

    def remove(self) -> None:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("change", list(CHANGES))
def test_checker_notices(change, assert_untouched):
    model = TINY_MODELS["relu: nn.ReLU(inplace=True)"]().double()
    handles = []
    try:
        with pytest.raises(AssertionError, match="was modified"):
            with assert_untouched(model):
                result = CHANGES[change](model)
                if hasattr(result, "remove"):
                    handles.append(result)
    finally:
        for handle in handles:
            handle.remove()


def test_checker_notices_a_container_filled_in_place(assert_untouched):
    model = TINY_MODELS["relu: nn.ReLU(inplace=True)"]().double()
    model.block.seen = []
    with pytest.raises(AssertionError, match="attribute seen"):
        with assert_untouched(model):
            model.block.seen.append(1)


def test_checker_notices_a_graph_taken_over(assert_untouched):
    """``copy.copy`` of a GraphModule (``GraphModule.__copy__``) makes the copy own the shared graph."""
    model = nn.Sequential(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4))))
    with pytest.raises(AssertionError, match="graph_owner"):
        with assert_untouched(model):
            copy.copy(model[0])


def test_checker_notices_vanillas_leftovers(assert_untouched):
    """Captum's own LRP leaves ``activations`` on every layer (and forgets the user's rule)."""
    model = SequentialNet().double()
    model.conv.rule = GammaRule()
    with pytest.raises(AssertionError, match="activations"):
        with assert_untouched(model):
            ca.LRP(model).attribute(example_input(), target=0)


def test_checker_runs_when_the_body_raises(assert_untouched):
    model = TINY_MODELS["a + b"]().double()
    with pytest.raises(AssertionError, match="was modified"):
        with assert_untouched(model):
            model.fc.rule = GammaRule()
            raise KeyError("body failed")


# ---------------------------------------------------------------------------
# successful calls
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_lrp_leaves_model_untouched(name, assert_untouched):
    make, make_input = MODELS[name]
    model, x = make(), make_input()
    with assert_untouched(model, x):
        lrp = LRP(model)
        first, delta = lrp.attribute(x, target=[1, 3], return_convergence_delta=True)
        second = lrp.attribute(x, target=[1, 3])
        third = LRP(model).attribute(x, target=[1, 3])
    assert torch.equal(first, second) and torch.equal(first, third), "repeated calls differ"
    assert not x.requires_grad, "the input's requires_grad was not restored"


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_lrp_leaves_model_untouched(name, assert_untouched):
    make, make_input = MODELS[name]
    model, x = make(), make_input()
    with assert_untouched(model, x):
        lrp = LayerLRP(model, LAYERS[name])
        first = lrp.attribute(x, target=2)
        lrp.attribute(x, target=2, attribute_to_layer_input=True, return_convergence_delta=True)
        again = lrp.attribute(x, target=2)
        single = LayerLRP(model, LAYERS[name][0]).attribute(x, target=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "repeated LayerLRP calls differ"
    # equal up to rounding: a captured layer keeps its ratio and multiplications apart (engine.FusedRatios)
    torch.testing.assert_close(single, first[0], rtol=1e-12, atol=1e-15)


def test_user_rule_and_user_hooks_stay(assert_untouched):
    model = SequentialNet().double()
    rule = GammaRule()
    model.conv.rule = rule
    calls = []
    handle = model.fc.register_forward_hook(lambda module, args, out: calls.append(1))
    x = example_input()
    try:
        with assert_untouched(model):
            LRP(model).attribute(x, target=1)
            LayerLRP(model, model.pool).attribute(x, target=1)
        assert model.conv.rule is rule
        n = len(calls)
        model(x)
        assert len(calls) == n + 1, "the user's hook no longer fires"
    finally:
        handle.remove()


def test_model_in_train_mode_keeps_its_buffers(assert_untouched):
    """Attribution must not update batch-norm running statistics of the user's model."""
    model = SequentialNet(batch_norm=True).double().train()
    with assert_untouched(model):
        LRP(model).attribute(example_input(4), target=1)


def test_mixed_training_flags_stay(assert_untouched):
    model = TINY_MODELS["relu: nn.ReLU(inplace=True)"]().double()
    model.block.train()
    with assert_untouched(model):
        LRP(model).attribute(example_input(), target=1)
        LayerLRP(model, "block.a").attribute(example_input(), target=1)


# ---------------------------------------------------------------------------
# failing calls
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_untouched_after_bad_target(name, assert_untouched):
    make, make_input = MODELS[name]
    model, x = make(), make_input()
    lrp = LRP(model)
    before = lrp.attribute(x, target=0)
    with assert_untouched(model, x):
        with pytest.raises(IndexError):
            lrp.attribute(x, target=10_000)
        with pytest.raises(IndexError):
            LayerLRP(model, LAYERS[name][0]).attribute(x, target=10_000)
    assert not x.requires_grad
    assert torch.equal(lrp.attribute(x, target=0), before), "a failed call changed later results"


_BOMB = {"armed": False}  # a global: torch.export snapshots a module's own attributes


class Bomb(nn.Module):
    """Identity until ``_BOMB['armed']`` is set."""

    def forward(self, x):
        if _BOMB["armed"]:
            raise RuntimeError("boom")
        return x * 1.0  # one operation: the captured call of this leaf module


captum_graph.register_leaf_module(Bomb)


def test_untouched_when_forward_raises(assert_untouched):
    model = TinyNet(Bomb()).double().eval()
    x = example_input()
    rules = {Bomb: PassThroughRule()}  # a leaf module needs a rule of its own
    lrp, layer_lrp = LRP(model, rules=rules), LayerLRP(model, "stem", rules=rules)
    before = lrp.attribute(x, target=0)
    _BOMB["armed"] = True  # set after the graph was captured
    try:
        with assert_untouched(model):
            with pytest.raises(RuntimeError, match="boom"):
                lrp.attribute(x, target=0)
            with pytest.raises(RuntimeError, match="boom"):
                layer_lrp.attribute(x, target=0)
    finally:
        _BOMB["armed"] = False
    assert torch.equal(lrp.attribute(x, target=0), before), "a failed call left hooks or state behind"


class _ThroughNumpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 2)  # cannot be captured


def test_untouched_when_tracing_fails(assert_untouched):
    model = TinyNet(_ThroughNumpy()).double().eval()
    model.stem.train()
    with assert_untouched(model, example_input()):
        with pytest.raises(captum_graph.TracingError):
            LRP(model).attribute(example_input(), target=0)


def test_untouched_when_operation_is_unsupported(assert_untouched):
    class Erf(nn.Module):
        def forward(self, x):
            return torch.erf(x)

    model = TinyNet(Erf()).double().eval()
    with assert_untouched(model, example_input()):
        with pytest.raises(captum_graph.UnsupportedOperationError):
            LRP(model).attribute(example_input(), target=0)


def test_models_are_independent():
    """Two models of the same class, one prepared after the other, keep their own weights."""
    a, b = TINY_MODELS["a + b"]().double(), TINY_MODELS["a + b"]().double()
    x = example_input()
    first = LRP(a).attribute(x, target=0)
    LRP(b).attribute(x, target=0)
    assert torch.equal(LRP(a).attribute(x, target=0), first)
    assert not torch.equal(LRP(b).attribute(x, target=0), first)


def test_deepcopy_of_model_after_attribution_works():
    model = TINY_MODELS["a + b"]().double()
    LRP(model).attribute(example_input(), target=0)
    clone = copy.deepcopy(model)
    x = example_input()
    torch.testing.assert_close(LRP(clone).attribute(x, target=0), LRP(model).attribute(x, target=0))


class _CachingScale(nn.Module):
    """Keeps a tensor it computes in a dict attribute, as timm's LeViT caches attention biases."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.cache = {}

    def forward(self, x):
        if "scale" not in self.cache:
            self.cache["scale"] = self.weight * 2
        return x * self.cache["scale"]


def test_what_a_forward_caches_during_capture_never_reaches_the_model():
    model = nn.Sequential(nn.Linear(4, 4).double(), _CachingScale()).eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    LRP(model).attribute(x, target=0)
    assert model[1].cache == {}, "the capture wrote into the user's module"
    value = model(x)[0, 0].item()
    assert isinstance(value, float)  # a real number, not a symbol of the capture


# ---------------------------------------------------------------------------
# wrapped models
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, for DistributedDataParallel."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


WRAPPERS = {
    "torch.compile": (torch.compile, "_orig_mod"),
    "DataParallel": (nn.DataParallel, "module"),
    "DistributedDataParallel": (lambda model: nn.parallel.DistributedDataParallel(model), "module"),
    "DataParallel(torch.compile)": (lambda model: nn.DataParallel(torch.compile(model)), "module._orig_mod"),
}


def _wrap(name, model, request):
    if "Distributed" in name:
        request.getfixturevalue("process_group")
    make, prefix = WRAPPERS[name]
    return make(model), prefix


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_model_is_explained_as_the_model_inside(wrapper, request, assert_untouched):
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    x = example_input()
    wrapped, prefix = _wrap(wrapper, model, request)
    expected = {
        "LRP": LRP(model).attribute(x, target=1),
        "block": LayerLRP(model, "block").attribute(x, target=1),
        "block.add": LayerLRP(model, "block.add").attribute(x, target=1, attribute_to_layer_input=True),
        "cam": LayerGradCam(model, "block").attribute(x, target=1),
        "cam at block.conv": LayerGradCam(model, model.block.conv).attribute(x, target=1),
    }
    with assert_untouched(model, x):
        assert torch.equal(LRP(wrapped).attribute(x, target=1), expected["LRP"])
        for name in ("block", f"{prefix}.block", model.block):  # plain, through the wrapper, a module inside
            assert torch.equal(LayerLRP(wrapped, name).attribute(x, target=1), expected["block"]), name
            assert torch.equal(LayerGradCam(wrapped, name).attribute(x, target=1), expected["cam"]), name
        for name in ("block.add", f"{prefix}.block.add"):
            found = LayerLRP(wrapped, name).attribute(x, target=1, attribute_to_layer_input=True)
            assert all(torch.equal(a, b) for a, b in zip(found, expected["block.add"])), name
        found = LayerGradCam(wrapped, model.block.conv).attribute(x, target=1)
        assert torch.equal(found, expected["cam at block.conv"])
        assert torch.equal(LayerGradCam(wrapped).attribute(x, target=1), LayerGradCam(model).attribute(x, target=1))
    assert [name for name, _ in model.named_children()] == ["stem", "relu", "block", "pool", "fc"]


def test_module_forwarding_its_attributes_is_explained_and_untouched(assert_untouched):
    plain = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    sink = AttributeSink()
    model = copy.deepcopy(plain)
    model.block = Forwarding(model.block, sink)
    model.block.inner.train()  # flags are where copies write most (training, inplace, forward)
    plain.block.train()
    x = example_input()
    with assert_untouched(model, x):
        assert torch.equal(LRP(model).attribute(x, target=1), LRP(plain).attribute(x, target=1))
        found = LayerLRP(model, "block.inner.add").attribute(x, target=1)
        assert torch.equal(found, LayerLRP(plain, "block.add").attribute(x, target=1))
        found = LayerGradCam(model, model.block).attribute(x, target=1)
        assert torch.equal(found, LayerGradCam(plain, plain.block).attribute(x, target=1))
        assert torch.equal(LayerGradCam(model, "block").attribute(x, target=1), found)
    assert vars(sink) == {"label": "sink"}, f"attributes were written through to the user's object: {vars(sink)}"


def test_model_wrapped_in_a_forwarding_module_is_explained_as_the_model_inside(assert_untouched):
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    sink = AttributeSink()
    wrapper = Forwarding(model, sink)
    x = example_input()
    with assert_untouched(wrapper, x):
        assert torch.equal(LRP(wrapper).attribute(x, target=1), LRP(model).attribute(x, target=1))
        found = LayerGradCam(wrapper, "inner.block").attribute(x, target=1)
        assert torch.equal(found, LayerGradCam(model, "block").attribute(x, target=1))
    assert vars(sink) == {"label": "sink"}


def test_graph_module_inside_the_model_keeps_its_graph(assert_untouched):
    """A submodule traced with fx: copying it must not take over its graph (``GraphModule.__copy__`` does)."""
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    model.block = torch.fx.symbolic_trace(model.block)
    x = example_input()
    with assert_untouched(model, x):
        LRP(model).attribute(x, target=1)
        LayerGradCam(model, "block").attribute(x, target=1)
    assert model.block.graph.owning_module is model.block
