"""Which relevance rule every module of a rewritten graph gets.

Rules are Captum ``PropagationRule`` objects. Besides Captum's Epsilon, Gamma,
Alpha1_Beta0 and Identity rules this module adds the rules Captum lacks (Flat,
ZPlus, ZBox) and two markers: :class:`PassThroughRule` (relevance passes
unchanged, for elementwise activations) and :class:`MoveRule` (relevance is
moved by the operation's own gradient, for concatenations and reshapes).
"""
import copy
import difflib
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx as fx
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule, PropagationRule
from torch import Tensor, nn
from torch.func import functional_call

from . import modules as M
from .errors import UnsupportedOperationError, describe_node
from .passes import moves_data, relevance_carrying_nodes, view_base

__all__ = [
    "PassThroughRule",
    "MoveRule",
    "FlatRule",
    "ZPlusRule",
    "ZBoxRule",
    "UniformSplitRule",
    "ConstantRule",
    "GateRule",
    "SoftmaxRule",
    "AttnLRPAttentionRule",
    "constant_inputs",
    "register_rule",
    "PRESETS",
    "RuleAssignment",
    "assign_rules",
]

RuleKey = Union[str, Type[nn.Module], Tuple[Type[nn.Module], ...]]


class PassThroughRule(PropagationRule):
    """Relevance passes unchanged from output to input (elementwise activations)."""

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        pass


class MoveRule(PropagationRule):
    """Relevance is moved by the operation's gradient: nothing created or lost.

    For concatenation, stacking, flattening, permutation and other data movement.
    """

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        pass


class ConstantRule(PropagationRule):
    """The module's output is a constant for relevance: nothing flows back through it.

    For attention probabilities (CP-LRP, Ali et al. 2022): relevance reaches
    the values through the product, and none the queries and keys.
    """

    constant_inputs = "all"

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        pass


class GateRule(PassThroughRule):
    """``signal * gate`` with the gate (the second factor) a constant: all relevance goes to the signal.

    ``R_signal = R_out``, ``R_gate = 0``. The ``cp-lrp`` preset's rule for gated
    linear units (SwiGLU's ``up(x) * silu(gate(x))``): CP-LRP (Ali et al. 2022)
    holds the non-linear interactions constant, and LXT's CP-LRP variant
    detaches the gate so. Sigmoid gates (:class:`~captum_graph.modules.Gate`)
    are treated so by default.
    """

    constant_inputs = (1,)


def constant_inputs(module: nn.Module, rule: Optional[PropagationRule]) -> Union[str, Tuple[int, ...]]:
    """Positions of ``module``'s arguments that relevance does not enter under ``rule`` (or ``"all"``).

    A rule's ``constant_inputs`` attribute wins over the module's: under
    AttnLRP the queries and keys of an attention carry relevance, which
    CP-LRP holds constant.
    """
    declared = getattr(rule, "constant_inputs", None)
    return declared if declared is not None else getattr(module, "constant_inputs", ())


class ExplicitRule(PropagationRule):
    """A rule that computes input relevance from output relevance directly.

    Subclasses implement :meth:`relevance`. It receives the module's inputs as
    detached tensors; those that carry relevance (that depend on the attributed
    inputs) have ``requires_grad`` set, the others (``additional_forward_args``,
    constants) do not. ``epsilon`` stabilises denominators.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.STABILITY_FACTOR = epsilon

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        pass

    def relevance(self, module: nn.Module, inputs: Tuple[Tensor, ...], relevance: Tensor) -> Tuple[Optional[Tensor], ...]:
        raise NotImplementedError

    def _ratio(self, relevance: Tensor, z: Tensor) -> Tensor:
        return relevance / stabilize(z, self.STABILITY_FACTOR)


def stabilize(z: Tensor, epsilon: float, non_negative: bool = False) -> Tensor:
    """``z + epsilon * sign(z)``, with sign(0) taken as +1 (Captum's convention).

    Computed as ``z + copysign(epsilon, z + 0.0)`` (adding zero turns -0.0
    into +0.0, which takes the +1): the same values bit for bit as the
    formula spelled out, in three passes over ``z`` where that takes six,
    and without comparisons and boolean masks (slow on CPUs). A caller that
    knows ``z >= 0`` (a ReLU's output) passes ``non_negative``: one pass.
    """
    if not isinstance(epsilon, (int, float)):  # e.g. a tensor: the formula spelled out
        return z + epsilon * ((z >= 0).to(z.dtype) * 2 - 1)
    epsilon_tensor = constant_tensor(float(epsilon), z.dtype, z.device)
    if non_negative:
        return z + epsilon_tensor
    if z.requires_grad and torch.is_grad_enabled():  # out= does not record gradients
        return z + torch.copysign(epsilon_tensor, z + 0.0)
    step = z + 0.0
    torch.copysign(epsilon_tensor, step, out=step)
    return step.add_(z)


@functools.lru_cache(maxsize=64)
def constant_tensor(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a 0-dimensional tensor (cached), rounded as PyTorch rounds a Python scalar."""
    # ``epsilon * sign`` computes in float32 for float32 and narrower tensors and in float64
    # for float64 (a Python float times a float64 tensor stays exact); round the same way.
    wide = torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return wide.to(dtype=dtype, device=device)


def _call_with(module: nn.Module, transform: Callable[[str, Tensor], Tensor], *args: Tensor) -> Tensor:
    params = {name: transform(name, p) for name, p in module.named_parameters()}
    return functional_call(module, params, args)


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


class ZPlusRule(ExplicitRule):
    """z+ rule (Montavon et al. 2017, eq. 6): only positive contributions count.

    ``R_i = sum_j (x_i^+ w_ij^+ + x_i^- w_ij^-) / z_j^+ R_j``, biases ignored.
    """

    def relevance(self, module, inputs, relevance):
        x = inputs[0].detach()
        if not bool((x < 0).any()):  # e.g. after a ReLU: the x^- w^- half is zero, skip computing it
            pos = x.requires_grad_()
            with torch.enable_grad():
                z = _call_with(module, lambda n, p: p * 0 if _is_bias(n) else p.clamp(min=0), pos)
                (g_pos,) = torch.autograd.grad(z, pos, self._ratio(relevance, z))
            return (pos * g_pos,)
        pos, neg = x.clamp(min=0).requires_grad_(), x.clamp(max=0).requires_grad_()
        with torch.enable_grad():
            z = _call_with(module, lambda n, p: p * 0 if _is_bias(n) else p.clamp(min=0), pos) + _call_with(
                module, lambda n, p: p * 0 if _is_bias(n) else p.clamp(max=0), neg
            )
            g_pos, g_neg = torch.autograd.grad(z, (pos, neg), self._ratio(relevance, z))
        return (pos * g_pos + neg * g_neg,)


class FlatRule(ExplicitRule):
    """Flat rule (Lapuschkin et al. 2019): relevance spread uniformly over each receptive field.

    ``R_i = sum_j 1 / (sum_i' 1) R_j``: weights set to one, inputs to one, no bias.
    """

    def relevance(self, module, inputs, relevance):
        ones = torch.ones_like(inputs[0]).requires_grad_()
        with torch.enable_grad():
            z = _call_with(module, lambda n, p: p * 0 if _is_bias(n) else torch.ones_like(p), ones)
            (grad,) = torch.autograd.grad(z, ones, self._ratio(relevance, z))
        return (grad,)


class ZBoxRule(ExplicitRule):
    """zB rule (Montavon et al. 2017, eq. 7) for inputs bounded by ``[low, high]``.

    ``R_i = sum_j (x_i w_ij - l_i w_ij^+ - h_i w_ij^-) / z_j R_j`` where ``z_j``
    sums the numerators (no bias).
    """

    def __init__(self, low: Union[float, Tensor], high: Union[float, Tensor], epsilon: float = 1e-6) -> None:
        super().__init__(epsilon)
        self.low, self.high = low, high

    def relevance(self, module, inputs, relevance):
        x = inputs[0].detach().requires_grad_()
        low = (torch.zeros_like(x) + self.low).requires_grad_()
        high = (torch.zeros_like(x) + self.high).requires_grad_()
        with torch.enable_grad():
            z = (
                _call_with(module, lambda n, p: p * 0 if _is_bias(n) else p, x)
                - _call_with(module, lambda n, p: p * 0 if _is_bias(n) else p.clamp(min=0), low)
                - _call_with(module, lambda n, p: p * 0 if _is_bias(n) else p.clamp(max=0), high)
            )
            grads = torch.autograd.grad(z, (x, low, high), self._ratio(relevance, z))
        return (x * grads[0] + low * grads[1] + high * grads[2],)


class UniformSplitRule(ExplicitRule):
    """Relevance split equally between the factors of a product (AttnLRP, Achtibat et al. 2024, eq. 11).

    For ``z = f(a, b)`` bilinear with no known role of either factor, each
    factor gets the epsilon rule's share halved: ``R_a = a * df/da * R / (2 z)``;
    for an elementwise product that is ``R_a = R_b = R / 2``. A factor that
    carries no relevance (an additional forward argument) is a constant: the
    other factor then gets all of it.
    """

    def __init__(self, epsilon: float = 1e-9) -> None:
        super().__init__(epsilon)

    def relevance(self, module, inputs, relevance):
        signals = [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
        with torch.enable_grad():
            z = module(*inputs)
            grads = torch.autograd.grad(z, signals, self._ratio(relevance, z) / len(signals), allow_unused=True)
        found = iter(x * g if g is not None else None for x, g in zip(signals, grads))
        return tuple(next(found) if isinstance(x, Tensor) and x.requires_grad else None for x in inputs)


class SoftmaxRule(ExplicitRule):
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1).

    For ``s = softmax(x)`` along ``dim``: ``R_x = x * (R_s - s * sum(R_s))``,
    the first-order Taylor terms of the softmax at ``x`` (``x * J^T (R_s / s)``,
    no epsilon). It is not conservative: per softmax row, ``sum(R_x) =
    sum_j R_s_j (x_j - sum_i s_i x_i)``; the rest is the bias term of the
    linearisation, absorbed. Positions masked with ``-inf`` (``s = 0``) get
    none. Queries and keys before the softmax therefore carry relevance.
    """

    constant_inputs = ()

    def __init__(self) -> None:
        super().__init__(0.0)

    def relevance(self, module, inputs, relevance):
        x = inputs[0]
        dim = _softmax_dim(module, inputs)
        s = module(*inputs).to(relevance.dtype)
        shares = x * (relevance - s * relevance.sum(dim, keepdim=True))
        return (torch.where(torch.isfinite(x), shares, torch.zeros_like(shares)),) + (None,) * (len(inputs) - 1)


def _softmax_dim(module: nn.Module, inputs: Tuple) -> int:
    dim = module.dim if isinstance(module, nn.Softmax) else inputs[1] if len(inputs) > 1 else module.kwargs.get("dim")
    if not isinstance(dim, int):
        raise ValueError(f"SoftmaxRule needs the softmax's dimension; {type(module).__name__} has dim={dim!r}")
    return dim


class AttnLRPAttentionRule(EpsilonRule):
    """AttnLRP on ``scaled_dot_product_attention`` (Achtibat et al. 2024).

    Inside the attention: the uniform rule on both matrix products (``q k^T``
    and ``softmax(...) v``: half the relevance to each factor, eq. 7) and
    :class:`SoftmaxRule` on the softmax; relevance reaches queries, keys and
    values (the mask gets none). Computed in one backward pass of the fused
    attention through the Gradient x Input identity of these rules: the
    gradient reaching the values is halved and that reaching queries and
    keys quartered (as LXT does). Epsilon stabilises the output, as
    :class:`~captum.attr._utils.lrp_rules.EpsilonRule`.

    With ``o = p v``, ``p = softmax(s)``, ``s = q k^T / sqrt(d) + mask`` and
    ``r = R_o / (o + eps sign(o))``: ``R_v = v * (p^T r) / 2``,
    ``R_p = p * (r v^T) / 2``, ``R_s = s * (R_p - p * sum(R_p))``, and with
    ``t = R_s / (q k^T)``: ``R_q = q * (t k) / 2``, ``R_k = k * (t^T q) / 2``.
    """

    constant_inputs = (3,)


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
PASS_THROUGH_TYPES: Tuple[type, ...] = (
    M.Activation, M.Scale, M.Gate, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Identity,
)
MOVE_TYPES: Tuple[type, ...] = (
    M.Concatenate, M.Tap, M.Lookup, nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)
EPSILON_TYPES: Tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, Addition_Module, M.Subtraction, M.LinearFunction,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, M.AttentionMatmul, M.Attention,
)

# reason: ordered (types, rule) pairs, first isinstance match wins; register_rule prepends.
_DEFAULT_RULES: List[Tuple[Tuple[type, ...], Callable[[], PropagationRule]]] = [
    (PASS_THROUGH_TYPES, PassThroughRule),
    (MOVE_TYPES, MoveRule),
    (EPSILON_TYPES, EpsilonRule),
    ((M.Product, M.Matmul), UniformSplitRule),
    ((M.Softmax, nn.Softmax), ConstantRule),
]


def has_default_rule(module: nn.Module) -> bool:
    """Whether a registered or built-in rule covers ``module``."""
    return any(isinstance(module, types) for types, _ in _DEFAULT_RULES)


def register_rule(module_types: Union[type, Tuple[type, ...]], rule: Union[PropagationRule, Callable[[], PropagationRule]]) -> None:
    """Use ``rule`` for every module that is an instance of ``module_types``.

    ``rule`` is a rule instance (copied for each call site) or a factory.
    Registered rules take precedence over the built-in table.
    """
    types = module_types if isinstance(module_types, tuple) else (module_types,)
    _DEFAULT_RULES.insert(0, (types, _factory(rule)))


def _factory(rule: Union[PropagationRule, Callable[[], PropagationRule]]) -> Callable[[], PropagationRule]:
    if isinstance(rule, PropagationRule):
        return lambda: copy.deepcopy(rule)
    return rule


# ---------------------------------------------------------------------------
# presets: (first layer rule, conv rule, linear rule, rules by module type)
# ---------------------------------------------------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Preset:
    """A composite of rules: one for the first layer, one for convolutions, one for dense layers,
    and ``layers``, ``(module types, rule factory)`` pairs looked at before those two (first match wins)."""

    name: str
    first: Optional[Callable[[], PropagationRule]]
    conv: Optional[Callable[[], PropagationRule]]
    linear: Optional[Callable[[], PropagationRule]]
    layers: Tuple[Tuple[Tuple[type, ...], Callable[[], PropagationRule]], ...] = ()


_SOFTMAXES = (M.Softmax, nn.Softmax)
_PRODUCTS = (M.Product, M.Matmul, M.AttentionMatmul)  # GatedProduct is a Product
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)  # linearised: the standard deviation is a constant

PRESETS: Dict[str, Preset] = {
    "epsilon": Preset("epsilon", None, None, None),
    "epsilon-plus-flat": Preset("epsilon-plus-flat", FlatRule, ZPlusRule, lambda: EpsilonRule(1e-6)),
    "epsilon-gamma-box": Preset(
        "epsilon-gamma-box", lambda: ZBoxRule(-3.0, 3.0), lambda: GammaRule(0.25), lambda: EpsilonRule(1e-6)
    ),
    # CP-LRP (Ali et al. 2022): attention probabilities, normalising factors and the activated
    # factor of gated linear units are constants; the network is then linear in what carries relevance.
    "cp-lrp": Preset(
        "cp-lrp", None, None, EpsilonRule, layers=(
            (_SOFTMAXES, ConstantRule),
            ((M.Attention, M.AttentionMatmul) + _NORMS, EpsilonRule),
            ((M.GatedProduct,), GateRule),
        ),
    ),
    # AttnLRP (Achtibat et al. 2024): softmax by its own rule, uniform split of products, identity
    # on normalisation (its factor constant) and on elementwise activations, epsilon elsewhere.
    "attn-lrp": Preset(
        "attn-lrp", None, None, EpsilonRule, layers=(
            (_SOFTMAXES, SoftmaxRule),
            ((M.Attention,), AttnLRPAttentionRule),
            (_PRODUCTS, UniformSplitRule),
            (_NORMS, EpsilonRule),
        ),
    ),
}


# ---------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------
@dataclass
class RuleAssignment:
    """The rule one call site gets, and why."""

    node: str
    qualname: str
    module_type: str
    rule: Optional[PropagationRule]
    source: str
    replaced: Optional[str] = None
    problem: Optional[str] = None

    @property
    def rule_name(self) -> str:
        if self.rule is None:
            return "-"
        name = type(self.rule).__name__
        eps = getattr(self.rule, "STABILITY_FACTOR", None)
        return f"{name}({eps:g})" if type(self.rule) is EpsilonRule or (isinstance(self.rule, EpsilonRule) and name == "EpsilonRule") else name


def assign_rules(
    gm: fx.GraphModule,
    rules: Optional[Mapping[RuleKey, PropagationRule]] = None,
    preset: Union[str, Preset, None] = None,
    origins: Optional[Mapping[str, Callable[[], Optional[nn.Module]]]] = None,
) -> List[RuleAssignment]:
    """A rule for every relevance-carrying node of ``gm``, never raising.

    ``origins`` maps a module target of ``gm`` to (a weak reference to) the
    user's module it stands for, whose ``rule`` attribute is read at call time.
    Precedence: a ``rule`` attribute the user set on the module, then
    ``rules`` keyed by qualified name (longest prefix wins), then ``rules``
    keyed by module type, then the preset, then the registered and built-in
    defaults. A name covers everything inside that module, except
    pass-through and data-movement modules, which it must name exactly. Nodes
    without a rule are reported with ``problem`` set; only a name in ``rules``
    that matches nothing raises (``ValueError``).
    """
    by_name, by_type = _split_rule_keys(rules or {})
    _check_names_exist(gm, by_name)
    chosen_preset = _preset(preset)
    first_layer = _first_layer(gm)
    chosen = {}  # a module call -> (module, rule, source); a rule may decide which inputs carry relevance
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        origin = (origins or {}).get(str(node.target))
        own_rule = getattr(origin() if origin is not None else None, "rule", None)
        chosen[node] = (module,) + _rule_for(node, module, own_rule, by_name, by_type, chosen_preset, node is first_layer)
    carrying = relevance_carrying_nodes(gm, lambda node: constant_inputs(*chosen[node][:2]))
    assignments = []
    for node in gm.graph.nodes:
        written = node.meta.get("inplace_on_view")
        if written and (node in carrying or view_base(node.args[0]) in carrying):
            assignments.append(_assignment(node, "", None, "", _inplace_on_view_message(node)))
        if node not in carrying or node.op in ("placeholder", "output") or written:
            continue
        if node.op == "call_module":
            module, rule, source = chosen[node]
            problem = None if rule is not None else _missing_rule_message(node, module)
            assignments.append(_assignment(node, type(module).__qualname__, rule, source, problem))
        elif moves_data(node) or not _carries_tensor(node):
            assignments.append(_assignment(node, "", MoveRule(), "data movement"))
        else:
            assignments.append(_assignment(node, "", None, "", _missing_rule_message(node, None)))
    return assignments


def raise_for_problems(assignments: Sequence[RuleAssignment]) -> None:
    """Raise :class:`UnsupportedOperationError` for the first node without a rule."""
    for assignment in assignments:
        if assignment.problem:
            raise UnsupportedOperationError(assignment.problem)


def _assignment(node: fx.Node, module_type: str, rule, source: str, problem: Optional[str] = None) -> RuleAssignment:
    return RuleAssignment(
        node=node.meta.get("original_name", node.name),
        qualname=node.meta.get("qualname", node.name),
        module_type=module_type,
        rule=rule,
        source=source,
        replaced=node.meta.get("replaced"),
        problem=problem,
    )


def validate_rules(rules: Mapping[RuleKey, PropagationRule], preset: Union[str, Preset, None]) -> None:
    """Raise for rules that are not Captum rules, keys that are neither names nor types, unknown presets."""
    _split_rule_keys(rules)
    _preset(preset)


def _split_rule_keys(rules: Mapping[RuleKey, PropagationRule]):
    by_name, by_type = {}, []
    for key, rule in rules.items():
        if not isinstance(rule, PropagationRule):
            raise TypeError(f"rules[{key!r}] must be a captum PropagationRule, got {type(rule).__name__}")
        if isinstance(key, str):
            by_name[key] = rule
        elif isinstance(key, type) or (isinstance(key, tuple) and all(isinstance(k, type) for k in key)):
            by_type.append((key, rule))
        else:
            raise TypeError(f"rules keys must be qualified names or module types, got {key!r}")
    return by_name, by_type


def _preset(preset: Union[str, Preset, None]) -> Optional[Preset]:
    if preset is None or isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _rule_for(node, module, own, by_name, by_type, preset, is_first) -> Tuple[Optional[PropagationRule], str]:
    if isinstance(own, PropagationRule):
        return copy.deepcopy(own), "module.rule"
    named = [key for key in by_name if any(_covers(key, name) for name in _names(node))]
    exact = [key for key in named if key in _names(node)]
    if named and (exact or not isinstance(module, PASS_THROUGH_TYPES + MOVE_TYPES)):
        key = max(named, key=len)
        return copy.deepcopy(by_name[key]), f"rules[{key!r}]"
    for types, rule in by_type:
        if isinstance(module, types):
            return copy.deepcopy(rule), f"rules[{getattr(types, '__name__', types)}]"
    if preset is not None:
        factory = preset.first if is_first else None
        factory = factory or next((rule for types, rule in preset.layers if isinstance(module, types)), None)
        factory = factory or (preset.conv if isinstance(module, _CONVS) else preset.linear if isinstance(module, nn.Linear) else None)
        if factory is not None:
            return factory(), f"preset {preset.name}"
    for types, factory in _DEFAULT_RULES:
        if isinstance(module, types):
            return factory(), "default"
    return None, ""


def _names(node: fx.Node) -> Tuple[str, ...]:
    """The node's qualified name and, for a module call, the module's own path."""
    names = (node.meta.get("qualname", node.name),)
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module" and "replaced" not in node.meta and stack:
        names += (list(stack.values())[-1][0],)
    return names


def _covers(key: str, name: str) -> bool:
    return name == key or name.startswith(key + ".")


def _check_names_exist(gm: fx.GraphModule, by_name: Mapping[str, PropagationRule]) -> None:
    known = {name for node in gm.graph.nodes for name in _names(node)}
    for key in by_name:
        if not any(_covers(key, name) for name in known):
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"rules[{key!r}] names no module or node of the model.{hint}")


def _first_layer(gm: fx.GraphModule) -> Optional[fx.Node]:
    for node in gm.graph.find_nodes(op="call_module"):
        if isinstance(gm.get_submodule(node.target), _CONVS + (nn.Linear,)):
            return node
    return None


def _carries_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return True  # unknown: assume it does
    return isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata) and meta.dtype.is_floating_point


def _missing_rule_message(node: fx.Node, module: Optional[nn.Module]) -> str:
    what = f"module type {type(module).__qualname__}" if module is not None else "this operation"
    return (
        f"no LRP rule for {describe_node(node)}\n"
        f"Register one for {what} with captum_graph.register_rule(...), pass rules={{...}} "
        f"to LRP, or mark the module as a leaf with a rule (captum_graph.register_leaf_module)."
    )


def _inplace_on_view_message(node: fx.Node) -> str:
    return (
        f"relevance flows through an in-place write into a view, {describe_node(node)}\n"
        "Another view of the same tensor is read afterwards, so the write cannot be made "
        "out-of-place. Write the forward without the in-place operation (e.g. torch.cat or "
        "torch.where instead of slice assignment)."
    )


def init_rule_state(rule: PropagationRule) -> None:
    """Give a rule its own relevance dictionaries (Captum keeps them on the class)."""
    rule.relevance_input = defaultdict(list)
    rule.relevance_output = {}
