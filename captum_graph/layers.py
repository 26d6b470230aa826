"""Resolving a ``layer`` argument (module, qualified name or node name) to a graph node."""
import difflib
from typing import Dict, List, Union

import torch.fx as fx
from torch import nn

from .errors import LayerResolutionError
from .prepare import PreparedModel, unwrap_layer

__all__ = ["resolve_layer", "check_layer_spec", "LayerSpec"]

LayerSpec = Union[str, nn.Module]


def resolve_layer(model: nn.Module, prepared: PreparedModel, layer: LayerSpec) -> fx.Node:
    """The node of ``prepared``'s graph whose output ``layer`` stands for.

    A module or module name called at one place resolves to that call; a
    container resolves to its last node; a qualified node name
    (``'layer1.0.add'``, ``'layer1.0.relu_1'``) or fx node name (``'add_7'``)
    to that node. For a wrapped model (``torch.compile``, DataParallel)
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
        choices = ", ".join(f"'{_unambiguous_name(n, name)}'" for n in sites)
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


def _unambiguous_name(node: fx.Node, module_name: str) -> str:
    qualname = node.meta.get("qualname", node.name)
    return qualname if qualname != module_name else node.meta.get("original_name", node.name)
