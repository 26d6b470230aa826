"""Conservation on the torchvision families beyond plain CNNs (float64).

Gates (squeeze-excitation), layer scale, LayerNorm / LayerNorm2d,
multi-head attention, Swin's shifted-window attention and MaxViT's einsum
attention: with every additive constant zeroed, input relevance sums to the
target logit per example (DESIGN.md oracle 2), within 1e-6 relative. Epsilon
is negligible (1e-15) so the check measures the rules, not the stabiliser.
"""
import functools

import pytest
import torch
import torchvision
from captum.attr._utils.lrp_rules import EpsilonRule

from captum_graph.attr import LRP
from captum_graph.rules import EPSILON_TYPES, assign_rules
from captum_graph import prepare
from helpers.oracles import assert_conserves, make_meaningful, zero_additive_constants

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")

TINY_EPSILON = {EPSILON_TYPES: EpsilonRule(1e-15)}

# name: (input height, input width, constructor keyword arguments, slow)
FAMILIES = {
    "mobilenet_v2": (32, 32, {}, False),
    "mobilenet_v3_small": (32, 32, {}, False),
    "efficientnet_b0": (32, 32, {}, True),
    "efficientnet_v2_s": (32, 32, {}, True),
    "regnet_x_400mf": (32, 32, {}, False),
    "regnet_y_400mf": (32, 32, {}, False),
    "convnext_tiny": (32, 32, {}, True),
    "vit_b_16": (32, 32, {"image_size": 32}, True),
    "swin_t": (64, 64, {}, True),
    "swin_v2_t": (64, 64, {}, True),
    # maxvit_t's layout, with windows of 2 so that a 64x64 input divides into them
    "maxvit_t": (64, 64, {"input_size": (64, 64), "partition_size": 2, "stem_channels": 64,
                          "block_channels": [64, 128, 256, 512], "block_layers": [2, 2, 5, 2],
                          "head_dim": 32, "stochastic_depth_prob": 0.2}, True),
}
TARGETS = [3, 7]


@functools.lru_cache(maxsize=1)
def _bias_free(name: str):
    height, width, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    if name == "maxvit_t":
        model = torchvision.models.maxvit.MaxVit(**kwargs)
    else:
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    make_meaningful(model, x)
    zero_additive_constants(model)
    return model, x


def _params(slow_ones: bool):
    return [
        pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else [])
        for name, (_, _, _, slow) in FAMILIES.items()
    ]


@pytest.mark.parametrize("name", _params(True))
def test_every_node_has_a_rule(name):
    model, x = _bias_free(name)
    problems = [a.problem for a in assign_rules(prepare(model, (x,)).graph_module) if a.problem]
    assert not problems, f"{name}: {len(problems)} unsupported nodes, first: {problems[:1]}"


@pytest.mark.parametrize("name", _params(True))
def test_relevance_is_conserved(name):
    model, x = _bias_free(name)
    relevance = LRP(model, rules=TINY_EPSILON).attribute(x, target=TARGETS)
    assert torch.isfinite(relevance).all(), f"{name}: non-finite relevance"
    with torch.no_grad():
        logits = model(x)[torch.arange(len(TARGETS)), TARGETS]
    assert (logits.abs() > 1e-6).all(), f"{name}: degenerate logits {logits.tolist()}; the check would mean nothing"
    assert_conserves(relevance, logits, name)
