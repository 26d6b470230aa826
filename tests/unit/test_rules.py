"""Rules: each rule against the slow reference, precedence, copies, registry, presets."""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS_DIR not in sys.path:  # harmless when tests/conftest.py already put it there
    sys.path.insert(0, _TESTS_DIR)

import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule, PropagationRule
from torch import nn

import captum_graph
from captum_graph import rules as rules_module
from captum_graph import passes as passes_module
from captum_graph.attr import LRP
from captum_graph.errors import UnsupportedOperationError
from captum_graph import modules as M
from captum_graph.rules import (
    POSITIONWISE,
    PRESETS,
    AlphaBetaRule,
    FlatRule,
    GeneralizedGammaRule,
    PassThroughRule,
    Preset,
    WSquareRule,
    ZBoxRule,
    ZPlusRule,
    epsilon_gamma_box,
    layer_kind,
)
from helpers import reference_lrp as ref

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")

DTYPE = torch.float64


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8) -> None:
    """Elementwise rtol, with an absolute floor relative to the largest value (exact zeros)."""
    atol = 1e-12 * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _one_hot_relevance(out: torch.Tensor, target: int) -> torch.Tensor:
    relevance = torch.zeros_like(out)
    relevance[:, target] = out[:, target]
    return relevance


def _report(lrp) -> dict:
    return {entry.qualname: entry for entry in lrp.rule_report()}


def _state(rule: PropagationRule) -> dict:
    """The rule's instance attributes, by identity (a mutation or a new attribute shows)."""
    return {key: (id(value), repr(value)) for key, value in vars(rule).items()}


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5, bias=bias)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self, kernel_size: int, stride: int, padding: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, kernel_size, stride=stride, padding=padding, bias=bias)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        side = (6 + 2 * padding - kernel_size) // stride + 1
        self.fc = nn.Linear(3 * side * side, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.relu(self.conv1(x))))


def _seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().to(DTYPE).eval()


def _inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


# Each case: (captum_graph rule factory, reference function taking (layer, x, relevance, bounds)).
# ``bounds`` are the ZBox bounds for the test's input shape.
RULE_CASES = {
    "epsilon": (lambda b: EpsilonRule(), lambda layer, x, r, b: ref.epsilon(layer, x, r, eps=1e-9)),
    "epsilon-large": (lambda b: EpsilonRule(0.25), lambda layer, x, r, b: ref.epsilon(layer, x, r, eps=0.25)),
    "gamma": (lambda b: GammaRule(), lambda layer, x, r, b: ref.gamma(layer, x, r, gamma=0.25)),
    "gamma-no-bias": (
        lambda b: GammaRule(gamma=0.7, set_bias_to_zero=True),
        lambda layer, x, r, b: ref.gamma(layer, x, r, gamma=0.7, set_bias_to_zero=True),
    ),
    "alpha1-beta0": (lambda b: Alpha1_Beta0_Rule(), lambda layer, x, r, b: ref.alpha1_beta0(layer, x, r)),
    "alpha1-beta0-no-bias": (
        lambda b: Alpha1_Beta0_Rule(set_bias_to_zero=True),
        lambda layer, x, r, b: ref.alpha1_beta0(layer, x, r, set_bias_to_zero=True),
    ),
    "zplus": (lambda b: ZPlusRule(), lambda layer, x, r, b: ref.zplus(layer, x, r, eps=1e-6)),
    # 0.25 is exact in float32 too: these cases test the rule, not the stabiliser's dtype (see below)
    "zplus-large-eps": (lambda b: ZPlusRule(epsilon=0.25), lambda layer, x, r, b: ref.zplus(layer, x, r, eps=0.25)),
    "alpha2-beta1": (lambda b: AlphaBetaRule(), lambda layer, x, r, b: ref.alpha_beta(layer, x, r, 2.0, 1.0)),
    "alpha3-beta2-large-eps": (
        lambda b: AlphaBetaRule(3.0, 2.0, epsilon=0.25),
        lambda layer, x, r, b: ref.alpha_beta(layer, x, r, 3.0, 2.0, eps=0.25),
    ),
    "signed-gamma": (lambda b: GeneralizedGammaRule(), lambda layer, x, r, b: ref.signed_gamma(layer, x, r, 0.25)),
    "signed-gamma-large": (
        lambda b: GeneralizedGammaRule(gamma=2.0), lambda layer, x, r, b: ref.signed_gamma(layer, x, r, 2.0)
    ),
    "flat": (lambda b: FlatRule(), lambda layer, x, r, b: ref.flat(layer, x, r, eps=1e-6)),
    "wsquare": (lambda b: WSquareRule(), lambda layer, x, r, b: ref.wsquare(layer, x, r, eps=1e-6)),
    "zbox": (lambda b: ZBoxRule(-3.0, 3.0), lambda layer, x, r, b: ref.zbox(layer, x, r, -3.0, 3.0, eps=1e-6)),
    "zbox-tensor-bounds": (
        lambda b: ZBoxRule(b[0], b[1]),
        lambda layer, x, r, b: ref.zbox(layer, x, r, b[0], b[1], eps=1e-6),
    ),
}


# ---------------------------------------------------------------------------
# the reference itself (so that agreeing with it means something)
# ---------------------------------------------------------------------------
def test_reference_epsilon_on_conv_is_gradient_times_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DTYPE)
    x = _inputs(2, 2, 5, 5)
    relevance = _inputs(2, 3, 3, 3, seed=2)
    x_grad = x.clone().requires_grad_()
    z = conv(x_grad)
    (grad,) = torch.autograd.grad(z, x_grad, relevance / ref.stabilize(z.detach(), 1e-9))
    _assert_close(ref.epsilon(conv, x, relevance), x * grad)


@pytest.mark.parametrize("rule", ["zplus", "flat", "zbox"])
def test_reference_bias_free_rules_conserve_relevance_on_padded_conv(rule):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).to(DTYPE)
    x = _inputs(2, 2, 4, 4)
    relevance = _inputs(2, 3, 4, 4, seed=2)
    kwargs = {"low": -3.0, "high": 3.0} if rule == "zbox" else {}
    out = ref.RULES[rule](conv, x, relevance, eps=1e-12, **kwargs)
    torch.testing.assert_close(out.sum((1, 2, 3)), relevance.sum((1, 2, 3)), rtol=1e-9, atol=1e-9)


def test_reference_flat_counts_only_real_inputs():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).to(DTYPE)
    relevance = torch.zeros(1, 1, 3, 3, dtype=DTYPE)
    relevance[0, 0, 0, 0] = 1.0  # a corner output sees 4 real inputs and 5 padded ones
    out = ref.flat(conv, torch.zeros(1, 1, 3, 3, dtype=DTYPE), relevance, eps=0.0)
    expected = torch.zeros(1, 1, 3, 3, dtype=DTYPE)
    expected[0, 0, :2, :2] = 0.25
    _assert_close(out, expected)


# ---------------------------------------------------------------------------
# each rule against the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_on_linear_matches_reference(case, bias):
    rule_factory, reference = RULE_CASES[case]
    model = _seeded(lambda: MLP(bias=bias))
    x = _inputs(4, 6)
    bounds = (x.min(0).values - 0.5, x.max(0).values + 0.5)
    target = 1
    lrp = LRP(model, rules={"fc1": rule_factory(bounds), "fc2": EpsilonRule(1e-9)})
    assert type(_report(lrp)["fc1"].rule) is type(rule_factory(bounds))

    actual = lrp.attribute(x, target=target)

    with torch.no_grad():
        hidden = model.relu(model.fc1(x))
        out = model.fc2(hidden)
    hidden_relevance = ref.epsilon(model.fc2, hidden, _one_hot_relevance(out, target), eps=1e-9)
    expected = reference(model.fc1, x, hidden_relevance, bounds)  # the ReLU passes relevance unchanged
    _assert_close(actual, expected)


CONV_GEOMETRIES = {
    "k3-pad1": dict(kernel_size=3, stride=1, padding=1, bias=True),
    "k3-pad1-stride2-no-bias": dict(kernel_size=3, stride=2, padding=1, bias=False),
    "k2-stride2": dict(kernel_size=2, stride=2, padding=0, bias=True),
}


@pytest.mark.parametrize("geometry", sorted(CONV_GEOMETRIES))
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_on_conv2d_matches_unfold_reference(case, geometry):
    rule_factory, reference = RULE_CASES[case]
    model = _seeded(lambda: ConvNet(**CONV_GEOMETRIES[geometry]))
    x = _inputs(2, 2, 6, 6)
    bounds = (x.amin((0, 2, 3))[:, None, None] - 0.5, x.amax((0, 2, 3))[:, None, None] + 0.5)
    target = 2
    lrp = LRP(model, rules={"conv1": rule_factory(bounds), "fc": EpsilonRule(1e-9)})

    actual = lrp.attribute(x, target=target)

    with torch.no_grad():
        z = model.conv1(x)
        hidden = model.flatten(model.relu(z))
        out = model.fc(hidden)
    hidden_relevance = ref.epsilon(model.fc, hidden, _one_hot_relevance(out, target), eps=1e-9)
    expected = reference(model.conv1, x, hidden_relevance.reshape(z.shape), bounds)
    _assert_close(actual, expected)


@pytest.mark.parametrize(
    "rule, reference",
    [
        (lambda: EpsilonRule(0.1), lambda layer, x, r: ref.epsilon(layer, x, r, eps=0.1)),
        (lambda: ZPlusRule(epsilon=0.1), lambda layer, x, r: ref.zplus(layer, x, r, eps=0.1)),
    ],
    ids=["epsilon", "zplus"],
)
def test_stabiliser_uses_the_exact_float64_epsilon(rule, reference):
    """``z + eps * sign(z)`` must not round ``eps`` to float32 (0.1 is not a float32 number)."""
    model = _seeded(MLP)
    x = _inputs(4, 6)
    actual = LRP(model, rules={"fc1": rule(), "fc2": EpsilonRule(1e-9)}).attribute(x, target=0)
    with torch.no_grad():
        hidden = model.relu(model.fc1(x))
        out = model.fc2(hidden)
    expected = reference(model.fc1, x, ref.epsilon(model.fc2, hidden, _one_hot_relevance(out, 0), eps=1e-9))
    _assert_close(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("sign", ["non-negative", "mixed"])
def test_zplus_after_relu_matches_reference(sign):
    """ZPlus skips the negative half of its formula when no input is negative (after a ReLU)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DTYPE)
    x = _inputs(2, 2, 5, 5)
    x = x.clamp(min=0) if sign == "non-negative" else x
    relevance = _inputs(2, 3, 5, 5, seed=2)
    (actual,) = ZPlusRule().relevance(conv, (x,), relevance)
    _assert_close(actual, ref.zplus(conv, x, relevance, eps=1e-6))


class ReusedMLP(nn.Module):
    """``fc1`` and ``relu`` are each called at two places."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.relu(self.fc1(x)))))


@pytest.mark.parametrize("case", ["gamma", "zplus", "flat", "alpha1-beta0", "alpha2-beta1", "signed-gamma"])
def test_rule_on_reused_module_matches_reference_at_both_call_sites(case):
    """Per-call-site rule state: Captum's own LRP refuses reused modules, this must not mix them up."""
    rule_factory, reference = RULE_CASES[case]
    model = _seeded(ReusedMLP)
    x = _inputs(3, 5)
    target = 0
    lrp = LRP(model, rules={nn.Linear: rule_factory(None), "fc2": EpsilonRule(1e-9)})

    actual = lrp.attribute(x, target=target)

    with torch.no_grad():
        a1 = model.relu(model.fc1(x))
        a2 = model.relu(model.fc1(a1))
        out = model.fc2(a2)
    r2 = ref.epsilon(model.fc2, a2, _one_hot_relevance(out, target), eps=1e-9)
    r1 = reference(model.fc1, a1, r2, None)
    expected = reference(model.fc1, x, r1, None)
    _assert_close(actual, expected)


# ---------------------------------------------------------------------------
# precedence
# ---------------------------------------------------------------------------
class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.block(self.relu(self.fc1(x))))


def _assert_entry(entry, rule_type: type, source: str) -> None:
    assert type(entry.rule) is rule_type, f"{entry.qualname}: {type(entry.rule).__name__} ({entry.source})"
    if source in ("default", "module.rule"):
        assert entry.source == source, entry
    elif source.startswith("preset "):
        assert entry.source.startswith("preset") and source.split()[1] in entry.source, entry
    else:  # "rules[...]": the key shows, quoted for names
        assert entry.source.startswith("rules[") and source[len("rules[") : -1] in entry.source, entry


def test_defaults_are_captums_epsilon_and_pass_through():
    report = _report(LRP(_seeded(Nested)))
    for name in ("fc1", "block.0", "block.2", "fc2"):
        _assert_entry(report[name], EpsilonRule, "default")
        assert report[name].rule.STABILITY_FACTOR == 1e-9
    for name in ("relu", "block.1"):
        _assert_entry(report[name], PassThroughRule, "default")


def test_precedence_ladder_module_rule_then_name_then_type_then_preset_then_default():
    # Each step adds a more specific source for fc1. A fresh model per step, so
    # that this test is about precedence only (see the cache test below).
    lrp = LRP(_seeded(Nested))
    _assert_entry(_report(lrp)["fc1"], EpsilonRule, "default")

    lrp = LRP(_seeded(Nested), preset="epsilon-plus-flat")
    _assert_entry(_report(lrp)["fc1"], FlatRule, "preset epsilon-plus-flat")
    _assert_entry(_report(lrp)["fc2"], EpsilonRule, "preset epsilon-plus-flat")

    rules = {nn.Linear: GammaRule()}
    lrp = LRP(_seeded(Nested), rules=rules, preset="epsilon-plus-flat")
    _assert_entry(_report(lrp)["fc1"], GammaRule, "rules[Linear]")
    _assert_entry(_report(lrp)["fc2"], GammaRule, "rules[Linear]")

    rules = {nn.Linear: GammaRule(), "fc1": Alpha1_Beta0_Rule()}
    lrp = LRP(_seeded(Nested), rules=rules, preset="epsilon-plus-flat")
    _assert_entry(_report(lrp)["fc1"], Alpha1_Beta0_Rule, "rules['fc1']")
    _assert_entry(_report(lrp)["fc2"], GammaRule, "rules[Linear]")

    model = _seeded(Nested)
    model.fc1.rule = ZPlusRule()
    lrp = LRP(model, rules=rules, preset="epsilon-plus-flat")
    _assert_entry(_report(lrp)["fc1"], ZPlusRule, "module.rule")
    _assert_entry(_report(lrp)["fc2"], GammaRule, "rules[Linear]")


def test_module_rule_set_or_removed_after_an_earlier_attribution_is_honoured():
    """``module.rule`` is read when attributing, not frozen into the cached graph."""
    model = _seeded(Nested)
    x = _inputs(2, 4)
    LRP(model).attribute(x, target=0)  # prepares and caches the graph
    model.fc2.rule = GammaRule()
    _assert_entry(_report(LRP(model))["fc2"], GammaRule, "module.rule")
    del model.fc2.rule
    _assert_entry(_report(LRP(model))["fc2"], EpsilonRule, "default")


def test_rules_by_name_longest_prefix_wins_and_covers_children():
    rules = {"block": GammaRule(), "block.2": ZPlusRule()}
    report = _report(LRP(_seeded(Nested), rules=rules))
    _assert_entry(report["block.0"], GammaRule, "rules['block']")
    # a container's name leaves pass-through modules inside it alone; naming them exactly does not
    _assert_entry(report["block.1"], PassThroughRule, "default")
    _assert_entry(report["block.2"], ZPlusRule, "rules['block.2']")
    _assert_entry(report["fc1"], EpsilonRule, "default")
    _assert_entry(_report(LRP(_seeded(Nested), rules={"block.1": GammaRule()}))["block.1"], GammaRule, "rules['block.1']")
    # 'fc' is not a prefix of 'fc1' in the qualified-name sense ('fc.' would be): it names nothing
    with pytest.raises(ValueError, match=r"rules\['fc'\] names no module or node.*'fc1'"):
        LRP(_seeded(Nested), rules={"fc": FlatRule()}).rule_report()  # names are checked on the captured graph


def test_rules_by_type_tuple_key():
    rules = {(nn.ReLU, nn.Tanh): EpsilonRule(0.5), nn.Linear: GammaRule()}
    report = _report(LRP(_seeded(Nested), rules=rules))
    for name in ("relu", "block.1"):
        assert type(report[name].rule) is EpsilonRule and report[name].rule.STABILITY_FACTOR == 0.5
        assert report[name].source.startswith("rules[")
    _assert_entry(report["fc1"], GammaRule, "rules[Linear]")


class MyLinear(nn.Linear):
    """A user's subclass (timm and many codebases have one): still a Linear."""


def test_rules_by_type_and_presets_reach_subclasses_of_torch_layers():
    """isinstance matching (STYLE.md): ``rules={nn.Linear: ...}`` and presets cover subclasses."""
    model = _seeded(Nested)
    model.fc1 = MyLinear(4, 5).to(DTYPE)
    report = LRP(model, rules={nn.Linear: GammaRule()}).rule_report()
    linears = [entry for entry in report if entry.module_type in ("Linear", "MyLinear", "LinearFunction")]
    assert [entry.qualname for entry in linears] == ["fc1", "block.0", "block.2", "fc2"], [
        (entry.qualname, entry.module_type) for entry in report
    ]
    assert all(type(entry.rule) is GammaRule for entry in linears), [(e.qualname, e.rule_name) for e in linears]

    report = _report(LRP(model, preset="epsilon-plus-flat"))
    _assert_entry(report["fc1"], FlatRule, "preset epsilon-plus-flat")
    _assert_entry(report["fc2"], EpsilonRule, "preset epsilon-plus-flat")


def test_module_rule_on_a_container_is_not_inherited_by_a_name_rule_of_the_child():
    """A ``rule`` set on a module of the user's model is honoured for that module only."""
    model = _seeded(Nested)
    model.block[0].rule = Alpha1_Beta0_Rule()
    try:
        report = _report(LRP(model, rules={"block": GammaRule()}))
    finally:
        del model.block[0].rule
    _assert_entry(report["block.0"], Alpha1_Beta0_Rule, "module.rule")
    _assert_entry(report["block.2"], GammaRule, "rules['block']")


def test_rule_by_name_applies_to_every_call_site_of_the_module():
    """``rules={"fc1": ...}`` names the user's module fc1; a second call of fc1 is still fc1.

    ``module.rule`` reaches both call sites, and so does a type key; a name key
    must not silently leave the second call site on the default rule.
    """
    report = LRP(_seeded(ReusedMLP), rules={"fc1": GammaRule()}).rule_report()
    linear_sites = [entry for entry in report if entry.module_type == "Linear" and entry.qualname != "fc2"]
    assert len(linear_sites) == 2, [entry.qualname for entry in report]
    for entry in linear_sites:
        assert type(entry.rule) is GammaRule, f"call site {entry.qualname!r} got {entry.rule_name} ({entry.source})"


def test_bad_rule_keys_and_values_are_rejected():
    model = _seeded(Nested)
    with pytest.raises(TypeError, match="PropagationRule"):
        LRP(model, rules={"fc1": GammaRule})  # the class, not an instance
    with pytest.raises(TypeError, match="keys"):
        LRP(model, rules={3: GammaRule()})
    with pytest.raises(ValueError, match="unknown preset"):
        LRP(model, preset="epsilon-plus-flatt")


# ---------------------------------------------------------------------------
# rules are copied per call site; the user's rule objects are never changed
# ---------------------------------------------------------------------------
def test_every_call_site_gets_its_own_rule_object():
    shared = GammaRule()
    model = _seeded(ReusedMLP)
    model.fc2.rule = EpsilonRule(0.1)
    try:
        report = LRP(model, rules={nn.Linear: shared, nn.ReLU: PassThroughRule()}).rule_report()
        own = model.fc2.rule
    finally:
        del model.fc2.rule
    rules = [entry.rule for entry in report if entry.rule is not None]
    assert len(rules) == 5  # fc1, relu, fc1 again, relu again, fc2
    assert len({id(rule) for rule in rules}) == len(rules), "two call sites share one rule object"
    assert all(rule is not shared and rule is not own for rule in rules)


def test_user_rule_objects_gain_no_attributes_during_attribution():
    by_name, by_type, on_module = ZPlusRule(), GammaRule(), Alpha1_Beta0_Rule()
    model = _seeded(ReusedMLP)
    model.fc2.rule = on_module
    before = {name: _state(rule) for name, rule in [("name", by_name), ("type", by_type), ("module", on_module)]}
    class_state = (dict(PropagationRule.relevance_input), dict(PropagationRule.relevance_output))
    try:
        lrp = LRP(model, rules={"fc1": by_name, nn.Linear: by_type})
        lrp.attribute(_inputs(2, 5), target=0)
        lrp.attribute(_inputs(2, 5, seed=3), target=1)
        assert model.fc2.rule is on_module
    finally:
        del model.fc2.rule
    after = {name: _state(rule) for name, rule in [("name", by_name), ("type", by_type), ("module", on_module)]}
    assert after == before
    # Captum keeps relevance dictionaries on the class; they must stay untouched too.
    assert (PropagationRule.relevance_input, PropagationRule.relevance_output) == class_state


# ---------------------------------------------------------------------------
# register_rule: a custom leaf module becomes supported
# ---------------------------------------------------------------------------
class Affine(nn.Module):
    """A custom layer kept as a leaf: captum_graph cannot know its rule by itself."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features))
        self.bias = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class WithAffine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine = Affine(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.affine(self.relu(self.affine(x)))))


class MyEpsilonRule(EpsilonRule):
    pass


@pytest.fixture
def clean_registries(monkeypatch):
    """Registering in a test must not leak: fresh copies of the rule and leaf registries."""
    monkeypatch.setattr(rules_module, "_DEFAULT_RULES", list(rules_module._DEFAULT_RULES))
    monkeypatch.setattr(passes_module, "_LEAF_MODULES", set(passes_module._LEAF_MODULES))


def test_custom_leaf_module_without_rule_is_reported_and_refused(clean_registries):
    captum_graph.register_leaf_module(Affine)
    lrp = LRP(_seeded(WithAffine))
    entries = [entry for entry in lrp.rule_report() if entry.module_type == "Affine"]
    assert len(entries) == 2 and all(entry.rule is None and entry.problem for entry in entries)
    assert "affine" in entries[0].problem and "register_rule" in entries[0].problem
    with pytest.raises(UnsupportedOperationError, match="no LRP rule"):
        lrp.attribute(_inputs(2, 4), target=0)


@pytest.mark.parametrize("as_instance", [True, False], ids=["instance", "factory"])
def test_register_rule_makes_custom_leaf_module_supported(clean_registries, as_instance):
    captum_graph.register_leaf_module(Affine)
    registered = MyEpsilonRule(1e-12)
    captum_graph.register_rule(Affine, registered if as_instance else MyEpsilonRule)
    model = _seeded(WithAffine)
    x = _inputs(3, 4)

    lrp = LRP(model)
    entries = [entry for entry in lrp.rule_report() if entry.module_type == "Affine"]
    assert len(entries) == 2
    for entry in entries:
        _assert_entry(entry, MyEpsilonRule, "default")
        assert entry.rule is not registered
    assert entries[0].rule is not entries[1].rule
    # Epsilon everywhere on a ReLU network: Gradient x Input
    expected = InputXGradient(model).attribute(x.clone(), target=2)
    _assert_close(lrp.attribute(x, target=2), expected, rtol=1e-6)


def test_registered_rule_comes_before_builtin_defaults_but_after_user_rules(clean_registries):
    captum_graph.register_rule(nn.Linear, GammaRule(0.5))
    model = _seeded(Nested)
    report = _report(LRP(model, rules={"fc2": ZPlusRule()}))
    _assert_entry(report["fc1"], GammaRule, "default")
    assert report["fc1"].rule.gamma == 0.5
    _assert_entry(report["fc2"], ZPlusRule, "rules['fc2']")


# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------
class PresetNet(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(4, 4, bias=bias)
        self.fc2 = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x)).mean((2, 3))
        return self.fc2(self.relu(self.fc1(x)))


# preset: (first layer, convolutions, dense layers); zennit's composites
PRESET_EXPECTATIONS = {
    "epsilon-plus": (ZPlusRule, ZPlusRule, EpsilonRule),
    "epsilon-plus-flat": (FlatRule, ZPlusRule, EpsilonRule),
    "epsilon-alpha2-beta1": (AlphaBetaRule, AlphaBetaRule, EpsilonRule),
    "epsilon-alpha2-beta1-flat": (FlatRule, AlphaBetaRule, EpsilonRule),
    "epsilon-gamma-box": (ZBoxRule, GeneralizedGammaRule, EpsilonRule),
}


#: Tested in tests/unit/test_transformer_rules.py.
TRANSFORMER_PRESETS = {"cp-lrp", "attn-lrp"}


def test_every_preset_but_epsilon_is_tested():
    """The zennit presets here; their ``-positionwise`` variants in the test after the next."""
    variants = {name + POSITIONWISE for name in PRESET_EXPECTATIONS}
    assert set(PRESETS) == set(PRESET_EXPECTATIONS) | variants | TRANSFORMER_PRESETS | {"epsilon"}


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_preset_assigns_first_layer_conv_and_linear_rules(preset):
    first, conv, linear = PRESET_EXPECTATIONS[preset]
    report = LRP(_seeded(PresetNet), preset=preset).rule_report()
    by_name = {entry.qualname: entry for entry in report}
    _assert_entry(by_name["conv1"], first, f"preset {preset}")
    for name in ("conv2", "conv3"):
        _assert_entry(by_name[name], conv, f"preset {preset}")
    for name in ("fc1", "fc2"):
        _assert_entry(by_name[name], linear, f"preset {preset}")
        assert by_name[name].rule.STABILITY_FACTOR == 1e-6
    # the spatial mean is average pooling: zennit's Norm rule (epsilon as a stabiliser)
    (mean,) = [entry for entry in report if entry.module_type == "LinearFunction"]
    _assert_entry(mean, EpsilonRule, f"preset {preset}")
    assert mean.rule.STABILITY_FACTOR == 1e-6
    for entry in report:
        if entry.qualname not in ("conv1", "conv2", "conv3", "fc1", "fc2", mean.qualname) and entry.rule is not None:
            assert entry.source in ("default", "data movement"), entry


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_preset_on_dense_network_uses_first_rule_on_first_linear_as_zennit_does(preset):
    """zennit's Flat composites take any linear first layer; EpsilonGammaBox looks for a convolution only."""
    first, _, linear = PRESET_EXPECTATIONS[preset]
    first = linear if preset == "epsilon-gamma-box" else first
    first = linear if preset in ("epsilon-plus", "epsilon-alpha2-beta1") else first  # no first-layer rule
    report = _report(LRP(_seeded(Nested), preset=preset))
    _assert_entry(report["fc1"], first, f"preset {preset}")
    for name in ("block.0", "block.2", "fc2"):
        _assert_entry(report[name], linear, f"preset {preset}")


def test_epsilon_preset_is_the_defaults():
    plain = LRP(_seeded(PresetNet)).rule_report()
    preset = LRP(_seeded(PresetNet), preset="epsilon").rule_report()
    assert [(e.qualname, e.rule_name, e.source) for e in plain] == [(e.qualname, e.rule_name, e.source) for e in preset]


class ResidualBlockNet(nn.Module):
    """A residual block with a batch norm that cannot be folded (it follows the addition) and average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.bn2(F.relu(self.bn1(self.conv2(x))) - x + x)
        return self.fc(torch.flatten(F.avg_pool2d(self.pool(x), 1), 1))


def test_presets_give_zennits_rules_to_sums_average_pooling_and_batch_norms():
    """zennit's layer_map_base: Norm at sums (here additions and subtractions) and average pooling
    (modules and functional), batch norms pass relevance on; with ``fold_batch_norm`` the norm after
    a convolution is folded and only the other remains."""
    for fold, norms in ((True, ["bn2"]), (False, ["bn1", "bn2"])):
        report = LRP(_seeded(ResidualBlockNet), preset="epsilon-plus", fold_batch_norm=fold).rule_report()
        kinds = {}
        for entry in report:
            kinds.setdefault(entry.module_type, []).append(entry)
        assert sorted(e.qualname for e in kinds["BatchNorm2d"]) == norms
        assert all(type(e.rule) is PassThroughRule and e.source == "preset epsilon-plus" for e in kinds["BatchNorm2d"])
        sums_and_pools = kinds["Addition"] + kinds["Subtraction"] + kinds["AdaptiveAvgPool2d"] + kinds["LinearFunction"]
        assert len(sums_and_pools) == 4, [(e.qualname, e.module_type) for e in report]
        for entry in sums_and_pools:
            _assert_entry(entry, EpsilonRule, "preset epsilon-plus")
            assert entry.rule.STABILITY_FACTOR == 1e-6


def test_non_epsilon_presets_fold_batch_norms_by_default():
    model = _seeded(ResidualBlockNet)
    assert LRP(model).fold_batch_norm is False
    assert LRP(model, preset="epsilon").fold_batch_norm is False
    for preset in PRESET_EXPECTATIONS:
        assert LRP(model, preset=preset).fold_batch_norm is True
        assert LRP(model, preset=preset, fold_batch_norm=False).fold_batch_norm is False
    assert captum_graph.attr.LayerLRP(model, "conv2", preset="epsilon-plus").fold_batch_norm is True
    report = _report(LRP(model, preset="epsilon-gamma-box"))
    assert "bn1" not in report and "bn2" in report  # bn1 is folded into conv2


def test_epsilon_gamma_box_takes_the_input_bounds():
    low, high = torch.tensor([-1.0, -2.0, -3.0]).reshape(3, 1, 1), torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1)
    preset = epsilon_gamma_box(low, high, gamma=0.5)
    report = _report(LRP(_seeded(PresetNet), preset=preset))
    assert type(report["conv1"].rule) is ZBoxRule and report["conv1"].rule.low is low and report["conv1"].rule.high is high
    assert type(report["conv2"].rule) is GeneralizedGammaRule and report["conv2"].rule.gamma == 0.5
    x = _inputs(2, 3, 6, 6)
    torch.testing.assert_close(
        LRP(_seeded(PresetNet), preset=epsilon_gamma_box(-3.0, 3.0)).attribute(x, target=1),
        LRP(_seeded(PresetNet), preset="epsilon-gamma-box").attribute(x, target=1),
        rtol=0,
        atol=0,
    )


def test_a_preset_layer_map_takes_module_types_too():
    preset = Preset("mine", layers=(((nn.ReLU,), lambda: EpsilonRule(0.5)), ("linear", GeneralizedGammaRule)))
    report = _report(LRP(_seeded(Nested), preset=preset))
    assert type(report["relu"].rule) is EpsilonRule and report["relu"].rule.STABILITY_FACTOR == 0.5
    _assert_entry(report["fc1"], GeneralizedGammaRule, "preset mine")


def test_layer_kinds_of_modules_and_functional_calls():
    aten = torch.ops.aten
    assert layer_kind(nn.Conv2d(1, 1, 1)) == layer_kind(nn.ConvTranspose1d(1, 1, 1)) == "conv"
    assert layer_kind(M.LinearFunction(aten.conv2d.default)) == layer_kind(M.LinearFunction(aten.convolution.default)) == "conv"
    assert layer_kind(MyLinear(1, 1)) == layer_kind(M.LinearFunction(aten.linear.default)) == "linear"
    assert layer_kind(nn.BatchNorm1d(1)) == layer_kind(M.LinearFunction(aten.batch_norm.default)) == "batch_norm"
    assert layer_kind(nn.AvgPool2d(2)) == layer_kind(M.LinearFunction(aten.mean.dim)) == "average_pool"
    assert layer_kind(M.Addition()) == layer_kind(M.Subtraction()) == "addition"
    assert layer_kind(nn.MaxPool2d(2)) is None and layer_kind(M.LinearFunction(aten.max_pool2d.default)) is None
    assert layer_kind(ConvWithOwnForward(1, 1, 1)) is None  # its forward is not Conv2d's


class ConvWithOwnForward(nn.Conv2d):
    """timm's Conv2dSame in miniature: a Conv2d subclass with a forward of its own (captured as aten.conv2d)."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalConvNet(PresetNet):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        if functional:
            for name in ("conv1", "conv2"):
                conv = getattr(self, name)
                own = ConvWithOwnForward(conv.in_channels, conv.out_channels, 3, padding=1)
                own.load_state_dict(conv.state_dict())
                setattr(self, name, own)


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_functional_convolutions_get_the_presets_conv_and_first_layer_rules(preset):
    """A convolution captured as ``aten.conv2d`` gets the same rule, and the same relevance, as ``nn.Conv2d``."""
    first, conv, _ = PRESET_EXPECTATIONS[preset]
    functional, modules = _seeded(lambda: FunctionalConvNet(True)), _seeded(lambda: FunctionalConvNet(False))
    report = LRP(functional, preset=preset).rule_report()
    convs = [entry for entry in report if entry.module_type == "LinearFunction" and entry.qualname.startswith("conv")]
    assert [type(entry.rule) for entry in convs] == [first, conv], [(e.qualname, e.rule_name) for e in report]
    x = _inputs(2, 3, 6, 6)
    _assert_close(LRP(functional, preset=preset).attribute(x, target=2), LRP(modules, preset=preset).attribute(x, target=2))


class DynamicConvNet(nn.Module):
    """A convolution whose kernel is computed from the input (CondConv-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Linear(3, 4 * 3 * 3 * 3)
        self.bias = nn.Parameter(torch.randn(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        kernel = self.kernel(x.mean((0, 2, 3))).reshape(4, 3, 3, 3)
        y = F.conv2d(x, kernel, self.bias, padding=1)
        return self.fc(F.relu(y).mean((2, 3)))


def test_preset_refuses_a_convolution_whose_weight_depends_on_the_input():
    lrp = LRP(_seeded(DynamicConvNet), preset="epsilon-plus")
    x = _inputs(2, 3, 6, 6)
    problems = [entry for entry in lrp.rule_report(x) if entry.problem]
    assert len(problems) == 1 and "weight or bias depends on the input" in problems[0].problem, problems
    with pytest.raises(UnsupportedOperationError, match="preset 'epsilon-plus' has no rule for .*conv2d"):
        lrp.attribute(x, target=0)
    # a rule given by name takes precedence over the preset, as always
    name = problems[0].qualname
    LRP(_seeded(DynamicConvNet), preset="epsilon-plus", rules={name: EpsilonRule()}).attribute(x, target=0)
    with pytest.raises(UnsupportedOperationError, match="weight or bias of .* depends on the input"):
        LRP(_seeded(DynamicConvNet), rules={name: ZPlusRule()}).attribute(x, target=0)


# Bias-free conservation: which presets guarantee it (see the stability test for the reasons).
CONSERVING_PRESETS = ["epsilon-plus", "epsilon-plus-flat", "epsilon-gamma-box"]


@pytest.mark.parametrize("preset", CONSERVING_PRESETS)
def test_preset_conserves_relevance_on_bias_free_network(preset):
    model = _seeded(lambda: PresetNet(bias=False))
    with torch.no_grad():  # outputs of order one, so that epsilon=1e-6 absorbs little
        for parameter in model.parameters():
            parameter.mul_(4.0)
    x = _inputs(2, 3, 6, 6).clamp(-3, 3)
    target = 1
    relevance = LRP(model, preset=preset).attribute(x, target=target)
    with torch.no_grad():
        out = model(x)[:, target]
    torch.testing.assert_close(relevance.sum((1, 2, 3)), out, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------
# the rules against zennit's own, layer by layer
# ---------------------------------------------------------------------------
zennit_rules = pytest.importorskip("zennit.rules")

# rule: (ours, zennit's), each built from per-channel upper bounds shaped (1, C, 1, ...) for ZBox
ZENNIT_RULES = {
    "zplus": (lambda high: ZPlusRule(), lambda high: zennit_rules.ZPlus()),
    "alpha2-beta1": (lambda high: AlphaBetaRule(), lambda high: zennit_rules.AlphaBeta(2.0, 1.0)),
    "gamma": (lambda high: GeneralizedGammaRule(), lambda high: zennit_rules.Gamma(0.25)),
    "flat": (lambda high: FlatRule(), lambda high: zennit_rules.Flat()),
    "wsquare": (lambda high: WSquareRule(), lambda high: zennit_rules.WSquare()),
    "zbox": (lambda high: ZBoxRule(-2.0, high), lambda high: zennit_rules.ZBox(-2.0, high)),
}
LAYERS = {
    "conv-groups-stride": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 7, 7)),
    "conv-transpose": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2), (3, 4, 4, 4)),
    "linear": (lambda: nn.Linear(4, 5), (3, 4)),
}


def _zennit_relevance(hook, layer: nn.Module, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    handles = hook.register(layer)
    try:
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(layer(x), x, relevance)
    finally:
        handles.remove()
    return grad


@pytest.mark.parametrize("inputs", ["mixed", "non-negative"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("rule", sorted(ZENNIT_RULES))
def test_rule_equals_zennits(rule, layer, inputs):
    ours, theirs = ZENNIT_RULES[rule]
    factory, shape = LAYERS[layer]
    torch.manual_seed(0)
    module = factory().to(DTYPE)
    with torch.no_grad():
        module.bias.normal_()
    x = _inputs(*shape)
    x = x.clamp(min=0) if inputs == "non-negative" else x
    with torch.no_grad():
        relevance = _inputs(*module(x).shape, seed=5)
    high = torch.linspace(1.5, 4.5, x.shape[1], dtype=DTYPE).reshape((1, -1) + (1,) * (x.dim() - 2))
    (actual,) = ours(high).relevance(module, (x,), relevance)
    _assert_close(actual, _zennit_relevance(theirs(high), module, x, relevance), rtol=1e-9)


@pytest.mark.parametrize("rule", sorted(set(ZENNIT_RULES) - {"zbox"}))
def test_rule_on_a_functional_convolution_equals_the_module(rule):
    """The same rule on ``LinearFunction(aten.conv2d)(x, weight, bias, stride, padding, dilation, groups)``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).to(DTYPE)
    function = M.LinearFunction(torch.ops.aten.conv2d.default)
    arguments = (conv.weight.detach(), conv.bias.detach(), [2, 2], [1, 1], [1, 1], 2)
    x = _inputs(3, 4, 7, 7)
    relevance = _inputs(3, 6, 4, 4, seed=5)
    ours = ZENNIT_RULES[rule][0]
    (expected,) = ours(None).relevance(conv, (x,), relevance)
    actual = ours(None).relevance(function, (x,) + arguments, relevance)
    assert len(actual) == 1 + len(arguments) and all(r is None for r in actual[1:])
    _assert_close(actual[0], expected, rtol=1e-12)


def test_alpha_beta_rule_checks_its_parameters():
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBetaRule(2.0, 2.0)


def test_signed_gamma_cannot_amplify_relevance_where_the_output_nearly_cancels():
    """Each output's relevance is spread over contributions of total size at most ``(2 + gamma) / gamma`` times
    it (bias-free, inputs of any sign); Captum's GammaRule divides by ``x (w + gamma w^+)``, which can vanish."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 64, bias=False).to(DTYPE)
    x = _inputs(1, 8)
    with torch.no_grad():  # shift each weight row so that z_j is tiny but not zero
        z = layer(x)
        layer.weight.sub_((z / x.pow(2).sum())[0][:, None] * x[0][None, :] * (1 - 1e-6))
        assert float(layer(x).abs().max()) < 1e-5
    relevance = torch.ones(1, 64, dtype=DTYPE)
    gamma = 0.25
    (ours,) = GeneralizedGammaRule(gamma, epsilon=1e-12).relevance(layer, (x,), relevance)
    assert float(ours.abs().sum()) <= (2 + gamma) / gamma * 64
    captums = ref.gamma(layer, x, relevance, gamma=gamma)
    assert float(captums.abs().sum()) > 100 * float(ours.abs().sum())


def test_preset_builders_take_zennits_epsilon_and_stabilizer():
    model = _seeded(ResidualBlockNet)
    for builder, conv_rule in (
        (captum_graph.rules.epsilon_plus, ZPlusRule),
        (captum_graph.rules.epsilon_plus_flat, ZPlusRule),
        (captum_graph.rules.epsilon_alpha2_beta1, AlphaBetaRule),
        (captum_graph.rules.epsilon_alpha2_beta1_flat, AlphaBetaRule),
        (epsilon_gamma_box, GeneralizedGammaRule),
    ):
        report = LRP(model, preset=builder(epsilon=0.5, stabilizer=0.25)).rule_report()
        by_type = {}
        for entry in report:
            by_type.setdefault(entry.module_type, []).append(entry.rule)
        conv2 = _report(LRP(model, preset=builder(epsilon=0.5, stabilizer=0.25)))["conv2"].rule
        assert type(conv2) is conv_rule and conv2.STABILITY_FACTOR == 0.25, builder
        assert [rule.STABILITY_FACTOR for rule in by_type["Linear"]] == [0.5]
        assert {rule.STABILITY_FACTOR for rule in by_type["Addition"] + by_type["AdaptiveAvgPool2d"]} == {0.25}
        default = builder().name
        assert [(e.qualname, e.rule_name) for e in LRP(model, preset=default).rule_report()] == [
            (e.qualname, e.rule_name) for e in LRP(model, preset=builder()).rule_report()
        ]


class TokenNet(nn.Module):
    """Dense layers at every token, on flattened tokens (nn.MultiheadAttention's output projection), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.mlp = nn.Linear(8, 8)
        self.flat = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, C)
        tokens = F.relu(self.mlp(tokens))
        n, t, c = tokens.shape
        tokens = self.flat(tokens.reshape(n * t, c)).reshape(n, t, c)
        return self.head(tokens.mean(1))


@pytest.mark.parametrize("batch", [1, 2], ids=["fixed-batch", "dynamic-batch"])
def test_positionwise_presets_give_dense_layers_at_every_position_the_convolution_rule(batch):
    """A dense layer applied to every token is a 1x1 convolution: the ``-positionwise`` presets give it their
    convolution rule; the zennit-equal presets, like zennit (matching by module type), give it epsilon.
    The head on (N, C) keeps epsilon under both."""
    model = _seeded(TokenNet)
    lrp = LRP(model, preset="epsilon-gamma-box-positionwise")
    report = {entry.qualname: entry for entry in lrp.rule_report(_inputs(batch, 3, 4, 4))}
    assert lrp.prepared(_inputs(batch, 3, 4, 4)).dynamic_batch is (batch > 1)
    _assert_entry(report["embed"], ZBoxRule, "preset epsilon-gamma-box-positionwise")
    for name in ("mlp", "flat"):
        _assert_entry(report[name], GeneralizedGammaRule, "preset epsilon-gamma-box-positionwise")
    _assert_entry(report["head"], EpsilonRule, "preset epsilon-gamma-box-positionwise")
    zennit_like = {entry.qualname: entry for entry in LRP(model, preset="epsilon-gamma-box").rule_report(_inputs(batch, 3, 4, 4))}
    _assert_entry(zennit_like["embed"], ZBoxRule, "preset epsilon-gamma-box")
    for name in ("mlp", "flat", "head"):
        _assert_entry(zennit_like[name], EpsilonRule, "preset epsilon-gamma-box")
    # presets that say nothing of position-wise layers give them their dense-layer rule
    plain = Preset("plain", linear=lambda: EpsilonRule(0.5))
    report = {entry.qualname: entry for entry in LRP(model, preset=plain).rule_report(_inputs(batch, 3, 4, 4))}
    assert all(report[name].rule.STABILITY_FACTOR == 0.5 for name in ("mlp", "flat", "head"))


def test_every_zennit_preset_has_a_positionwise_variant_that_differs_only_there():
    zennit = [name for name in PRESETS if name not in TRANSFORMER_PRESETS | {"epsilon"} and not name.endswith(POSITIONWISE)]
    assert len(zennit) == 5
    for name in zennit:
        base, variant = PRESETS[name], PRESETS[name + POSITIONWISE]
        assert variant.name == name + POSITIONWISE
        assert [kind for kind, _ in variant.layers] == ["positionwise_linear"] + [kind for kind, _ in base.layers]
        assert variant.first_kinds == base.first_kinds
        for ours, theirs in ((variant.first, base.first), (variant.conv, base.conv), (variant.linear, base.linear)):
            assert _factory_key(ours) == _factory_key(theirs)


def _factory_key(factory):
    """What a rule factory (a ``functools.partial`` or ``None``) builds, comparable across builds."""
    return None if factory is None else (factory.func, factory.args, tuple(sorted(factory.keywords.items())))


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_presets_leave_the_model_untouched(preset, assert_untouched):
    """Folding, the explicit rules and their parameter transforms work on private copies only."""
    model = _seeded(lambda: FunctionalConvNet(True))
    x = _inputs(2, 3, 6, 6)
    with assert_untouched(model, (x,)):
        LRP(model, preset=preset).attribute(x, target=1)
        captum_graph.attr.LayerLRP(model, "conv3", preset=preset).attribute(x, target=0)
    model = _seeded(ResidualBlockNet)
    with assert_untouched(model, (x,)):
        LRP(model, preset=preset).attribute(x, target=1)


def test_with_input_bounds_bounds_the_box_rule_and_leaves_other_presets_alone():
    from captum_graph.rules import with_input_bounds

    low, high = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    for name in ("epsilon-gamma-box", "epsilon-gamma-box" + POSITIONWISE):
        bounded = with_input_bounds(name, low, high)
        rule = bounded.first()
        assert isinstance(rule, ZBoxRule) and rule.low is low and rule.high is high
        assert bounded.name == name and bounded.layers == PRESETS[name].layers
        assert rule.STABILITY_FACTOR == PRESETS[name].first().STABILITY_FACTOR
    assert with_input_bounds("epsilon-plus-flat", low, high) is PRESETS["epsilon-plus-flat"]
