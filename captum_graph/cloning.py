"""Private copies of modules that share parameter storage with the user's model.

Anything captum_graph does to a module (rules, hooks, ``inplace=False``, weight
changes by a rule) happens on such a copy, so the user's model never changes.
"""
import copy
from typing import Dict

from torch import nn

__all__ = ["private_copy"]


def private_copy(module: nn.Module, memo: Dict[int, nn.Module] = None) -> nn.Module:
    """A copy of ``module`` and its children that owns nothing of the original.

    Parameters are new ``nn.Parameter`` objects viewing the same storage, so
    in-place updates of the original (an optimiser step) are visible, while
    rebinding a copy's ``weight.data`` leaves the original alone; they do not
    require gradients (attribution needs gradients of activations only). Buffers are
    shared tensors, except in modules in training mode (batch norm would update
    them). Hooks and a ``rule`` attribute are not copied (rules are read from
    the user's module when needed); containers among the attributes are
    copied shallowly, so that what a forward stores in them (a cache written
    while torch.export traces) never reaches the user's model. A child reached
    twice is copied once.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)
    memo[id(module)] = clone
    for key, value in module.__dict__.items():
        if "hook" in key and isinstance(value, dict):
            clone.__dict__[key] = type(value)()
        elif isinstance(value, (dict, list, set)):  # a cache the forward fills (timm's LeViT) stays the user's
            clone.__dict__[key] = copy.copy(value)
    clone.__dict__.pop("rule", None)
    state = clone.__dict__  # not setattr: a wrapper's __setattr__ (torch.compile's) writes to the wrapped model
    state["_parameters"] = {name: _share(param) for name, param in module._parameters.items()}
    # A module in training mode updates running statistics in place: those get their own copy.
    state["_buffers"] = {
        name: b.clone() if module.training and b is not None else b for name, b in module._buffers.items()
    }
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {name: None if child is None else private_copy(child, memo) for name, child in module._modules.items()}
    return clone


def _share(param: nn.Parameter) -> nn.Parameter:
    if param is None:
        return None
    return nn.Parameter(param.detach(), requires_grad=False)


