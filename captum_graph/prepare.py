"""From the user's model to an LRP-ready GraphModule, cached per model."""
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch.fx as fx
from torch import nn

from .architecture import ModelArchitecture
from .cloning import private_copy
from .passes import fold_batch_norms, functional_to_modules, remove_inplace, unshare_modules
from .tracing import trace

__all__ = ["PreparedModel", "prepare", "PASSES"]

PASSES = (unshare_modules, remove_inplace, functional_to_modules)


@dataclass
class PreparedModel:
    """The rewritten graph of a model and where its modules are called.

    Attributes:
        graph_module: the rewritten graph. Its modules are private copies that
            share parameter storage with the user's model.
        call_sites: for each user module (by ``id``), the graph nodes calling it.
        model_copy: the private copy of the model the graph was traced from,
            with its container modules (the graph keeps only shells of them).
        origins: for each ``call_module`` target standing for a user module, a
            weak reference to that module (where a ``rule`` attribute is read).
    """

    graph_module: fx.GraphModule
    call_sites: Dict[int, List[fx.Node]] = field(default_factory=dict)
    model_copy: nn.Module = None
    origins: Dict[str, "weakref.ref[nn.Module]"] = field(default_factory=dict)

    def architecture(self) -> ModelArchitecture:
        """A :class:`ModelArchitecture` view of the rewritten graph."""
        return ModelArchitecture(self.graph_module.graph, self.model_copy)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[bool, Tuple[tuple, PreparedModel]]]" = weakref.WeakKeyDictionary()


def prepare(model: nn.Module, fold_batch_norm: bool = False) -> PreparedModel:
    """Trace ``model`` and run every rewrite pass; cached until the model changes.

    With ``fold_batch_norm``, eval-mode batch norms are also merged into the
    convolution or linear layer before them (:func:`fold_batch_norms`).

    The cache is keyed by the model and checked against its module structure,
    ``training`` flags and parameters (identity, storage and in-place version),
    so replacing a submodule or a parameter, an optimiser step, or switching
    ``eval()``/``train()`` prepares again.
    """
    key = _fingerprint(model)
    cached = _CACHE.setdefault(model, {}).get(fold_batch_norm)
    if cached is not None and cached[0] == key:
        return cached[1]
    prepared = _prepare(model, fold_batch_norm)
    _CACHE[model][fold_batch_norm] = (key, prepared)
    return prepared


def _prepare(model: nn.Module, fold_batch_norm: bool) -> PreparedModel:
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    user_modules = {id(module): module for module in model.modules()}
    copy = private_copy(model)
    gm = trace(copy, record_inplace=True)
    for run_pass in PASSES + ((fold_batch_norms,) if fold_batch_norm else ()):
        run_pass(gm)
    copies = {name: module for name, module in copy.named_modules(remove_duplicate=False)}
    by_copy = {id(copies[name]): user_id for user_id, name in names.items() if name in copies}
    call_sites: Dict[int, List[fx.Node]] = {}
    origins: Dict[str, weakref.ref] = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if "replaced" in node.meta:
            continue  # a module standing for a functional operation
        original = node.meta.get("nn_module_stack", {})
        path = list(original.values())[-1][0] if original else node.target
        user_id = by_copy.get(id(copies.get(path)))
        if user_id is not None:
            call_sites.setdefault(user_id, []).append(node)
            origins[str(node.target)] = weakref.ref(user_modules[user_id])
    return PreparedModel(gm, call_sites, copy, origins)


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(
        (
            id(module),
            module.training,
            tuple((id(p), p.data_ptr(), p._version) for p in module._parameters.values() if p is not None),
            tuple((id(b), b._version) for b in module._buffers.values() if b is not None),
        )
        for module in model.modules()
    )
