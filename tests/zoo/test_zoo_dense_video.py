"""Conservation on torchvision's segmentation and video models (float64, bias-free copies).

A segmentation model is explained through a class score summed over its
pixels (``PixelSum``); a video model through its class logit. With every
additive constant zeroed, input relevance sums to that score per example
(DESIGN.md oracle 2), within 1e-6 relative; on the original model the map
is finite and shaped like the input.

Excluded: s3d and mvit_v1_b / mvit_v2_s need 16x224x224 clips (their
pooling and positional embeddings are built for that size), more than this
suite's budget allows on two CPU cores.
"""
import functools

import pytest
import torch
import torchvision
from captum_graph.attr import LRP
from captum_graph.rules import EPSILON_TYPES
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import nn

from helpers.oracles import assert_conserves, make_meaningful, zero_additive_constants

TINY_EPSILON = {EPSILON_TYPES: EpsilonRule(1e-15)}
TARGETS = [3, 7]


class PixelSum(nn.Module):
    """A segmentation model's class scores summed over the pixels: ``(N, classes)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"].sum((2, 3))


# name: (constructor, input shape without batch, slow)
MODELS = {
    "fcn_resnet50": (torchvision.models.segmentation.fcn_resnet50, (3, 32, 32), True),
    "deeplabv3_mobilenet_v3_large": (torchvision.models.segmentation.deeplabv3_mobilenet_v3_large, (3, 32, 32), True),
    "lraspp_mobilenet_v3_large": (torchvision.models.segmentation.lraspp_mobilenet_v3_large, (3, 32, 32), False),
    "r3d_18": (torchvision.models.video.r3d_18, (3, 4, 32, 32), True),
    "r2plus1d_18": (torchvision.models.video.r2plus1d_18, (3, 4, 32, 32), True),
    "mc3_18": (torchvision.models.video.mc3_18, (3, 4, 32, 32), False),
    "swin3d_t": (torchvision.models.video.swin3d_t, (3, 4, 32, 32), True),
}
SEGMENTATION = {"fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"}


def _build(name: str) -> nn.Module:
    constructor = MODELS[name][0]
    kwargs = {"weights_backbone": None, "aux_loss": False} if name in SEGMENTATION else {}
    if name == "lraspp_mobilenet_v3_large":
        kwargs.pop("aux_loss")
    model = constructor(weights=None, num_classes=10, **kwargs)
    return PixelSum(model) if name in SEGMENTATION else model


@functools.lru_cache(maxsize=1)
def _models(name: str):
    torch.manual_seed(0)
    model = _build(name).double().eval()
    x = torch.randn((2,) + MODELS[name][1], dtype=torch.float64)
    make_meaningful(model, x)
    bias_free = zero_additive_constants(_copy(model))
    return model, bias_free, x


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _params():
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else []) for name, (_, _, slow) in MODELS.items()]


@pytest.mark.parametrize("name", _params())
def test_relevance_is_conserved(name):
    _, model, x = _models(name)
    relevance = LRP(model, rules=TINY_EPSILON).attribute(x, target=TARGETS)
    with torch.no_grad():
        scores = model(x)[torch.arange(len(TARGETS)), TARGETS]
    assert (scores.abs() > 1e-6).all(), f"{name}: degenerate scores {scores.tolist()}; the check would mean nothing"
    assert_conserves(relevance, scores, name)


@pytest.mark.parametrize("name", _params())
def test_original_model_gives_a_finite_input_shaped_map(name):
    model, _, x = _models(name)
    relevance = LRP(model).attribute(x, target=TARGETS)
    assert relevance.shape == x.shape
    assert torch.isfinite(relevance).all(), f"{name}: non-finite relevance"
    assert relevance.abs().sum() > 0
