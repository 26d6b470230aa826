"""Ready-made ``filter_func`` arguments for :meth:`ModelArchitecture.find_node`.

Each filter takes a :class:`~captum_graph.NodeInfo` and says whether the node
is that kind of tensor operation, in any graph a ``ModelArchitecture`` views:

* a plain ``torch.fx`` graph: a module call (``call_module``), a function
  (``call_function``: ``F.relu``, ``operator.add``) or a tensor method
  (``call_method``: ``x.mean``);
* an ATen graph (``torch.export``): a ``call_function`` of an ATen operator,
  matched by its overload packet (``aten.add.Tensor`` is ``aten.add``) and its
  in-place form (``aten.add_``);
* a rewritten graph (:meth:`ModelArchitecture.from_model`): leaf modules of
  :mod:`captum_graph.modules`, by type (``Addition``, ``Concatenate``) or, for
  :class:`~captum_graph.modules.Function` modules (``Activation``,
  ``LinearFunction``), by the function they call (``fn``).

Arithmetic on sizes (nodes whose value is a ``SymInt`` or a number) is no
tensor operation and matches no filter.

Examples::

    >>> arch = ModelArchitecture.from_model(torchvision.models.resnet18())
    >>> arch.find_node(conv_filter)
    NodeInfo(opcode='call_module', name='conv1', target='conv1')
    >>> len(arch.find_node(addition_filter, all=True))
    8
"""
import operator
from typing import Any, Callable, FrozenSet, NamedTuple, Tuple, Type

import torch
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn

from .architecture import NodeInfo
from .modules import Concatenate, Function

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


def _aten(*names: str) -> FrozenSet[Any]:
    """The ATen overload packets ``aten.<name>`` and their in-place forms ``aten.<name>_``, where they exist."""
    return frozenset(_optional(*names, *(name + "_" for name in names), owner=torch.ops.aten))


class _Kind(NamedTuple):
    """Every spelling of one kind of operation."""

    modules: Tuple[Type[nn.Module], ...]
    functions: FrozenSet[Callable] = frozenset()
    methods: FrozenSet[str] = frozenset()
    aten: FrozenSet[Any] = frozenset()


_CONV = _Kind(
    modules=(nn.modules.conv._ConvNd,),
    functions=frozenset({
        F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    }),
    aten=_aten(
        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "convolution", "_convolution",
    ),
)

_LINEAR = _Kind(
    modules=(nn.Linear, nn.Bilinear),
    functions=frozenset({F.linear, F.bilinear}),
    aten=_aten("linear", "bilinear"),
)

_NORM = _Kind(
    modules=(
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,  # and subclasses such as torchvision's LayerNorm2d
        nn.GroupNorm,
        nn.LocalResponseNorm,
    ) + _optional("RMSNorm", owner=nn),
    functions=frozenset({
        F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm, F.local_response_norm,
        torch.batch_norm, torch.instance_norm, torch.layer_norm, torch.group_norm,
    } | set(_optional("rms_norm", owner=F)) | set(_optional("rms_norm"))),
    aten=_aten(
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "instance_norm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm",
        "_fused_rms_norm",
    ),
)

_ACTIVATION = _Kind(
    modules=(
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
        nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
        nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
    ),
    functions=frozenset({
        F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.elu, F.selu,
        F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid,
        F.tanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.threshold,
        torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.selu, torch.celu, torch.prelu,
        torch.rrelu,
    }),
    methods=frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}),
    # nn.ReLU6 runs as aten.hardtanh, F.relu6 as aten.relu6; softsign and tanhshrink
    # are decomposed into arithmetic by torch.export.
    aten=_aten(
        "relu", "relu6", "leaky_relu", "prelu", "_prelu_kernel", "rrelu", "rrelu_with_noise", "elu", "selu",
        "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus",
        "log_sigmoid", "log_sigmoid_forward", "threshold",
    ),
)

_POOLING = _Kind(
    modules=(
        nn.modules.pooling._MaxPoolNd,
        nn.modules.pooling._AvgPoolNd,
        nn.modules.pooling._AdaptiveAvgPoolNd,
        nn.modules.pooling._AdaptiveMaxPoolNd,
        nn.modules.pooling._LPPoolNd,
        nn.FractionalMaxPool2d,
        nn.FractionalMaxPool3d,
    ),
    functions=frozenset({
        F.max_pool1d, F.max_pool2d, F.max_pool3d,
        F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
        F.lp_pool1d, F.lp_pool2d,
        torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
        torch.mean,
    }),
    methods=frozenset({"mean"}),
    aten=_aten(
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "fractional_max_pool2d",
        "fractional_max_pool3d", "mean",
    ),
)

_ADDITION = _Kind(
    modules=(Addition_Module,),  # captum_graph.modules.Addition among them
    functions=frozenset({operator.add, operator.iadd, torch.add}),
    methods=frozenset({"add", "add_"}),
    aten=_aten("add"),
)

_CONCATENATION = _Kind(
    modules=(Concatenate,),  # and Stack
    functions=frozenset({torch.cat, torch.stack} | set(_optional("concat", "concatenate"))),
    aten=_aten("cat", "concat", "concatenate", "stack"),
)

#: Values that make a node arithmetic on sizes rather than a tensor operation.
_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _calls(fn: Any, kind: _Kind) -> bool:
    """Whether the function ``fn`` (an ATen overload or packet, or a Python callable) is of ``kind``."""
    packet = getattr(fn, "overloadpacket", fn)  # aten.add.Tensor -> aten.add
    try:
        return packet in kind.aten or fn in kind.functions
    except TypeError:  # an unhashable callable cannot be one of ours
        return False


def _is(node: NodeInfo, kind: _Kind) -> bool:
    if isinstance(node.meta.get("val"), _NUMBERS):
        return False
    if node.opcode == "call_module":
        module = node.operator
        return isinstance(module, kind.modules) or (isinstance(module, Function) and _calls(module.fn, kind))
    if node.opcode == "call_function":
        return _calls(node.operator, kind)
    return node.opcode == "call_method" and node.operator in kind.methods


def conv_filter(node: NodeInfo) -> bool:
    """A convolution: ``Conv*d``/``ConvTranspose*d``, ``F.conv*d`` or ``aten.conv*d``/``aten.convolution``."""
    return _is(node, _CONV)


def linear_filter(node: NodeInfo) -> bool:
    """A fully connected layer: ``nn.Linear``/``nn.Bilinear``, ``F.linear``/``F.bilinear`` or ``aten.linear``."""
    return _is(node, _LINEAR)


def norm_filter(node: NodeInfo) -> bool:
    """A batch, instance, layer, group, RMS or local-response normalisation: module, function or ATen op."""
    return _is(node, _NORM)


def activation_filter(node: NodeInfo) -> bool:
    """An elementwise activation: ``nn.ReLU``, ``F.relu``, ``x.relu()``, ``aten.relu``, ... (not dropout)."""
    return _is(node, _ACTIVATION)


def pooling_filter(node: NodeInfo) -> bool:
    """A pooling or mean: ``nn.MaxPool2d``, ``F.adaptive_avg_pool2d``, ``x.mean(...)``, ``aten.avg_pool2d``, ..."""
    return _is(node, _POOLING)


def addition_filter(node: NodeInfo) -> bool:
    """An addition: ``+``, ``+=``, ``torch.add``, ``x.add(...)``, ``aten.add`` or an ``Addition_Module``."""
    return _is(node, _ADDITION)


def concatenation_filter(node: NodeInfo) -> bool:
    """A concatenation: ``torch.cat``/``concat``/``stack``, ``aten.cat``/``aten.stack`` or ``Concatenate``/``Stack``."""
    return _is(node, _CONCATENATION)


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
        return node.opcode == "call_module" and isinstance(node.operator, types)

    module_type.__qualname__ = module_type.__name__ = (
        f"module_type_filter({', '.join(t.__qualname__ for t in types)})"
    )
    return module_type
