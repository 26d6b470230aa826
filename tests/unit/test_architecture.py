"""ModelArchitecture / NodeInfo (the seed-000 notebook's API) and captum_graph.filters."""
import operator
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.vision_transformer import VisionTransformer

from captum_graph import ModelArchitecture, NodeInfo
from captum_graph import filters
from captum_graph.filters import (
    activation_filter,
    addition_filter,
    concatenation_filter,
    conv_filter,
    linear_filter,
    module_type_filter,
    norm_filter,
    pooling_filter,
)
from captum_graph.modules import Addition, Concatenate, Stack

# The seed notebook's expectations for torchvision resnet18 ------------------

RESNET18_CONVS = [
    ("conv1", "conv1"),
    ("layer1_0_conv1", "layer1.0.conv1"),
    ("layer1_0_conv2", "layer1.0.conv2"),
    ("layer1_1_conv1", "layer1.1.conv1"),
    ("layer1_1_conv2", "layer1.1.conv2"),
    ("layer2_0_conv1", "layer2.0.conv1"),
    ("layer2_0_conv2", "layer2.0.conv2"),
    ("layer2_0_downsample_0", "layer2.0.downsample.0"),
    ("layer2_1_conv1", "layer2.1.conv1"),
    ("layer2_1_conv2", "layer2.1.conv2"),
    ("layer3_0_conv1", "layer3.0.conv1"),
    ("layer3_0_conv2", "layer3.0.conv2"),
    ("layer3_0_downsample_0", "layer3.0.downsample.0"),
    ("layer3_1_conv1", "layer3.1.conv1"),
    ("layer3_1_conv2", "layer3.1.conv2"),
    ("layer4_0_conv1", "layer4.0.conv1"),
    ("layer4_0_conv2", "layer4.0.conv2"),
    ("layer4_0_downsample_0", "layer4.0.downsample.0"),
    ("layer4_1_conv1", "layer4.1.conv1"),
    ("layer4_1_conv2", "layer4.1.conv2"),
]

RESNET18_TWO_USERS = [
    ("maxpool", "maxpool"),
    ("layer1_0_relu_1", "layer1.0.relu"),
    ("layer1_1_relu_1", "layer1.1.relu"),
    ("layer2_0_relu_1", "layer2.0.relu"),
    ("layer2_1_relu_1", "layer2.1.relu"),
    ("layer3_0_relu_1", "layer3.0.relu"),
    ("layer3_1_relu_1", "layer3.1.relu"),
    ("layer4_0_relu_1", "layer4.0.relu"),
]


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def arch(resnet):
    # As in the seed: no example inputs, so the CAM target uses default shape inference.
    return ModelArchitecture.from_model(resnet)


def _rows(nodes):
    return [(n.opcode, n.name, n.target) for n in nodes]


def _names(nodes):
    return [n.name for n in nodes]


def test_list_nodes_starts_like_the_seed(arch):
    first = arch.list_nodes()[:5]
    assert _rows(first) == [
        ("placeholder", "x", "x"),
        ("call_module", "conv1", "conv1"),
        ("call_module", "bn1", "bn1"),
        ("call_module", "relu", "relu"),
        ("call_module", "maxpool", "maxpool"),
    ]
    assert all(type(n) is NodeInfo for n in first)
    assert repr(first[0]) == "NodeInfo(opcode='placeholder', name='x', target='x')"
    assert repr(first[1]) == "NodeInfo(opcode='call_module', name='conv1', target='conv1')"


def test_list_nodes_is_the_graph_in_execution_order(arch):
    nodes = arch.list_nodes()
    assert [n._node for n in nodes] == list(arch.graph.nodes)
    assert nodes[-1].opcode == "output"


def test_get_node_by_fx_name(arch, resnet):
    node = arch.get_node(name="conv1")
    assert repr(node) == "NodeInfo(opcode='call_module', name='conv1', target='conv1')"
    assert type(node._node) is fx.Node
    assert node._node.name == "conv1"
    assert node == arch.list_nodes()[1]
    assert hash(node) == hash(arch.list_nodes()[1])


def test_get_node_by_qualified_name(arch):
    assert arch.get_node("layer4.1.add") == arch.get_node("add_7")
    assert arch.get_node("layer4.1.add").name == "add_7"
    assert arch.get_node("layer1.0.add").name == "add"
    assert arch.get_node("layer1.0.relu_1").name == "layer1_0_relu_1"
    assert arch.get_node("layer2.0.downsample.0").name == "layer2_0_downsample_0"


def test_get_node_typo_suggests_close_names(arch):
    with pytest.raises(KeyError, match=r"no node named 'layer4\.1\.ad'.*Did you mean: 'layer4\.1\.add'"):
        arch.get_node("layer4.1.ad")
    with pytest.raises(KeyError, match=r"Did you mean: 'conv1'"):
        arch.get_node("convv1")


def test_get_node_unknown_name_without_close_match(arch):
    with pytest.raises(KeyError, match=r"no node named 'zzzzzzzz'") as caught:
        arch.get_node("zzzzzzzz")
    assert "Did you mean" not in str(caught.value)


def test_find_node_first_conv(arch):
    assert _rows([arch.find_node(conv_filter)]) == [("call_module", "conv1", "conv1")]


def test_find_node_all_convs_as_in_seed(arch):
    found = arch.find_node(conv_filter, all=True)
    assert isinstance(found, list)
    assert [(n.name, n.target) for n in found] == RESNET18_CONVS
    assert {n.opcode for n in found} == {"call_module"}


def test_find_node_custom_filter_additions(arch):
    found = arch.find_node(lambda n: n.operator is operator.add, all=True)
    assert _rows(found) == [("call_function", name, "operator.add") for name in ["add"] + [f"add_{i}" for i in range(1, 8)]]
    assert [n.qualname for n in found] == [f"layer{i}.{j}.add" for i in range(1, 5) for j in range(2)]


def test_find_node_custom_filter_two_users(arch):
    found = arch.find_node(lambda n: len(n.users) == 2, all=True)
    assert [(n.opcode, n.name, n.target) for n in found] == [("call_module", a, b) for a, b in RESNET18_TWO_USERS]


def test_find_node_custom_filter_pooling_modules(arch):
    pool = lambda n: n.opcode == "call_module" and n.operator.__module__ == "torch.nn.modules.pooling"  # noqa: E731
    assert _names(arch.find_node(pool, all=True)) == ["maxpool", "avgpool"]


def test_find_node_no_match(arch):
    assert arch.find_node(lambda n: False) is None
    assert arch.find_node(lambda n: False, all=True) == []


def test_find_node_from_base_node_searches_downstream_only(arch):
    # layer2.0's downsample comes after layer2_0_conv1 in execution order but is
    # on the skip branch, not downstream of it.
    base = arch.get_node("layer2_0_conv1")
    found = arch.find_node(conv_filter, base_node=base, all=True)
    names = _names(found)
    assert "layer2_0_downsample_0" not in names
    assert "layer2_0_conv1" not in names  # the base itself is excluded
    assert names == [name for name, _ in RESNET18_CONVS[RESNET18_CONVS.index(("layer2_0_conv2", "layer2.0.conv2")):] if name != "layer2_0_downsample_0"]
    assert arch.find_node(conv_filter, base_node=base).name == "layer2_0_conv2"


def test_find_node_from_base_node_downstream_of_a_fork(arch):
    base = arch.get_node("layer3_1_relu_1")  # feeds layer4.0's main branch and its downsample
    assert _names(arch.find_node(conv_filter, base_node=base, all=True)[:3]) == [
        "layer4_0_conv1",
        "layer4_0_conv2",
        "layer4_0_downsample_0",
    ]
    assert arch.find_node(addition_filter, base_node=arch.get_node("add_7")) is None
    assert _names(arch.find_node(addition_filter, base_node=arch.get_node("add_5"), all=True)) == ["add_6", "add_7"]


def test_node_info_fields_of_conv1(arch, resnet):
    node = arch.get_node("conv1")
    assert (node.opcode, node.name, node.target) == ("call_module", "conv1", "conv1")
    assert node.meta["nn_module_stack"] == {"conv1": ("conv1", nn.Conv2d)}
    assert node.meta is node._node.meta
    assert node.args == (arch.get_node("x"),)
    assert repr(node.args) == "(NodeInfo(opcode='placeholder', name='x', target='x'),)"
    assert node.kwargs == {}
    assert node.users == (arch.get_node("bn1"),)
    assert repr(node.users) == "(NodeInfo(opcode='call_module', name='bn1', target='bn1'),)"
    assert node.next == arch.get_node("bn1")
    assert node.prev == arch.get_node("x")
    assert node.to_dict() == {"opcode": "call_module", "name": "conv1", "target": "conv1"}


def test_node_info_users_args_are_node_infos(arch):
    maxpool = arch.get_node("maxpool")
    assert maxpool.users == (arch.get_node("layer1_0_conv1"), arch.get_node("add"))
    add = arch.get_node("add")
    assert add.args == (arch.get_node("layer1_0_bn2"), arch.get_node("maxpool"))
    assert all(type(a) is NodeInfo for a in add.args)


def test_node_info_ends_of_the_graph(arch):
    nodes = arch.list_nodes()
    assert nodes[0].prev is None
    assert nodes[-1].next is None
    assert nodes[-1].users == ()


def test_operator_of_module_node_is_the_models_module(arch, resnet):
    node = arch.get_node("conv1")
    assert node.operator is resnet.conv1
    from_model = resnet
    for part in node.target.split("."):
        from_model = getattr(from_model, part)
    assert from_model is node.operator
    assert arch.get_node("layer2_0_downsample_0").operator is resnet.layer2[0].downsample[0]


def test_owning_module_of_a_module_node(arch, resnet):
    node = arch.get_node("conv1")
    name, module = node.owning_module
    assert name == "conv1" == node.target
    assert module is node.operator is resnet.conv1


def test_owning_module_of_a_function_node(arch, resnet):
    node = arch.get_node("add")
    assert node.target == "operator.add"
    assert node.operator is operator.add
    name, module = node.owning_module
    assert name == "layer1.0"
    assert module is resnet.layer1[0]
    assert type(module) is torchvision.models.resnet.BasicBlock
    assert node.to_dict() == {"opcode": "call_function", "name": "add", "target": "operator.add"}


def test_owning_module_of_top_level_node_is_none():
    class Top(nn.Module):
        def forward(self, x):
            return x + 1

    arch = ModelArchitecture.from_model(Top())
    assert arch.get_node("add").owning_module is None
    assert arch.get_node("x").owning_module is None


def test_find_cam_target_module_on_resnet18(arch, resnet):
    name, module = arch.find_cam_target_module()
    assert name == "layer4.1.relu"
    assert module is resnet.layer4[1].relu
    # The relu's second call (after the addition) is the feature map.
    assert arch.find_cam_target_node().name == "layer4_1_relu_1"


def test_find_cam_target_module_with_small_example_inputs(resnet):
    arch = ModelArchitecture.from_model(resnet, example_inputs=(torch.randn(1, 3, 64, 64),))
    assert arch.get_node("layer4_1_relu_1").shape == torch.Size([1, 512, 2, 2])
    name, module = arch.find_cam_target_module()
    assert name == "layer4.1.relu"
    assert module is resnet.layer4[1].relu


def _tiny_vit(image_size=32):
    return VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()


def test_find_cam_target_module_is_none_for_token_models():
    vit = _tiny_vit()
    arch = ModelArchitecture.from_model(vit, example_inputs=(torch.randn(1, 3, 32, 32),))
    assert arch.find_cam_target_module() is None


def test_find_cam_target_module_default_shapes_use_the_models_image_size():
    # Default shape inference must use the model's own ``image_size`` (torchvision
    # ViT asserts the input size), as shapes.default_example_inputs documents.
    vit = _tiny_vit(image_size=32)
    arch = ModelArchitecture.from_model(vit)
    assert arch.find_cam_target_module() is None


def test_find_cam_target_module_is_none_without_feature_maps():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    arch = ModelArchitecture.from_model(mlp, example_inputs=(torch.randn(1, 4),))
    assert arch.find_cam_target_module() is None


def test_constructor_from_symbolic_trace_graph(resnet):
    traced = fx.symbolic_trace(resnet)
    arch = ModelArchitecture(graph=traced.graph)
    assert _rows(arch.list_nodes()[:2]) == [("placeholder", "x", "x"), ("call_module", "conv1", "conv1")]
    assert arch.get_node("conv1").operator is resnet.conv1  # symbolic_trace shares submodules
    assert arch.get_node("add").owning_module[0] == "layer1.0"
    assert [(n.name, n.target) for n in arch.find_node(conv_filter, all=True)] == RESNET18_CONVS


def test_constructor_with_model_returns_the_models_containers(resnet):
    arch = ModelArchitecture(graph=fx.symbolic_trace(resnet).graph, model=resnet)
    assert arch.get_node("add").owning_module[1] is resnet.layer1[0]


def test_constructor_rejects_a_graph_without_owner():
    with pytest.raises(ValueError, match="must belong to a GraphModule"):
        ModelArchitecture(graph=fx.Graph())


def test_from_model_leaves_the_model_untouched(assert_untouched):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
    model.train()
    model[1].eval()
    running_mean = model[1].running_mean.clone()
    with assert_untouched(model):
        arch = ModelArchitecture.from_model(model, example_inputs=(torch.randn(2, 3, 8, 8),))
        assert arch.find_cam_target_module() == ("2", model[2])
        ModelArchitecture.from_model(model).find_cam_target_module()  # default 224x224 shapes
    assert torch.equal(model[1].running_mean, running_mean)
    assert model.training and model[0].training and not model[1].training


# captum_graph.filters --------------------------------------------------------


class KitchenSink(nn.Module):
    """Every spelling of each operation kind that fx records from a forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln2d = LayerNorm2d(4)
        self.relu = nn.ReLU()
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout()
        self.maxpool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.add = Addition()
        self.cat = Concatenate(dim=1)
        self.stack = Stack(dim=1)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.kernel = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.weight = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        x = self.conv(x)
        x = F.conv2d(x, self.kernel)
        x = self.deconv(x)
        x = self.bn(x)
        x = self.inorm(x)
        x = self.gn(x)
        x = self.ln2d(x)
        x = F.group_norm(x, 2)
        x = self.relu(x)
        x = F.relu(x)
        x = torch.relu(x)
        x = x.relu()
        x = self.gelu(x)
        x = self.dropout(torch.sigmoid(x) * x)
        x = self.maxpool(x)
        x = F.avg_pool2d(x, 1)
        x = self.avgpool(x)
        a = x + x
        a += x
        b = torch.add(a, x)
        c = b.add(x)
        d = self.add(c, x)
        e = torch.cat([d, x], dim=1)
        g = self.cat(e, e)
        h = torch.stack([g, g], dim=1).flatten(1, 2)
        i = self.stack(h, h).flatten(1, 2)
        v = i.mean([2, 3])
        v = torch.mean(v.reshape(1, 8, 8), dim=1)
        v = self.fc(v)
        v = F.linear(v, self.weight)
        v = self.ln(v)
        return F.layer_norm(v, (6,))


#: filter -> nodes it must find, with Addition/Concatenate/LayerNorm2d kept as leaves.
KITCHEN_SINK_LEAVES = {
    conv_filter: ["conv", "conv2d", "deconv"],
    linear_filter: ["fc", "linear"],
    norm_filter: ["bn", "inorm", "gn", "ln2d", "group_norm", "ln", "layer_norm"],
    activation_filter: ["relu", "relu_1", "relu_2", "relu_3", "gelu", "sigmoid"],
    pooling_filter: ["maxpool", "avg_pool2d", "avgpool", "mean", "mean_1"],
    addition_filter: ["add", "add_1", "add_2", "add_3", "add_4"],
    concatenation_filter: ["cat", "cat_1", "stack", "stack_1"],
}


@pytest.fixture(scope="module")
def kitchen_sink():
    model = KitchenSink().eval()
    leaves = (Addition_Module, Concatenate, LayerNorm2d)
    return model, ModelArchitecture.from_model(model, leaf_modules=leaves)


def test_every_public_filter_is_tested():
    assert set(filters.__all__) == {f.__name__ for f in KITCHEN_SINK_LEAVES} | {"module_type_filter"}
    for name in filters.__all__:
        doc = getattr(filters, name).__doc__
        assert doc and doc.strip().splitlines()[0], f"filters.{name} has no docstring"


@pytest.mark.parametrize("filter_func", list(KITCHEN_SINK_LEAVES), ids=lambda f: f.__name__)
def test_filter_on_every_spelling(kitchen_sink, filter_func):
    _, arch = kitchen_sink
    assert _names(arch.find_node(filter_func, all=True)) == KITCHEN_SINK_LEAVES[filter_func]


def test_filters_see_module_kinds_of_leaf_modules(kitchen_sink):
    model, arch = kitchen_sink
    assert arch.get_node("add_4").operator is model.add
    assert arch.get_node("cat_1").operator is model.cat
    assert arch.get_node("stack_1").operator is model.stack
    assert arch.get_node("ln2d").operator is model.ln2d


def test_filters_match_nothing_else(kitchen_sink):
    _, arch = kitchen_sink
    matched = {name for names in KITCHEN_SINK_LEAVES.values() for name in names}
    unmatched = [n.name for n in arch.list_nodes() if n.name not in matched]
    assert unmatched == ["x", "kernel", "mul", "dropout", "flatten", "flatten_1", "reshape", "weight", "output"]
    for node in arch.list_nodes():
        hits = [f.__name__ for f in KITCHEN_SINK_LEAVES if f(node)]
        assert len(hits) <= 1, f"{node} matched several filters: {hits}"


def test_filters_when_leaf_modules_are_traced_into():
    # Without leaf_modules, captum_graph's Addition/Concatenate and torchvision's
    # LayerNorm2d are traced into: the functional spellings are found instead.
    arch = ModelArchitecture.from_model(KitchenSink().eval())
    assert _names(arch.find_node(norm_filter, all=True)) == [
        "bn", "inorm", "gn", "layer_norm", "group_norm", "ln", "layer_norm_1",
    ]
    assert arch.get_node("layer_norm").qualname == "ln2d.layer_norm"
    assert _names(arch.find_node(addition_filter, all=True)) == ["add", "add_1", "add_2", "add_3", "add_4"]
    assert arch.get_node("add_4").opcode == "call_function"
    assert _names(arch.find_node(concatenation_filter, all=True)) == ["cat", "cat_1", "stack", "stack_1"]


def _single_node_architecture(op, target, module=None):
    """A graph ``x -> node -> output`` whose one node is ``(op, target)``."""
    root = nn.Module()
    if module is not None:
        root.m = module
        target = "m"
    graph = fx.Graph()
    x = graph.placeholder("x")
    binary = op == "call_function" and getattr(target, "__module__", None) == "_operator"
    node = graph.create_node(op, target, (x, x) if binary else (x,), name="node")
    graph.output(node)
    gm = fx.GraphModule(root, graph)
    return ModelArchitecture(gm.graph).get_node("node")


# (op, target or module, the one filter that must match it; None: no filter)
SPELLINGS = [
    ("call_module", nn.Conv1d(1, 1, 1), conv_filter),
    ("call_module", nn.Conv3d(1, 1, 1), conv_filter),
    ("call_module", nn.ConvTranspose1d(1, 1, 1), conv_filter),
    ("call_function", F.conv1d, conv_filter),
    ("call_function", F.conv_transpose2d, conv_filter),
    ("call_module", nn.Linear(1, 1), linear_filter),
    ("call_module", nn.Bilinear(1, 1, 1), linear_filter),
    ("call_function", F.linear, linear_filter),
    ("call_module", nn.BatchNorm1d(1), norm_filter),
    ("call_module", nn.BatchNorm3d(1), norm_filter),
    ("call_module", nn.SyncBatchNorm(1), norm_filter),
    ("call_module", nn.InstanceNorm1d(1), norm_filter),
    ("call_module", nn.LayerNorm(1), norm_filter),
    ("call_module", LayerNorm2d(1), norm_filter),
    ("call_module", nn.GroupNorm(1, 1), norm_filter),
    ("call_function", F.batch_norm, norm_filter),
    ("call_function", F.instance_norm, norm_filter),
    ("call_function", torch.layer_norm, norm_filter),
    ("call_module", nn.ReLU6(), activation_filter),
    ("call_module", nn.LeakyReLU(), activation_filter),
    ("call_module", nn.SiLU(), activation_filter),
    ("call_module", nn.Hardswish(), activation_filter),
    ("call_module", nn.Hardsigmoid(), activation_filter),
    ("call_module", nn.Sigmoid(), activation_filter),
    ("call_module", nn.Tanh(), activation_filter),
    ("call_module", nn.ELU(), activation_filter),
    ("call_function", F.relu6, activation_filter),
    ("call_function", F.gelu, activation_filter),
    ("call_function", F.silu, activation_filter),
    ("call_function", F.hardswish, activation_filter),
    ("call_function", F.leaky_relu, activation_filter),
    ("call_function", torch.tanh, activation_filter),
    ("call_function", torch.relu_, activation_filter),
    ("call_method", "relu_", activation_filter),
    ("call_method", "sigmoid", activation_filter),
    ("call_method", "tanh", activation_filter),
    ("call_module", nn.AvgPool2d(1), pooling_filter),
    ("call_module", nn.MaxPool1d(1), pooling_filter),
    ("call_module", nn.AdaptiveMaxPool2d(1), pooling_filter),
    ("call_module", nn.AdaptiveAvgPool1d(1), pooling_filter),
    ("call_module", nn.LPPool2d(2, 1), pooling_filter),
    ("call_function", F.max_pool2d, pooling_filter),
    ("call_function", torch.max_pool2d, pooling_filter),
    ("call_function", F.adaptive_avg_pool2d, pooling_filter),
    ("call_function", F.adaptive_max_pool2d, pooling_filter),
    ("call_function", F.avg_pool1d, pooling_filter),
    ("call_function", torch.mean, pooling_filter),
    ("call_method", "mean", pooling_filter),
    ("call_function", operator.add, addition_filter),
    ("call_function", operator.iadd, addition_filter),
    ("call_function", torch.add, addition_filter),
    ("call_method", "add", addition_filter),
    ("call_method", "add_", addition_filter),
    ("call_module", Addition(), addition_filter),
    ("call_module", Addition_Module(), addition_filter),
    ("call_function", torch.cat, concatenation_filter),
    ("call_function", torch.concat, concatenation_filter),
    ("call_function", torch.stack, concatenation_filter),
    ("call_module", Concatenate(1), concatenation_filter),
    ("call_module", Stack(1), concatenation_filter),
    # none of the filters
    ("call_function", operator.mul, None),
    ("call_function", operator.sub, None),
    ("call_function", torch.matmul, None),
    ("call_function", F.softmax, None),
    ("call_method", "flatten", None),
    ("call_method", "sum", None),
    ("call_method", "view", None),
    ("call_module", nn.Softmax(dim=1), None),
    ("call_module", nn.Dropout(), None),
    ("call_module", nn.Identity(), None),
    ("call_module", nn.Flatten(), None),
    ("call_module", nn.Sequential(nn.Conv2d(1, 1, 1)), None),
    ("call_module", nn.MultiheadAttention(2, 1), None),
]


def _spelling_id(case):
    op, target, _ = case
    if isinstance(target, nn.Module):
        what = type(target).__name__
    elif isinstance(target, str):
        what = target
    else:
        what = f"{getattr(target, '__module__', None) or 'torch'}.{target.__name__}"
    return f"{op}-{what}"


@pytest.mark.parametrize("case", SPELLINGS, ids=[_spelling_id(c) for c in SPELLINGS])
def test_filter_spelling(case):
    op, target, expected = case
    if isinstance(target, nn.Module):
        node = _single_node_architecture(op, None, module=target)
    else:
        node = _single_node_architecture(op, target)
    hits = [f for f in KITCHEN_SINK_LEAVES if f(node)]
    assert hits == ([expected] if expected else []), f"{node} ({target!r}): {[f.__name__ for f in hits]}"


def test_filters_ignore_placeholders_get_attr_and_output(kitchen_sink):
    _, arch = kitchen_sink
    for name in ("x", "kernel", "weight", "output"):
        node = arch.get_node(name)
        assert not any(f(node) for f in KITCHEN_SINK_LEAVES), name


def test_module_type_filter(arch, resnet):
    bn = module_type_filter(nn.BatchNorm2d)
    found = arch.find_node(bn, all=True)
    assert len(found) == 20
    assert found[0].name == "bn1"
    assert all(isinstance(n.operator, nn.BatchNorm2d) for n in found)
    several = arch.find_node(module_type_filter(nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear), all=True)
    assert _names(several) == ["maxpool", "avgpool", "fc"]
    assert arch.find_node(module_type_filter(nn.ReLU)).name == "relu"


def test_module_type_filter_matches_module_calls_only(kitchen_sink):
    _, arch = kitchen_sink
    # F.relu/torch.relu/x.relu() are activations but no nn.ReLU module call.
    assert _names(arch.find_node(module_type_filter(nn.ReLU), all=True)) == ["relu"]
    # LayerNorm2d subclasses nn.LayerNorm: isinstance, not exact type.
    assert _names(arch.find_node(module_type_filter(nn.LayerNorm), all=True)) == ["ln2d", "ln"]
    assert _names(arch.find_node(module_type_filter(Addition_Module), all=True)) == ["add_4"]


def test_module_type_filter_rejects_bad_arguments():
    with pytest.raises(TypeError, match="at least one module class"):
        module_type_filter()
    with pytest.raises(TypeError, match=re.escape("takes module classes")):
        module_type_filter(nn.ReLU())


def test_module_type_filter_has_a_readable_name():
    assert module_type_filter(nn.Conv2d, nn.Linear).__name__ == "module_type_filter(Conv2d, Linear)"


def test_filters_on_resnet18(arch):
    counts = {f.__name__: len(arch.find_node(f, all=True)) for f in KITCHEN_SINK_LEAVES}
    assert counts == {
        "conv_filter": 20,
        "linear_filter": 1,
        "norm_filter": 20,
        "activation_filter": 17,
        "pooling_filter": 2,
        "addition_filter": 8,
        "concatenation_filter": 0,
    }
