"""LRP on one small model of every timm model module (float64).

The table is :mod:`timm_models` (next to this file): for every module of
``timm.models`` that registers models, its smallest model, shrunk by keyword
arguments, at the smallest input it takes. Two checks per entry:

* on the model as built (biases and all), LRP with the default rules gives a
  finite map shaped like the input, ``LayerGradCam(model)`` picks a layer and
  gives a spatial map, and the model is left untouched;
* conservation (DESIGN.md oracle 2): with every additive constant zeroed, the
  input relevance sums to the target logit per example within 1e-6 relative.
  Epsilon is negligible (1e-15) so the check measures the rules, not the
  stabiliser. Entries whose code adds literal constants are listed, with the
  reason, in ``NO_CONSERVATION``.

The constants are zeroed in place on the same model, so both checks share one
captured graph (it shares the model's storage).

And two bookkeeping checks: every timm model module has an entry or a reason
in ``EXCLUDED`` (so a new timm module is noticed), and every entry names a
model of its own module.

All but the entries in ``FAST`` are marked slow.
"""
import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: E402

from captum_graph import UnsupportedOperationError  # noqa: E402
from captum_graph.attr import LRP, LayerGradCam  # noqa: E402
from captum_graph.rules import EPSILON_TYPES  # noqa: E402
from helpers.oracles import assert_conserves, make_meaningful  # noqa: E402
from timm_models import (  # noqa: E402
    EXCLUDED,
    FAST,
    NO_CONSERVATION,
    UNSUPPORTED,
    TIMM_MODELS,
    build,
    timm_model_modules,
    zero_timm_additive_constants,
)

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")

TINY_EPSILON = {EPSILON_TYPES: EpsilonRule(1e-15)}
TARGETS = [3, 7]


def _params():
    return [
        pytest.param(module, id=module, marks=[] if module in FAST else [pytest.mark.slow])
        for module in TIMM_MODELS
    ]


@pytest.mark.parametrize("module", _params())
def test_lrp_and_gradcam(module, assert_untouched):
    """On the model as built: a finite LRP map and an automatic Grad-CAM map; then, with its
    additive constants zeroed in place (the captured graph shares the storage and is reused),
    conservation."""
    model, x = build(module)
    if module in UNSUPPORTED:
        operation, _ = UNSUPPORTED[module]
        with assert_untouched(model, x), pytest.raises(UnsupportedOperationError, match=operation):
            LRP(model).attribute(x, target=TARGETS)
        return
    with assert_untouched(model, x):
        relevance = LRP(model).attribute(x, target=TARGETS)
        cam = LayerGradCam(model)
        heatmap = cam.attribute(x, target=TARGETS)
    assert relevance.shape == x.shape, f"{module}: relevance shape {tuple(relevance.shape)} != {tuple(x.shape)}"
    assert torch.isfinite(relevance).all(), f"{module}: non-finite relevance"
    assert relevance.abs().sum() > 0, f"{module}: all-zero relevance"
    assert heatmap.dim() == 4 and heatmap.shape[:2] == (2, 1) and heatmap.shape[2] * heatmap.shape[3] > 1, (
        f"{module}: Grad-CAM at '{cam.layer_name}' gives {tuple(heatmap.shape)}, not a spatial map"
    )
    assert torch.isfinite(heatmap).all(), f"{module}: non-finite Grad-CAM map at '{cam.layer_name}'"
    if module in NO_CONSERVATION:
        return
    zero_timm_additive_constants(model)
    with torch.no_grad():
        at_zero = model(torch.zeros_like(x))
        logits = model(x)[torch.arange(len(TARGETS)), TARGETS]
    # the oracle's own premise: a model without additive constants maps 0 to 0
    assert float(at_zero.abs().max()) <= 1e-9 * float(logits.abs().max()), (
        f"{module}: the bias-free copy still adds a constant (max |model(0)| {float(at_zero.abs().max()):.3e}); "
        f"name it in timm_models.TIMM_ADDITIVE_CONSTANT_NAMES"
    )
    assert (logits.abs() > 1e-6).all(), f"{module}: degenerate logits {logits.tolist()}; the check would mean nothing"
    relevance = LRP(model, rules=TINY_EPSILON).attribute(x, target=TARGETS)
    assert torch.isfinite(relevance).all(), f"{module}: non-finite relevance"
    assert_conserves(relevance, logits, module)


def _mixer(**kwargs):
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=(32, 48), patch_size=8, num_blocks=2, embed_dim=32, **kwargs)


def _resmlp():
    from timm.models.mlp_mixer import Affine, ResBlock

    return _mixer(mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)


_TINY_LINEAR_PATCH = {"num_classes": 10, "depth": 2, "embed_dim": 64, "num_heads": 2}
#: name -> (model on a 32x48 image, its module whose output holds the automatic layer's tokens, grid (h, w))
TOKEN_GRIDS = {
    "mixer": (_mixer, "norm", (4, 6)),
    "resmlp": (_resmlp, "norm", (4, 6)),
    "vit with dynamic_img_size": (
        lambda: timm.create_model("test_vit", num_classes=10, img_size=32, depth=2, dynamic_img_size=True),
        "blocks.1.norm1", (2, 3),
    ),
    # patches embedded by a linear layer on reshaped pixels: the grid comes from the reshape
    "naflexvit": (
        lambda: timm.create_model("naflexvit_base_patch16_parfac_gap", img_size=(32, 48), **_TINY_LINEAR_PATCH),
        "norm", (2, 3),
    ),
    "gemma4_vit": (
        lambda: timm.create_model("gemma4_vit_167m", img_size=(32, 48), head_dim=32, intermediate_size=128,
                                  **_TINY_LINEAR_PATCH),
        "encoder.blocks.1", (2, 3),
    ),
}


def _grad_cam_by_hand(model, module_path, x, grid):
    """Grad-CAM on the patch tokens (the last h*w) of a module's output, read row by row as an h x w grid."""
    store = {}
    handle = model.get_submodule(module_path).register_forward_hook(lambda m, args, output: store.update(tokens=output))
    try:
        output = model(x)
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(output[torch.arange(len(TARGETS)), TARGETS].sum(), store["tokens"])
    h, w = grid
    tokens, grads = store["tokens"][:, -h * w :], grads[:, -h * w :]
    return (grads.mean(1, keepdim=True) * tokens).sum(-1).reshape(len(x), 1, h, w).detach()


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[] if name == "mixer" else [pytest.mark.slow]) for name in TOKEN_GRIDS]
)
def test_automatic_gradcam_reads_the_token_grid(name, assert_untouched):
    """Token models with a non-square 4x6 or 2x3 grid of patches: Mixer, ResMLP, a ViT, and models whose
    patches are embedded by a linear layer. The automatic layer's map equals Grad-CAM computed by hand on
    the tokens read row by row (a transposed or misread grid would differ)."""
    make, module_path, grid = TOKEN_GRIDS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    model = make_meaningful(make(), x)
    cam = LayerGradCam(model)
    with assert_untouched(model, x):
        found = cam.attribute(x, target=TARGETS)
    assert found.shape == (2, 1) + grid, f"{name}: {tuple(found.shape)} at '{cam.layer_name}'"
    expected = _grad_cam_by_hand(model, module_path, x, grid)
    assert expected.abs().max() > 0
    torch.testing.assert_close(found, expected, rtol=1e-7, atol=1e-10 * float(expected.abs().max()))


def test_every_timm_model_module_has_an_entry_or_a_reason():
    modules = timm_model_modules()
    both = set(TIMM_MODELS) & set(EXCLUDED)
    assert not both, f"in both TIMM_MODELS and EXCLUDED: {sorted(both)}"
    new = modules - set(TIMM_MODELS) - set(EXCLUDED)
    assert not new, (
        f"timm {timm.__version__} has model modules the zoo does not know: {sorted(new)}; add each to "
        f"timm_models.TIMM_MODELS (its smallest model and input) or to timm_models.EXCLUDED (with the reason)"
    )
    gone = (set(TIMM_MODELS) | set(EXCLUDED)) - modules
    assert not gone, f"timm {timm.__version__} no longer has the model modules {sorted(gone)}"


def test_every_exclusion_names_a_reason():
    unsupported = {module: reason for module, (_, reason) in UNSUPPORTED.items()}
    tables = (("EXCLUDED", EXCLUDED), ("NO_CONSERVATION", NO_CONSERVATION), ("UNSUPPORTED", unsupported))
    for table_name, table in tables:
        for module, reason in table.items():
            assert isinstance(reason, str) and len(reason.split()) >= 3, (
                f"{table_name}[{module!r}] needs a concrete reason, got {reason!r}"
            )
    for table_name, table in tables[1:]:
        assert set(table) <= set(TIMM_MODELS), f"{table_name}: {sorted(set(table) - set(TIMM_MODELS))}"
    assert FAST <= set(TIMM_MODELS), sorted(FAST - set(TIMM_MODELS))


def test_every_entry_is_a_model_of_its_module():
    for module, (name, kwargs, (height, width)) in TIMM_MODELS.items():
        assert name in timm.list_models(module=module), f"{module}: {name} is not one of its models"
        assert isinstance(kwargs, dict) and height > 0 and width > 0, module
