"""Rewrite passes: each takes a GraphModule, rewrites it in place, says if it changed.

Every pass keeps the outputs of the graph unchanged, carries the replaced
node's ``meta`` (qualified name, stack trace, module stack) to its replacement,
and changes nothing when run a second time.
"""
import operator
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import _patch_merging_pad, shifted_window_attention
from torchvision.ops import stochastic_depth

from . import modules as M
from .cloning import private_copy

__all__ = [
    "fold_batch_norms",
    "unshare_modules",
    "remove_inplace",
    "functional_to_modules",
    "DATA_MOVEMENT_FUNCTIONS",
    "DATA_MOVEMENT_METHODS",
    "input_dependent_nodes",
]

Pattern = Tuple[str, Any]  # (op, target)


def _finish(gm: fx.GraphModule, changed: bool) -> bool:
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed


def input_dependent_nodes(graph: fx.Graph) -> Set[fx.Node]:
    """Nodes whose value depends on a graph input (they carry relevance).

    Shapes, sizes and dtypes of tensors (``x.shape``, ``x.size(1)``) and what
    is computed from them alone carry no relevance and are left out.
    """
    reached: Set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (
            not _reads_metadata(node) and any(arg in reached for arg in node.all_input_nodes)
        ):
            reached.add(node)
    return reached


_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "get_device", "is_contiguous", "nelement"}


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in _METADATA_METHODS


# ---------------------------------------------------------------------------
# unshare_modules
# ---------------------------------------------------------------------------
def unshare_modules(gm: fx.GraphModule) -> bool:
    """Give each call site of a module called more than once a copy of its own.

    Matches ``call_module`` nodes whose target was already called earlier; the
    later call sites get a private copy (sharing parameter storage) registered
    under the node's qualified name, e.g. ``layer1.0.relu_1``. Idempotent.
    """
    seen: Set[str] = set()
    changed = False
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target not in seen:
            seen.add(node.target)
            continue
        copy = private_copy(gm.get_submodule(node.target))
        node.target = _free_path(gm, node.meta.get("qualname", node.name))
        gm.add_submodule(node.target, copy)
        seen.add(node.target)
        changed = True
    return _finish(gm, changed)


def _free_path(gm: fx.GraphModule, wanted: str) -> str:
    path, suffix = wanted, 0
    while _path_exists(gm, path):
        suffix += 1
        path = f"{wanted}_{suffix}"
    return path


def _path_exists(gm: nn.Module, path: str) -> bool:
    owner_path, _, name = path.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return False
    return hasattr(owner, name)


# ---------------------------------------------------------------------------
# fold_batch_norms
# ---------------------------------------------------------------------------
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_batch_norms(gm: fx.GraphModule) -> bool:
    """Merge each eval-mode batch norm into the convolution or linear layer feeding it.

    Matches a ``call_module`` batch norm whose input is a conv/linear call used
    by nothing else, anywhere in the graph; the pair becomes one layer with
    folded weights (a new private module; the user's parameters are read, never
    written). Outputs are unchanged up to rounding. Idempotent.
    """
    changed = False
    for norm_node in list(gm.graph.find_nodes(op="call_module")):
        norm = gm.get_submodule(norm_node.target)
        layer_node = norm_node.args[0] if norm_node.args else None
        if not _can_fold(gm, norm, layer_node):
            continue
        gm.add_submodule(layer_node.target, _folded(gm.get_submodule(layer_node.target), norm))
        norm_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(norm_node)
        changed = True
    return _finish(gm, changed)


def _can_fold(gm: fx.GraphModule, norm: nn.Module, layer_node: Any) -> bool:
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.training or norm.running_var is None:
        return False
    if not isinstance(layer_node, fx.Node) or layer_node.op != "call_module" or len(layer_node.users) != 1:
        return False
    layer = gm.get_submodule(layer_node.target)
    return isinstance(layer, _FOLDABLE) and (isinstance(layer, nn.Linear) or layer.out_channels == norm.num_features)


def _folded(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0)
        weight = layer.weight * scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
        bias = shift if layer.bias is None else layer.bias * scale + shift
    folded = private_copy(layer)
    folded.weight = nn.Parameter(weight, requires_grad=False)
    folded.bias = nn.Parameter(bias, requires_grad=False)
    return folded


# ---------------------------------------------------------------------------
# remove_inplace
# ---------------------------------------------------------------------------
_INPLACE_FUNCTIONS: Dict[Callable, Callable] = {
    torch.relu_: torch.relu,
    F.relu_: F.relu,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def remove_inplace(gm: fx.GraphModule) -> bool:
    """Make every in-place operation out-of-place.

    Matches modules with ``inplace=True`` (replaced by a private copy with
    ``inplace=False``: the user's module keeps its flag), ``inplace=True``
    keyword arguments, in-place functions
    (``torch.relu_``, ``operator.iadd``) and in-place methods (``x.add_(y)``).
    Later readers of a tensor that was modified in place read the new node.
    Idempotent.
    """
    changed = False
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is True:
            copy = private_copy(module)
            copy.inplace = False
            gm.add_submodule(node.target, copy)
            if node.args and isinstance(node.args[0], fx.Node):
                _redirect_later_readers(node, node.args[0])
            changed = True
    for node in list(gm.graph.nodes):
        mutated = _make_out_of_place(node)
        if mutated is not None:
            _redirect_later_readers(node, mutated)
            changed = True
    return _finish(gm, changed)


def _make_out_of_place(node: fx.Node) -> Optional[fx.Node]:
    """Rewrite ``node`` out of place; return the tensor it used to modify, if any."""
    if node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        node.target = _INPLACE_FUNCTIONS[node.target]
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and _is_inplace_method(node.target):
        node.target = node.target[:-1]
        return node.args[0]
    return None


def _is_inplace_method(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name.endswith("_")
        and not name.startswith("_")
        and hasattr(torch.Tensor, name[:-1])
    )


def _redirect_later_readers(node: fx.Node, mutated: fx.Node) -> None:
    later = False
    for candidate in node.graph.nodes:
        if candidate is node:
            later = True
            continue
        if later and mutated in candidate.all_input_nodes:
            candidate.replace_input_with(mutated, node)


# ---------------------------------------------------------------------------
# functional_to_modules
# ---------------------------------------------------------------------------
def _pattern(*targets: Any) -> List[Pattern]:
    return [("call_method", t) if isinstance(t, str) else ("call_function", t) for t in targets]


ADDITIONS = _pattern(operator.add, torch.add, "add")
SUBTRACTIONS = _pattern(operator.sub, torch.sub, torch.subtract, "sub")
PRODUCTS = _pattern(operator.mul, torch.mul, torch.multiply, "mul")
DIVISIONS = _pattern(operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
SOFTMAXES = _pattern(F.softmax, torch.softmax, "softmax")
MATMULS = _pattern(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", torch.einsum)
CONCATENATIONS = _pattern(torch.cat, torch.concat, torch.concatenate)
STACKS = _pattern(torch.stack)

ACTIVATIONS = _pattern(
    F.relu, torch.relu, "relu", F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.hardtanh, torch.tanh, "tanh", F.tanh,
    torch.sigmoid, "sigmoid", F.sigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, "clamp", torch.clamp, "clip", torch.clip, stochastic_depth,
)
LINEAR_FUNCTIONS = _pattern(
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.mean, "mean", torch.sum, "sum", F.linear, F.conv1d, F.conv2d, F.conv3d,
    F.interpolate, F.batch_norm, torch.neg, "neg", operator.neg, F.layer_norm, F.group_norm,
    shifted_window_attention,
)

DATA_MOVEMENT_FUNCTIONS = frozenset({
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.swapaxes, torch.squeeze, torch.unsqueeze, torch.split, torch.chunk, torch.unbind,
    torch.roll, torch.flip, torch.narrow, torch.movedim, torch.moveaxis, F.pad, torch.t,
    torch.tensor_split, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle,
    torch.clone, F.channel_shuffle, torch.index_select,
    _patch_merging_pad,  # torchvision swin: zero-pads H and W to even sizes
})
DATA_MOVEMENT_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "swapaxes",
    "contiguous", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "split", "chunk",
    "unbind", "unflatten", "narrow", "flip", "roll", "clone", "to", "type", "float", "double",
    "half", "bfloat16", "t", "movedim", "moveaxis", "size", "dim", "numel", "tensor_split",
    "index_select", "detach",
})


def functional_to_modules(gm: fx.GraphModule) -> bool:
    """Turn functional operations that matter for relevance into leaf modules.

    Matches (by ``(op, target)`` tables): additions in every spelling
    (``a + b``, ``torch.add(a, b, alpha=)``, ``a.add(b)``; chains of additions
    stay one module per call site) -> :class:`Addition`; subtractions ->
    :class:`Subtraction`; products and divisions by a constant ->
    :class:`Scale`; ``cat``/``concat``/``stack`` -> :class:`Concatenate` /
    :class:`Stack`; functional activations -> :class:`Activation`; pooling,
    means, sums and other linear functions -> :class:`LinearFunction`. The new
    module is registered under the node's qualified name (``layer1.0.add``).
    Products of two input-dependent tensors become :class:`Gate` when one
    factor comes from a sigmoid-like function, else :class:`Product`.
    Idempotent: it matches functions only.
    """
    dependent = input_dependent_nodes(gm.graph)
    changed = False
    for node in list(gm.graph.nodes):
        replacement = _module_for(node, dependent)
        if replacement is not None:
            dependent.add(_replace_with_module(gm, node, *replacement))
            changed = True
    return _finish(gm, changed)


def _module_for(node: fx.Node, dependent: Set[fx.Node]) -> Optional[Tuple[nn.Module, tuple]]:
    if node not in dependent or node.op not in ("call_function", "call_method"):
        return None
    key = (node.op, node.target)
    if key in ADDITIONS:
        return _addition(node)
    if key in SUBTRACTIONS and len(node.args) == 2 and not node.kwargs:
        return M.Subtraction(), node.args
    if key in PRODUCTS:
        return _scaling(node, dependent, divide=False) or _product(node)
    if key in DIVISIONS:
        return _scaling(node, dependent, divide=True)
    if key in SOFTMAXES:
        return _function_module(M.Softmax, node)
    if key in MATMULS:
        return _matmul(node, dependent)
    if key in CONCATENATIONS:
        return _concatenation(node, M.Concatenate)
    if key in STACKS:
        return _concatenation(node, M.Stack)
    if key in ACTIVATIONS:
        return _function_module(M.Activation, node)
    if key in LINEAR_FUNCTIONS:
        return _function_module(M.LinearFunction, node)
    return None


def _addition(node: fx.Node) -> Optional[Tuple[nn.Module, tuple]]:
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    return M.Addition(2, node.kwargs.get("alpha", 1)), node.args


def _scaling(node: fx.Node, dependent: Set[fx.Node], divide: bool) -> Optional[Tuple[nn.Module, tuple]]:
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a in dependent and b not in dependent:
        return M.Scale(divide), (a, b)
    if b in dependent and a not in dependent and not divide:
        return M.Scale(divide), (b, a)
    return None


_GATE_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid)
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)


def _is_gate(node: Any) -> bool:
    """Whether ``node`` is the output of a sigmoid-like function (already a module)."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    module = node.graph.owning_module.get_submodule(node.target)
    return isinstance(module, _GATE_MODULES) or getattr(module, "fn", None) in _GATE_FUNCTIONS + (torch.Tensor.sigmoid,)


def _product(node: fx.Node) -> Optional[Tuple[nn.Module, tuple]]:
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if _is_gate(b):
        return M.Gate(), (a, b)
    if _is_gate(a):
        return M.Gate(), (b, a)
    return M.Product(), (a, b)


def _matmul(node: fx.Node, dependent: Set[fx.Node]) -> Optional[Tuple[nn.Module, tuple, dict]]:
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    signals = [a for a in operands if a in dependent]
    if len(signals) < 2:
        return _function_module(M.LinearFunction, node)
    kind = M.AttentionMatmul if any(_comes_from_softmax(a) for a in signals) else M.Matmul
    return _function_module(kind, node)


def _comes_from_softmax(node: fx.Node) -> bool:
    """Whether ``node`` is a softmax's output, possibly reshaped or dropped out."""
    while True:
        if node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), (M.Softmax, nn.Softmax)):
            return True
        movable = node.op == "call_method" and node.target in DATA_MOVEMENT_METHODS or (
            node.op == "call_function" and node.target in DATA_MOVEMENT_FUNCTIONS
        )
        dropout = node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), (nn.Dropout, M.Activation))
        if not (movable or dropout) or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]


def _concatenation(node: fx.Node, kind: type) -> Optional[Tuple[nn.Module, tuple]]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    return kind(dim), tuple(tensors)


def _function_module(kind: type, node: fx.Node) -> Optional[Tuple[nn.Module, tuple, dict]]:
    fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    fixed = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
    passed = {k: v for k, v in node.kwargs.items() if isinstance(v, fx.Node)}
    return kind(fn, **fixed), node.args, passed


def _replace_with_module(
    gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: Iterable, kwargs: Optional[dict] = None
) -> fx.Node:
    qualname = node.meta.get("qualname", node.name)
    path = _free_path(gm, qualname)
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, tuple(args), kwargs or {})
    new.meta = dict(node.meta)
    new.meta["qualname"] = qualname
    new.meta["original_name"] = node.meta.get("original_name", node.name)
    new.meta["replaced"] = _describe_target(node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _describe_target(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    module = getattr(node.target, "__module__", "") or ""
    module = "operator" if module == "_operator" else module
    return f"{module}.{getattr(node.target, '__name__', node.target)}"
