"""Rewrite passes over captured ATen graphs: each rewrites a GraphModule in place, says if it changed.

Every pass keeps the outputs of the graph unchanged, carries the replaced
node's ``meta`` (qualified name, stack trace, module stack) to its replacement,
and changes nothing when run a second time. The op tables are keyed by ATen
operator (``aten.add`` stands for all its overloads), so ``x + y``,
``torch.add`` and ``x.add_(y)`` in the user's code are one pattern here.
"""
import functools
import inspect
import operator
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Type, Union

import torch
import torch.fx as fx
from torch import nn

from . import modules as M
from .cloning import private_copy

__all__ = [
    "register_leaf_module",
    "registered_leaf_modules",
    "remove_inplace",
    "views_to_reshapes",
    "is_torch_layer",
    "takes_one_tensor",
    "calls_to_modules",
    "qualify_names",
    "fold_batch_norms",
    "unshare_modules",
    "elementwise_functions_to_modules",
    "functional_to_modules",
    "DATA_MOVEMENT",
    "moves_data",
    "CONSTANT_INPUT",
    "input_dependent_nodes",
    "view_base",
    "relevance_carrying_nodes",
]

aten = torch.ops.aten


def _finish(gm: fx.GraphModule, changed: bool) -> bool:
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed


def _packet(node: fx.Node) -> Any:
    """The ATen operator of a node (``aten.add`` for ``aten.add_.Tensor``), also once it is a
    :class:`~captum_graph.modules.Function` module; else the function called, or ``None``."""
    if node.op == "call_module":
        target = node.meta.get("replaced_op") or getattr(node.graph.owning_module.get_submodule(node.target), "fn", None)
    elif node.op == "call_function":
        target = node.target
    else:
        return None
    return getattr(target, "overloadpacket", target)


# ---------------------------------------------------------------------------
# which nodes carry relevance
# ---------------------------------------------------------------------------
# Operators whose value does not depend on their tensor inputs' values.
_METADATA = frozenset({
    aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset, aten.new_zeros,
    aten.new_ones, aten.new_empty, aten.new_full, aten.zeros_like, aten.ones_like, aten.empty_like,
    aten.full_like, aten.scalar_tensor, aten.arange,
})


def _reads_metadata(node: fx.Node) -> bool:
    if _packet(node) in _METADATA:
        return True
    value = node.meta.get("val")
    return value is not None and not isinstance(value, (torch.Tensor, tuple, list))  # sizes, SymInts


#: ``meta`` key marking a placeholder whose value LRP holds constant: an argument that is
#: not explained (Captum's ``additional_forward_args``), so no relevance flows into it.
CONSTANT_INPUT = "captum_graph_constant_input"

#: Operators that look rows of a table up by indices (``nn.Embedding``): where the indices come from
#: an integer input (token ids), relevance starts at the rows looked up.
LOOKUPS = frozenset({aten.embedding})


def input_dependent_nodes(graph: fx.Graph) -> Set[fx.Node]:
    """Nodes whose value depends on the values of an explained floating-point graph input, or on
    an embedding lookup at indices read from an explained graph input.

    Integer and boolean inputs (token ids, attention masks) carry no
    relevance themselves: relevance ends at the rows an embedding looks up
    with them, and a mask made from them is a constant. Shapes and sizes
    (``aten.sym_size``), tensors made from them alone (``new_zeros``),
    placeholders marked :data:`CONSTANT_INPUT` and what is computed from
    those carry no relevance either.
    """
    read: Set[fx.Node] = set()  # depends on some input's values
    reached: Set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if not node.meta.get(CONSTANT_INPUT):
                read.add(node)
                if _is_floating(node):
                    reached.add(node)
        elif not _reads_metadata(node) and any(arg in read for arg in node.all_input_nodes):
            read.add(node)
            if _packet(node) in LOOKUPS or any(arg in reached for arg in node.all_input_nodes):
                reached.add(node)
    return reached


def _is_floating(node: fx.Node) -> bool:
    """Whether a placeholder holds a floating-point (or complex) tensor; unknown counts as floating."""
    value = node.meta.get("val")
    return not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex


ConstantInputs = Union[str, Tuple[int, ...]]


def relevance_carrying_nodes(
    gm: fx.GraphModule, constant_inputs: Optional[Callable[[fx.Node], ConstantInputs]] = None
) -> Set[fx.Node]:
    """Input-dependent nodes that relevance reaches from the output.

    Relevance does not enter a module's constant inputs (a gate, a
    normalising factor, attention scores before a constant softmax), so what
    only feeds those needs no rule. ``constant_inputs(node)`` gives them for a
    ``call_module`` node (argument positions, or ``"all"``); by default the
    module's ``constant_inputs`` attribute (a rule may declare others: see
    :func:`captum_graph.rules.constant_inputs`).
    """
    dependent = input_dependent_nodes(gm.graph)
    constant_inputs = constant_inputs or (lambda node: getattr(gm.get_submodule(node.target), "constant_inputs", ()))
    reached: Set[fx.Node] = set()
    frontier = [n for n in gm.graph.find_nodes(op="output")]
    while frontier:
        node = frontier.pop()
        for arg in _relevance_inputs(node, constant_inputs(node) if node.op == "call_module" else ()):
            if arg in dependent and arg not in reached:
                reached.add(arg)
                frontier.append(arg)
    return reached


def _relevance_inputs(node: fx.Node, constant: ConstantInputs) -> List[fx.Node]:
    if constant == "all":
        return []
    return [arg for i, arg in enumerate(node.args) if isinstance(arg, fx.Node) and i not in constant] + [
        arg for arg in node.all_input_nodes if arg not in node.args
    ]


# ---------------------------------------------------------------------------
# remove_inplace
# ---------------------------------------------------------------------------
# Operators returning a view of their first argument (a write to one is a write to the other).
VIEWS = frozenset({
    aten.view, aten._unsafe_view, aten.reshape, aten.slice, aten.select, aten.transpose, aten.permute,
    aten.unsqueeze, aten.squeeze, aten.expand, aten.as_strided, aten.t, aten.narrow, aten.diagonal,
    aten.alias, aten.unflatten, aten.flatten, aten.reshape_as, aten.ravel, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind,
    aten.view_as, aten.expand_as, aten.swapaxes, aten.movedim, aten.detach, aten.contiguous,
})


def remove_inplace(gm: fx.GraphModule) -> bool:
    """Make in-place ATen operations out-of-place (``aten.relu_`` -> ``aten.relu``).

    Later readers of the mutated tensor read the new node. An in-place
    operation on a tensor another view of whose memory is read later (its
    base, a view of it or of the base) stays as it is, marked
    ``meta["inplace_on_view"]``: harmless where no relevance flows (masks), an
    error at rule assignment where it does.
    Idempotent.
    """
    changed = False
    for node in list(gm.graph.nodes):
        functional = _out_of_place(node)
        if functional is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        if _aliases_read_later(node, mutated):
            node.meta["inplace_on_view"] = True
            continue
        node.target = functional
        _redirect_later_readers(node, mutated)
        changed = True
    return _finish(gm, changed)


def _out_of_place(node: fx.Node) -> Optional[Any]:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target._schema.name.split("::")[-1]
    arguments = node.target._schema.arguments
    if not name.endswith("_") or name.startswith("_") or not arguments or arguments[0].alias_info is None:
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, node.target._overloadname, None) if packet is not None else None


def view_base(node: fx.Node) -> fx.Node:
    """The tensor ``node`` is a view of (itself if it is none)."""
    while node.op == "call_function" and (_packet(node) in VIEWS or node.target is operator.getitem):
        node = node.args[0]
    return node


def _aliases_read_later(node: fx.Node, mutated: fx.Node) -> bool:
    """Whether a tensor sharing memory with ``mutated`` (its base, views of either) is read after ``node``."""
    base = view_base(mutated)
    aliases, frontier = {base}, [base]
    while frontier:
        for user in frontier.pop().users:
            if user not in aliases and (_packet(user) in VIEWS or user.target is operator.getitem):
                aliases.add(user)
                frontier.append(user)
    aliases.discard(mutated)
    later = False
    for candidate in node.graph.nodes:
        if candidate is node:
            later = True
        elif later and any(arg in aliases for arg in candidate.all_input_nodes):
            return True
    return False


def _redirect_later_readers(node: fx.Node, mutated: fx.Node) -> None:
    later = False
    for candidate in node.graph.nodes:
        if candidate is node:
            later = True
            continue
        if later and mutated in candidate.all_input_nodes:
            candidate.replace_input_with(mutated, node)


def views_to_reshapes(gm: fx.GraphModule) -> bool:
    """Make every ``aten.view`` an ``aten.reshape``: the same values, also where strides differ.

    Out-of-place operations may lay out their results differently from the
    in-place ones they replace, and a ``view`` of such a result would fail.
    Skipped where an in-place write stays in the graph (it may write through
    a view). Idempotent.
    """
    if any(node.meta.get("inplace_on_view") for node in gm.graph.nodes):
        return False
    views = [node for node in gm.graph.nodes if node.op == "call_function" and node.target is aten.view.default]
    for node in views:
        node.target = aten.reshape.default
    return _finish(gm, bool(views))


# ---------------------------------------------------------------------------
# calls_to_modules
# ---------------------------------------------------------------------------
_LEAF_MODULES: Set[Type[nn.Module]] = set()


def register_leaf_module(module_class: Type[nn.Module]) -> Type[nn.Module]:
    """Keep each call of a ``module_class`` instance as one node of the graph.

    Usable as a class decorator. The module must take one tensor and return
    one; it needs a relevance rule (:func:`captum_graph.register_rule`) unless
    one of its base classes has one.
    """
    _LEAF_MODULES.add(module_class)
    return module_class


def registered_leaf_modules() -> Tuple[Type[nn.Module], ...]:
    """The module classes registered with :func:`register_leaf_module`."""
    return tuple(_LEAF_MODULES)


_TORCH_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def is_torch_layer(module: nn.Module) -> bool:
    """A torch.nn layer, or a subclass that keeps its ``forward`` (``class MyConv(nn.Conv2d)``).

    A subclass with a ``forward`` of its own (timm's ``BatchNormAct2d``) is not:
    what it computes is read from its operations instead.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.modules") and cls not in _TORCH_CONTAINERS:
            return type(module).forward is cls.forward
    return False


def takes_one_tensor(module: nn.Module) -> bool:
    """Whether ``module.forward`` has exactly one required positional argument."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def calls_to_modules(gm: fx.GraphModule, model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> bool:
    """Turn each call of a leaf module of ``model`` back into one ``call_module`` node.

    Matches the operations recorded inside one call of a module (by
    ``nn_module_stack``) for which ``is_leaf`` holds and that take one tensor
    from outside and give one tensor back; outermost calls first. They are
    replaced by a call of ``model``'s module at its path (a private copy with
    ``inplace=False`` where the module works in place). Idempotent: a
    ``call_module`` node is never matched.
    """
    changed = False
    for key, path in _module_calls(gm.graph):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if not is_leaf(module):
            continue
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and key in (n.meta.get("nn_module_stack") or {})]
        boundary = _single_boundary(nodes)
        if boundary is None:
            continue
        if getattr(module, "inplace", False) is True:
            module = private_copy(module)
            module.inplace = False
        source, result = boundary
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(result):
            call = gm.graph.call_module(path, (source,))
        call.meta = {**result.meta, "nn_module_stack": _stack_up_to(result, key)}
        result.replace_all_uses_with(call)
        for node in reversed(nodes):
            gm.graph.erase_node(node)
        changed = True
    _erase_unused_attributes(gm)
    return _finish(gm, changed)


def _module_calls(graph: fx.Graph) -> List[Tuple[str, str]]:
    """Every ``(stack key, module path)`` in the graph, outermost calls first."""
    calls: Dict[str, Tuple[int, str]] = {}
    for node in graph.nodes:
        for depth, (key, (path, _)) in enumerate((node.meta.get("nn_module_stack") or {}).items()):
            calls.setdefault(key, (depth, path))
    return [(key, path) for key, (_, path) in sorted(calls.items(), key=lambda item: item[1][0])]


def _single_boundary(nodes: List[fx.Node]) -> Optional[Tuple[fx.Node, fx.Node]]:
    """``(input, output)`` if ``nodes`` read one outside tensor and one of them is read outside."""
    if not nodes:
        return None
    inside = set(nodes)
    sources = {
        arg for node in nodes for arg in node.all_input_nodes
        if arg not in inside and arg.op != "get_attr" and not _reads_metadata(arg)
    }
    results = [node for node in nodes if any(user not in inside for user in node.users)]
    if len(sources) != 1 or len(results) != 1 or not isinstance(results[0].meta.get("val"), torch.Tensor):
        return None
    return next(iter(sources)), results[0]


def _stack_up_to(node: fx.Node, key: str) -> Dict[str, Any]:
    stack = {}
    for entry, value in (node.meta.get("nn_module_stack") or {}).items():
        stack[entry] = value
        if entry == key:
            break
    return stack


def _erase_unused_attributes(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            gm.graph.erase_node(node)


# ---------------------------------------------------------------------------
# qualify_names
# ---------------------------------------------------------------------------
def qualify_names(gm: fx.GraphModule) -> bool:
    """Give every node a qualified name (``meta["qualname"]``) and an fx-style name.

    A module call is named by the module's path (``layer1.0.relu``, a second
    call ``layer1.0.relu_1``); an operation by the innermost module it ran in
    plus the operator (``layer1.0.add``), or by the operator alone at top
    level. ``meta["original_name"]`` numbers each operator over the graph as
    ``torch.fx`` does (``add``, ``add_1``, ...). Idempotent.
    """
    used: Dict[str, int] = {}
    numbered: Dict[str, int] = {}
    wanted: Dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if "qualname" in node.meta:
            used[node.meta["qualname"]] = used.get(node.meta["qualname"], 0) + 1
            continue
        base = _base_name(node)
        count = numbered.get(base, 0)
        numbered[base] = count + 1
        node.meta["original_name"] = base if count == 0 else f"{base}_{count}"
        if node.op in ("placeholder", "output"):
            wanted[node] = node.name
        elif node.op in ("call_module", "get_attr"):
            wanted[node] = str(node.target)
        else:
            stack = node.meta.get("nn_module_stack") or {}
            owner = list(stack.values())[-1][0] if stack else ""
            wanted[node] = f"{owner}.{base}" if owner else node.meta["original_name"]
    # module calls first: a module's first call is named by its path, whatever functions share it
    for node in sorted(wanted, key=lambda n: n.op != "call_module"):
        count = used.get(wanted[node], 0)
        used[wanted[node]] = count + 1
        node.meta["qualname"] = wanted[node] if count == 0 else f"{wanted[node]}_{count}"
    return bool(wanted)


def _base_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target).replace(".", "_")
    if node.op != "call_function":
        return node.name
    name = getattr(node.target, "__name__", None) or str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target._schema.name.split("::")[-1]
    return name.strip("_") or name


# ---------------------------------------------------------------------------
# unshare_modules
# ---------------------------------------------------------------------------
def unshare_modules(gm: fx.GraphModule) -> bool:
    """Give each call site of a module called more than once a copy of its own.

    Matches ``call_module`` nodes whose module (the same object, under any
    path: a model may hold one module under two names) was already called
    earlier; the later call sites get a private copy (sharing parameter
    storage) registered under the node's qualified name, e.g.
    ``layer1.0.relu_1``. Idempotent.
    """
    seen: Set[int] = set()
    changed = False
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        if id(module) not in seen:
            seen.add(id(module))
            continue
        copy = private_copy(module)
        node.target = _free_path(gm, node.meta.get("qualname", node.name))
        gm.add_submodule(node.target, copy)
        seen.add(id(copy))
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
# elementwise_functions_to_modules
# ---------------------------------------------------------------------------
# Pointwise operators that are linear in their tensor argument (with scalar constants), and casts.
_LINEAR_POINTWISE = frozenset({aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.neg, aten.clone, aten._to_copy})
# Products: of two functions of the same tensor, the mark of an activation written out.
_PRODUCTS = frozenset({aten.mul, aten.div, aten.addcmul, aten.addcdiv})
# Statistics: a pointwise function of one is a normalising factor, recognised where it divides.
_REDUCTIONS = frozenset({
    aten.mean, aten.sum, aten.var, aten.std, aten.var_mean, aten.amax, aten.amin, aten.max, aten.min,
    aten.norm, aten.linalg_vector_norm, aten.frobenius_norm, aten.logsumexp, aten.prod,
})


def elementwise_functions_to_modules(gm: fx.GraphModule) -> bool:
    """Turn an elementwise activation written out in operations into one :class:`Elementwise` module.

    Matches a connected group of pointwise ATen operations (and casts)
    computing a function of one input-dependent tensor ``x`` with scalar
    constants only, read outside the group at one node, that multiplies two
    functions of ``x`` of which one is non-linear:
    ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x ** 3)))`` (GPT-2's GELU),
    ``x * relu6(x + 3) / 6`` (not a sigmoid gate ``x * sigmoid(x)``, a
    :class:`Gate` already). It becomes one module on
    ``x`` (relevance passes through, as for any elementwise activation)
    instead of additions of constants and a product of two signals, which
    would absorb and split relevance. Chains of activations without such a
    product keep a module each (``relu`` stays a layer). A function of a
    statistic (``sqrt(var + eps)``) is left to the normalising-factor rules.
    Idempotent: it matches ``call_function`` nodes only.
    """
    dependent = input_dependent_nodes(gm.graph)
    roots: Dict[fx.Node, fx.Node] = {}  # node -> the one tensor it is an elementwise function of
    for node in gm.graph.nodes:
        root = _elementwise_root(node, dependent, roots)
        if root is not None:
            roots[node] = root
    changed = False
    for group in _connected_groups(roots):
        readout = [n for n in group if any(user not in group for user in n.users)]
        nonlinear = any(_packet(n) not in _LINEAR_POINTWISE for n in group)
        product = any(_is_signal_product(n) for n in group)
        root = roots[group[0]]
        if len(readout) != 1 or not (nonlinear and product) or _packet(root) in _REDUCTIONS:
            continue
        _replace_with_module(gm, readout[0], M.Elementwise(_subgraph(group, root, readout[0])), (root,))
        for node in reversed(group):
            if node is not readout[0]:  # replaced and erased already
                gm.graph.erase_node(node)
        changed = True
    return _finish(gm, changed)


def _is_signal_product(node: fx.Node) -> bool:
    """A product of two signals, neither a sigmoid-like gate (``x * sigmoid(x)`` is a :class:`Gate`)."""
    factors = node.all_input_nodes
    return _packet(node) in _PRODUCTS and len(factors) > 1 and not any(_packet(f) in _GATES for f in factors)


def _elementwise_root(node: fx.Node, dependent: Set[fx.Node], roots: Dict[fx.Node, fx.Node]) -> Optional[fx.Node]:
    """The tensor ``node`` is a pointwise function of (with scalar constants), or ``None``."""
    if node.op != "call_function" or node not in dependent or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if torch.Tag.pointwise not in node.target.tags and _packet(node) is not aten._to_copy:
        return None
    arguments = list(node.args) + list(node.kwargs.values())
    if any(isinstance(a, (list, tuple)) for a in arguments):
        return None
    tensors = [a for a in arguments if isinstance(a, fx.Node)]
    if not tensors or any(a not in dependent for a in tensors):
        return None  # a constant tensor (a weight, a mask) makes it no function of one tensor
    found = {roots.get(a, a) for a in tensors}
    return found.pop() if len(found) == 1 else None


def _connected_groups(roots: Dict[fx.Node, fx.Node]) -> List[List[fx.Node]]:
    """The nodes of ``roots`` in groups linked by their arguments, each in graph order."""
    group_of: Dict[fx.Node, List[fx.Node]] = {}
    for node in roots:  # graph order
        linked = [group_of[a] for a in node.all_input_nodes if a in group_of]
        group = linked[0] if linked else []
        for other in linked[1:]:
            if other is not group:
                group.extend(other)
                for member in other:
                    group_of[member] = group
        group.append(node)
        group_of[node] = group
    unique = {id(g): g for g in group_of.values()}
    order = {node: i for i, node in enumerate(roots)}
    return [sorted(g, key=order.__getitem__) for g in unique.values()]


def _subgraph(group: List[fx.Node], root: fx.Node, readout: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env = {root: graph.placeholder("x")}
    for node in group:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[readout])
    return fx.GraphModule(nn.Module(), graph, "elementwise")


# ---------------------------------------------------------------------------
# functional_to_modules
# ---------------------------------------------------------------------------
ADDITIONS = frozenset({aten.add})
SUBTRACTIONS = frozenset({aten.sub})
PRODUCTS = frozenset({aten.mul})
DIVISIONS = frozenset({aten.div})
SOFTMAXES = frozenset({aten.softmax, aten._softmax, aten._safe_softmax})
MATMULS = frozenset({aten.matmul, aten.bmm, aten.mm, aten.einsum})
CONCATENATIONS = frozenset({aten.cat, aten.concat, aten.concatenate})
STACKS = frozenset({aten.stack})
ATTENTION = frozenset({aten.scaled_dot_product_attention})
ACTIVATIONS = frozenset({
    aten.relu, aten.relu6, aten.leaky_relu, aten.elu, aten.selu, aten.celu, aten.gelu, aten.silu,
    aten.hardswish, aten.hardsigmoid, aten.mish, aten.softplus, aten.hardtanh, aten.tanh, aten.sigmoid,
    aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout, aten.clamp,
    aten.clamp_min, aten.clamp_max, aten.clip, aten.prelu, aten.threshold,
})
LINEAR_FUNCTIONS = frozenset({
    aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
    aten.convolution, aten.linear, aten.batch_norm, aten.layer_norm, aten.group_norm, aten.rms_norm,
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices, aten.avg_pool1d,
    aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d,
    aten.mean, aten.sum, aten.neg, aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
    aten.upsample_linear1d, aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d,
    aten._upsample_nearest_exact3d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d,
    aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa, aten.amax, aten.max, aten.addcmul,
    aten.col2im,  # F.fold sums overlapping patches: split by contribution, not copied
})
#: ``beta * c + alpha * (a @ b)``: linear where one factor is a constant (transformers' ``Conv1D``).
AFFINE_PRODUCTS = frozenset({aten.addmm, aten.baddbmm})
#: Operators that move relevance (data movement, casts, padding, selection): nothing created or lost.
DATA_MOVEMENT = VIEWS | frozenset({
    aten.clone, aten.roll, aten.flip, aten.pad, aten.constant_pad_nd, aten.reflection_pad1d,
    aten.reflection_pad2d, aten.reflection_pad3d, aten.replication_pad1d, aten.replication_pad2d,
    aten.replication_pad3d, aten._to_copy, aten.to, aten.type_as, aten.index_select, aten.index,
    aten.gather, aten.take_along_dim, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle,
    aten.native_channel_shuffle, aten.repeat, aten.tile, aten.repeat_interleave, aten.tensor_split,
    aten.masked_fill, aten.where, aten.copy, aten.lift_fresh_copy, aten.im2col,
    aten.unfold, operator.getitem,
}) - {aten.detach}

# Operators at the root of a normalising factor (x / ||x||, x * rsqrt(mean(x^2) + eps)).
_NORMS = frozenset({
    aten.sqrt, aten.rsqrt, aten.linalg_vector_norm, aten.norm, aten.std, aten.var, aten.frobenius_norm,
    aten.sum, aten.mean,  # x / x.sum(-1, keepdim=True): renormalised attention (ConViT)
})
# Between that root and the product: reshapes and casts, an added epsilon, clamping, reciprocals.
_CASTS = frozenset({aten._to_copy, aten.to, aten.type_as})
_NORM_STEPS = frozenset({aten.add, aten.clamp, aten.clamp_min, aten.reciprocal, aten.pow, aten.mul})


def moves_data(node: fx.Node) -> bool:
    """Whether ``node`` only moves, selects or casts values (see :data:`DATA_MOVEMENT`)."""
    return node.op == "call_function" and _packet(node) in DATA_MOVEMENT


def functional_to_modules(gm: fx.GraphModule) -> bool:
    """Turn ATen operations that matter for relevance into leaf modules.

    Matches, by ATen operator: additions (``aten.add`` with ``alpha``) ->
    :class:`Addition`; subtractions -> :class:`Subtraction`; products and
    divisions by a constant or by a normalising factor (a norm, ``rsqrt``
    of a mean square) -> :class:`Scale`; products with a sigmoid-like gate ->
    :class:`Gate`, of an activation's output and another signal (a gated
    linear unit: SwiGLU, GeGLU) -> :class:`GatedProduct`, of two other
    signals -> :class:`Product`; ``cat`` / ``stack`` -> :class:`Concatenate` /
    :class:`Stack`; elementwise activations -> :class:`Activation`; convolutions, pooling, norms, means,
    interpolation, ``addmm`` with a constant factor and other linear
    functions -> :class:`LinearFunction`; embedding lookups -> :class:`Lookup`;
    ``x ** c`` counts as an activation; softmax -> :class:`Softmax`; attention (``scaled_dot_product_attention``)
    -> :class:`Attention`; matrix products -> :class:`AttentionMatmul` or
    :class:`Matmul`. The new module is registered under the node's qualified
    name (``layer1.0.add``). Idempotent: it matches ``call_function`` nodes only.
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
    if node not in dependent or node.op != "call_function" or node.meta.get("inplace_on_view"):
        return None
    op = _packet(node)
    if op in ADDITIONS:
        return _addition(node)
    if op in SUBTRACTIONS and len(node.args) == 2 and not node.kwargs:
        return M.Subtraction(), node.args
    if op is aten.rsub and len(node.args) == 2 and not node.kwargs:  # rsub(x, c) = c - x
        return M.Subtraction(), node.args[::-1]
    if op in PRODUCTS:
        return _scaling(node, dependent, divide=False) or _product(node)
    if op in DIVISIONS and not node.kwargs:
        return _scaling(node, dependent, divide=True)
    if op in SOFTMAXES:
        return _function_module(M.Softmax, node)
    if op in ATTENTION:
        return _function_module(M.Attention, node)
    if op in MATMULS:
        return _matmul(node, dependent)
    if op in CONCATENATIONS:
        return _concatenation(node, M.Concatenate)
    if op in STACKS:
        return _concatenation(node, M.Stack)
    if op in ACTIVATIONS or (op is aten.pow and isinstance(node.args[1], (int, float))):  # x ** 2 (StarReLU)
        return _function_module(M.Activation, node)
    if op in LINEAR_FUNCTIONS:
        return _linear_function(node, dependent)
    if op in AFFINE_PRODUCTS:
        return _affine_product(node, dependent)
    if op in LOOKUPS:
        return _function_module(M.Lookup, node)
    return None


def _addition(node: fx.Node) -> Optional[Tuple[nn.Module, tuple]]:
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    return M.Addition(2, node.kwargs.get("alpha", 1)), node.args


def _scaling(node: fx.Node, dependent: Set[fx.Node], divide: bool) -> Optional[Tuple[nn.Module, tuple]]:
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a in dependent and (b not in dependent or _is_normaliser(b, dependent)):
        return M.Scale(divide), (a, b)
    if b in dependent and not divide and (a not in dependent or _is_normaliser(a, dependent)):
        return M.Scale(divide), (b, a)
    return None


def _is_normaliser(node: Any, dependent: Set[fx.Node]) -> bool:
    """Whether ``node`` is a normalising factor: a norm, a square root, through epsilons and reshapes."""
    while isinstance(node, fx.Node):
        op = _packet(node)
        if op in _NORMS:
            return True
        if op in VIEWS or op in _CASTS or op is aten.div:  # follow the value (a ratio: its numerator)
            node = node.args[0]
            continue
        signals = [a for a in node.args if isinstance(a, fx.Node) and a in dependent]
        if op not in _NORM_STEPS or len(signals) != 1:
            return False
        node = signals[0]
    return False


_GATES = frozenset({aten.sigmoid, aten.hardsigmoid})
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)


def _is_gate(node: Any) -> bool:
    """Whether ``node`` is the output of a sigmoid-like function (already a module)."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    return isinstance(node.graph.owning_module.get_submodule(node.target), _GATE_MODULES) or _packet(node) in _GATES


def _product(node: fx.Node) -> Optional[Tuple[nn.Module, tuple]]:
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if _is_gate(b):
        return M.Gate(), (a, b)
    if _is_gate(a):
        return M.Gate(), (b, a)
    if _is_activated(a) != _is_activated(b):  # act(gate(x)) * up(x): SwiGLU, GeGLU
        return M.GatedProduct(), (b, a) if _is_activated(a) else (a, b)
    return M.Product(), (a, b)


# Elementwise activations whose output gates a product in a gated linear unit.
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Mish, nn.Softplus, nn.Tanh, nn.Hardtanh,
)
_DROPOUTS = frozenset({aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout})


def _is_activated(node: Any) -> bool:
    """Whether ``node`` is the output of an elementwise activation (already a module), not a dropout."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    module = node.graph.owning_module.get_submodule(node.target)
    if isinstance(module, M.Activation):
        return _packet(node) not in _DROPOUTS
    return isinstance(module, _ACTIVATION_MODULES)


def _matmul(node: fx.Node, dependent: Set[fx.Node]) -> Optional[Tuple[nn.Module, tuple, dict]]:
    signals = [a for a in node.all_input_nodes if a in dependent]
    kind = M.LinearFunction
    if len(signals) >= 2:
        kind = M.AttentionMatmul if any(_comes_from_softmax(a) for a in signals) else M.Matmul
    if _packet(node) is aten.einsum:  # operands as arguments of their own, so rules see each one
        equation, operands = node.args[0], node.args[1]
        return kind(functools.partial(_einsum, equation)), tuple(operands), {}
    return _function_module(kind, node)


def _einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    return aten.einsum(equation, list(operands))


def _comes_from_softmax(node: fx.Node) -> bool:
    """Whether ``node`` is a softmax's output, possibly reshaped or dropped out."""
    owner = node.graph.owning_module
    while True:
        module = owner.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, (M.Softmax, nn.Softmax)):
            return True
        dropout = isinstance(module, (nn.Dropout, M.Activation))
        if not (moves_data(node) or dropout) or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]


def _linear_function(node: fx.Node, dependent: Set[fx.Node]) -> Optional[Tuple[nn.Module, tuple, dict]]:
    if _packet(node) is aten.addcmul and sum(a in dependent for a in node.args[:3]) != 1:
        return None  # a product of two signals: no linear rule
    return _function_module(M.LinearFunction, node)


def _affine_product(node: fx.Node, dependent: Set[fx.Node]) -> Optional[Tuple[nn.Module, tuple, dict]]:
    """``c + a @ b`` with one of ``a``, ``b`` a constant (``torch.addmm(bias, x, w)``: a linear layer)."""
    if sum(a in dependent for a in node.args[1:3]) != 1:
        return None  # a product of two signals: no linear rule
    return _function_module(M.LinearFunction, node)


def _concatenation(node: fx.Node, kind: type) -> Optional[Tuple[nn.Module, tuple]]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    return kind(dim), tuple(tensors)


def _function_module(kind: type, node: fx.Node) -> Optional[Tuple[nn.Module, tuple, dict]]:
    if any(isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg) for arg in node.args):
        return None  # a rule sees the module's tensor arguments only: left unsupported, so it raises
    fixed = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
    passed = {k: v for k, v in node.kwargs.items() if isinstance(v, fx.Node)}
    return kind(node.target, **fixed), node.args, passed


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
    new.meta["replaced"] = str(node.target)
    new.meta["replaced_op"] = node.target
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
