"""The presets on every torchvision family zennit has no canonizer for (float64): finite, bounded, conservative.

One member per family, at the zoo tests' input sizes, one image (uniform pixels
normalised with ImageNet's statistics), explained for its predicted class.
For each family and each of the five zennit presets (and, on the families with
dense layers applied at every position, their ``-positionwise`` variants):

* **Finite**: the maps of the realistic model (every bias drawn, batch-norm
  scales drawn from [0.5, 1.5], statistics calibrated: ``make_meaningful``) and
  of its bias-free copy are finite.
* **Bounded**: on the realistic model, ``sum |R| / |logit| <= BOUND`` (10).
  ``UNBOUNDED`` lists where a preset's rule amplifies relevance beyond it.
* **Conservative**: on the bias-free copy (``zero_additive_constants``), with
  the preset's stabilisers at 1e-12 so that the rules are measured, not the
  stabiliser, input relevance sums to the logit within 1e-6 relative.
  ``NOT_CONSERVED`` lists where a preset's rule does not promise it.

What each rule promises on a bias-free layer (which is why the lists are what
they are):

* flat, zB, epsilon (dense layers) and zennit's Norm (sums, average pooling)
  pass on exactly the relevance they receive (up to the stabiliser);
* gamma (``epsilon-gamma-box``) too, at every output with ``z != 0``; it may
  amplify ``sum |R|`` by up to ``(2 + gamma) / gamma = 9`` per layer where an
  output's contributions nearly cancel, which compounds where convolutions
  read centred inputs of both signs (MaxViT's MBConv reads a batch norm's
  output directly);
* z+ (``epsilon-plus``, ``epsilon-plus-flat``) never amplifies (``sum |R|``
  cannot grow), but an output with no positive contribution loses its
  relevance: where a depthwise or narrow convolution's outputs carry relevance
  without a ReLU after them (ShuffleNet's and MobileNetV3's depthwise layers,
  ConvNeXt, MaxViT, EfficientNet, MNASNet's narrow layers) the map sums to less;
* alpha-beta (``epsilon-alpha2-beta1``, ``-flat``) passes on ``alpha R`` at an
  output with no negative contribution and may pass ``(alpha + beta) |R| = 3 |R|``
  in absolute value; where relevance of both signs reaches convolutions (no
  ReLU after them: linear bottlenecks, residual branches) this compounds with
  depth. It conserves and stays bounded on ReLU networks whose convolutions
  mix many inputs.

The ``epsilon`` preset (Captum's rules, Gradient x Input) is covered by the
zoo oracles; its maps are not bounded (up to 1000x on ShuffleNet).
"""
import copy
import functools
import gc

import pytest
import torch
import torchvision
from torch import nn

from captum_graph.attr import LRP
from captum_graph.rules import (
    POSITIONWISE,
    epsilon_alpha2_beta1,
    epsilon_alpha2_beta1_flat,
    epsilon_gamma_box,
    epsilon_plus,
    epsilon_plus_flat,
)
from helpers.oracles import make_meaningful, zero_additive_constants

pytestmark = pytest.mark.filterwarnings(
    "ignore:Input Tensor .* did not already require gradients",
    "ignore:The default weight initialization of inception_v3",
    "ignore:The default weight initialization of GoogleNet",
)

BOUND = 10.0
CONSERVATION = 1e-6
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
LOW, HIGH = (-MEAN / STD)[0], ((1 - MEAN) / STD)[0]
EXACT = dict(epsilon=1e-12, stabilizer=1e-12)

# preset: builder taking zennit's epsilon and stabilizer
ZENNIT_PRESETS = {
    "epsilon-plus": epsilon_plus,
    "epsilon-plus-flat": epsilon_plus_flat,
    "epsilon-alpha2-beta1": epsilon_alpha2_beta1,
    "epsilon-alpha2-beta1-flat": epsilon_alpha2_beta1_flat,
    "epsilon-gamma-box": lambda **kwargs: epsilon_gamma_box(LOW, HIGH, **kwargs),
}
PRESETS = dict(ZENNIT_PRESETS)
PRESETS.update({
    name + POSITIONWISE: functools.partial(build, positionwise=True) for name, build in ZENNIT_PRESETS.items()
})
#: families with dense layers applied at every position: only there the -positionwise variants differ
POSITIONWISE_FAMILIES = ("convnext_tiny", "vit_b_16", "swin_t", "maxvit_t")
_MAXVIT = {
    "input_size": (64, 64), "partition_size": 2, "stem_channels": 64, "block_channels": [64, 128, 256, 512],
    "block_layers": [2, 2, 5, 2], "head_dim": 32, "stochastic_depth_prob": 0.2,
}  # maxvit_t's layout with windows of 2, so that a 64x64 input divides into them
_NO_AUX = {"aux_logits": False, "transform_input": False, "init_weights": True}
# family: (input size, constructor keyword arguments, slow)
FAMILIES = {
    "alexnet": (64, {}, True),
    "squeezenet1_1": (48, {}, False),
    "googlenet": (32, _NO_AUX, True),
    "inception_v3": (75, _NO_AUX, True),
    "densenet121": (32, {}, True),
    "shufflenet_v2_x0_5": (32, {}, False),
    "mnasnet0_5": (32, {}, False),
    "mobilenet_v2": (32, {}, False),
    "mobilenet_v3_small": (32, {}, False),
    "efficientnet_b0": (32, {}, True),
    "regnet_y_400mf": (32, {}, True),
    "convnext_tiny": (32, {}, True),
    "vit_b_16": (32, {"image_size": 32}, True),
    "swin_t": (64, {}, True),
    "maxvit_t": (64, _MAXVIT, True),
}
_ALPHA_BETA_LINEAR_BOTTLENECKS = {
    "mnasnet0_5": "linear bottlenecks",
    "mobilenet_v2": "linear bottlenecks",
    "mobilenet_v3_small": "linear bottlenecks, hardswish",
    "efficientnet_b0": "linear bottlenecks, SiLU",
    "regnet_y_400mf": "residual branches without a ReLU",
    "maxvit_t": "MBConv and attention, GELU",
}
_ALPHA_BETA_POINTWISE_EPSILON = {
    "convnext_tiny": "epsilon on its dense pointwise layers hands relevance of both signs to alpha-beta on its "
    "depthwise convolutions (9e3; its -positionwise variant: 0.8)",
}
# preset: {family: why sum |R| / |logit| exceeds BOUND there}
UNBOUNDED = {
    "epsilon-alpha2-beta1": {**_ALPHA_BETA_LINEAR_BOTTLENECKS, **_ALPHA_BETA_POINTWISE_EPSILON},
    "epsilon-alpha2-beta1-flat": {**_ALPHA_BETA_LINEAR_BOTTLENECKS, **_ALPHA_BETA_POINTWISE_EPSILON},
    "epsilon-gamma-box": {"maxvit_t": "gamma on convolutions of a batch norm's centred output"},
}
_Z_PLUS_LOSES = {
    "shufflenet_v2_x0_5": "depthwise convolutions without a ReLU after them",
    "mnasnet0_5": "narrow convolutions (8 channels)",
    "mobilenet_v3_small": "depthwise convolutions with hardswish",
    "efficientnet_b0": "depthwise convolutions with SiLU",
    "convnext_tiny": "depthwise convolutions of the residual stream",
    "maxvit_t": "depthwise convolutions with GELU",
}
_ALPHA_BETA_ONE_SIDED = dict(
    _Z_PLUS_LOSES,
    squeezenet1_1="narrow squeeze layers",
    mobilenet_v2="depthwise convolutions",
    regnet_y_400mf="grouped convolutions",
)
# preset: {family: where relevance is not conserved}
NOT_CONSERVED = {
    "epsilon-plus": _Z_PLUS_LOSES,
    "epsilon-plus-flat": _Z_PLUS_LOSES,
    "epsilon-alpha2-beta1": _ALPHA_BETA_ONE_SIDED,
    "epsilon-alpha2-beta1-flat": _ALPHA_BETA_ONE_SIDED,
}
# The -positionwise variants: the same reasons, on the families where they run, but ConvNeXt's
# alpha-beta explosion, which comes from epsilon on its pointwise layers.
for _name in ZENNIT_PRESETS:
    UNBOUNDED[_name + POSITIONWISE] = {
        family: why for family, why in UNBOUNDED.get(_name, {}).items()
        if family in POSITIONWISE_FAMILIES and family not in _ALPHA_BETA_POINTWISE_EPSILON
    }
    NOT_CONSERVED[_name + POSITIONWISE] = {
        family: why for family, why in NOT_CONSERVED.get(_name, {}).items() if family in POSITIONWISE_FAMILIES
    }
_BUILT = {}  # one family at a time


def _family(name: str):
    """The realistic float64 model, its bias-free copy and an image (built once for the five presets)."""
    if name not in _BUILT:
        _BUILT.clear()
        gc.collect()
        size, kwargs, _ = FAMILIES[name]
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            if name == "maxvit_t":
                model = torchvision.models.maxvit.MaxVit(**kwargs)
            else:
                model = getattr(torchvision.models, name)(weights=None, **kwargs)
        finally:
            torch.set_default_dtype(default_dtype)
        with torch.no_grad():
            for norm in model.modules():
                if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.weight is not None:
                    norm.weight.uniform_(0.5, 1.5)
        x = (torch.rand(1, 3, size, size, dtype=torch.float64) - MEAN) / STD
        make_meaningful(model, x)
        _BUILT[name] = (model, zero_additive_constants(copy.deepcopy(model)), x)
    return _BUILT[name]


def _explain(model: nn.Module, x: torch.Tensor, preset) -> tuple:
    with torch.no_grad():
        logits = model(x)[0]
    target = int(logits.argmax())
    relevance = LRP(model, preset=preset).attribute(x, target=target)
    return relevance, logits[target]


def _params():
    for name, (_, _, slow) in FAMILIES.items():
        for preset in PRESETS:
            if preset.endswith(POSITIONWISE) and name not in POSITIONWISE_FAMILIES:
                continue  # the same rules as the zennit preset: no dense layer runs at every position
            yield pytest.param(name, preset, id=f"{name}-{preset}", marks=[pytest.mark.slow] if slow else [])


# the preset varies fastest: one family's models serve its presets' tests in a row
@pytest.mark.parametrize("name, preset", list(_params()))
def test_preset_is_finite_bounded_and_conservative(name, preset):
    model, bias_free, x = _family(name)

    relevance, logit = _explain(model, x, PRESETS[preset]())
    assert torch.isfinite(relevance).all(), f"{name} {preset}: non-finite relevance"
    ratio = float(relevance.abs().sum() / logit.abs())
    if name not in UNBOUNDED.get(preset, {}):
        assert ratio <= BOUND, f"{name} {preset}: sum |R| / |logit| = {ratio:.3g} > {BOUND}"

    relevance, logit = _explain(bias_free, x, PRESETS[preset](**EXACT))
    assert torch.isfinite(relevance).all(), f"{name} {preset}: non-finite relevance on the bias-free copy"
    assert float(logit.abs()) > 1e-6, f"{name}: degenerate logit {float(logit)}; the check would mean nothing"
    error = float((relevance.sum() - logit).abs() / logit.abs())
    if name not in NOT_CONSERVED.get(preset, {}):
        assert error <= CONSERVATION, (
            f"{name} {preset}: bias-free relevance sums to {float(relevance.sum()):.6g}, logit {float(logit):.6g} "
            f"(relative error {error:.2e}); sum |R| / |logit| on the realistic model {ratio:.3g}"
        )
    print(f"{name} {preset}: sum|R|/|logit| {ratio:.3g}, bias-free conservation error {error:.2e}")
