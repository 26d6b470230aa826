"""ModelArchitecture / NodeInfo (the seed-000 notebook's API) and captum_graph.filters.

``ModelArchitecture.from_model`` views the rewritten graph (capture with
torch.export, then ``prepare.rewrite_passes``): the model's layers are
``call_module`` nodes, functional operations are leaf modules of
``captum_graph.modules`` (``meta["replaced"]`` names the ATen op), data
movement stays ATen ``call_function``. ``ModelArchitecture(graph=...)`` views
any fx graph: a plain ``torch.fx.symbolic_trace`` one or a raw ATen capture.
"""
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
from captum_graph.capture import capture
from captum_graph.cloning import private_copy
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
from captum_graph.modules import (
    Activation,
    Addition,
    Concatenate,
    Gate,
    LinearFunction,
    Product,
    Scale,
    Softmax,
    Stack,
    Subtraction,
)
from captum_graph.prepare import prepare
from captum_graph.layers import resolve_layer

aten = torch.ops.aten

FILTERS = [
    conv_filter,
    linear_filter,
    norm_filter,
    activation_filter,
    pooling_filter,
    addition_filter,
    concatenation_filter,
]

# torchvision resnet18 ---------------------------------------------------------

RESNET18_CONV_PATHS = [
    "conv1",
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2",
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv1", "layer3.1.conv2",
    "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
]
RESNET18_CONVS = [(path.replace(".", "_"), path) for path in RESNET18_CONV_PATHS]
RESNET18_BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]

#: Nodes with two users (a fork: main branch and skip connection). The second
#: call of a block's ReLU is a per-call-site copy named ``<block>.relu_1``.
RESNET18_TWO_USERS = [("maxpool", "maxpool")] + [
    (f"{block.replace('.', '_')}_relu_1", f"{block}.relu_1") for block in RESNET18_BLOCKS[:-1]
]


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def arch(resnet):
    # As in the seed: no example inputs (one random 224x224 image).
    return ModelArchitecture.from_model(resnet)


def _rows(nodes):
    return [(n.opcode, n.name, n.target) for n in nodes]


def _names(nodes):
    return [n.name for n in nodes]


def _qualnames(nodes):
    return [n.qualname for n in nodes]


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


def test_list_nodes_is_the_rewritten_graph_in_execution_order(arch):
    nodes = arch.list_nodes()
    assert [n._node for n in nodes] == list(arch.graph.nodes)
    assert _rows(nodes[-4:]) == [
        ("call_module", "avgpool", "avgpool"),
        ("call_function", "flatten", arch.get_node("flatten").target),  # see test_node_target_of_an_aten_call
        ("call_module", "fc", "fc"),
        ("output", "output", "output"),
    ]
    # no tracer-era opcodes, no raw ATen arithmetic left
    assert {n.opcode for n in nodes} == {"placeholder", "call_module", "call_function", "output"}
    assert [n.name for n in nodes if n.opcode == "call_function"] == ["flatten"]


def test_get_node_by_fx_name(arch):
    node = arch.get_node(name="conv1")
    assert repr(node) == "NodeInfo(opcode='call_module', name='conv1', target='conv1')"
    assert type(node._node) is fx.Node
    assert node == arch.list_nodes()[1]
    assert hash(node) == hash(arch.list_nodes()[1])
    assert node is arch.list_nodes()[1]  # one NodeInfo per node


def test_get_node_by_qualified_name(arch):
    add = arch.get_node("layer4.1.add")
    assert (add.opcode, add.name, add.target, add.qualname) == (
        "call_module", "layer4_1_add", "layer4.1.add", "layer4.1.add",
    )
    assert add.meta["original_name"] == "add_7"
    assert add.meta["replaced"] == "aten.add.Tensor"
    assert arch.get_node("layer1.0.relu_1").name == "layer1_0_relu_1"
    assert arch.get_node("layer2.0.downsample.0").name == "layer2_0_downsample_0"


def test_get_node_by_torch_fx_style_name(arch, resnet):
    # BUG (architecture.py): ModelArchitecture._lookup ignores meta["original_name"],
    # the fx-style name that LayerLRP(model, "add_7") resolves (captum_graph.layers).
    assert arch.get_node("add_7") is arch.get_node("layer4.1.add")
    assert arch.get_node("add") is arch.get_node("layer1.0.add")
    prepared = prepare(resnet)
    assert resolve_layer(resnet, prepared, "add_7") is arch.get_node("add_7")._node


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
    found = arch.find_node(lambda n: isinstance(n.operator, Addition), all=True)
    assert _rows(found) == [("call_module", f"{b.replace('.', '_')}_add", f"{b}.add") for b in RESNET18_BLOCKS]
    assert _qualnames(found) == [f"{b}.add" for b in RESNET18_BLOCKS]
    assert [n.meta["original_name"] for n in found] == ["add"] + [f"add_{i}" for i in range(1, 8)]
    assert {n.meta["replaced"] for n in found} == {"aten.add.Tensor"}


def test_find_node_custom_filter_two_users(arch):
    found = arch.find_node(lambda n: len(n.users) == 2, all=True)
    assert _rows(found) == [("call_module", a, b) for a, b in RESNET18_TWO_USERS]


def test_find_node_custom_filter_pooling_modules(arch):
    pool = lambda n: n.opcode == "call_module" and type(n.operator).__module__ == "torch.nn.modules.pooling"  # noqa: E731
    assert _names(arch.find_node(pool, all=True)) == ["maxpool", "avgpool"]


def test_find_node_no_match(arch):
    assert arch.find_node(lambda n: False) is None
    assert arch.find_node(lambda n: False, all=True) == []


def test_find_node_from_base_node_searches_downstream_only(arch):
    # layer2.0's downsample comes after layer2_0_conv1 in execution order but is
    # on the skip branch, not downstream of it.
    base = arch.get_node("layer2_0_conv1")
    names = _names(arch.find_node(conv_filter, base_node=base, all=True))
    expected = [name for name, _ in RESNET18_CONVS[RESNET18_CONVS.index(("layer2_0_conv2", "layer2.0.conv2")):]]
    assert names == [name for name in expected if name != "layer2_0_downsample_0"]
    assert arch.find_node(conv_filter, base_node=base).name == "layer2_0_conv2"


def test_find_node_from_base_node_downstream_of_a_fork(arch):
    base = arch.get_node("layer3.1.relu_1")  # feeds layer4.0's main branch and its downsample
    assert _names(arch.find_node(conv_filter, base_node=base, all=True)[:3]) == [
        "layer4_0_conv1",
        "layer4_0_conv2",
        "layer4_0_downsample_0",
    ]
    assert arch.find_node(addition_filter, base_node=arch.get_node("layer4.1.add")) is None
    found = arch.find_node(addition_filter, base_node=arch.get_node("layer3.1.add"), all=True)
    assert _qualnames(found) == ["layer4.0.add", "layer4.1.add"]


def test_branches_of_residual_additions(arch):
    assert [_names(b) for b in arch.branches("layer1.0.add")] == [
        ["layer1_0_conv1", "layer1_0_bn1", "layer1_0_relu", "layer1_0_conv2", "layer1_0_bn2"],
        [],  # the identity skip: maxpool is the fork
    ]
    assert [_names(b) for b in arch.branches(arch.get_node("layer2.0.add"))] == [
        ["layer2_0_conv1", "layer2_0_bn1", "layer2_0_relu", "layer2_0_conv2", "layer2_0_bn2"],
        ["layer2_0_downsample_0", "layer2_0_downsample_1"],
    ]


def test_node_info_fields_of_conv1(arch):
    node = arch.get_node("conv1")
    assert (node.opcode, node.name, node.target, node.qualname) == ("call_module", "conv1", "conv1", "conv1")
    assert list(node.meta["nn_module_stack"].values()) == [("conv1", "torch.nn.modules.conv.Conv2d")]
    assert node.meta["original_name"] == "conv1"
    assert "replaced" not in node.meta  # the model's own layer, not a rewritten operation
    assert node.meta is node._node.meta
    assert node.args == (arch.get_node("x"),)
    assert repr(node.args) == "(NodeInfo(opcode='placeholder', name='x', target='x'),)"
    assert node.kwargs == {}
    assert node.users == (arch.get_node("bn1"),)
    assert repr(node.users) == "(NodeInfo(opcode='call_module', name='bn1', target='bn1'),)"
    assert node.next == arch.get_node("bn1")
    assert node.prev == arch.get_node("x")
    assert node.to_dict() == {"opcode": "call_module", "name": "conv1", "target": "conv1"}


def test_node_info_shapes_are_the_example_inputs(arch):
    # BUG (architecture.py): NodeInfo.shape returns export's symbolic batch
    # (torch.Size([s95, 64, 112, 112])) instead of the example input's batch of 1.
    assert arch.get_node("conv1").shape == torch.Size([1, 64, 112, 112])
    assert arch.get_node("layer4.1.relu_1").shape == torch.Size([1, 512, 7, 7])
    assert arch.get_node("fc").shape == torch.Size([1, 1000])
    assert arch.get_node("output").shape is None


def test_node_info_users_args_are_node_infos(arch):
    maxpool = arch.get_node("maxpool")
    assert maxpool.users == (arch.get_node("layer1_0_conv1"), arch.get_node("layer1.0.add"))
    add = arch.get_node("layer1.0.add")
    assert add.args == (arch.get_node("layer1_0_bn2"), arch.get_node("maxpool"))
    assert all(type(a) is NodeInfo for a in add.args)


def test_node_info_ends_of_the_graph(arch):
    nodes = arch.list_nodes()
    assert nodes[0].prev is None
    assert nodes[-1].next is None
    assert nodes[-1].users == ()


def test_operator_of_module_node_is_the_models_module(arch, resnet):
    # BUG (architecture.py): NodeInfo.operator returns the graph's private copy.
    assert arch.get_node("conv1").operator is resnet.conv1
    assert arch.get_node("layer2_0_downsample_0").operator is resnet.layer2[0].downsample[0]
    # the per-call-site copy of a module called twice stands for the model's module
    assert arch.get_node("layer1.0.relu_1").operator is resnet.layer1[0].relu


def test_operator_of_rewritten_and_data_movement_nodes(arch, resnet):
    add = arch.get_node("layer1.0.add")
    assert type(add.operator) is Addition
    assert add.operator is arch.root.get_submodule("layer1.0.add")
    assert all(add.operator is not module for module in resnet.modules())
    flatten = arch.get_node("flatten")
    assert flatten.operator is aten.flatten.using_ints
    assert flatten.meta["qualname"] == "flatten"


def test_node_target_of_an_aten_call_names_the_op(arch):
    # BUG (architecture.py): _target_name gives 'torch._ops.aten.flatten.using_ints',
    # which names nothing importable and differs from meta["replaced"]'s spelling.
    assert arch.get_node("flatten").target == "aten.flatten.using_ints"
    assert arch.get_node("flatten").to_dict() == {
        "opcode": "call_function", "name": "flatten", "target": "aten.flatten.using_ints",
    }


def test_owning_module_of_a_module_node(arch, resnet):
    # BUG (architecture.py): owning_module returns the graph's target and private copy.
    assert arch.get_node("conv1").owning_module == ("conv1", resnet.conv1)
    name, module = arch.get_node("layer4.1.relu_1").owning_module
    assert name == "layer4.1.relu"
    assert module is resnet.layer4[1].relu


def test_owning_module_of_a_rewritten_functional_node(arch, resnet):
    # BUG (architecture.py): a rewritten addition is a functional operation of the
    # block's forward; owning_module returns ('layer1.0.add', Addition(...)) instead.
    name, module = arch.get_node("layer1.0.add").owning_module
    assert name == "layer1.0"
    assert module is resnet.layer1[0]
    assert type(module) is torchvision.models.resnet.BasicBlock


def test_owning_module_of_top_level_nodes_is_none():
    class Top(nn.Module):
        def forward(self, x):
            return torch.flatten(x, 1) + 1

    arch = ModelArchitecture.from_model(Top(), example_inputs=(torch.randn(1, 3, 2),))
    assert (arch.get_node("flatten").opcode, arch.get_node("add").opcode) == ("call_function", "call_module")
    assert arch.get_node("x").owning_module is None
    assert arch.get_node("flatten").owning_module is None
    assert arch.get_node("add").owning_module is None  # BUG: ('add', Addition(...))


def test_owning_module_of_a_size_node_is_none():
    # torch.export tags nodes made outside any module (the dynamic batch's
    # sym_size) with a stand-in stack entry: a top-level node, no owner.
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(x.reshape(x.shape[0], -1))

    arch = ModelArchitecture.from_model(Flat(), example_inputs=(torch.randn(2, 2, 3),))  # a dynamic batch
    size = arch.find_node(lambda n: n.operator is aten.sym_size.int)
    assert size.qualname == "sym_size"
    assert size.owning_module is None


def test_find_cam_target_module_on_resnet18(arch, resnet):
    # BUG (architecture.py, via owning_module): ('layer4.1.relu_1', <private copy>).
    assert arch.find_cam_target_node().name == "layer4_1_relu_1"  # the ReLU after the last addition
    name, module = arch.find_cam_target_module()
    assert name == "layer4.1.relu"
    assert module is resnet.layer4[1].relu


def test_find_cam_target_node_with_small_example_inputs(resnet):
    arch = ModelArchitecture.from_model(resnet, example_inputs=(torch.randn(1, 3, 64, 64),))
    assert arch.get_node("layer4_1_relu_1").shape[1:] == torch.Size([512, 2, 2])
    assert arch.find_cam_target_node() is arch.get_node("layer4.1.relu_1")


def _tiny_vit(image_size=32):
    return VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()


def test_find_cam_target_module_is_none_for_token_models():
    # torchvision's ViT asserts the input size: the default image is image_size x image_size.
    arch = ModelArchitecture.from_model(_tiny_vit(image_size=32))
    assert arch.example_inputs[0].shape == torch.Size([1, 3, 32, 32])
    assert arch.find_cam_target_module() is None


def test_find_cam_target_module_is_none_without_feature_maps():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    arch = ModelArchitecture.from_model(mlp, example_inputs=(torch.randn(1, 4),))
    assert arch.find_cam_target_module() is None


def test_from_model_without_a_layer_to_guess_inputs_for_needs_example_inputs():
    with pytest.raises(ValueError, match="Sequential has no .*pass example inputs"):
        ModelArchitecture.from_model(nn.Sequential(nn.ReLU()))


def test_constructor_from_symbolic_trace_graph(resnet):
    traced = fx.symbolic_trace(resnet)
    arch = ModelArchitecture(graph=traced.graph)
    assert _rows(arch.list_nodes()[:2]) == [("placeholder", "x", "x"), ("call_module", "conv1", "conv1")]
    assert arch.get_node("conv1").operator is resnet.conv1  # symbolic_trace shares submodules
    add = arch.get_node("add")
    assert (add.opcode, add.target, add.operator) == ("call_function", "operator.add", operator.add)
    assert add.owning_module == ("layer1.0", traced.get_submodule("layer1.0"))
    assert add.to_dict() == {"opcode": "call_function", "name": "add", "target": "operator.add"}
    assert [(n.name, n.target) for n in arch.find_node(conv_filter, all=True)] == RESNET18_CONVS


def test_constructor_with_model_returns_the_models_containers(resnet):
    arch = ModelArchitecture(graph=fx.symbolic_trace(resnet).graph, model=resnet)
    assert arch.get_node("add").owning_module == ("layer1.0", resnet.layer1[0])


def test_constructor_rejects_a_graph_without_owner():
    with pytest.raises(ValueError, match="must belong to a GraphModule"):
        ModelArchitecture(graph=fx.Graph())


def _untouched_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
    model.train()
    model[1].eval()
    return model


def test_from_model_leaves_the_model_untouched(assert_untouched):
    model = _untouched_model()
    inputs = torch.randn(2, 3, 8, 8)
    with assert_untouched(model, (inputs,)):
        arch = ModelArchitecture.from_model(model, example_inputs=(inputs,))
        assert arch.find_cam_target_module()[0] == "2"
        assert ModelArchitecture.from_model(model).find_cam_target_module()[0] == "2"  # default 224x224
    assert model.training and model[0].training and not model[1].training and model[2].inplace
    # the graph's ReLU is a private out-of-place copy
    assert arch.root.get_submodule("2") is not model[2] and not arch.root.get_submodule("2").inplace


def test_from_model_leaves_the_model_untouched_when_it_fails(assert_untouched):
    model = _untouched_model()
    with assert_untouched(model):
        with pytest.raises(RuntimeError):
            ModelArchitecture.from_model(model, example_inputs=(torch.randn(2, 5, 8, 8),))  # 5 channels
    assert model.training and not model[1].training and model[2].inplace


def test_find_cam_target_module_is_the_models_module():
    # BUG (architecture.py): the private ReLU(inplace=False) copy is returned.
    model = _untouched_model()
    arch = ModelArchitecture.from_model(model, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert arch.find_cam_target_module() == ("2", model[2])
    assert arch.find_cam_target_module()[1] is model[2]


# captum_graph.filters --------------------------------------------------------


class KitchenSink(nn.Module):
    """Every spelling of each operation kind in one forward."""

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


KITCHEN_SINK_INPUTS = (torch.randn(1, 3, 8, 8),)

#: Rewritten graph (from_model): filter -> qualified names of the nodes it must find.
#: Modules with a forward of their own (captum_graph's Addition/Concatenate,
#: LayerNorm2d, InstanceNorm2d) are captured as their operations.
KITCHEN_SINK_REWRITTEN = {
    conv_filter: ["conv", "conv2d", "deconv"],
    linear_filter: ["fc", "linear"],
    norm_filter: ["bn", "inorm.instance_norm", "gn", "ln2d.layer_norm", "group_norm", "ln", "layer_norm_1"],
    activation_filter: ["relu", "relu_1", "relu_2", "relu_3", "gelu", "sigmoid"],
    pooling_filter: ["maxpool", "avg_pool2d", "avgpool", "mean", "mean_1"],
    addition_filter: ["add", "add_1", "add_2", "add_3", "add.add"],
    concatenation_filter: ["cat", "cat.cat", "stack", "stack.stack"],
}
KITCHEN_SINK_REWRITTEN_UNMATCHED = [
    "x", "kernel", "weight", "ln2d.weight", "ln2d.bias", "ln2d.permute", "ln2d.permute_1", "mul", "dropout",
    "flatten", "flatten_1", "reshape", "output",
]

#: Raw ATen capture (captum_graph.capture, no rewrite): filter -> node names.
KITCHEN_SINK_ATEN = {
    conv_filter: ["conv2d", "conv2d_1", "conv_transpose2d"],
    linear_filter: ["linear", "linear_1"],
    norm_filter: ["batch_norm", "instance_norm", "group_norm", "layer_norm", "group_norm_1", "layer_norm_1", "layer_norm_2"],
    activation_filter: ["relu", "relu_1", "relu_2", "relu_3", "gelu", "sigmoid"],
    pooling_filter: ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean", "mean_1"],
    addition_filter: ["add", "add_", "add_1", "add_2", "add_3"],
    concatenation_filter: ["cat", "cat_1", "stack", "stack_1"],
}

#: Plain torch.fx graph, Addition/Concatenate/LayerNorm2d kept as leaves: filter -> node names.
KITCHEN_SINK_FX_LEAVES = {
    conv_filter: ["conv", "conv2d", "deconv"],
    linear_filter: ["fc", "linear"],
    norm_filter: ["bn", "inorm", "gn", "ln2d", "group_norm", "ln", "layer_norm"],
    activation_filter: ["relu", "relu_1", "relu_2", "relu_3", "gelu", "sigmoid"],
    pooling_filter: ["maxpool", "avg_pool2d", "avgpool", "mean", "mean_1"],
    addition_filter: ["add", "add_1", "add_2", "add_3", "add_4"],  # fx records ``a += x`` as operator.add
    concatenation_filter: ["cat", "cat_1", "stack", "stack_1"],
}
KITCHEN_SINK_FX_UNMATCHED = ["x", "kernel", "mul", "dropout", "flatten", "flatten_1", "reshape", "weight", "output"]


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, module, qualname):
        return isinstance(module, (Addition_Module, Concatenate, LayerNorm2d)) or super().is_leaf_module(module, qualname)


@pytest.fixture(scope="module")
def kitchen_sink():
    model = KitchenSink().eval()
    return model, ModelArchitecture.from_model(model, example_inputs=KITCHEN_SINK_INPUTS)


@pytest.fixture(scope="module")
def kitchen_sink_aten():
    model = private_copy(KitchenSink().eval())
    return ModelArchitecture(graph=capture(model, KITCHEN_SINK_INPUTS).graph_module.graph)


@pytest.fixture(scope="module")
def kitchen_sink_fx():
    model = KitchenSink().eval()
    return model, ModelArchitecture(graph=fx.GraphModule(model, _LeafTracer().trace(model)).graph)


def _assert_exclusive(arch):
    for node in arch.list_nodes():
        hits = [f.__name__ for f in FILTERS if f(node)]
        assert len(hits) <= 1, f"{node} matched several filters: {hits}"


def test_every_public_filter_is_tested():
    assert set(filters.__all__) == {f.__name__ for f in FILTERS} | {"module_type_filter"}
    for name in filters.__all__:
        doc = getattr(filters, name).__doc__
        assert doc and doc.strip().splitlines()[0], f"filters.{name} has no docstring"


@pytest.mark.parametrize("filter_func", FILTERS, ids=lambda f: f.__name__)
def test_filter_on_the_rewritten_graph(kitchen_sink, filter_func):
    _, arch = kitchen_sink
    assert _qualnames(arch.find_node(filter_func, all=True)) == KITCHEN_SINK_REWRITTEN[filter_func]


def test_every_addition_spelling_becomes_an_addition(kitchen_sink):
    _, arch = kitchen_sink
    # x + x, a += x, torch.add, b.add(x) and the user's own Addition module's forward
    for node in arch.find_node(addition_filter, all=True):
        assert (node.opcode, type(node.operator), node.meta["replaced"]) == (
            "call_module", Addition, "aten.add.Tensor",
        ), node.qualname
    for node in arch.find_node(concatenation_filter, all=True):
        assert node.opcode == "call_module" and isinstance(node.operator, Concatenate), node.qualname
    assert [type(n.operator) for n in arch.find_node(concatenation_filter, all=True)] == [
        Concatenate, Concatenate, Stack, Stack,
    ]


def test_every_activation_spelling_becomes_a_module(kitchen_sink):
    model, arch = kitchen_sink
    relu, f_relu, torch_relu, method_relu, gelu, sigmoid = arch.find_node(activation_filter, all=True)
    assert "replaced" not in relu.meta and type(relu.operator) is nn.ReLU  # the model's nn.ReLU
    for node in (f_relu, torch_relu, method_relu):  # F.relu, torch.relu, x.relu()
        assert type(node.operator) is Activation and node.operator.fn is aten.relu.default
        assert node.meta["replaced"] == "aten.relu.default"
    assert type(gelu.operator) is nn.GELU
    assert type(sigmoid.operator) is Activation and sigmoid.operator.fn is aten.sigmoid.default
    # the gate product is no activation, the dropout module no activation either
    assert type(arch.get_node("mul").operator) is Gate


def test_functional_layers_become_linear_functions(kitchen_sink):
    _, arch = kitchen_sink
    fns = {
        q: arch.get_node(q).operator.fn
        for q in ("conv2d", "linear", "ln2d.layer_norm", "group_norm", "layer_norm_1", "avg_pool2d", "mean", "mean_1")
    }
    assert all(type(arch.get_node(q).operator) is LinearFunction for q in fns)
    assert fns == {
        "conv2d": aten.conv2d.default,
        "linear": aten.linear.default,
        "ln2d.layer_norm": aten.layer_norm.default,
        "group_norm": aten.group_norm.default,
        "layer_norm_1": aten.layer_norm.default,
        "avg_pool2d": aten.avg_pool2d.default,
        "mean": aten.mean.dim,
        "mean_1": aten.mean.dim,
    }
    # InstanceNorm2d stays an ATen call (no rewrite for it), still a norm
    inorm = arch.get_node("inorm.instance_norm")
    assert (inorm.opcode, inorm.operator) == ("call_function", aten.instance_norm.default)


def test_filters_match_nothing_else_on_the_rewritten_graph(kitchen_sink):
    _, arch = kitchen_sink
    unmatched = [n.qualname for n in arch.list_nodes() if not any(f(n) for f in FILTERS)]
    assert unmatched == KITCHEN_SINK_REWRITTEN_UNMATCHED
    _assert_exclusive(arch)


@pytest.mark.parametrize("filter_func", FILTERS, ids=lambda f: f.__name__)
def test_filter_on_an_aten_graph(kitchen_sink_aten, filter_func):
    found = kitchen_sink_aten.find_node(filter_func, all=True)
    assert _names(found) == KITCHEN_SINK_ATEN[filter_func]
    assert {n.opcode for n in found} == {"call_function"}


def test_filters_match_nothing_else_on_an_aten_graph(kitchen_sink_aten):
    matched = {name for names in KITCHEN_SINK_ATEN.values() for name in names}
    unmatched = [n for n in kitchen_sink_aten.list_nodes() if n.name not in matched]
    assert {n.opcode for n in unmatched} == {"placeholder", "get_attr", "call_function", "output"}
    assert [(n.name, n.operator) for n in unmatched if n.opcode == "call_function"] == [
        ("permute", aten.permute.default),
        ("permute_1", aten.permute.default),
        ("mul", aten.mul.Tensor),
        ("dropout", aten.dropout.default),
        ("flatten", aten.flatten.using_ints),
        ("flatten_1", aten.flatten.using_ints),
        ("reshape", aten.reshape.default),
    ]
    assert not any(f(n) for f in FILTERS for n in unmatched)
    _assert_exclusive(kitchen_sink_aten)


@pytest.mark.parametrize("filter_func", FILTERS, ids=lambda f: f.__name__)
def test_filter_on_a_plain_fx_graph(kitchen_sink_fx, filter_func):
    _, arch = kitchen_sink_fx
    assert _names(arch.find_node(filter_func, all=True)) == KITCHEN_SINK_FX_LEAVES[filter_func]


def test_filters_match_nothing_else_on_a_plain_fx_graph(kitchen_sink_fx):
    model, arch = kitchen_sink_fx
    matched = {name for names in KITCHEN_SINK_FX_LEAVES.values() for name in names}
    assert [n.name for n in arch.list_nodes() if n.name not in matched] == KITCHEN_SINK_FX_UNMATCHED
    _assert_exclusive(arch)
    # leaf modules are the model's own; the other spellings are functions and methods
    assert arch.get_node("add_4").operator is model.add
    assert arch.get_node("cat_1").operator is model.cat
    assert arch.get_node("stack_1").operator is model.stack
    assert arch.get_node("ln2d").operator is model.ln2d
    assert [(n.opcode, n.operator) for n in arch.find_node(addition_filter, all=True)[:4]] == [
        ("call_function", operator.add),
        ("call_function", operator.add),
        ("call_function", torch.add),
        ("call_method", "add"),
    ]


def test_filters_on_a_plain_symbolic_trace():
    # Without leaves, captum_graph's Addition/Concatenate and LayerNorm2d are traced into.
    model = KitchenSink().eval()
    # with the model: a GraphModule keeps no parameterless container (model.add)
    arch = ModelArchitecture(graph=fx.symbolic_trace(model).graph, model=model)
    assert _names(arch.find_node(norm_filter, all=True)) == [
        "bn", "inorm", "gn", "layer_norm", "group_norm", "ln", "layer_norm_1",
    ]
    assert arch.get_node("layer_norm").owning_module[0] == "ln2d"
    assert _names(arch.find_node(addition_filter, all=True)) == ["add", "add_1", "add_2", "add_3", "add_4"]
    assert arch.get_node("add_4").owning_module == ("add", model.add)
    assert _names(arch.find_node(concatenation_filter, all=True)) == ["cat", "cat_1", "stack", "stack_1"]


def test_filters_skip_arithmetic_on_sizes():
    class Sizes(nn.Module):
        def forward(self, x):
            return x.new_zeros(x.shape[0] + 1) + x.sum()

    arch = ModelArchitecture.from_model(Sizes(), example_inputs=(torch.randn(2, 3),))
    size_add = arch.find_node(lambda n: n.operator is operator.add)
    assert size_add.opcode == "call_function" and isinstance(size_add.meta["val"], torch.SymInt)
    assert not any(f(size_add) for f in FILTERS)
    assert _qualnames(arch.find_node(addition_filter, all=True)) == ["add_1"]
    assert type(arch.get_node("add_1").operator) is Addition


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
    # plain torch.fx: modules, functions, methods
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
    ("call_module", nn.RMSNorm(1), norm_filter),
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
    ("call_module", Addition_Module(), addition_filter),
    ("call_function", torch.cat, concatenation_filter),
    ("call_function", torch.concat, concatenation_filter),
    ("call_function", torch.stack, concatenation_filter),
    # ATen operators (torch.export), by overload and by packet, in-place forms too
    ("call_function", aten.conv2d.default, conv_filter),
    ("call_function", aten.conv_transpose2d.input, conv_filter),
    ("call_function", aten.convolution.default, conv_filter),
    ("call_function", aten.linear.default, linear_filter),
    ("call_function", aten.batch_norm.default, norm_filter),
    ("call_function", aten._native_batch_norm_legit_no_training.default, norm_filter),
    ("call_function", aten.layer_norm.default, norm_filter),
    ("call_function", aten.group_norm.default, norm_filter),
    ("call_function", aten.rms_norm.default, norm_filter),
    ("call_function", aten.relu.default, activation_filter),
    ("call_function", aten.relu_.default, activation_filter),
    ("call_function", aten.relu, activation_filter),
    ("call_function", aten.hardtanh.default, activation_filter),  # nn.ReLU6
    ("call_function", aten.relu6.default, activation_filter),  # F.relu6
    ("call_function", aten.gelu.default, activation_filter),
    ("call_function", aten.silu_.default, activation_filter),
    ("call_function", aten.sigmoid.default, activation_filter),
    ("call_function", aten.prelu.default, activation_filter),
    ("call_function", aten.max_pool2d.default, pooling_filter),
    ("call_function", aten.max_pool2d_with_indices.default, pooling_filter),
    ("call_function", aten.avg_pool2d.default, pooling_filter),
    ("call_function", aten.adaptive_avg_pool2d.default, pooling_filter),
    ("call_function", aten.adaptive_max_pool2d.default, pooling_filter),
    ("call_function", aten.mean.dim, pooling_filter),
    ("call_function", aten.add.Tensor, addition_filter),
    ("call_function", aten.add_.Tensor, addition_filter),
    ("call_function", aten.add.Scalar, addition_filter),
    ("call_function", aten.cat.default, concatenation_filter),
    ("call_function", aten.stack.default, concatenation_filter),
    # rewritten leaf modules of captum_graph.modules, classified by type or fn
    ("call_module", Addition(), addition_filter),
    ("call_module", Concatenate(1), concatenation_filter),
    ("call_module", Stack(1), concatenation_filter),
    ("call_module", Activation(aten.relu.default), activation_filter),
    ("call_module", Activation(aten.hardswish.default), activation_filter),
    ("call_module", Activation(F.gelu), activation_filter),
    ("call_module", LinearFunction(aten.conv2d.default), conv_filter),
    ("call_module", LinearFunction(aten.linear.default), linear_filter),
    ("call_module", LinearFunction(aten.layer_norm.default), norm_filter),
    ("call_module", LinearFunction(aten.avg_pool2d.default), pooling_filter),
    ("call_module", LinearFunction(aten.mean.dim), pooling_filter),
    ("call_module", LinearFunction(F.adaptive_avg_pool2d), pooling_filter),
    # none of the filters
    ("call_function", operator.mul, None),
    ("call_function", operator.sub, None),
    ("call_function", torch.matmul, None),
    ("call_function", F.softmax, None),
    ("call_function", F.dropout, None),
    ("call_method", "flatten", None),
    ("call_method", "sum", None),
    ("call_method", "view", None),
    ("call_function", aten.mul.Tensor, None),
    ("call_function", aten.sub.Tensor, None),
    ("call_function", aten.sum.dim_IntList, None),
    ("call_function", aten.softmax.int, None),
    ("call_function", aten.dropout.default, None),
    ("call_function", aten.clamp.default, None),
    ("call_function", aten.flatten.using_ints, None),
    ("call_function", aten.permute.default, None),
    ("call_function", aten.matmul.default, None),
    ("call_module", nn.Softmax(dim=1), None),
    ("call_module", nn.Dropout(), None),
    ("call_module", nn.Identity(), None),
    ("call_module", nn.Flatten(), None),
    ("call_module", nn.Sequential(nn.Conv2d(1, 1, 1)), None),
    ("call_module", nn.MultiheadAttention(2, 1), None),
    ("call_module", Activation(aten.dropout.default), None),
    ("call_module", LinearFunction(aten.sum.dim_IntList), None),
    ("call_module", LinearFunction(aten.upsample_bilinear2d.vec), None),
    ("call_module", Softmax(aten.softmax.int), None),
    ("call_module", Subtraction(), None),
    ("call_module", Scale(), None),
    ("call_module", Gate(), None),
    ("call_module", Product(), None),
]


def _spelling_id(case):
    op, target, _ = case
    if isinstance(target, nn.Module):
        fn = getattr(target, "fn", None)
        what = type(target).__name__ + (f"({getattr(fn, '__name__', fn)})" if fn is not None else "")
    elif isinstance(target, str):
        what = target
    elif isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        what = str(target)
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
    hits = [f for f in FILTERS if f(node)]
    assert hits == ([expected] if expected else []), f"{node} ({target!r}): {[f.__name__ for f in hits]}"


def test_filters_ignore_placeholders_get_attr_and_output(kitchen_sink_fx, kitchen_sink_aten):
    _, arch = kitchen_sink_fx
    for name in ("x", "kernel", "weight", "output"):
        assert not any(f(arch.get_node(name)) for f in FILTERS), name
    for name in ("x", "conv_weight", "bn_running_mean", "output"):
        assert not any(f(kitchen_sink_aten.get_node(name)) for f in FILTERS), name


def test_module_type_filter(arch):
    found = arch.find_node(module_type_filter(nn.BatchNorm2d), all=True)
    assert len(found) == 20
    assert found[0].name == "bn1"
    assert all(isinstance(n.operator, nn.BatchNorm2d) for n in found)
    several = arch.find_node(module_type_filter(nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear), all=True)
    assert _names(several) == ["maxpool", "avgpool", "fc"]
    assert arch.find_node(module_type_filter(nn.ReLU)).name == "relu"
    assert len(arch.find_node(module_type_filter(nn.ReLU), all=True)) == 17  # per-call-site copies included
    assert _qualnames(arch.find_node(module_type_filter(Addition_Module), all=True)) == [
        f"{b}.add" for b in RESNET18_BLOCKS
    ]


def test_module_type_filter_matches_module_calls_only(kitchen_sink, kitchen_sink_fx):
    _, arch = kitchen_sink
    # F.relu/torch.relu/x.relu() are activations, rewritten as Activation modules: no nn.ReLU.
    assert _qualnames(arch.find_node(module_type_filter(nn.ReLU), all=True)) == ["relu"]
    assert _qualnames(arch.find_node(module_type_filter(Activation), all=True)) == [
        "relu_1", "relu_2", "relu_3", "sigmoid",
    ]
    # LayerNorm2d has a forward of its own: captured as aten.layer_norm, no module call
    assert _qualnames(arch.find_node(module_type_filter(nn.LayerNorm), all=True)) == ["ln"]
    assert _qualnames(arch.find_node(module_type_filter(Addition_Module), all=True)) == KITCHEN_SINK_REWRITTEN[
        addition_filter
    ]
    _, fx_arch = kitchen_sink_fx
    # isinstance, not exact type: LayerNorm2d subclasses nn.LayerNorm
    assert _names(fx_arch.find_node(module_type_filter(nn.LayerNorm), all=True)) == ["ln2d", "ln"]
    assert _names(fx_arch.find_node(module_type_filter(Addition_Module), all=True)) == ["add_4"]


def test_module_type_filter_rejects_bad_arguments():
    with pytest.raises(TypeError, match="at least one module class"):
        module_type_filter()
    with pytest.raises(TypeError, match=re.escape("takes module classes")):
        module_type_filter(nn.ReLU())


def test_module_type_filter_has_a_readable_name():
    assert module_type_filter(nn.Conv2d, nn.Linear).__name__ == "module_type_filter(Conv2d, Linear)"


RESNET18_COUNTS = {
    "conv_filter": 20,
    "linear_filter": 1,
    "norm_filter": 20,
    "activation_filter": 17,
    "pooling_filter": 2,
    "addition_filter": 8,
    "concatenation_filter": 0,
}


def test_filters_on_resnet18(arch):
    assert {f.__name__: len(arch.find_node(f, all=True)) for f in FILTERS} == RESNET18_COUNTS
    _assert_exclusive(arch)


def test_filters_on_resnet18_symbolic_trace(resnet):
    arch = ModelArchitecture(graph=fx.symbolic_trace(resnet).graph)
    assert {f.__name__: len(arch.find_node(f, all=True)) for f in FILTERS} == RESNET18_COUNTS
    assert _names(arch.find_node(addition_filter, all=True)) == ["add"] + [f"add_{i}" for i in range(1, 8)]
