"""captum_graph's presets equal zennit 0.5.1's composites wherever zennit runs (float64).

Five presets x torchvision's vgg16, vgg16_bn, resnet18 and resnet50, with
random weights made realistic: every bias and batch-norm shift drawn, batch-norm
scales drawn from [0.5, 1.5], running means and variances calibrated on a
batch (``make_meaningful``). The input is an image of uniform pixels in [0, 1]
normalised with ImageNet's mean and standard deviation, and ``epsilon-gamma-box``
gets the matching per-channel bounds (normalised 0 and 1). zennit runs with its
canonizers (``VGGCanonizer``, ``ResNetCanonizer``); captum_graph with its
defaults, which fold batch norms for these presets. Both are scaled to the target
logit (the relevance entering the output is the logit), and they must agree
to 1e-6 of the largest zennit relevance.

Batch norms are built with ``eps=0``: zennit's canonizer merges a batch norm
into the convolution before it and leaves the norm computing
``x / sqrt(1 + eps)`` instead of the identity (it sets the running variance to
one), so with torchvision's ``eps=1e-5`` zennit explains a slightly different
function (resnet18's logits move by 9e-5 relative) and the maps differ by
about 5e-5 relative. With ``eps=0`` both explain the same function.
"""
import gc

import pytest
import torch
import torchvision
from torch import nn

from captum_graph.attr import LRP
from captum_graph.rules import epsilon_gamma_box
from helpers.oracles import make_meaningful

zennit_composites = pytest.importorskip("zennit.composites")
zennit_torchvision = pytest.importorskip("zennit.torchvision")

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")

SIZE = 32  # the smallest input all four run at; resnet50's last stage is 1x1 here, as vgg's last block
TOLERANCE = 1e-6
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
LOW, HIGH = -MEAN / STD, (1 - MEAN) / STD

# name: (zennit canonizer, slow)
MODELS = {
    "vgg16": (zennit_torchvision.VGGCanonizer, False),
    "vgg16_bn": (zennit_torchvision.VGGCanonizer, True),
    "resnet18": (zennit_torchvision.ResNetCanonizer, False),
    "resnet50": (zennit_torchvision.ResNetCanonizer, True),
}
# captum_graph preset: zennit composite
PRESETS = {
    "epsilon-plus": lambda canonizers: zennit_composites.EpsilonPlus(canonizers=canonizers),
    "epsilon-plus-flat": lambda canonizers: zennit_composites.EpsilonPlusFlat(canonizers=canonizers),
    "epsilon-alpha2-beta1": lambda canonizers: zennit_composites.EpsilonAlpha2Beta1(canonizers=canonizers),
    "epsilon-alpha2-beta1-flat": lambda canonizers: zennit_composites.EpsilonAlpha2Beta1Flat(canonizers=canonizers),
    "epsilon-gamma-box": lambda canonizers: zennit_composites.EpsilonGammaBox(LOW, HIGH, canonizers=canonizers),
}
_BUILT = {}  # one model at a time (vgg16 is 1.1 GB in float64)


def _model(name: str):
    """The realistic float64 model, an input and its target (built once for the five presets)."""
    if name not in _BUILT:
        _BUILT.clear()
        gc.collect()  # the previous model's gigabyte goes before the next is built
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # built in float64: no float32 copy on the way
        try:
            model = getattr(torchvision.models, name)(weights=None)
        finally:
            torch.set_default_dtype(default_dtype)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            for norm in norms:
                norm.weight.uniform_(0.5, 1.5)
        x = (torch.rand(1, 3, SIZE, SIZE, dtype=torch.float64) - MEAN) / STD
        make_meaningful(model, x)  # draws the (zero) biases, calibrates the batch norms
        for norm in norms:
            norm.eps = 0.0
        with torch.no_grad():
            target = int(model(x).argmax())
        _BUILT[name] = (model, x, target)
    return _BUILT[name]


def _zennit_relevance(model: nn.Module, x: torch.Tensor, target: int, preset: str, name: str) -> torch.Tensor:
    with torch.no_grad():
        logit = model(x)[0, target]
    composite = PRESETS[preset]([MODELS[name][0]()])
    with composite.context(model) as modified:
        inputs = x.clone().requires_grad_()
        output = modified(inputs)
        relevance_out = torch.zeros_like(output)
        relevance_out[0, target] = logit
        (relevance,) = torch.autograd.grad(output, inputs, relevance_out)
    return relevance


def _params():
    for name, (_, slow) in MODELS.items():
        yield pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else [])


# the preset varies fastest: one model serves five tests in a row
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", list(_params()))
def test_preset_equals_zennit_composite(name, preset):
    model, x, target = _model(name)
    chosen = epsilon_gamma_box(LOW[0], HIGH[0]) if preset == "epsilon-gamma-box" else preset
    ours = LRP(model, preset=chosen).attribute(x, target=target)
    theirs = _zennit_relevance(model, x, target, preset, name)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), f"{name} {preset}: non-finite relevance"
    scale = float(theirs.abs().max())
    assert scale > 0, f"{name} {preset}: zennit's relevance is zero; the comparison would mean nothing"
    difference = float((ours - theirs).abs().max()) / scale
    assert difference <= TOLERANCE, (
        f"{name} {preset}: max |captum_graph - zennit| / max |zennit| = {difference:.2e}; relevance sums "
        f"{float(ours.sum()):.6g} vs {float(theirs.sum()):.6g}"
    )
    print(f"{name} {preset}: max difference / max zennit relevance {difference:.1e}")
