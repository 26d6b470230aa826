"""Resolving a ``layer`` argument: to a module of the model where it names one, else to a graph node."""
import difflib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.fx as fx
from torch import nn

from .errors import LayerResolutionError
from .prepare import PreparedModel, unwrap_layer

__all__ = ["resolve_layer", "check_layer_spec", "named_modules_for", "LayerSpec"]

LayerSpec = Union[str, nn.Module]

_CALL = "#"  # 'lin1#0': the first call of module lin1


def named_modules_for(
    model: nn.Module, layers: Union[None, LayerSpec, Sequence[LayerSpec]]
) -> Optional[List[Tuple[str, nn.Module]]]:
    """``(qualified name, module)`` for each layer, where every layer is a module of ``model`` or a module's name.

    ``None`` where one of them is not (a graph node name such as
    ``"layer1.0.add"``, or no layer at all): those need the graph. A module
    name wins over a node name spelled the same (a module's only call has its
    module's name).

    Raises:
        LayerResolutionError: a module that is not a submodule of ``model``.
    """
    if layers is None or (isinstance(layers, (list, tuple)) and not layers):
        return None
    modules = None
    found = []
    for layer in layers if isinstance(layers, (list, tuple)) else [layers]:
        if isinstance(layer, nn.Module):
            found.append((_module_name(model, layer), layer))
            continue
        if modules is None:
            modules = dict(model.named_modules(remove_duplicate=False))
        if not isinstance(layer, str) or layer == "" or layer not in modules:
            return None
        found.append((layer, modules[layer]))
    return found


def resolve_layer(model: nn.Module, prepared: PreparedModel, layer: LayerSpec) -> fx.Node:
    """The node of ``prepared``'s graph whose output ``layer`` stands for.

    A module or module name called at one place resolves to that call; a
    container resolves to its last node; a qualified node name
    (``'layer1.0.add'``, ``'layer1.0.relu_1'``) or fx node name (``'add_7'``)
    to that node; ``'<module name>#<k>'`` to the k-th call (from 0) of a
    module called at several places.
    For a wrapped model (``torch.compile``, DataParallel)
    names are those of the model inside, with or without the wrapper's prefix
    (``'layer1'`` or ``'_orig_mod.layer1'``).

    Raises:
        LayerResolutionError: unknown names (with suggestions), modules not in
            the model, or a module called at several places (lists the nodes).
    """
    model, layer = unwrap_layer(model, layer)
    if isinstance(layer, nn.Module):
        name = _module_name(model, layer)
        return _resolve_module(prepared, layer, name)
    if not isinstance(layer, str):
        raise LayerResolutionError(f"layer must be an nn.Module or a name, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return _resolve_module(prepared, modules[layer], layer)
    nodes = _nodes_by_name(prepared.graph_module.graph)
    if layer in nodes:
        return nodes[layer]
    name, _, index = layer.rpartition(_CALL)
    if name in modules and index.isdigit() and int(index) < len(prepared.call_sites.get(id(modules[name]), [])):
        return prepared.call_sites[id(modules[name])][int(index)]
    close = difflib.get_close_matches(layer, list(nodes) + list(modules), n=5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise LayerResolutionError(
        f"no module or node named {layer!r} in {type(model).__name__}.{hint} "
        "Module names come from model.named_modules(); node names from "
        "captum_graph.ModelArchitecture.from_model(model).list_nodes()."
    )


def check_layer_spec(model: nn.Module, layer: LayerSpec) -> None:
    """Raise for a layer that is neither a name nor a submodule of ``model`` (no graph needed)."""
    model, layer = unwrap_layer(model, layer)
    if isinstance(layer, nn.Module):
        _module_name(model, layer)
    elif not isinstance(layer, str):
        raise LayerResolutionError(f"layer must be an nn.Module or a name, got {type(layer).__name__}")


def _nodes_by_name(graph: fx.Graph) -> Dict[str, fx.Node]:
    table: Dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        table.setdefault(node.name, node)
        table.setdefault(node.meta.get("original_name", node.name), node)
    for node in graph.nodes:  # qualified names win over fx names
        if "qualname" in node.meta and node.op not in ("placeholder", "output", "get_attr"):
            table[node.meta["qualname"]] = node
    return table


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise LayerResolutionError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _resolve_module(prepared: PreparedModel, module: nn.Module, name: str) -> fx.Node:
    sites = prepared.call_sites.get(id(module), [])
    if len(sites) == 1:
        return sites[0]
    if len(sites) > 1:
        choices = ", ".join(f"'{_unambiguous_name(n, name, k)}'" for k, n in enumerate(sites))
        raise LayerResolutionError(
            f"module '{name}' ({type(module).__name__}) is called at {len(sites)} places; "
            f"name the call you mean: {choices}"
        )
    owned = _owned_nodes(prepared.graph_module.graph, name)
    if not owned:
        raise LayerResolutionError(f"module '{name}' is never called in the traced forward pass")
    return owned[-1]


def _owned_nodes(graph: fx.Graph, path: str) -> List[fx.Node]:
    def owned(node: fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(entry[0] == path or entry[0].startswith(path + ".") for entry in stack.values())

    return [node for node in graph.nodes if node.op not in ("placeholder", "output", "get_attr") and owned(node)]


def _unambiguous_name(node: fx.Node, module_name: str, index: int) -> str:
    """A name of one call of a module called at several places that resolves to that call alone."""
    for name in (node.meta.get("qualname", node.name), node.meta.get("original_name", node.name)):
        if name != module_name:
            return name
    return f"{module_name}{_CALL}{index}"
