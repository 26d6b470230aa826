"""The two oracles of DESIGN.md section 3 on torchvision classifiers (float64).

* Gradient x Input: LRP with a negligible epsilon equals
  ``captum.attr.InputXGradient``, biases included, after ``make_meaningful``
  (no zero or tiny weights, calibrated batch norm).
* Conservation: on a copy with every additive constant zeroed, input relevance
  sums to the target output per example.

Inputs are as small as each architecture allows (ResNets, DenseNet, VGG,
GoogLeNet, ShuffleNet, MNASNet: 32x32; AlexNet: 64x64; SqueezeNet: 48x48;
Inception v3: 75x75), with two examples and a target per example. GoogLeNet
and Inception v3 are built without auxiliary heads (not run in eval) and without
``transform_input`` (an additive constant on the input; off for weights=None).
"""
import copy
import functools

import pytest
import torch
import torchvision
from captum_graph.attr import LRP
from helpers.oracles import (
    NEGLIGIBLE_EPSILON,
    assert_conserves,
    assert_matches_input_x_gradient,
    input_x_gradient,
    make_meaningful,
    zero_additive_constants,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Input Tensor .* did not already require gradients",
    "ignore:The default weight initialization of inception_v3",
    "ignore:The default weight initialization of GoogleNet",
)

# name: (input size, constructor keyword arguments, slow)
ZOO = {
    "resnet18": (32, {}, False),
    "resnet50": (32, {}, True),
    "resnext50_32x4d": (32, {}, True),
    "wide_resnet50_2": (32, {}, True),
    "densenet121": (32, {}, True),
    "googlenet": (32, {"aux_logits": False, "transform_input": False, "init_weights": True}, False),
    "inception_v3": (75, {"aux_logits": False, "transform_input": False, "init_weights": True}, True),
    "vgg11_bn": (32, {}, True),
    "alexnet": (64, {}, True),
    "squeezenet1_1": (48, {}, False),
    "shufflenet_v2_x0_5": (32, {}, False),
    "mnasnet0_5": (32, {}, False),
}
TARGETS = [3, 7]


@functools.lru_cache(maxsize=1)
def _zoo_model(name: str):
    """The meaningful float64 model and an input batch (cached for the next oracle)."""
    size, kwargs, _ = ZOO[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    x = torch.randn(len(TARGETS), 3, size, size, dtype=torch.float64)
    make_meaningful(model, x)
    return model, x


def _params():
    for name, (_, _, slow) in ZOO.items():
        yield pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else [])


# "oracle" varies fastest, so both oracles of one architecture run back to back
@pytest.mark.parametrize("oracle", ["input_x_gradient", "conservation"])
@pytest.mark.parametrize("name", list(_params()))
def test_zoo_oracle(name, oracle):
    model, x = _zoo_model(name)
    if oracle == "input_x_gradient":
        relevance = LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=TARGETS)
        expected = input_x_gradient(model, x, target=TARGETS)
        assert float(expected.abs().max()) > 0, f"{name}: Gradient x Input is zero; the oracle would be vacuous"
        assert_matches_input_x_gradient(relevance, expected, name, rtol=1e-5, atol_factor=1e-9)
    else:
        bias_free = zero_additive_constants(copy.deepcopy(model))
        relevance, delta = LRP(bias_free, rules=NEGLIGIBLE_EPSILON).attribute(
            x, target=TARGETS, return_convergence_delta=True
        )
        with torch.no_grad():
            output = bias_free(x)[torch.arange(len(TARGETS)), TARGETS]
        assert_conserves(relevance, output, name, rtol=1e-6)
        assert delta.shape == (len(TARGETS),)
