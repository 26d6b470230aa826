"""Private copies of modules that share parameter storage with the user's model.

Anything captum_graph does to a module (rules, hooks, ``inplace=False``, weight
changes by a rule) happens on such a copy, so the user's model never changes.
A call that installs hooks or swaps forwards on a prepared graph does it on a
working copy it borrows for the call (:func:`borrowed`), so that calls from
several threads never see each other's.
"""
import contextlib
import copy
import threading
import weakref
from typing import Dict, Iterator, List

import torch.fx as fx
from torch import nn

__all__ = ["private_copy", "private_graph_copy", "borrowed", "set_training", "MAX_IDLE_COPIES"]

#: Working copies kept per graph for later calls (as many as calls ran at once, up to this).
MAX_IDLE_COPIES = 8


def private_copy(module: nn.Module, memo: Dict[int, nn.Module] = None, share_buffers: bool = False) -> nn.Module:
    """A copy of ``module`` and its children that owns nothing of the original.

    Parameters are new ``nn.Parameter`` objects viewing the same storage, so
    in-place updates of the original (an optimiser step) are visible, while
    rebinding a copy's ``weight.data`` leaves the original alone; they do not
    require gradients (attribution needs gradients of activations only). Buffers are
    shared tensors, except in modules in training mode (batch norm would update
    them), or with ``share_buffers`` always shared. Hooks and a ``rule`` attribute are not copied (rules are read from
    the user's module when needed); containers among the attributes are
    copied shallowly, so that what a forward stores in them (a cache written
    while torch.export traces) never reaches the user's model. A child reached
    twice is copied once.

    Nothing is written through the module's own ``__setattr__`` or
    ``__copy__`` (torch.compile's wrapper forwards attribute writes to the
    model it wraps; ``GraphModule.__copy__`` takes ownership of the shared
    graph): the copy is made field by field. A ``GraphModule`` copy shares
    the original's graph and generated ``forward``; see
    :func:`private_graph_copy` for one with a graph of its own.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = object.__new__(type(module))
    memo[id(module)] = clone
    state = clone.__dict__
    for key, value in module.__dict__.items():
        if "hook" in key and isinstance(value, dict):
            state[key] = type(value)()
        elif isinstance(value, (dict, list, set)):  # a cache the forward fills (timm's LeViT) stays the user's
            state[key] = copy.copy(value)
        else:
            state[key] = value
    state.pop("rule", None)
    state["_parameters"] = {name: _share(param) for name, param in module._parameters.items()}
    # A module in training mode updates running statistics in place: those get their own copy.
    own = module.training and not share_buffers
    state["_buffers"] = {name: b.clone() if own and b is not None else b for name, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {
        name: None if child is None else private_copy(child, memo, share_buffers) for name, child in module._modules.items()
    }
    return clone


def set_training(module: nn.Module, mode: bool) -> nn.Module:
    """``module.train(mode)`` on a private copy, written field by field (see :func:`private_copy`)."""
    for submodule in module.modules():
        submodule.__dict__["training"] = mode
    return module


def _share(param: nn.Parameter) -> nn.Parameter:
    if param is None:
        return None
    return nn.Parameter(param.detach(), requires_grad=False)


def private_graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with private modules (:func:`private_copy`) and a graph of its own.

    Its buffers are ``gm``'s: ``gm`` is a prepared graph, whose modules already
    own what they may write (and whose attribute containers, plain modules in
    training mode, must not freeze the values the graph reads from the model).
    The copy owns a copy of the graph, so code reading modules through
    ``node.graph.owning_module`` on its nodes reads the copy's, never
    ``gm``'s. Node names, targets and ``meta`` are the same. The forward
    pre-hooks registered on ``gm`` itself (the shape check of a captured
    graph) are registered on the copy too; those of its submodules are not
    copied. Nothing of ``gm`` changes.
    """
    clone = private_copy(gm, share_buffers=True)
    graph = copy.deepcopy(gm.graph)  # new nodes; their ``meta`` dicts are shallow copies
    graph.owning_module = clone
    clone.__dict__["_graph"] = graph  # same code as ``gm``'s, which the copy shares: no recompile
    for key, hook in gm._forward_pre_hooks.items():
        clone.register_forward_pre_hook(hook, with_kwargs=key in gm._forward_pre_hooks_with_kwargs)
    return clone


_IDLE: "weakref.WeakKeyDictionary[fx.GraphModule, List[fx.GraphModule]]" = weakref.WeakKeyDictionary()
_IDLE_LOCK = threading.Lock()


@contextlib.contextmanager
def borrowed(template: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """A private working copy of ``template`` (:func:`private_graph_copy`) for the body's use.

    Hooks, swapped forwards and anything else one call installs go on the
    copy, never on ``template``, which stays as prepared and may be read (not
    run with hooks) by anyone. The copy is given back for later calls when the
    body returns, so sequential calls reuse one copy and calls running at the
    same time each get their own; a copy whose body raised is dropped, since
    it may hold what the failed call left behind.
    """
    with _IDLE_LOCK:
        idle = _IDLE.get(template)
        working = idle.pop() if idle else None
    if working is None:
        working = private_graph_copy(template)
    yield working  # not reached after an exception in the body: the copy is dropped
    with _IDLE_LOCK:
        idle = _IDLE.setdefault(template, [])
        if len(idle) < MAX_IDLE_COPIES:
            idle.append(working)
