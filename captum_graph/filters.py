"""Ready-made ``filter_func`` arguments for :meth:`ModelArchitecture.find_node`.

Each filter takes a :class:`~captum_graph.NodeInfo` and says whether the node
is that kind of operation, whichever way the model wrote it: a module call
(``call_module``), a function (``call_function``, e.g. ``F.relu``,
``operator.add``) or a tensor method (``call_method``, e.g. ``x.mean``).

Examples::

    >>> arch = ModelArchitecture.from_model(torchvision.models.resnet18())
    >>> arch.find_node(conv_filter)
    NodeInfo(opcode='call_module', name='conv1', target='conv1')
    >>> len(arch.find_node(addition_filter, all=True))
    8
"""
import operator
from typing import Any, Callable, FrozenSet, Tuple, Type

import torch
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn

from .architecture import NodeInfo
from .modules import Concatenate

__all__ = [
    "conv_filter",
    "linear_filter",
    "norm_filter",
    "activation_filter",
    "pooling_filter",
    "addition_filter",
    "concatenation_filter",
    "module_type_filter",
]

NodeFilter = Callable[[NodeInfo], bool]


def _optional(*names: str, owner: Any = torch) -> Tuple[Any, ...]:
    # reason: some functions and classes exist only in newer torch releases
    return tuple(getattr(owner, name) for name in names if hasattr(owner, name))


_CONV_MODULES: Tuple[Type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
_CONV_FUNCTIONS: FrozenSet[Callable] = frozenset({
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
})

_LINEAR_MODULES: Tuple[Type[nn.Module], ...] = (nn.Linear, nn.Bilinear)
_LINEAR_FUNCTIONS: FrozenSet[Callable] = frozenset({F.linear, F.bilinear})

_NORM_MODULES: Tuple[Type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,  # and subclasses such as torchvision's LayerNorm2d
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + _optional("RMSNorm", owner=nn)
_NORM_FUNCTIONS: FrozenSet[Callable] = frozenset({
    F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm, F.local_response_norm,
    torch.batch_norm, torch.instance_norm, torch.layer_norm, torch.group_norm,
} | set(_optional("rms_norm", owner=F)) | set(_optional("rms_norm")))

_ACTIVATION_MODULES: Tuple[Type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
)
_ACTIVATION_FUNCTIONS: FrozenSet[Callable] = frozenset({
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.elu, F.selu,
    F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid,
    F.tanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.threshold,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.selu, torch.celu, torch.prelu,
    torch.rrelu,
})
_ACTIVATION_METHODS: FrozenSet[str] = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
})

_POOLING_MODULES: Tuple[Type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)
_POOLING_FUNCTIONS: FrozenSet[Callable] = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    torch.mean,
})
_POOLING_METHODS: FrozenSet[str] = frozenset({"mean"})

_ADDITION_FUNCTIONS: FrozenSet[Callable] = frozenset({operator.add, operator.iadd, torch.add})
_ADDITION_METHODS: FrozenSet[str] = frozenset({"add", "add_"})

_CONCATENATION_FUNCTIONS: FrozenSet[Callable] = frozenset(
    {torch.cat, torch.stack} | set(_optional("concat", "concatenate"))
)


def _is_module(node: NodeInfo, types: Tuple[type, ...]) -> bool:
    return node.opcode == "call_module" and isinstance(node.operator, types)


def _is_function(node: NodeInfo, functions: FrozenSet[Callable]) -> bool:
    if node.opcode != "call_function":
        return False
    try:
        return node.operator in functions
    except TypeError:  # an unhashable callable cannot be one of ours
        return False


def _is_method(node: NodeInfo, methods: FrozenSet[str]) -> bool:
    return node.opcode == "call_method" and node.operator in methods


def conv_filter(node: NodeInfo) -> bool:
    """A convolution: a ``Conv*d``/``ConvTranspose*d`` module or ``F.conv*d``."""
    return _is_module(node, _CONV_MODULES) or _is_function(node, _CONV_FUNCTIONS)


def linear_filter(node: NodeInfo) -> bool:
    """A fully connected layer: ``nn.Linear``/``nn.Bilinear`` or ``F.linear``/``F.bilinear``."""
    return _is_module(node, _LINEAR_MODULES) or _is_function(node, _LINEAR_FUNCTIONS)


def norm_filter(node: NodeInfo) -> bool:
    """A batch, instance, layer, group, RMS or local-response normalisation, module or function."""
    return _is_module(node, _NORM_MODULES) or _is_function(node, _NORM_FUNCTIONS)


def activation_filter(node: NodeInfo) -> bool:
    """An elementwise activation: module (``nn.ReLU``, ...), function (``F.relu``) or method (``x.relu()``)."""
    return (
        _is_module(node, _ACTIVATION_MODULES)
        or _is_function(node, _ACTIVATION_FUNCTIONS)
        or _is_method(node, _ACTIVATION_METHODS)
    )


def pooling_filter(node: NodeInfo) -> bool:
    """A pooling: module (``nn.MaxPool2d``, ...), function (``F.adaptive_avg_pool2d``) or ``x.mean(...)``."""
    return (
        _is_module(node, _POOLING_MODULES)
        or _is_function(node, _POOLING_FUNCTIONS)
        or _is_method(node, _POOLING_METHODS)
    )


def addition_filter(node: NodeInfo) -> bool:
    """An addition: ``+``, ``+=``, ``torch.add``, ``x.add(...)`` or a Captum ``Addition_Module``."""
    return (
        _is_module(node, (Addition_Module,))
        or _is_function(node, _ADDITION_FUNCTIONS)
        or _is_method(node, _ADDITION_METHODS)
    )


def concatenation_filter(node: NodeInfo) -> bool:
    """A concatenation: ``torch.cat``/``concat``/``stack`` or a ``captum_graph.modules.Concatenate``."""
    return _is_module(node, (Concatenate,)) or _is_function(node, _CONCATENATION_FUNCTIONS)


def module_type_filter(*types: Type[nn.Module]) -> NodeFilter:
    """A filter for calls of modules that are instances of any of ``types``.

    Raises:
        TypeError: no types given, or one of them is not a class.
    """
    if not types:
        raise TypeError("module_type_filter() needs at least one module class, e.g. module_type_filter(nn.Conv2d)")
    not_classes = [t for t in types if not isinstance(t, type)]
    if not_classes:
        raise TypeError(f"module_type_filter() takes module classes, got {not_classes!r}")

    def module_type(node: NodeInfo) -> bool:
        """A call of a module that is an instance of one of the given types."""
        return _is_module(node, types)

    module_type.__qualname__ = module_type.__name__ = (
        f"module_type_filter({', '.join(t.__qualname__ for t in types)})"
    )
    return module_type
