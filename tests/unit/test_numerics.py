"""Non-finite values and 16-bit floats.

* A NaN or an infinity in an input is refused with an error that names the
  input and counts the values (an error, not a warning: the map would be NaN
  wherever it reaches, and a warning is easy to miss in a batch job).
* Non-finite relevance from finite inputs (an overflow, a division by zero)
  is refused the same way, naming the node where it first appears.
* float16 and bfloat16 models work: relevance in the input's dtype, as close
  to the float64 result (of the same rounded model) as Gradient x Input in
  that dtype is to its own.
"""
import pytest
import torch
from captum.attr import InputXGradient
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule
from torch import nn

from captum_graph import CaptumGraphError
from captum_graph.attr import LayerGradCam, LayerLRP, LRP
from captum_graph import NonFiniteError
from captum_graph.fusion import _ratio_times_value
from captum_graph.rules import stabilize
from helpers.models import TINY_MODELS, TwoInputNet, example_input
from helpers.oracles import assert_untouched

METHODS = {
    "LRP": lambda model: LRP(model).attribute,
    "LayerLRP": lambda model: LayerLRP(model, "block").attribute,
    "LayerGradCam": lambda model: LayerGradCam(model, "block").attribute,
}


# ---------------------------------------------------------------------------
# non-finite inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_non_finite_input_is_refused_naming_it_and_counting(method):
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    x = example_input()
    x[0, 0, 0, :2] = float("nan")
    x[1, 2, 3, 4] = float("inf")
    with assert_untouched(model):
        with pytest.raises(NonFiniteError, match=r"input 0 \(shape \(2, 3, 8, 8\).*3 of 384 values are not finite \(2 NaN, 1 \+inf\)"):
            METHODS[method](model)(x, target=1)
    assert issubclass(NonFiniteError, (CaptumGraphError, ValueError))


def test_the_second_input_is_named():
    model = TwoInputNet().double().eval()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    y[0, 0] = -float("inf")
    with pytest.raises(NonFiniteError, match=r"input 1 \(shape \(2, 2\).* 1 of 4 values are not finite \(1 -inf\)"):
        LRP(model).attribute((x, y), target=0)


class _Masked(nn.Module):
    """Logits plus an additive mask, given as an additional forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TINY_MODELS["x + relu(conv(x))"]()

    def forward(self, x, mask):
        return self.net(x) + mask


def test_infinite_additional_arguments_are_allowed():
    """An additive mask of -inf is a legitimate additional argument; only ``inputs`` are checked."""
    model = _Masked().double().eval()
    x = example_input()
    mask = torch.zeros(2, 5, dtype=torch.float64)
    mask[:, 3] = -float("inf")
    relevance = LRP(model).attribute(x, target=1, additional_forward_args=(mask,))
    assert torch.isfinite(relevance).all()


# ---------------------------------------------------------------------------
# non-finite relevance from finite inputs
# ---------------------------------------------------------------------------
def test_division_by_zero_is_located_at_its_layer():
    """LRP-0 (epsilon 0) at a logit that is exactly 0: 0 / 0 at the head."""
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    with torch.no_grad():
        model.fc.weight[1] = 0.0
        model.fc.bias[1] = 0.0
    lrp = LRP(model, rules={"fc": EpsilonRule(0.0)})
    with assert_untouched(model):
        with pytest.raises(NonFiniteError, match=r"(?s)relevance of finite inputs is not finite: .*backward step of node 'fc'.*rule EpsilonRule\(0\).*NaN"):
            lrp.attribute(example_input(), target=1)
    # the prepared graph is shared with the failed call (whose working copy was dropped)
    assert torch.isfinite(LRP(model).attribute(example_input(), target=1)).all(), "a failed call spoiled later ones"


def test_non_finite_weight_is_located_in_the_forward_pass():
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    with torch.no_grad():
        model.block.conv.weight[0, 0, 0, 0] = float("nan")
    for attribute in (LRP(model).attribute, LayerLRP(model, "block.add").attribute):
        with pytest.raises(NonFiniteError, match=r"(?s)forward pass computes non-finite values at node 'block.conv'"):
            attribute(example_input(), target=1)


def test_float16_overflow_is_located_with_a_hint():
    model = TINY_MODELS["x + relu(conv(x))"]().eval()
    with torch.no_grad():
        model.block.conv.weight.mul_(1e5)
    model = model.half()
    with pytest.raises(NonFiniteError, match=r"(?s)forward pass computes non-finite values at node 'block.conv'.*torch.float16 .*float32"):
        LRP(model).attribute(example_input(dtype=torch.float16), target=1)


# ---------------------------------------------------------------------------
# 16-bit floats
# ---------------------------------------------------------------------------
def _net() -> nn.Module:
    """Convolutions, batch norm and ReLUs (zeros that a vanished epsilon would divide by)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


def _relative_error(found: torch.Tensor, reference: torch.Tensor) -> float:
    return float((found.detach().double() - reference.detach()).abs().max() / reference.detach().abs().max())


EXPLAINERS = {
    "LRP": lambda model: LRP(model).attribute,
    "LRP epsilon-plus-flat": lambda model: LRP(model, preset="epsilon-plus-flat").attribute,
    "LRP gamma (Captum's rule)": lambda model: LRP(model, rules={nn.Conv2d: GammaRule()}).attribute,
    "LRP alpha1-beta0 (Captum's rule)": lambda model: LRP(model, rules={nn.Conv2d: Alpha1_Beta0_Rule()}).attribute,
    "LayerLRP": lambda model: LayerLRP(model, "3").attribute,
    "LayerGradCam": lambda model: LayerGradCam(model, "3").attribute,
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("explainer", list(EXPLAINERS))
def test_16_bit_models_work_as_precisely_as_gradients(explainer, dtype, assert_untouched):
    torch.manual_seed(0)
    model = _net().to(dtype)
    x = torch.randn(2, 3, 16, 16).to(dtype)
    reference_model = _net().double()
    reference_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})  # the same rounded weights
    reference = EXPLAINERS[explainer](reference_model)(x.double(), target=1)
    with assert_untouched(model, x):
        found = EXPLAINERS[explainer](model)(x, target=1)
    assert found.dtype == dtype and torch.isfinite(found).all()
    gradient_error = _relative_error(
        InputXGradient(model).attribute(x, target=1), InputXGradient(reference_model).attribute(x.double(), target=1)
    )
    error = _relative_error(found, reference)
    assert error <= 2 * gradient_error + 1e-2, f"{error:.3g} (Gradient x Input in {dtype}: {gradient_error:.3g})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stabiliser_never_vanishes_in_16_bits(dtype):
    """Captum's epsilon 1e-9 is 0 in float16: ``0 / (0 + eps)`` would be NaN."""
    zeros = torch.zeros(4, dtype=dtype)
    assert (stabilize(zeros, 1e-9) > 0).all()
    assert (stabilize(zeros, 1e-9, non_negative=True) > 0).all()
    assert stabilize(zeros, 0.0).eq(0).all(), "an epsilon of 0 stays 0 (LRP-0)"
    grad = torch.ones(4, dtype=dtype)
    assert torch.equal(_ratio_times_value(grad, zeros.clone(), 1e-9, non_negative=True, reuse=True), zeros)
    assert torch.equal(_ratio_times_value(grad, zeros.clone(), 1e-9, non_negative=False, reuse=False), zeros)
