"""Every torchvision classification family is captured (torch.export), and gets the Grad-CAM target users expect.

Models are built with ``weights=None`` (no downloads) in eval mode and run on
the smallest input that keeps a spatial feature map of at least 2x2 before
global pooling, so the Grad-CAM target is the one of full-size inputs:

* 64x64 for the /32 networks;
* alexnet 96 (at 64 its features end at 1x1 and the adaptive pooling to 6x6
  would upsample);
* inception_v3 128 (>= 75 to run at all, >= 107 for a 2x2 ``Mixed_7c``);
* vit_b_16 is built with ``image_size=64`` (it checks the input size);
* maxvit_t needs 224: its window partitions of 7 need every stage divisible by 7
  and ``maxvit_t`` fixes ``partition_size``.

The expected Grad-CAM targets follow pytorch-grad-cam's recommendations
(``model.layer4[-1]`` for ResNet, ``model.features[-1]`` for VGG, DenseNet,
MobileNet, EfficientNet, ConvNeXt). ``find_cam_target_module`` returns the
innermost module whose output is that tensor (e.g. ``layer4.1.relu`` for
``layer4[-1]``), so each case also names the recommended module, and the test
checks on a real forward pass that both produce the same tensor.

Each model is captured once, with ``captum_graph.prepare(model, (x,))`` at its
small input (the fixture's capture is the cache entry every test reads). The
graph is one of ATen operations in which the model's modules are private
copies (one per call site: ``layer4.1.relu_1`` is the second call of
``layer4.1.relu``) and functional operations are captum_graph modules
(``layer4.1.add``); names, operators and the Grad-CAM target are still the
model's.

``slow``: the models whose tests together take over ~1.5 s on two cores
(building the large ones dominates); they still run in CI.
"""
from collections import Counter
from typing import Any, Callable, Dict, NamedTuple, Optional

import pytest
import torch
import torchvision

import captum_graph
from captum_graph import ModelArchitecture
from captum_graph import modules as M
from captum_graph.prepare import PreparedModel


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _channels_first(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


class Case(NamedTuple):
    size: int
    cam: Optional[str]  # what find_cam_target_module() must name
    recommended: Optional[str]  # pytorch-grad-cam's module; same output tensor as ``cam``
    kwargs: Dict[str, Any] = {}
    slow: bool = False
    # how the recommended module's output becomes the cam module's output
    transform: Callable[[torch.Tensor], torch.Tensor] = _same


NO_AUX = {"aux_logits": False, "init_weights": False}

CASES = {
    "alexnet": Case(96, "features.12", "features.12"),
    "vgg11_bn": Case(64, "features.28", "features.28", slow=True),
    "resnet18": Case(64, "layer4.1.relu", "layer4.1"),
    "resnet50": Case(64, "layer4.2.relu", "layer4.2"),
    "resnext50_32x4d": Case(64, "layer4.2.relu", "layer4.2"),
    "wide_resnet50_2": Case(64, "layer4.2.relu", "layer4.2", slow=True),
    "densenet121": Case(64, "features.norm5", "features.norm5"),
    "googlenet": Case(64, "inception5b", "inception5b", NO_AUX),
    "inception_v3": Case(128, "Mixed_7c", "Mixed_7c", NO_AUX),
    # The last feature map before global pooling is the ReLU after the 1x1
    # classifier conv (a class activation map), not ``features``.
    "squeezenet1_1": Case(64, "classifier.2", "classifier.2"),
    "shufflenet_v2_x0_5": Case(64, "conv5.2", "conv5"),
    "mobilenet_v2": Case(64, "features.18.2", "features.18"),
    "mobilenet_v3_small": Case(64, "features.12.2", "features.12"),
    "mnasnet0_5": Case(64, "layers.16", "layers.16"),
    "efficientnet_b0": Case(64, "features.8.2", "features.8"),
    "efficientnet_v2_s": Case(64, "features.7.2", "features.7", slow=True),
    "regnet_x_400mf": Case(64, "trunk_output.block4.block4-11.activation", "trunk_output"),
    "regnet_y_400mf": Case(64, "trunk_output.block4.block4-5.activation", "trunk_output"),
    "convnext_tiny": Case(64, "features.7.2", "features.7"),
    # Token model: no feature map (the seed API's answer).
    "vit_b_16": Case(64, None, None, {"image_size": 64}, slow=True),
    # Swin ends channels-last: ``norm`` then ``permute`` to (N, C, H, W).
    "swin_t": Case(64, "permute", "norm", transform=_channels_first, slow=True),
    "swin_v2_t": Case(64, "permute", "norm", transform=_channels_first, slow=True),
    "maxvit_t": Case(224, "blocks.3.layers.1.layers.grid_attention.departition_op", "blocks.3", slow=True),
}


def _params():
    return [
        pytest.param(name, id=name, marks=[pytest.mark.slow] if case.slow else [])
        for name, case in CASES.items()
    ]


class Zoo(NamedTuple):
    name: str
    case: Case
    model: torch.nn.Module
    x: torch.Tensor
    output: torch.Tensor
    captured: Dict[str, torch.Tensor]  # last output of the expected and recommended modules
    prepared: PreparedModel  # captum_graph.prepare(model, (x,)), the cache entry every test reads


@pytest.fixture(scope="module", params=_params())
def zoo(request):
    name = request.param
    case = CASES[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **case.kwargs).eval()
    x = torch.randn(1, 3, case.size, case.size)
    captured, handles = {}, []

    def keep(path):
        def hook(module, inputs, output):
            captured[path] = output.detach().clone()  # the last call wins

        return hook

    for path in {case.cam, case.recommended} - {None}:
        handles.append(model.get_submodule(path).register_forward_hook(keep(path)))
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    prepared = captum_graph.prepare(model, (x,))
    return Zoo(name, case, model, x, output, captured, prepared)


@pytest.fixture(scope="module")
def zoo_arch(zoo):
    return ModelArchitecture.from_model(zoo.model, example_inputs=(zoo.x,))


def test_captured_output_equals_model_output(zoo):
    prepared = zoo.prepared
    assert not prepared.path_specific, f"{zoo.name}: captured along one path (draft export)"
    assert captum_graph.prepare(zoo.model, (zoo.x,)) is prepared, f"{zoo.name}: not cached"
    with torch.no_grad():
        captured = prepared.graph_module(zoo.x)
    assert captured.dtype == torch.float32
    assert captured.shape == zoo.output.shape, zoo.name
    difference = (captured - zoo.output).abs().max().item()
    assert torch.allclose(captured, zoo.output, rtol=1e-5, atol=1e-6), f"{zoo.name}: captured output differs by {difference}"


def _module_path(node) -> str:
    """The model's path of the module a call_module node stands for (its target may be a call-site copy)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else node.target


def test_model_architecture_nodes(zoo, zoo_arch):
    nodes = zoo_arch.list_nodes()
    assert nodes[0].opcode == "placeholder" and nodes[-1].opcode == "output", zoo.name
    assert [n.name for n in nodes if n.opcode == "placeholder"] == ["x"], zoo.name
    for node in nodes[:3] + nodes[-3:]:
        assert zoo_arch.get_node(node.name) == node, f"{zoo.name}: get_node({node.name!r})"
        assert zoo_arch.get_node(node.qualname) == node, f"{zoo.name}: get_node({node.qualname!r})"
    by_name = {n.name: n for n in nodes}
    assert len(by_name) == len(nodes), zoo.name
    qualnames = Counter(n.qualname for n in nodes)
    duplicates = sorted(q for q, count in qualnames.items() if count > 1)
    assert not duplicates, f"{zoo.name}: qualified names used by several nodes: {duplicates}"
    # get_node() takes both kinds of name: a qualified name that is another node's
    # fx name would silently resolve to that other node.
    clashes = [(n.name, n.qualname) for n in nodes if by_name.get(n.qualname, n) is not n]
    assert not clashes, f"{zoo.name}: (node, qualified name) naming another node: {clashes}"
    # every call_module node is a module of the model (by its path) or a rewritten ATen operation
    for node in nodes:
        if node.opcode != "call_module":
            continue
        module = zoo.prepared.graph_module.get_submodule(node.target)
        if "replaced" in node.meta:
            assert type(module).__module__ == M.__name__, f"{zoo.name}: {node.qualname} is {type(module)}"
            assert node.meta["replaced"].startswith("aten."), f"{zoo.name}: {node.qualname} replaced {node.meta['replaced']}"
        else:
            own = zoo.model.get_submodule(_module_path(node))
            assert type(module) is type(own), f"{zoo.name}: {node.qualname}: {type(module)} for {type(own)}"
            for (pname, param), (_, original) in zip(module.named_parameters(), own.named_parameters()):
                assert param.data_ptr() == original.data_ptr(), f"{zoo.name}: {node.qualname}.{pname} not shared"
    # modules returning a tensor have a shape (attention returns a tuple: no single shape)
    tensor_modules = [n for n in nodes if n.opcode == "call_module" and not isinstance(n.meta.get("tensor_meta"), tuple)]
    assert all(n.shape is not None for n in tensor_modules), zoo.name


def test_call_module_nodes_are_the_models_modules(zoo, zoo_arch):
    """NodeInfo.operator of a call of one of the model's modules is the model's own module."""
    wrong = [
        n.qualname for n in zoo_arch.list_nodes()
        if n.opcode == "call_module" and "replaced" not in n.meta
        and n.operator is not zoo.model.get_submodule(_module_path(n))
    ]
    assert not wrong, f"{zoo.name}: operator is not the model's module for {wrong[:5]} ({len(wrong)} nodes)"


def test_find_cam_target_module(zoo, zoo_arch):
    found = zoo_arch.find_cam_target_module()
    if zoo.case.cam is None:
        assert found is None, f"{zoo.name}: expected no CAM target, got {found and found[0]}"
        return
    assert found is not None, f"{zoo.name}: no CAM target found"
    name, module = found
    assert name == zoo.case.cam, f"{zoo.name}: CAM target {name!r}, expected {zoo.case.cam!r}"
    got, recommended = zoo.captured[zoo.case.cam], zoo.case.transform(zoo.captured[zoo.case.recommended])
    assert got.dim() == 4 and got.shape[2] * got.shape[3] > 1, f"{zoo.name}: {tuple(got.shape)} is no feature map"
    assert torch.equal(got, recommended), (
        f"{zoo.name}: {zoo.case.cam!r} does not output the same tensor as {zoo.case.recommended!r}"
    )


def test_cam_target_is_the_models_own_module(zoo, zoo_arch):
    found = zoo_arch.find_cam_target_module()
    if zoo.case.cam is None or found is None:
        pytest.skip("no CAM target (test_find_cam_target_module checks that)")
    name, module = found
    assert module is zoo.model.get_submodule(zoo.case.cam), (
        f"{zoo.name}: CAM target {name!r} is {type(module).__name__} {id(module):#x}, not the model's own module"
    )
