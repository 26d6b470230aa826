"""Layer methods on graph nodes: automatic Grad-CAM, token grids, functional targets, errors."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum import attr as captum_attr
from torch import nn

from captum_graph import ActivationExtractor, LayerResolutionError, ModelArchitecture
from captum_graph import attr as graph_attr
from helpers.oracles import assert_untouched as untouched

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")

# family: (builder, pytorch-grad-cam's recommended layer, input size)
RECOMMENDED = {
    "resnet18": (lambda: torchvision.models.resnet18(), lambda m: m.layer4[-1], 64),
    "vgg11": (lambda: torchvision.models.vgg11(), lambda m: m.features[-1], 64),
    "densenet121": (lambda: torchvision.models.densenet121(), lambda m: m.features[-1], 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), lambda m: m.features[-1], 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), lambda m: m.features[-1], 64),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), lambda m: m.features[-1], 64),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(), lambda m: m.trunk_output, 64),
    "mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(), lambda m: m.layers[-1], 64),
}


def _redraw_heads(model: nn.Module) -> nn.Module:
    """Zero-initialised heads make every gradient zero; redraw them so the check means something."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("family", sorted(RECOMMENDED))
def test_automatic_gradcam_equals_captum_on_the_recommended_layer(family):
    build, recommended, size = RECOMMENDED[family]
    torch.manual_seed(0)
    model = _redraw_heads(build())
    x = torch.randn(2, 3, size, size)
    with untouched(model, x):
        cam = graph_attr.LayerGradCam(model)
        ours = cam.attribute(x, target=[1, 2])
    theirs = captum_attr.LayerGradCam(model, recommended(model)).attribute(x, target=[1, 2])
    assert ours.shape == theirs.shape, f"{family}: {ours.shape} vs {theirs.shape}"
    assert theirs.abs().sum() > 0, f"{family}: degenerate reference"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=lambda m: f"{family} ({cam.layer_name}): {m}")
    assert cam.layer_name in repr(cam)


def _vit_reference(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM by hand on the last block's first LayerNorm, tokens reshaped to their grid."""
    store = {}
    norm = model.encoder.layers[-1].ln_1

    def keep(module, inputs, output):
        output.retain_grad()
        store["tokens"] = output

    handle = norm.register_forward_hook(keep)
    try:
        model(x)[:, target].sum().backward()
    finally:
        handle.remove()
    tokens, grads = store["tokens"][:, 1:], store["tokens"].grad[:, 1:]
    side = int(tokens.shape[1] ** 0.5)
    weights = grads.mean(1, keepdim=True)
    cam = (weights * tokens).sum(-1).reshape(x.shape[0], 1, side, -1)
    return F.relu(cam).detach()


def test_vit_gradcam_picks_the_last_attention_input_and_returns_the_token_grid():
    torch.manual_seed(0)
    model = _redraw_heads(torchvision.models.vit_b_16(image_size=64))
    x = torch.randn(2, 3, 64, 64)
    cam = graph_attr.LayerGradCam(model)
    ours = cam.attribute(x, target=1, relu_attributions=True)
    assert cam.layer_name == "encoder.layers.encoder_layer_11.ln_1"
    assert ours.shape == (2, 1, 4, 4)
    torch.testing.assert_close(ours, _vit_reference(model, x, 1), rtol=1e-4, atol=1e-6)


class _TinyViT(nn.Module):
    """Patch embedding, class token, one attention block; any input size (no fixed grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        grid = self.embed(x)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), grid.flatten(2).transpose(1, 2)], dim=1)
        normed = self.norm(tokens)
        mixed = tokens + self.attn(normed, normed, normed, need_weights=False)[0]
        return self.head(mixed[:, 0])


def test_token_grid_is_inferred_at_run_time_for_non_square_inputs():
    torch.manual_seed(0)
    model = _TinyViT().eval()
    cam = graph_attr.LayerGradCam(model)
    for height, width in [(32, 32), (32, 20)]:
        x = torch.randn(2, 3, height, width)
        assert cam.attribute(x, target=0).shape == (2, 1, height // 4, width // 4)
        assert cam.layer_name == "norm"


@pytest.mark.parametrize("height, width", [(224, 224), (224, 160)])
def test_swin_gradcam_is_a_spatial_map(height, width):
    torch.manual_seed(0)
    model = _redraw_heads(torchvision.models.swin_t())
    x = torch.randn(1, 3, height, width)
    cam = graph_attr.LayerGradCam(model)
    ours = cam.attribute(x, target=1)
    assert ours.shape == (1, 1, height // 32, width // 32)
    # the reference: Captum's Grad-CAM on torchvision's own NHWC -> NCHW permute
    theirs = captum_attr.LayerGradCam(model, model.permute).attribute(x, target=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


class _Residual(nn.Module):
    """A functional residual addition, a concatenation and a global mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a = self.conv(x)
        b = self.side(x)
        s = a + b
        c = torch.cat([s, b], dim=1)
        return self.fc(c.mean((2, 3)))


class _ResidualAsModules(nn.Module):
    """The same network with the functional operations as modules: the reference."""

    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    class Cat(nn.Module):
        def forward(self, a, b):
            return torch.cat([a, b], dim=1)

    class Mean(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    def __init__(self, source: _Residual) -> None:
        super().__init__()
        self.conv, self.side, self.fc = source.conv, source.side, source.fc
        self.add, self.cat, self.mean = self.Add(), self.Cat(), self.Mean()

    def forward(self, x):
        a = self.conv(x)
        b = self.side(x)
        return self.fc(self.mean(self.cat(self.add(a, b), b)))


LAYER_METHODS = {
    "LayerGradCam": dict(),
    "LayerActivation": dict(),
    "LayerGradientXActivation": dict(),
    "LayerIntegratedGradients": dict(n_steps=8),
    "LayerConductance": dict(n_steps=8),
    "LayerDeepLift": dict(),
}


# Grad-CAM needs a feature map, and the mean is a vector
NODE_TARGETS = [
    (method, node) for method in sorted(LAYER_METHODS) for node in ["add", "cat", "mean"]
    if (method, node) != ("LayerGradCam", "mean")
]


@pytest.mark.parametrize("method, node", NODE_TARGETS)
def test_functional_nodes_are_targets_for_every_layer_method(method, node):
    torch.manual_seed(0)
    model = _Residual().eval()
    reference = _ResidualAsModules(model).eval()
    x = torch.randn(2, 3, 6, 6)
    kwargs = LAYER_METHODS[method]
    if method == "LayerActivation":
        call = dict()
    else:
        call = dict(target=1, **kwargs)
    with untouched(model, x):
        ours = getattr(graph_attr, method)(model, node).attribute(x, **call)
    theirs = getattr(captum_attr, method)(reference, getattr(reference, node)).attribute(x, **call)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=lambda m: f"{method} on {node}: {m}")


def test_guided_gradcam_on_a_functional_node():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    ours = graph_attr.GuidedGradCam(model, "add").attribute(x, target=1)
    reference = _ResidualAsModules(model).eval()
    theirs = captum_attr.GuidedGradCam(reference, reference.add).attribute(x, target=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_resnet_addition_node_by_qualified_and_fx_name():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    by_qualname = graph_attr.LayerActivation(model, "layer4.1.add").attribute(x)
    by_fx_name = graph_attr.LayerActivation(model, "add_7").attribute(x)
    torch.testing.assert_close(by_qualname, by_fx_name)
    assert by_qualname.shape == (1, 512, 2, 2)


def test_a_module_called_twice_behaves_as_in_captum_and_each_call_has_a_name():
    """A module (or its name) runs Captum's own code: its hooks fire at both calls, Captum keeps the last."""
    torch.manual_seed(0)
    model = _redraw_heads(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    relu = model.layer1[0].relu
    theirs = captum_attr.LayerGradCam(model, relu).attribute(x, target=0)
    for layer in (relu, "layer1.0.relu"):
        with untouched(model, x):
            cam = graph_attr.LayerGradCam(model, layer)
            assert torch.equal(cam.attribute(x, target=0), theirs)
        assert cam.layer_name == "layer1.0.relu"
    # each call by its own name, on the graph; the second call is what Captum keeps
    second = graph_attr.LayerGradCam(model, "layer1.0.relu_1")
    torch.testing.assert_close(second.attribute(x, target=0), theirs, rtol=1e-4, atol=1e-6)
    assert second.layer_name == "layer1.0.relu_1"
    first = graph_attr.LayerGradCam(model, "layer1_0_relu").attribute(x, target=0)
    assert first.shape == (1, 1, 8, 8) and not torch.equal(first, theirs)
    # LRP has one rule per call: the module's name is ambiguous there, and the error lists the calls
    with pytest.raises(LayerResolutionError, match=r"called at 2 places.*'layer1_0_relu'.*'layer1.0.relu_1'"):
        graph_attr.LayerLRP(model, relu).attribute(x, target=0)


def test_the_first_call_of_a_top_level_module_called_twice_is_named_with_its_index():
    model = _Twice().eval()
    x = torch.randn(2, 3)
    with pytest.raises(LayerResolutionError, match=r"name the call you mean: 'lin#0', 'lin_1'"):
        graph_attr.LayerLRP(model, "lin").attribute(x, target=0)
    first = graph_attr.LayerActivation(model, "lin#0").attribute(x)
    torch.testing.assert_close(first, model.lin(x))
    second = graph_attr.LayerActivation(model, "lin_1").attribute(x)
    torch.testing.assert_close(second, model.lin(torch.relu(model.lin(x))))


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_unknown_names_suggest_close_ones():
    model = torchvision.models.resnet18().eval()
    with pytest.raises(LayerResolutionError, match=r"no module or node named 'layer4.1.ad'.*'layer4.1.add'"):
        graph_attr.LayerGradCam(model, "layer4.1.ad").attribute(torch.randn(1, 3, 32, 32), target=0)
    with pytest.raises(LayerResolutionError, match="not a submodule"):  # needs no graph: at construction
        graph_attr.LayerGradCam(model, nn.ReLU())


def test_activation_extractor_returns_output_and_activations_in_one_pass():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    calls = []
    handle = model.conv.register_forward_hook(lambda *args: calls.append(1))
    try:
        with untouched(model):
            extractor = ActivationExtractor(model, ["conv", "add", model.side])
            output, activations = extractor(x)
    finally:
        handle.remove()
    assert not calls, "the extractor runs the graph's private copies, not the user's modules"
    torch.testing.assert_close(output, model(x))
    torch.testing.assert_close(activations["add"], model.conv(x) + model.side(x))
    assert set(activations) == {"conv", "add", "side"}
    with pytest.raises(ValueError, match="more than once: add"):
        ActivationExtractor(model, ["add", "add"])
    with pytest.raises(LayerResolutionError, match="Did you mean"):  # names resolve on the captured graph
        ActivationExtractor(model, ["ad"])(x)


def test_branches_of_residual_additions():
    architecture = ModelArchitecture.from_model(torchvision.models.resnet18())
    branch, skip = architecture.branches("layer2.0.add")
    assert [n.qualname for n in branch] == [
        "layer2.0.conv1", "layer2.0.bn1", "layer2.0.relu", "layer2.0.conv2", "layer2.0.bn2",
    ]
    assert [n.qualname for n in skip] == ["layer2.0.downsample.0", "layer2.0.downsample.1"]
    assert architecture.branches("layer1.0.add")[1] == []  # identity skip


@pytest.mark.slow
def test_vit_b_16_at_224_gives_a_14_by_14_map():
    torch.manual_seed(0)
    model = _redraw_heads(torchvision.models.vit_b_16())
    x = torch.randn(1, 3, 224, 224)
    cam = graph_attr.LayerGradCam(model)
    ours = cam.attribute(x, target=1, relu_attributions=True)
    assert ours.shape == (1, 1, 14, 14)
    torch.testing.assert_close(ours, _vit_reference(model, x, 1), rtol=1e-4, atol=1e-6)


def test_layer_method_after_lrp_at_a_batch_of_one_runs_at_its_own_batch_sizes():
    """LRP captures a batch of one as it is; Integrated Gradients then runs the model at 1 x n_steps."""
    torch.manual_seed(0)
    model = _Residual().double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    graph_attr.LRP(model).attribute(x, target=1)  # a fixed-batch graph for (1, 3, 6, 6)
    ours = graph_attr.LayerIntegratedGradients(model, "add").attribute(x, target=1, n_steps=8)
    reference = _ResidualAsModules(model).eval()
    theirs = captum_attr.LayerIntegratedGradients(reference, reference.add).attribute(x, target=1, n_steps=8)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)


def test_captum_hooks_go_on_a_private_copy_and_the_users_own_hooks_still_fire():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    seen = []

    def users_hook(module, args, output):  # the user's own hook: Captum would run it, so do we
        seen.append(len(model.conv._forward_hooks))

    handle = model.conv.register_forward_hook(users_hook)
    try:
        theirs = captum_attr.LayerGradCam(model, model.conv).attribute(x, target=1)
        seen.clear()
        with untouched(model, x):
            ours = graph_attr.LayerGradCam(model, model.conv).attribute(x, target=1)
    finally:
        handle.remove()
    assert torch.equal(ours, theirs)
    assert seen and set(seen) == {1}, f"the user's module held {seen} hooks during the call: Captum's went on it"


def test_concurrent_calls_on_one_model_do_not_see_each_others_hooks():
    torch.manual_seed(0)
    model = _Residual().eval()
    inputs = [torch.randn(2, 3, 6, 6) for _ in range(4)]
    methods = [
        lambda x: graph_attr.LayerGradCam(model, model.conv).attribute(x, target=1),
        lambda x: graph_attr.LayerIntegratedGradients(model, "side").attribute(x, target=0, n_steps=8),
        lambda x: graph_attr.LayerActivation(model, [model.conv, model.side]).attribute(x),
    ]
    expected = [[method(x) for x in inputs] for method in methods]
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {(m, i, r): pool.submit(methods[m], inputs[i]) for m in range(3) for i in range(4) for r in range(3)}
        for (m, i, _), future in futures.items():
            got = future.result()
            for a, b in zip(got if isinstance(got, list) else [got], expected[m][i] if m == 2 else [expected[m][i]]):
                assert torch.equal(a, b), f"method {m}, input {i}: a concurrent call changed the result"
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_attribution_to_the_inputs_of_a_functional_node():
    """``attribute_to_layer_input`` at ``add``: one attribution per summand, as Captum gives for a module."""
    torch.manual_seed(0)
    model = _Residual().eval()
    reference = _ResidualAsModules(model).eval()
    x = torch.randn(2, 3, 6, 6)
    for method, call in [
        ("LayerActivation", {}),
        ("LayerGradientXActivation", dict(target=1)),
        ("LayerIntegratedGradients", dict(target=1, n_steps=8)),
        ("LayerConductance", dict(target=1, n_steps=8)),
    ]:
        with untouched(model, x):
            ours = getattr(graph_attr, method)(model, "add").attribute(x, attribute_to_layer_input=True, **call)
        theirs = getattr(captum_attr, method)(reference, reference.add).attribute(x, attribute_to_layer_input=True, **call)
        assert isinstance(ours, tuple) and len(ours) == 2, method
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=lambda m: f"{method}: {m}")


def test_a_list_of_node_names_gives_a_list_as_captum_does_for_modules():
    torch.manual_seed(0)
    model = _Residual().eval()
    reference = _ResidualAsModules(model).eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = graph_attr.LayerGradientXActivation(model, ["add", "cat", model.side])
    ours = explainer.attribute(x, target=1)
    theirs = captum_attr.LayerGradientXActivation(reference, [reference.add, reference.cat, reference.side]).attribute(x, target=1)
    assert isinstance(ours, list) and len(ours) == 3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert explainer.layer_name == ["add", "cat", "side"]
    modules = graph_attr.LayerActivation(model, ["conv", "side"])  # modules only: Captum's own code
    assert all(torch.equal(a, b) for a, b in zip(modules.attribute(x), captum_attr.LayerActivation(model, [model.conv, model.side]).attribute(x)))
    assert modules.layer_name == ["conv", "side"]


def test_a_plain_function_as_the_forward_runs_captums_code_as_it_is():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(2, 3, 6, 6)

    def forward(inputs):
        return model(inputs) * 2

    ours = graph_attr.LayerGradCam(forward, model.conv).attribute(x, target=1)
    assert torch.equal(ours, captum_attr.LayerGradCam(forward, model.conv).attribute(x, target=1))
    with pytest.raises(LayerResolutionError, match="needs the model as an nn.Module"):
        graph_attr.LayerGradCam(forward, "conv")


def test_a_layer_that_depends_on_parameters_only_gets_gradients_on_the_working_copy():
    """An embedding of integer ids: its output requires grad through its weight alone (Captum's hooks need that)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    ids = torch.randint(0, 10, (3, 3))
    for method, call in [("LayerGradCam", dict(target=1)), ("LayerIntegratedGradients", dict(target=1, n_steps=5))]:
        with untouched(model):
            ours = getattr(graph_attr, method)(model, model[0]).attribute(ids, **call)
        assert torch.equal(ours, getattr(captum_attr, method)(model, model[0]).attribute(ids, **call)), method
