"""The README's coverage matrix: conservation and cost of LRP on every torchvision family.

For each family (random weights made meaningful as in the tests, float64,
every additive constant zeroed, epsilon 1e-15) prints the largest relative
conservation error over the examples of captum_graph's LRP, the same figure
for plain ``captum.attr.LRP`` (its default epsilon 1e-9, or the error it
raises), and the time of captum_graph's LRP over the time of captum's
InputXGradient on the same small input (the two measured alternately, median
of the repeats; ``benchmarks/run.py`` measures speed at full size). Run:

    .venv/bin/python benchmarks/coverage.py            # markdown table on stdout
    .venv/bin/python benchmarks/coverage.py --timm     # one model per timm module (tests/zoo/timm_models.py)
    .venv/bin/python benchmarks/coverage.py --timm --models naflexvit gemma4_vit   # only these rows
"""
import argparse
import os
import copy
import statistics
import sys
import time
import warnings

import torch
import torchvision
from captum.attr import LRP as CaptumLRP
from captum.attr import InputXGradient
from captum.attr._utils.lrp_rules import EpsilonRule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "zoo"))
from helpers.oracles import make_meaningful, zero_additive_constants  # noqa: E402

from captum_graph.attr import LRP  # noqa: E402
from captum_graph.rules import EPSILON_TYPES  # noqa: E402

# name: (input size, constructor keyword arguments)
FAMILIES = {
    "alexnet": (64, {}),
    "vgg11_bn": (32, {}),
    "resnet18": (32, {}),
    "resnet50": (32, {}),
    "resnext50_32x4d": (32, {}),
    "wide_resnet50_2": (32, {}),
    "densenet121": (32, {}),
    "googlenet": (32, {"aux_logits": False, "transform_input": False, "init_weights": True}),
    "inception_v3": (75, {"aux_logits": False, "transform_input": False, "init_weights": True}),
    "squeezenet1_1": (48, {}),
    "shufflenet_v2_x0_5": (32, {}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "mnasnet0_5": (32, {}),
    "efficientnet_b0": (32, {}),
    "efficientnet_v2_s": (32, {}),
    "regnet_x_400mf": (32, {}),
    "regnet_y_400mf": (32, {}),
    "convnext_tiny": (32, {}),
    "vit_b_16": (32, {"image_size": 32}),
    "swin_t": (64, {}),
    "swin_v2_t": (64, {}),
    "maxvit_t": (224, {}),
}


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _time_ratio(numerator, denominator, repeats: int) -> float:
    """Median time of ``numerator()`` over that of ``denominator()``, run alternately after a warm-up."""
    numerator(), denominator()
    pairs = [(_seconds(numerator), _seconds(denominator)) for _ in range(repeats)]
    return statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)


def _relative_error(relevance, logits) -> float:
    return ((relevance.flatten(1).sum(1) - logits).abs() / logits.abs()).max().item()


def _captum_outcome(model, x, targets, logits) -> str:
    """Plain Captum LRP on a copy (it leaves rules on the modules): its error, or why it fails."""
    try:
        relevance = CaptumLRP(copy.deepcopy(model)).attribute(x, target=targets)
    except Exception as failure:
        return f"fails: {type(failure).__name__}"
    return f"{_relative_error(relevance, logits):.1e}"


def measure(name: str, repeats: int):
    size, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    zero_additive_constants(make_meaningful(model, x))
    targets = [3, 7]
    lrp = LRP(model, rules={EPSILON_TYPES: EpsilonRule(1e-15)})
    relevance = lrp.attribute(x, target=targets)
    with torch.no_grad():
        logits = model(x)[torch.arange(2), targets]
    ratio = _time_ratio(
        lambda: lrp.attribute(x, target=targets), lambda: InputXGradient(model).attribute(x, target=targets), repeats
    )
    return size, _relative_error(relevance, logits), _captum_outcome(model, x, targets, logits), ratio


def measure_timm(module: str) -> str:
    """One markdown row: the timm entry's conservation error, Grad-CAM layer, or what refuses it."""
    from captum_graph.attr import LayerGradCam
    from timm_models import NO_CONSERVATION, TIMM_MODELS, UNSUPPORTED, build, zero_timm_additive_constants

    name, _, (height, width) = TIMM_MODELS[module]
    row = f"| {module} | {name} | {height}x{width} |"
    model, x = build(module)
    targets = [3, 7]
    try:
        LRP(model).attribute(x, target=targets)
    except Exception as failure:
        reason = UNSUPPORTED.get(module, ("", "unexpected"))[1]
        return f"{row} refused: {type(failure).__name__} ({reason}) | - |"
    cam = LayerGradCam(model)
    cam.attribute(x, target=targets)
    layer = f"`{cam.layer_name}`"
    if module in NO_CONSERVATION:
        return f"{row} n/a: {NO_CONSERVATION[module].split(':')[0]} | {layer} |"
    zero_timm_additive_constants(model)
    relevance = LRP(model, rules={EPSILON_TYPES: EpsilonRule(1e-15)}).attribute(x, target=targets)
    with torch.no_grad():
        logits = model(x)[torch.arange(2), targets]
    return f"{row} {_relative_error(relevance, logits):.1e} | {layer} |"


def main_timm(modules=None) -> None:
    import timm
    from timm_models import TIMM_MODELS

    print(f"timm {timm.__version__}, torch {torch.__version__}; batch 2, float64, epsilon 1e-15\n")
    print("| timm module | model | input | max relative conservation error | automatic Grad-CAM layer |")
    print("|---|---|---|---|---|")
    for module in sorted(modules or TIMM_MODELS):
        try:
            print(measure_timm(module), flush=True)
        except Exception as failure:  # a row per model, whatever happens
            print(f"| {module} | - | - | failed: {type(failure).__name__}: {str(failure).splitlines()[0][:80]} | - |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="torchvision families, or timm modules with --timm")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timm", action="store_true", help="one model per timm module instead")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.timm:
        main_timm(args.models)
        return
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; batch 2, float64\n")
    print("| model | input | captum_graph LRP: max relative conservation error | captum.attr.LRP: the same | captum_graph LRP time / InputXGradient time |")
    print("|---|---|---|---|---|")
    for name in args.models or FAMILIES:
        try:
            size, error, captum, ratio = measure(name, args.repeats)
            print(f"| {name} | {size}x{size} | {error:.1e} | {captum} | {ratio:.2f} |", flush=True)
        except Exception as failure:  # a row per model, whatever happens
            print(f"| {name} | - | failed: {type(failure).__name__}: {str(failure).splitlines()[0][:80]} | - | - |", flush=True)


if __name__ == "__main__":
    main()
