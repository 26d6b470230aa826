"""The correctness oracles of DESIGN.md section 3 and the untouched-model check.

* :data:`NEGLIGIBLE_EPSILON` -- a ``rules=`` mapping that makes epsilon
  negligible on every layer that uses the epsilon rule, and on nothing else.
* :func:`make_meaningful` -- random weights that exercise every term (no zero
  biases, calibrated batch norm), in float64.
* :func:`zero_additive_constants` -- the bias-free copy on which relevance is
  conserved exactly.
* :func:`input_x_gradient` / :func:`assert_matches_input_x_gradient` /
  :func:`assert_conserves` -- the two oracles, with messages that name the
  culprit.
* :func:`assert_untouched` -- DESIGN.md's "untouched model" guarantee as a
  context manager.
"""
import contextlib
import copy
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from captum.attr import InputXGradient
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import Tensor, nn

from captum_graph import modules as M

__all__ = [
    "EPSILON_LAYER_TYPES",
    "NEGLIGIBLE_EPSILON",
    "negligible_epsilon",
    "make_meaningful",
    "zero_additive_constants",
    "ADDITIVE_CONSTANT_NAMES",
    "input_x_gradient",
    "assert_matches_input_x_gradient",
    "assert_conserves",
    "snapshot",
    "assert_same_snapshot",
    "assert_untouched",
]

# Why a tuple of types and not ``{nn.Module: EpsilonRule(...)}``: a ``rules``
# key that is a type matches with ``isinstance`` and wins over the built-in
# defaults (rules.py ``_rule_for``: module.rule > name keys > type keys >
# preset > defaults). ``nn.Module`` would therefore also replace the
# pass-through rule of ReLU and the move rule of concatenations with an epsilon
# rule, which is wrong for them. A name key ``""`` matches nothing (name keys
# match ``qualname == key`` or ``qualname.startswith(key + ".")``). So the
# oracles key a negligible epsilon by exactly the types whose default is the
# epsilon rule in DESIGN.md section 3 (conv, linear, batch norm, pooling,
# mean, addition, subtraction); everything else keeps its default.
EPSILON_LAYER_TYPES: Tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    Addition_Module,  # captum's, and captum_graph.modules.Addition (a subclass)
    M.LinearFunction,  # functional pooling, x.mean(...), F.linear, ...
    M.Subtraction,
)

#: ``rules=`` for LRP/LayerLRP that makes LRP-epsilon equal LRP-0 in float64.
NEGLIGIBLE_EPSILON = {EPSILON_LAYER_TYPES: EpsilonRule(1e-15)}


def negligible_epsilon(preset: Optional[str] = None) -> Dict[Any, Any]:
    """``rules=`` making epsilon negligible (1e-15) under ``preset`` without changing its rules.

    Every built-in epsilon type (``captum_graph.rules.EPSILON_TYPES``: also norms and
    attention) gets ``EpsilonRule(1e-15)``; under ``"attn-lrp"`` the attention keeps
    AttnLRP's rule and products the uniform split, each with epsilon 1e-15.
    """
    from captum_graph.rules import EPSILON_TYPES, AttnLRPAttentionRule, UniformSplitRule

    if preset != "attn-lrp":
        return {EPSILON_TYPES: EpsilonRule(1e-15)}
    attention = (M.Attention, M.AttentionMatmul)
    return {
        tuple(t for t in EPSILON_TYPES if t not in attention): EpsilonRule(1e-15),
        M.Attention: AttnLRPAttentionRule(1e-15),
        (M.Product, M.Matmul, M.AttentionMatmul): UniformSplitRule(1e-15),
    }

#: Names (last component) of parameters and buffers that add a constant.
ADDITIVE_CONSTANT_NAMES = frozenset({
    "bias",  # conv, linear, batch norm's affine shift, layer/group norm
    "running_mean",  # batch norm subtracts it: an additive constant
    "in_proj_bias",  # nn.MultiheadAttention
    "bias_k", "bias_v",  # nn.MultiheadAttention extra key/value
    "class_token", "cls_token", "dist_token", "reg_token",  # token models
    "pos_embedding", "pos_embed", "positional_embedding", "absolute_pos_embed",
    "relative_position_bias_table",  # Swin (added to attention scores)
})


def _redraw(name: str, parameter: Tensor) -> Tensor:
    if parameter.dim() > 1:
        fan_in = parameter[0].numel()
        return torch.randn_like(parameter) / fan_in ** 0.5
    return 0.1 * torch.randn_like(parameter)


def make_meaningful(model: nn.Module, example: Tensor, calibration_batch: int = 8) -> nn.Module:
    """Make random weights exercise every term of the oracles; in place, float64.

    * converts the model to float64 and puts it in eval mode;
    * redraws every parameter that is all zero or tiny (``abs().max() < 1e-3``):
      zero-initialised biases would hide bias handling, zero-initialised
      residual branches would hide additions;
    * calibrates every batch norm on a random batch shaped like ``example``
      (running statistics reset, ``momentum=None`` i.e. a plain average, only
      the batch norms in train mode so no auxiliary head or dropout runs), so
      activations neither explode nor vanish in deep random networks.

    Returns the model.
    """
    model.double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() and parameter.abs().max() < 1e-3:
                parameter.copy_(_redraw(name, parameter))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        shape = (max(calibration_batch, example.shape[0]),) + tuple(example.shape[1:])
        with torch.no_grad():
            model(torch.randn(shape, dtype=torch.float64))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    return model


def zero_additive_constants(model: nn.Module) -> nn.Module:
    """Zero every additive constant of ``model`` (in place); return it.

    Biases (conv, linear, batch norm's affine shift, LayerNorm/GroupNorm),
    batch norm running means, attention projection biases, class tokens and
    positional embeddings: every parameter or buffer whose last name
    component is in :data:`ADDITIVE_CONSTANT_NAMES`. Raises if the model adds
    constants in a way this helper does not know (GoogLeNet's
    ``transform_input``).
    """
    if getattr(model, "transform_input", False):
        raise ValueError("transform_input adds constants to the input; build the model without it")
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.rsplit(".", 1)[-1] in ADDITIVE_CONSTANT_NAMES:
                tensor.zero_()
    return model


# ---------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------
def input_x_gradient(model: nn.Module, inputs, target=None, additional_forward_args=None):
    """captum's InputXGradient, detached."""
    result = InputXGradient(model).attribute(inputs, target=target, additional_forward_args=additional_forward_args)
    if isinstance(result, tuple):
        return tuple(r.detach() for r in result)
    return result.detach()


def _as_tuple(value) -> Tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def assert_matches_input_x_gradient(
    relevance, expected, name: str = "model", rtol: float = 1e-5, atol_factor: float = 1e-9
) -> None:
    """LRP-0 relevance equals Gradient x Input (DESIGN.md oracle 1).

    ``atol`` is ``atol_factor * max|expected|`` so the check is scale-free.
    """
    for i, (got, want) in enumerate(zip(_as_tuple(relevance), _as_tuple(expected))):
        assert got.shape == want.shape, f"{name}: input {i} relevance shape {tuple(got.shape)} != {tuple(want.shape)}"
        got, want = got.detach(), want.detach()
        atol = atol_factor * float(want.abs().max())
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            error = (got - want).abs()
            worst = int(error.flatten().argmax())
            raise AssertionError(
                f"{name}: LRP != Gradient x Input on input {i}: max abs error {float(error.max()):.3e} "
                f"at flat index {worst} (got {float(got.flatten()[worst]):.6e}, "
                f"want {float(want.flatten()[worst]):.6e}); max |IxG| {float(want.abs().max()):.3e}; "
                f"relative error of the sums per example "
                f"{((got.flatten(1).sum(1) - want.flatten(1).sum(1)) / want.flatten(1).sum(1)).tolist()}"
            )


def assert_conserves(relevance, output: Tensor, name: str = "model", rtol: float = 1e-6) -> None:
    """Input relevance sums to the target output per example (DESIGN.md oracle 2)."""
    total = sum(r.detach().flatten(1).sum(1) for r in _as_tuple(relevance))
    output = output.detach().flatten()
    relative = (total - output).abs() / output.abs()
    assert bool((relative <= rtol).all()), (
        f"{name}: relevance is not conserved: sums {total.tolist()} vs target outputs "
        f"{output.tolist()} (relative error {relative.tolist()})"
    )


# ---------------------------------------------------------------------------
# untouched model
# ---------------------------------------------------------------------------
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_buffer_registration_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
)


def _hook_dicts(module: nn.Module) -> Dict[str, Dict[Any, Any]]:
    """Every hook dictionary of ``module`` (_forward_hooks, _backward_pre_hooks, ...)."""
    return {
        key: dict(value)
        for key, value in vars(module).items()
        if "hook" in key and isinstance(value, dict)
    }


def _plain_attributes(module: nn.Module) -> Dict[str, Any]:
    """``module.__dict__`` but parameters, buffers, children and hooks; containers copied (one level)
    so that what is written into a dict or list attribute in place shows."""
    skip = {"_parameters", "_buffers", "_modules"}
    return {
        k: copy.copy(v) if type(v) in (dict, list, set) else v
        for k, v in vars(module).items()
        if k not in skip and not ("hook" in k and isinstance(v, dict))
    }


def _tensor_state(t: Tensor) -> tuple:
    """Hooks and Python attributes a tensor carries (``register_hook``, flags set on it)."""
    return (
        tuple(getattr(t, "_backward_hooks", None) or {}),
        tuple(getattr(t, "_post_accumulate_grad_hooks", None) or {}),
        tuple(sorted(vars(t))) if hasattr(t, "__dict__") else (),
    )


def _global_state() -> Dict[str, Any]:
    """Process-wide switches an attribution might leave changed."""
    from torch.nn.utils import parametrize

    return {
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "parametrize caching": (parametrize._cache_enabled, len(parametrize._cache)),
    }


def snapshot(model: nn.Module, inputs: Optional[Union[Tensor, Sequence[Tensor]]] = None) -> Dict[str, Any]:
    """Everything of ``model`` an attribution must leave as it was."""
    import torch.nn.modules.module as module_module

    output = None
    if inputs is not None:  # first: a forward may fill a model's own cache (timm's attention_bias_cache)
        with torch.no_grad():
            output = model(*_as_tuple(inputs)).detach().clone()
    state = {}
    for name, module in model.named_modules(remove_duplicate=False):
        state[name] = {
            "type": type(module),
            "id": id(module),
            "training": module.training,
            "inplace": getattr(module, "inplace", None),
            "hooks": _hook_dicts(module),
            "attributes": dict(_plain_attributes(module)),
            "rule_state": sorted(vars(module.rule)) if hasattr(vars(module).get("rule"), "__dict__") else None,
            "parameters": {
                n: (id(p), p.data_ptr(), p.requires_grad, p.dtype, None if p.grad is None else p.grad.clone())
                for n, p in module._parameters.items()
                if p is not None
            },
            "tensor_state": {n: _tensor_state(t) for n, t in {**module._parameters, **module._buffers}.items() if t is not None},
            "buffers": {n: (id(b), b.data_ptr()) for n, b in module._buffers.items() if b is not None},
            "children": {n: id(c) for n, c in module._modules.items()},
            # a GraphModule's graph must stay its own (GraphModule.__copy__ re-owns it)
            "graph_owner": id(module.graph.owning_module) if isinstance(module, torch.fx.GraphModule) else None,
        }
    result = {
        "modules": state,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers(remove_duplicate=False)},
        "global_hooks": {name: dict(getattr(module_module, name, {})) for name in _GLOBAL_HOOK_DICTS},
        "global_state": _global_state(),
    }
    if output is not None:
        result["output"] = output
    return result


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def assert_same_snapshot(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    """Compare two :func:`snapshot` results; the message names what changed."""
    problems = []
    if set(before["modules"]) != set(after["modules"]):
        problems.append(f"module names changed: {set(before['modules']) ^ set(after['modules'])}")
    for name in before["modules"].keys() & after["modules"].keys():
        b, a = before["modules"][name], after["modules"][name]
        where = f"module '{name}' ({b['type'].__name__})"
        for key in ("type", "id", "training", "inplace", "children", "rule_state", "tensor_state", "graph_owner"):
            if b[key] != a[key]:
                problems.append(f"{where}: {key} {b[key]!r} -> {a[key]!r}")
        for key in b["hooks"].keys() | a["hooks"].keys():
            hb, ha = b["hooks"].get(key, {}), a["hooks"].get(key, {})
            if hb.keys() != ha.keys() or any(hb[k] is not ha[k] for k in hb):
                problems.append(f"{where}: {key} {hb} -> {ha}")
        attrs_b, attrs_a = b["attributes"], a["attributes"]
        if attrs_b.keys() != attrs_a.keys():
            problems.append(
                f"{where}: attributes added {sorted(attrs_a.keys() - attrs_b.keys())}, "
                f"removed {sorted(attrs_b.keys() - attrs_a.keys())}"
            )
        for key in attrs_b.keys() & attrs_a.keys():
            if not _same_value(attrs_b[key], attrs_a[key]):
                problems.append(f"{where}: attribute {key} {attrs_b[key]!r} -> {attrs_a[key]!r}")
        for key in b["parameters"].keys() | a["parameters"].keys():
            pb, pa = b["parameters"].get(key), a["parameters"].get(key)
            if pb is None or pa is None or pb[:4] != pa[:4] or not _same_value(pb[4], pa[4]):
                problems.append(f"{where}: parameter {key} (id, data_ptr, requires_grad, dtype, grad) {pb} -> {pa}")
        if b["buffers"] != a["buffers"]:
            problems.append(f"{where}: buffers (id, data_ptr) {b['buffers']} -> {a['buffers']}")
    for key in ("state_dict", "buffers"):
        if before[key].keys() != after[key].keys():
            problems.append(f"{key} keys changed: {before[key].keys() ^ after[key].keys()}")
        for name in before[key].keys() & after[key].keys():
            if not _same_value(before[key][name], after[key][name]):
                problems.append(f"{key}['{name}'] changed")
    for name, hooks in before["global_hooks"].items():
        if hooks.keys() != after["global_hooks"][name].keys():
            problems.append(f"global {name}: {hooks} -> {after['global_hooks'][name]}")
    if before["global_state"] != after["global_state"]:
        problems.append(f"global state {before['global_state']} -> {after['global_state']}")
    if "output" in before and not _same_value(before["output"], after.get("output")):
        problems.append("the model's output for the same input changed")
    assert not problems, "the model was modified:\n  " + "\n  ".join(problems)


@contextlib.contextmanager
def assert_untouched(model: nn.Module, inputs=None) -> Iterator[None]:
    """Check that the body leaves ``model`` exactly as it was, also when it raises.

    Compares the state dict and buffers bit for bit, parameter identity,
    storage, ``requires_grad`` and ``.grad``, the hooks and Python attributes
    of every parameter and buffer tensor, every hook dictionary of every
    module (and the global module hooks), ``training`` and ``inplace`` flags,
    the set and values of every other attribute in each module's ``__dict__``
    (so no leftover ``rule`` or ``activations``; containers one level deep),
    the module tree (names, types, identities, so parametrizations too), the
    owner of a GraphModule's graph, grad mode and parametrize's cache, and,
    given ``inputs``, the model's output.
    """
    before = snapshot(model, inputs)
    try:
        yield
    finally:
        assert_same_snapshot(before, snapshot(model, inputs))


def deepcopy_model(model: nn.Module) -> nn.Module:
    """A deep copy (helpers keep the caller's model intact)."""
    return copy.deepcopy(model)
