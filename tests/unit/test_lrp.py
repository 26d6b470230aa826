"""captum_graph.attr.LRP and LayerLRP: oracles, drop-in behaviour, rules, errors.

Everything runs in float64. "Oracle" refers to DESIGN.md section 3: on networks
of ReLU, conv/linear, pooling, additions, concatenations and reshapes, LRP with
a negligible epsilon equals Gradient x Input (biases included), and on
bias-free copies the input relevance sums to the target output.
"""
import copy
import inspect

import captum.attr as ca
import pytest
import torch
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule
from torch import nn

import captum_graph
from captum_graph.attr import LayerLRP, LRP
from helpers.models import (
    TINY_MODELS,
    BottleneckNet,
    DenseBlockNet,
    OffsetNet,
    ResidualNet,
    SequentialNet,
    SharedConvNet,
    SigmoidNet,
    TinyNet,
    TwoInputNet,
    TwoLayerLinear,
    example_input,
)
from helpers.oracles import (
    NEGLIGIBLE_EPSILON,
    assert_conserves,
    assert_matches_input_x_gradient,
    input_x_gradient,
)

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")

BATCH = 3
TARGETS = {
    "int": 1,
    "list": [0, 3, 4],
    "tensor": torch.tensor([4, 0, 2]),
}


def _tiny(name: str, bias: bool = True) -> nn.Module:
    return TINY_MODELS[name](bias=bias).double()


def _target_outputs(model, inputs, target, additional_forward_args=()):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        out = model(*inputs, *additional_forward_args)
    index = torch.as_tensor(target).expand(out.shape[0]) if not isinstance(target, list) else torch.tensor(target)
    return out[torch.arange(out.shape[0]), index]


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# oracle 1: Gradient x Input on every tiny model, biases included
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_lrp_equals_input_x_gradient(name, target):
    model = _tiny(name)
    x = example_input(BATCH)
    relevance = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=TARGETS[target])
    expected = input_x_gradient(model, x, target=TARGETS[target])
    assert_matches_input_x_gradient(relevance, expected, name, rtol=1e-6, atol_factor=1e-10)


def test_negligible_epsilon_keeps_pass_through_and_move_rules():
    """The oracles' ``rules=`` key (a tuple of types) changes only epsilon layers (see helpers.oracles)."""
    from captum_graph.rules import MoveRule, PassThroughRule

    report = {a.qualname: a for a in LRP(_tiny("torch.cat"), rules=NEGLIGIBLE_EPSILON).rule_report(example_input())}
    assert isinstance(report["relu"].rule, PassThroughRule)
    assert isinstance(report["block.cat"].rule, MoveRule)
    for qualname in ("stem", "block.a", "pool", "fc"):
        assert type(report[qualname].rule) is EpsilonRule and report[qualname].rule.STABILITY_FACTOR == 1e-15


@pytest.mark.parametrize("name", ["a + b", "torch.cat", "x + relu(conv(x))", "shared Conv2d"])
def test_default_epsilon_is_close_to_input_x_gradient(name):
    """Captum's default epsilon (1e-9) is already small in float64."""
    model = _tiny(name)
    x = example_input(BATCH)
    relevance = LRP(model).attribute(x, target=2)
    assert_matches_input_x_gradient(relevance, input_x_gradient(model, x, target=2), name, rtol=1e-4, atol_factor=1e-5)


# ---------------------------------------------------------------------------
# oracle 2: conservation on bias-free copies
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_relevance_is_conserved_without_biases(name):
    model = _tiny(name, bias=False)
    x = example_input(BATCH)
    target = TARGETS["list"]
    relevance, delta = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=target, return_convergence_delta=True)
    output = _target_outputs(model, x, target)
    assert relevance.shape == x.shape
    assert_conserves(relevance, output, name, rtol=1e-6)
    assert delta.shape == (BATCH,)
    assert bool((delta.abs() <= 1e-6 * output.abs()).all()), f"{name}: delta {delta.tolist()} vs {output.tolist()}"


def test_relevance_is_not_normalised_but_sums_to_the_output():
    """Unlike Captum's docstring, relevance is scaled by the target output (as Captum's code does)."""
    model = _tiny("a + b", bias=False)
    x = example_input(BATCH)
    relevance = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=0)
    assert_conserves(relevance, _target_outputs(model, x, 0))


# ---------------------------------------------------------------------------
# drop-in: same classes, arguments, results as vanilla Captum where it is right
# ---------------------------------------------------------------------------
def test_classes_subclass_captums_and_accept_its_arguments():
    assert issubclass(LRP, ca.LRP) and issubclass(LayerLRP, ca.LayerLRP)
    for ours, theirs in ((LRP, ca.LRP), (LayerLRP, ca.LayerLRP)):
        for method in ("__init__", "attribute"):
            mine = inspect.signature(getattr(ours, method)).parameters
            for name, parameter in inspect.signature(getattr(theirs, method)).parameters.items():
                assert name in mine, f"{ours.__name__}.{method} lacks Captum's argument {name!r}"
                assert mine[name].default == parameter.default, f"{ours.__name__}.{method}({name}=...) default differs"
    model = SequentialNet().double()
    assert LRP(model).multiplies_by_inputs and LRP(model).has_convergence_delta()


def _sequential(batch_norm: bool, inplace: bool = False) -> SequentialNet:
    """conv-(bn)-relu-pool-linear with non-trivial batch-norm statistics."""
    model = SequentialNet(batch_norm, inplace=inplace).double().eval()
    if batch_norm:
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.5, 0.5)
    return model


def _twins(batch_norm: bool, inplace: bool = False):
    """Two equal sequential models: one for vanilla Captum, one for captum_graph."""
    theirs, ours = _sequential(batch_norm, inplace), _sequential(batch_norm, inplace)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize(
    "batch_norm, inplace", [(False, False), (True, False), (True, True)],
    ids=["conv-relu-pool-linear", "with-bn", "with-bn-inplace-relu"],
)
@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_same_as_captum_on_sequential_model(batch_norm, inplace, target):
    theirs, ours = _twins(batch_norm, inplace)
    x = example_input(BATCH)
    expected, expected_delta = ca.LRP(theirs).attribute(x, target=TARGETS[target], return_convergence_delta=True)
    got, delta = LRP(ours).attribute(x, target=TARGETS[target], return_convergence_delta=True)
    _close(got, expected)
    _close(delta, expected_delta)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["conv-relu", "bn-relu"])
def test_ratio_after_relu_keeps_the_epsilon_rule(batch_norm):
    """The engine divides by the ReLU's output instead of the layer's before it: same relevance.

    A large epsilon makes the stabiliser count, so dividing by the wrong
    tensor would show; LayerLRP at the layer before the ReLU (which keeps the
    plain order) must agree with Captum too.
    """
    from captum_graph import prepare
    from captum_graph.fusion import fused_ratios

    theirs, ours = _twins(batch_norm)
    layer = "bn" if batch_norm else "conv"
    rules = {name: EpsilonRule(0.5) for name in ("conv", "bn", "pool", "fc") if getattr(theirs, name) is not None}
    for name, rule in rules.items():
        getattr(theirs, name).rule = rule
    x = 3 * example_input(BATCH)
    lrp = LRP(ours, rules={name: EpsilonRule(0.5) for name in rules})
    gm = prepare(ours, (x,)).graph_module
    assigned = {a.qualname: a.rule for a in lrp.rule_report(x) if a.rule is not None}
    assert fused_ratios(gm, assigned, set()).before_relu == {layer}
    assert fused_ratios(gm, assigned, {layer}).before_relu == set()

    # Captum gets a fresh model per call: the state its rules keep leaks into the next call
    theirs_again = copy.deepcopy(theirs)
    _close(lrp.attribute(x, target=TARGETS["list"]), ca.LRP(theirs).attribute(x, target=TARGETS["list"]))
    ours_at_layer = LayerLRP(ours, layer, rules={name: EpsilonRule(0.5) for name in rules})
    theirs_at_layer = ca.LayerLRP(theirs_again, getattr(theirs_again, layer))
    _close(ours_at_layer.attribute(x, target=1), theirs_at_layer.attribute(x.clone(), target=1))


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)


def _fused_plan(lrp: LRP, model: nn.Module, x: torch.Tensor):
    from captum_graph.fusion import fused_ratios

    gm = captum_graph.prepare(model, (x,)).graph_module
    by_name = {a.qualname: a.rule for a in lrp.rule_report(x) if a.rule is not None}
    rules = {n.target: by_name[n.meta.get("qualname", n.name)] for n in gm.graph.find_nodes(op="call_module")
             if n.meta.get("qualname", n.name) in by_name}
    return fused_ratios(gm, rules, set())


def _all_epsilon(eps: float) -> dict:
    return {kind: EpsilonRule(eps) for kind in (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.Linear, captum_graph.modules.Addition)}


def test_fused_ratios_on_a_residual_block_match_captum():
    """Every fused step of the engine on a ResNet block, against Captum's per-layer hooks.

    Batch norms with non-trivial statistics; a large epsilon so that a ratio
    taken at the wrong tensor would show. Captum is right here because its
    twin sums the residual with ``Addition_Module``.
    """
    torch.manual_seed(3)
    ours, theirs = BottleneckNet().double().eval(), BottleneckNet(captum_addition=True).double().eval()
    _randomise_norms(ours)
    theirs.load_state_dict(ours.state_dict())
    for name in ("conv1", "bn1", "conv2", "bn2", "add", "conv3", "bn3", "pool", "fc"):
        getattr(theirs, name).rule = EpsilonRule(0.5)
    lrp = LRP(ours, rules=_all_epsilon(0.5))
    x = 3 * example_input(BATCH)
    fused = _fused_plan(lrp, ours, x)
    assert fused.before_relu == {"bn1", "add"} and set(fused.relus) == {"relu1", "relu2"}
    assert set(fused.batch_norms) == {"bn2", "bn3"} and len(fused.in_place_additions) == 1
    assert {"conv1", "conv2", "conv3"} <= set(fused.at_output), "a convolution's ratio is not fused with its batch norm"

    expected = ca.LRP(theirs).attribute(x, target=TARGETS["list"])
    _close(lrp.attribute(x, target=TARGETS["list"]), expected)
    _close(lrp.attribute(x, target=TARGETS["list"]), expected)  # the fused forwards were put back


@pytest.mark.parametrize("input_in_concatenation", [False, True], ids=["features-only", "input-concatenated"])
def test_fused_ratios_through_concatenations(input_in_concatenation, monkeypatch):
    """Ratios fused across DenseNet's concatenations; a concatenation with an unfused part keeps the plain order.

    Checked against the engine with fusion switched off and, where the input
    is not concatenated, against Captum (whose tensor hook on the input would
    multiply the relevance arriving through the concatenation a second time).
    """
    from captum_graph import engine
    from captum_graph.fusion import FusedRatios

    torch.manual_seed(4)
    ours = DenseBlockNet(input_in_concatenation).double().eval()
    _randomise_norms(ours)
    lrp = LRP(ours, rules=_all_epsilon(0.5))
    x = example_input(BATCH)
    fused = _fused_plan(lrp, ours, x)
    if input_in_concatenation:  # every feature reaches a concatenation holding the input
        assert not {"conv1", "conv2", "norm0"} & (set(fused.at_output) | fused.before_relu)
        assert not {"norm1", "norm2", "norm3"} & set(fused.ratio_args)
    else:
        assert {"conv1", "conv2"} <= set(fused.at_output) and "norm0" in fused.before_relu
        assert all(fused.ratio_args[norm] == {0} for norm in ("norm1", "norm2", "norm3"))

    x = 3 * example_input(BATCH)
    found = lrp.attribute(x, target=TARGETS["list"])
    with monkeypatch.context() as patch:
        patch.setattr(engine, "fused_ratios", lambda *args: FusedRatios())
        _close(found, lrp.attribute(x, target=TARGETS["list"]))
    if not input_in_concatenation:
        theirs = copy.deepcopy(ours)
        for module in theirs.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.Linear)):
                module.rule = EpsilonRule(0.5)
        _close(found, ca.LRP(theirs).attribute(x, target=TARGETS["list"]))


def test_layer_subclass_output_is_never_overwritten():
    """A Conv2d subclass whose forward keeps its output for the backward (``exp``) gets no in-place ReLU."""

    @captum_graph.register_leaf_module
    class ExpConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).exp()

    model = nn.Sequential(ExpConv(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1), nn.Flatten(),
                          nn.Linear(2 * 8 * 8, 5)).double()
    x = example_input(BATCH)
    lrp = LRP(model, rules={ExpConv: EpsilonRule()})
    first = lrp.attribute(x, target=1)
    assert torch.isfinite(first).all() and torch.equal(first, lrp.attribute(x, target=1))


RULES_ON_USER_MODULES = {  # case: (module attribute, rule factory, tolerance)
    "conv=Gamma": ("conv", lambda: GammaRule(), 1e-10),
    "conv=Gamma(1, no bias)": ("conv", lambda: GammaRule(gamma=1.0, set_bias_to_zero=True), 1e-10),
    "conv=Alpha1_Beta0": ("conv", lambda: Alpha1_Beta0_Rule(), 1e-10),
    # Captum itself strays ~2e-9 (relative) from the epsilon formula with a large
    # epsilon on this conv; captum_graph matches the formula (test_hand_computed_relevance).
    "conv=Epsilon(0.1)": ("conv", lambda: EpsilonRule(0.1), 1e-8),
    "fc=Gamma(0.5)": ("fc", lambda: GammaRule(0.5), 1e-10),
    "fc=Alpha1_Beta0": ("fc", lambda: Alpha1_Beta0_Rule(), 1e-10),
    "bn=Identity": ("bn", lambda: IdentityRule(), 1e-10),
}


@pytest.mark.parametrize("case", list(RULES_ON_USER_MODULES))
def test_rule_set_on_users_module_as_in_captum(case, assert_untouched):
    """``model.conv.rule = GammaRule()`` (Captum's way) gives Captum's result and stays on the module."""
    attribute, make_rule, tolerance = RULES_ON_USER_MODULES[case]
    theirs, ours = _twins(True)
    getattr(theirs, attribute).rule = make_rule()
    rule = make_rule()
    getattr(ours, attribute).rule = rule
    x = example_input(BATCH)
    expected = ca.LRP(theirs).attribute(x, target=TARGETS["list"])
    with assert_untouched(ours, x):  # also: no attribute besides `rule` added, `rule` the same object
        got = LRP(ours).attribute(x, target=TARGETS["list"])
    _close(got, expected, tolerance)
    assert getattr(ours, attribute).rule is rule
    assert not hasattr(ours.conv if attribute != "conv" else ours.fc, "rule")
    assert set(vars(rule)) == set(vars(make_rule())), "the user's rule object was given state"


def test_rule_set_after_construction_is_honoured():
    """Captum reads ``module.rule`` when ``attribute`` runs, so setting it later works there."""
    theirs, ours = _twins(False)
    x = example_input(BATCH)
    lrp = LRP(ours)
    default = lrp.attribute(x, target=1)
    ours.conv.rule = GammaRule()
    theirs.conv.rule = GammaRule()
    expected = ca.LRP(theirs).attribute(x, target=1)
    assert not torch.allclose(default, expected), "test is vacuous: Gamma gives the default result"
    _close(lrp.attribute(x, target=1), expected)
    _close(LRP(ours).attribute(x, target=1), expected)
    del ours.conv.rule
    _close(LRP(ours).attribute(x, target=1), default)


def test_rules_by_type_and_name_agree_with_captum_module_rules():
    theirs, ours = _twins(True)
    theirs.conv.rule = GammaRule()
    theirs.fc.rule = Alpha1_Beta0_Rule()
    x = example_input(BATCH)
    expected = ca.LRP(theirs).attribute(x, target=3)
    _close(LRP(ours, rules={nn.Conv2d: GammaRule(), "fc": Alpha1_Beta0_Rule()}).attribute(x, target=3), expected)
    by_tuple = {(nn.Conv2d, nn.Conv1d): GammaRule(), nn.Linear: Alpha1_Beta0_Rule()}
    _close(LRP(ours, rules=by_tuple).attribute(x, target=3), expected)


def test_layer_lrp_same_as_captum_on_sequential_model():
    theirs, ours = _twins(True)
    x = example_input(BATCH)
    for attribute in ("conv", "bn", "pool", "fc"):
        for to_input in (False, True):
            expected = ca.LayerLRP(theirs, getattr(theirs, attribute)).attribute(
                x, target=TARGETS["list"], attribute_to_layer_input=to_input
            )
            got = LayerLRP(ours, getattr(ours, attribute)).attribute(
                x, target=TARGETS["list"], attribute_to_layer_input=to_input
            )
            _close(got, expected)
            by_name = LayerLRP(ours, attribute).attribute(
                x, target=TARGETS["list"], attribute_to_layer_input=to_input
            )
            _close(by_name, expected)


# ---------------------------------------------------------------------------
# hand-computed relevances (Bach et al. 2015; Montavon et al. 2019, eq. 1-4)
# ---------------------------------------------------------------------------
# fc1: W1 = [[1, -1, 1], [0, 1, -1]], b1 = [1, 0];  fc2: W2 = [[2, 1], [1, 1]], b2 = [1, 0]
# x = [1, 2, 3]:  z1 = [1 - 2 + 3 + 1, 2 - 3] = [3, -1],  a1 = relu(z1) = [3, 0]
#                 z2 = [2*3 + 1*0 + 1, 3 + 0] = [7, 3];   target 0, R2 = z2[0] = 7
# R_i = sum_j x_i w_ji / (z_j + eps sign z_j) R_j (with the rule's w and z), ReLU passes relevance.
HAND_CASES = {
    # epsilon -> 0:  R_a1 = [3*2/7*7, 0] = [6, 0];  R_x = [1, -2, 3] / 3 * 6 = [2, -4, 6]
    "epsilon": ({}, [2.0, -4.0, 6.0]),
    # epsilon = 1 everywhere:  R_a1 = 6/(7+1)*7 = 21/4;  R_x = [1, -2, 3] / (3+1) * 21/4
    "epsilon=1": ({"fc1": EpsilonRule(1.0), "fc2": EpsilonRule(1.0)}, [21 / 16, -42 / 16, 63 / 16]),
    # gamma=1 on fc1: W1' = W1 + W1^+ -> row 0 [2, -1, 2], z1'_0 = 2 - 2 + 6 + 1 = 7;  R_x = [2, -2, 6] / 7 * 6
    "gamma fc1": ({"fc1": GammaRule(gamma=1.0)}, [12 / 7, -12 / 7, 36 / 7]),
    # gamma=1 on fc2: W2' = 2 W2, z2'_0 = 12 + 1 = 13, R_a1 = [3*4/13*7, 0] = [84/13, 0];  R_x = [1, -2, 3] / 3 * 84/13
    "gamma fc2": ({"fc2": GammaRule(gamma=1.0)}, [28 / 13, -56 / 13, 84 / 13]),
    # alpha1-beta0 on fc1: W1^+ row 0 [1, 0, 1], z1'_0 = 1 + 3 + 1 = 5;  R_x = [1, 0, 3] / 5 * 6
    "alpha1beta0 fc1": ({"fc1": Alpha1_Beta0_Rule()}, [6 / 5, 0.0, 18 / 5]),
    # gamma=1 with the bias set to zero on fc1: z1'_0 = 6;  R_x = [2, -2, 6] / 6 * 6
    "gamma fc1 no bias": ({"fc1": GammaRule(gamma=1.0, set_bias_to_zero=True)}, [2.0, -2.0, 6.0]),
}


def _hand_model() -> TwoLayerLinear:
    w1, b1 = [[1.0, -1.0, 1.0], [0.0, 1.0, -1.0]], [1.0, 0.0]
    w2, b2 = [[2.0, 1.0], [1.0, 1.0]], [1.0, 0.0]
    return TwoLayerLinear(w1, b1, w2, b2).double()


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_hand_computed_relevance(case):
    rules, expected = HAND_CASES[case]
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    model = _hand_model()
    got = LRP(model, rules=rules).attribute(x, target=0)
    torch.testing.assert_close(got.detach(), torch.tensor([expected], dtype=torch.float64), rtol=1e-7, atol=1e-8)
    # and the same rules set Captum's way, through vanilla Captum
    theirs = _hand_model()
    for name, rule in rules.items():
        getattr(theirs, name).rule = copy.deepcopy(rule)
    _close(got, ca.LRP(theirs).attribute(x, target=0))


def test_hand_computed_batch_and_delta():
    model = _hand_model()
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], dtype=torch.float64)
    got, delta = LRP(model).attribute(x, target=[0, 0], return_convergence_delta=True)
    # doubling x doubles z1 - b1: z1 = [5, -2], a1 = [5, 0], z2 = [11, ...]; R_a1 = [10, 0]; R_x = [2, -4, 6] / 5 * 10
    expected = torch.tensor([[2.0, -4.0, 6.0], [4.0, -8.0, 12.0]], dtype=torch.float64)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-7, atol=1e-8)
    # delta = output - sum(relevance): biases kept 7 - 4 = 3 and 11 - 8 = 3
    torch.testing.assert_close(delta.detach(), torch.tensor([3.0, 3.0], dtype=torch.float64), rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------------------
# several inputs, additional forward arguments
# ---------------------------------------------------------------------------
def test_tuple_inputs():
    model = TwoInputNet().double()
    inputs = (torch.randn(BATCH, 3, dtype=torch.float64), torch.randn(BATCH, 2, dtype=torch.float64))
    got = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(inputs, target=TARGETS["list"])
    assert isinstance(got, tuple) and len(got) == 2
    assert [g.shape for g in got] == [i.shape for i in inputs]
    expected = input_x_gradient(model, inputs, target=TARGETS["list"])
    assert_matches_input_x_gradient(got, expected, "TwoInputNet", rtol=1e-6)
    bias_free = TwoInputNet(bias=False).double()
    got, delta = LRP(bias_free, rules=NEGLIGIBLE_EPSILON).attribute(inputs, target=1, return_convergence_delta=True)
    assert_conserves(got, _target_outputs(bias_free, inputs, 1))
    assert delta.shape == (BATCH,)


def test_single_tensor_in_a_tuple_gives_a_tuple():
    model = _tiny("a + b")
    x = example_input(BATCH)
    got = LRP(model).attribute((x,), target=1)
    assert isinstance(got, tuple) and len(got) == 1 and got[0].shape == x.shape


@pytest.mark.parametrize("scale", ["float", "tensor"])
def test_additional_forward_args(scale):
    """Additional arguments are not attributed; a product with one is a scaling by a constant."""
    model = OffsetNet().double()
    x = torch.randn(BATCH, 3, dtype=torch.float64)
    factor = 2.0 if scale == "float" else torch.full((BATCH, 1), 2.0, dtype=torch.float64)
    args = (factor, torch.randn(BATCH, 4, dtype=torch.float64))
    got = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=TARGETS["list"], additional_forward_args=args)
    expected = input_x_gradient(model, x, target=TARGETS["list"], additional_forward_args=args)
    assert_matches_input_x_gradient(got, expected, f"OffsetNet(scale={scale})", rtol=1e-6)
    bias_free = OffsetNet(bias=False).double()
    args = (factor, torch.zeros(BATCH, 4, dtype=torch.float64))
    got = LRP(bias_free, rules=NEGLIGIBLE_EPSILON).attribute(x, target=2, additional_forward_args=args)
    assert_conserves(got, _target_outputs(bias_free, x, 2, args), f"OffsetNet(scale={scale})")


# ---------------------------------------------------------------------------
# where vanilla Captum fails by design, captum_graph works
# ---------------------------------------------------------------------------
def test_module_without_captum_rule():
    model = SigmoidNet().double()
    x = torch.randn(BATCH, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="no rule"):
        ca.LRP(copy.deepcopy(model)).attribute(x, target=0)
    got = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=0)
    assert_conserves(got, _target_outputs(model, x, 0), "SigmoidNet")


def test_module_used_twice():
    model = SharedConvNet().double()
    x = example_input(BATCH)
    with pytest.raises(RuntimeError, match="more than once"):
        ca.LRP(copy.deepcopy(model)).attribute(x, target=0)
    got = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=0)
    assert_matches_input_x_gradient(got, input_x_gradient(model, x, target=0), "SharedConvNet", rtol=1e-6)


def test_functional_residual():
    """Vanilla Captum sends the full relevance down both paths of ``x + f(x)``: it is created."""
    model = ResidualNet(bias=False).double()
    x = example_input(BATCH)
    output = _target_outputs(model, x, 0)
    vanilla = ca.LRP(copy.deepcopy(model)).attribute(x, target=0)
    ratio = vanilla.detach().flatten(1).sum(1) / output
    assert bool(((ratio - 1).abs() > 0.1).all()), f"vanilla Captum conserved relevance after all: {ratio.tolist()}"
    got = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=0)
    assert_conserves(got, output, "ResidualNet")


def test_functional_residual_with_biases_matches_input_x_gradient():
    model = ResidualNet().double()
    x = example_input(BATCH)
    got = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=0)
    assert_matches_input_x_gradient(got, input_x_gradient(model, x, target=0), "ResidualNet", rtol=1e-6)


# ---------------------------------------------------------------------------
# LayerLRP: modules, names, functional nodes, inputs of an addition, lists
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["module", "qualified name", "node qualname", "fx name"])
def test_layer_lrp_layer_spellings(layer):
    model = _tiny("x + relu(conv(x))", bias=False)
    spec = {
        "module": model.block.conv,
        "qualified name": "block.conv",
        "node qualname": "block.add",
        "fx name": "add",
    }[layer]
    x = example_input(BATCH)
    got = LayerLRP(model, spec, rules=NEGLIGIBLE_EPSILON).attribute(x, target=TARGETS["list"])
    assert torch.is_tensor(got) and got.shape == (BATCH, 4, 8, 8)
    # every path from the input to the output passes through block.add: all relevance is there
    if layer in ("node qualname", "fx name"):
        assert_conserves(got, _target_outputs(model, x, TARGETS["list"]), f"LayerLRP({spec!r})")


def test_layer_lrp_addition_inputs_are_skip_and_branch():
    model = _tiny("x + relu(conv(x))", bias=False)
    x = example_input(BATCH)
    at_output = LayerLRP(model, "block.add", rules=NEGLIGIBLE_EPSILON).attribute(x, target=1)
    skip, branch = LayerLRP(model, "block.add", rules=NEGLIGIBLE_EPSILON).attribute(
        x, target=1, attribute_to_layer_input=True
    )
    assert skip.shape == branch.shape == at_output.shape
    _close(skip + branch, at_output, 1e-9)  # conservation at the node, element by element
    at_branch = LayerLRP(model, "block.relu", rules=NEGLIGIBLE_EPSILON).attribute(x, target=1)
    _close(branch, at_branch, 1e-9)
    assert skip.abs().sum() > 0 and branch.abs().sum() > 0


def test_layer_lrp_resnet18_functional_addition():
    from torchvision.models import resnet18

    model = resnet18(weights=None).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = LayerLRP(model, ["layer1.0.add", "layer1.0.bn2", "layer1.0"], rules=NEGLIGIBLE_EPSILON)
    (branch_and_skip, at_bn2_input, at_block_input) = lrp.attribute(x, target=7, attribute_to_layer_input=True)
    at_add, at_bn2, at_block = lrp.attribute(x, target=7)
    assert isinstance(branch_and_skip, tuple) and len(branch_and_skip) == 2
    branch, skip = branch_and_skip  # torchvision: out += identity
    _close(branch + skip, at_add, 1e-8)
    _close(branch, at_bn2, 1e-8)  # bn2's output only feeds the addition
    assert at_block.shape == at_add.shape  # 'layer1.0' is the container's last node (its relu)


def test_layer_lrp_list_and_delta():
    model = _tiny("a + b", bias=False)
    x = example_input(BATCH)
    layers = [model.stem, "block.add", "block.a"]
    lrp = LayerLRP(model, layers, rules=NEGLIGIBLE_EPSILON)
    relevances, deltas = lrp.attribute(x, target=2, return_convergence_delta=True)
    assert isinstance(relevances, list) and isinstance(deltas, list) and len(relevances) == len(deltas) == 3
    output = _target_outputs(model, x, 2)
    for name, relevance, delta in zip(("stem", "block.add"), relevances, deltas):
        assert delta.shape == (BATCH,)
        assert bool((delta.abs() <= 1e-6 * output.abs()).all()), f"{name}: {delta.tolist()}"
    single, delta = LayerLRP(model, "block.add", rules=NEGLIGIBLE_EPSILON).attribute(
        x, target=2, return_convergence_delta=True
    )
    assert torch.is_tensor(single) and delta.shape == (BATCH,)
    _close(single, relevances[1])


def test_layer_lrp_ambiguous_module_lists_call_sites():
    model = SharedConvNet().double()
    with pytest.raises(captum_graph.LayerResolutionError, match=r"conv.*2 places") as info:
        LayerLRP(model, model.conv).attribute(example_input(BATCH), target=0)  # resolved on the captured graph
    assert isinstance(info.value, ValueError)
    assert "'conv'" in str(info.value) and "conv_1" in str(info.value)


# ---------------------------------------------------------------------------
# rules= and presets
# ---------------------------------------------------------------------------
def test_rules_by_name_cover_a_subtree_only():
    model = _tiny("a + b")
    x = example_input(BATCH)
    lrp = LRP(model, rules={"block": GammaRule()})
    report = {a.qualname: a for a in lrp.rule_report(x)}
    for qualname in ("block.a", "block.b"):
        assert isinstance(report[qualname].rule, GammaRule), report[qualname]
        assert "block" in report[qualname].source
    for qualname in ("stem", "fc"):
        assert type(report[qualname].rule) is EpsilonRule
    default = LRP(model).attribute(x, target=1)
    assert not torch.allclose(lrp.attribute(x, target=1), default)
    # a name key matches whole path components only: 'bloc' names nothing, and says so
    with pytest.raises(ValueError, match="bloc"):  # checked against the graph captured at the call
        LRP(model, rules={"bloc": GammaRule()}).attribute(x, target=1)


def test_rules_by_type_and_precedence():
    model = SequentialNet().double()
    model.fc.rule = EpsilonRule(0.5)
    rules = {"conv": GammaRule(), nn.Conv2d: Alpha1_Beta0_Rule(), nn.Linear: GammaRule()}
    x = example_input(BATCH)
    report = {a.qualname: a for a in LRP(model, rules=rules).rule_report(x)}
    assert isinstance(report["conv"].rule, GammaRule)  # a name beats a type
    # module.rule beats both
    assert type(report["fc"].rule) is EpsilonRule and report["fc"].rule.STABILITY_FACTOR == 0.5
    report = {a.qualname: a for a in LRP(model, rules={nn.Conv2d: Alpha1_Beta0_Rule()}).rule_report(x)}
    assert isinstance(report["conv"].rule, Alpha1_Beta0_Rule)


@pytest.mark.parametrize("preset", ["epsilon-plus-flat", "epsilon-gamma-box"])
def test_presets_run_and_differ_from_default(preset):
    model = _tiny("F.max_pool2d/avg_pool2d + x.mean((2,3))")
    x = example_input(BATCH)
    got = LRP(model, preset=preset).attribute(x, target=1)
    assert got.shape == x.shape and bool(torch.isfinite(got).all())
    assert not torch.allclose(got, LRP(model).attribute(x, target=1))
    got = LayerLRP(model, "block.b", preset=preset).attribute(x, target=1)
    assert bool(torch.isfinite(got).all())


def test_epsilon_preset_is_the_default():
    model = _tiny("a + b")
    x = example_input(BATCH)
    _close(LRP(model, preset="epsilon").attribute(x, target=1), LRP(model).attribute(x, target=1), 0)


def test_unknown_preset():
    with pytest.raises(ValueError, match="epsilon-plus-flat"):
        LRP(_tiny("a + b"), preset="zennit")


@pytest.mark.parametrize(
    "rules",
    [{3: GammaRule()}, {nn.Conv2d(1, 1, 1): GammaRule()}, {"fc": "gamma"}, {nn.Linear: GammaRule}],
    ids=["int key", "module key", "string rule", "rule class"],
)
def test_bad_rules(rules):
    with pytest.raises(TypeError):
        LRP(_tiny("a + b"), rules=rules)


# ---------------------------------------------------------------------------
# unknown operations
# ---------------------------------------------------------------------------
class ErfBlock(nn.Module):
    def forward(self, x):
        return torch.erf(x)  # the unsupported line


def _line_of(function, marker: str) -> int:
    lines, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(lines) if marker in line)


def test_unknown_operation_raises_with_node_line_and_advice():
    model = TinyNet(ErfBlock()).double().eval()
    x = example_input(BATCH)
    lrp = LRP(model)  # constructing does not raise: the report is available
    with pytest.raises(captum_graph.UnsupportedOperationError) as info:
        lrp.attribute(x, target=0)
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "block.erf" in message
    assert f"test_lrp.py:{_line_of(ErfBlock.forward, 'unsupported line')}" in message
    assert "register_rule" in message
    with pytest.raises(TypeError, match="block.erf"):
        LayerLRP(model, "stem").attribute(x, target=0)


def test_rule_report_marks_unknown_operation():
    model = TinyNet(ErfBlock()).double().eval()
    report = LRP(model).rule_report(example_input(BATCH))
    problems = [a for a in report if a.problem]
    assert [a.qualname for a in problems] == ["block.erf"]
    assert "register_rule" in problems[0].problem
    assert all(a.rule is not None for a in report if not a.problem)


def test_registered_rule_makes_unknown_leaf_module_work():
    """The advice works: a leaf module without rule gets one through ``rules=`` by type."""

    class Odd(nn.Module):
        def forward(self, x):
            return x * 1.0  # linear, but a leaf module fx does not trace into

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2, bias=False)
            self.odd = Odd()

        def forward(self, x):
            return self.odd(self.fc(x))

    captum_graph.register_leaf_module(Odd)
    model = Net().double()
    x = torch.randn(BATCH, 3, dtype=torch.float64)
    with pytest.raises(captum_graph.UnsupportedOperationError, match="Odd"):
        LRP(model).attribute(x, target=0)
    got = LRP(model, rules={Odd: EpsilonRule(1e-15)}).attribute(x, target=0)
    assert_conserves(got, _target_outputs(model, x, 0), "Net")
