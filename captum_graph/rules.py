"""Which relevance rule every module of a rewritten graph gets.

Rules are Captum ``PropagationRule`` objects. Besides Captum's Epsilon, Gamma,
Alpha1_Beta0 and Identity rules this module adds the rules Captum lacks, as
zennit defines them (ZPlus, AlphaBeta, generalised Gamma, Flat, WSquare, ZBox),
and two markers: :class:`PassThroughRule` (relevance passes unchanged, for
elementwise activations) and :class:`MoveRule` (relevance is moved by the
operation's own gradient, for concatenations and reshapes). Presets
(:data:`PRESETS`) are zennit's composites: a rule per kind of layer.
"""
import copy
import dataclasses
import difflib
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import sympy
import torch
import torch.fx as fx
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import EpsilonRule, PropagationRule
from torch import Tensor, nn
from torch.func import functional_call

from . import modules as M
from .errors import UnsupportedOperationError, describe_node
from .passes import is_torch_layer, moves_data, relevance_carrying_nodes, view_base

__all__ = [
    "PassThroughRule",
    "MoveRule",
    "FlatRule",
    "ZPlusRule",
    "AlphaBetaRule",
    "GeneralizedGammaRule",
    "WSquareRule",
    "ZBoxRule",
    "UniformSplitRule",
    "ConstantRule",
    "GateRule",
    "SoftmaxRule",
    "AttnLRPAttentionRule",
    "constant_inputs",
    "register_rule",
    "Preset",
    "PRESETS",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "with_input_bounds",
    "POSITIONWISE",
    "layer_kind",
    "layer_kinds",
    "RuleAssignment",
    "assign_rules",
]

RuleKey = Union[str, Type[nn.Module], Tuple[Type[nn.Module], ...]]
aten = torch.ops.aten


class PassThroughRule(PropagationRule):
    """Relevance passes unchanged from output to input (elementwise activations).

    ``R_in = R_out`` element by element: in LRP an activation belongs to its
    neuron (Bach et al. 2015), as in AttnLRP's identity rule for elementwise
    functions (Achtibat et al. 2024).
    """

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        pass


class MoveRule(PropagationRule):
    """Relevance is moved by the operation's gradient: nothing created or lost.

    ``R_in = (dy/dx)^T R_out`` for concatenation, stacking, flattening,
    permutation and other data movement. From no paper: such an operation
    only moves, copies or selects values, and its gradient moves relevance
    the same way.
    """

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        pass


class ConstantRule(PropagationRule):
    """The module's output is a constant for relevance: nothing flows back through it.

    ``R_in = 0``. For attention probabilities (CP-LRP, Ali et al. 2022): relevance reaches
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
        """The relevance of each of ``inputs`` (``None`` for those that carry none) given the output's ``relevance``."""
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
    """An epsilon ``value`` as a 0-dimensional tensor (cached), rounded as PyTorch rounds a Python scalar.

    A positive value too small for ``dtype`` (1e-9 in float16, whose smallest
    normal number is 6.1e-5) becomes that smallest normal number: rounded to
    zero (or to a subnormal, which hardware may flush to zero) it would no
    longer keep ``z == 0`` from a division by zero.
    """
    if dtype.is_floating_point and 0 < value < torch.finfo(dtype).tiny:
        value = torch.finfo(dtype).tiny
    # ``epsilon * sign`` computes in float32 for float32 and narrower tensors and in float64
    # for float64 (a Python float times a float64 tensor stays exact); round the same way.
    wide = torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return wide.to(dtype=dtype, device=device)


def _call_with(module: nn.Module, transform: Callable[[str, Tensor], Tensor], *args: Tensor) -> Tensor:
    params = {name: transform(name, p) for name, p in module.named_parameters()}
    return functional_call(module, params, args)


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


# Functional layers whose arguments are (input, weight, bias, ...): timm's Conv2dSame, StdConv2d, F.linear.
_CONVOLUTION_FUNCTIONS = frozenset({
    aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
    aten.convolution,
})
_LINEAR_FUNCTIONS = frozenset({aten.linear})
Transform = Callable[[str, Tensor], Tensor]


class _AffineLayer:
    """A layer affine in its first input, evaluated with transformed weight and bias.

    A torch module (its parameters are transformed) or a functional
    convolution or linear layer (:class:`~captum_graph.modules.LinearFunction`,
    whose weight and bias are its second and third arguments).
    """

    def __init__(self, module: nn.Module, inputs: Tuple[Tensor, ...], rule: PropagationRule) -> None:
        self.module, self.inputs = module, inputs
        self.functional = isinstance(module, M.LinearFunction)
        if any(isinstance(a, Tensor) and a.requires_grad for a in inputs[1:]):
            raise UnsupportedOperationError(
                f"{type(rule).__name__} needs a layer with constant weight and bias, but the weight or bias of "
                f"{module} depends on the input. Give this layer another rule (rules={{name: EpsilonRule()}})."
            )

    @property
    def x(self) -> Tensor:
        return self.inputs[0]

    def __call__(self, x: Tensor, transform: Transform) -> Tensor:
        if not self.functional:
            return _call_with(self.module, transform, x)
        args = list(self.inputs)
        args[0] = x
        for position, name in ((1, "weight"), (2, "bias")):
            if position < len(args) and isinstance(args[position], Tensor):
                args[position] = transform(name, args[position])
        return self.module(*args)

    def result(self, relevance: Tensor) -> Tuple[Optional[Tensor], ...]:
        """The input relevance, aligned with the module's arguments (weight and bias get none)."""
        return (relevance,) + (None,) * (len(self.inputs) - 1)


def _unchanged(name: str, p: Tensor) -> Tensor:
    return p


def _without_bias(emphasis: Callable[[Tensor], Tensor]) -> Transform:
    return lambda name, p: torch.zeros_like(p) if _is_bias(name) else emphasis(p)


def _with_bias(emphasis: Callable[[Tensor], Tensor]) -> Transform:
    return lambda name, p: emphasis(p)


class _SignedRule(ExplicitRule):
    """Rules that treat positive and negative contributions apart (z+, alpha-beta, gamma).

    With ``up(p) = emphasis(p, +)`` and ``down(p) = emphasis(p, -)`` applied to
    weights and bias, two outputs are formed as zennit forms them::

        z_up   = L(x+; up(w), up(b))   + L(x-; down(w), 0)    (positive contributions)
        z_down = L(x+; down(w), down(b)) + L(x-; up(w), 0)    (negative contributions)

    and each input gets ``x+ * (dz_up/dx+ . r_up + dz_down/dx+ . r_down)`` plus
    the same for ``x-``, where :meth:`ratios` gives ``r_up, r_down`` from the
    output relevance. The bias is a neuron of constant input 1 (Montavon et al.
    2019, sec. 10.2.2): its share is absorbed, never passed on.
    """

    uses_down = True  # whether the rule needs z_down

    def emphasis(self, p: Tensor, positive: bool) -> Tensor:
        """The weight or bias ``p`` as this rule weighs positive (``positive=True``) or negative contributions."""
        raise NotImplementedError

    def ratios(self, relevance: Tensor, output: Callable[[], Tensor], z_up: Tensor, z_down: Optional[Tensor]):
        """``(r_up,)`` or ``(r_up, r_down)``; ``output()`` computes the layer's own output ``z``."""
        raise NotImplementedError

    def relevance(self, module, inputs, relevance):
        layer = _AffineLayer(module, inputs, self)
        x = layer.x.detach()
        up = functools.partial(self.emphasis, positive=True)
        down = functools.partial(self.emphasis, positive=False)
        leaves = [x.clamp(min=0).requires_grad_()]
        has_negative = bool((x < 0).any())  # after a ReLU the x- halves are zero: skip them
        if has_negative:
            leaves.append(x.clamp(max=0).requires_grad_())
        with torch.enable_grad():
            z_up = layer(leaves[0], _with_bias(up))
            z_down = layer(leaves[0], _with_bias(down)) if self.uses_down else None
            if has_negative:
                z_up = z_up + layer(leaves[1], _without_bias(down))
                if self.uses_down:
                    z_down = z_down + layer(leaves[1], _without_bias(up))
            outputs = (z_up,) if z_down is None else (z_up, z_down)
            ratios = self.ratios(relevance, lambda: layer(x, _unchanged), *(z.detach() for z in outputs))
            grads = torch.autograd.grad(outputs, leaves, ratios)
        return layer.result(sum(leaf.detach() * grad for leaf, grad in zip(leaves, grads)))


class AlphaBetaRule(_SignedRule):
    """Alpha-beta rule (Bach et al. 2015) as zennit's ``AlphaBeta``: ``alpha - beta = 1``.

    ``R_i = sum_j (alpha c_ij^+ / z_j^+ - beta c_ij^- / z_j^-) R_j`` with
    ``c^+ = x^+ w^+ + x^- w^-`` (and ``b^+`` in ``z^+``), ``c^- = x^+ w^- + x^- w^+``
    (and ``b^-`` in ``z^-``). Conserves relevance only where both halves are
    present: an output with no negative contribution passes on ``alpha R``.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, epsilon: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or alpha - beta != 1:
            raise ValueError(f"alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        super().__init__(epsilon)
        self.alpha, self.beta = alpha, beta
        self.uses_down = beta != 0

    def emphasis(self, p, positive):
        return p.clamp(min=0) if positive else p.clamp(max=0)

    def ratios(self, relevance, output, z_up, z_down=None):
        up = self._ratio(relevance, z_up) * self.alpha if self.alpha != 1 else self._ratio(relevance, z_up)
        return (up,) if z_down is None else (up, self._ratio(relevance, z_down) * -self.beta)


class ZPlusRule(AlphaBetaRule):
    """z+ rule (Montavon et al. 2017, eq. 6; zennit's ``ZPlus``): alpha-beta with alpha=1, beta=0.

    ``R_i = sum_j (x_i^+ w_ij^+ + x_i^- w_ij^-) / z_j^+ R_j``, where ``z_j^+``
    also holds the positive part of the bias (which absorbs its share).
    Not Captum's ``Alpha1_Beta0_Rule``, which keeps the whole bias and
    applies ``w^+`` to negative inputs as well.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__(1.0, 0.0, epsilon)


class GeneralizedGammaRule(_SignedRule):
    """Gamma rule (Montavon et al. 2019, eq. 4) for inputs of any sign, as zennit's ``Gamma``.

    Positive contributions are strengthened by ``gamma`` where the output
    ``z_j`` is positive, negative ones where it is negative (Andeol et al. 2021)::

        R_i = sum_j [z_j > 0] c_ij^up / z_j^up R_j + [z_j < 0] c_ij^down / z_j^down R_j

    with weights ``w + gamma w^+`` on positive inputs and ``w + gamma w^-`` on
    negative ones for ``c^up`` (bias ``b + gamma b^+``), the other way round for
    ``c^down`` (bias ``b + gamma b^-``). ``z^up`` and ``z^down`` have the sign
    of ``z`` and at least its size, so no denominator vanishes where ``z`` does
    not, and (bias-free) ``sum |R|`` grows at most ``(2 + gamma) / gamma``
    times per layer. Captum's ``GammaRule`` divides by ``x (w + gamma w^+) + b``
    whatever the signs, which can vanish where ``z`` does not.
    """

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6) -> None:
        super().__init__(epsilon)
        self.gamma = gamma

    def emphasis(self, p, positive):
        return p + self.gamma * (p.clamp(min=0) if positive else p.clamp(max=0))

    def ratios(self, relevance, output, z_up, z_down):
        with torch.no_grad():
            z = output()
        return (
            self._ratio(relevance * (z > 0).to(relevance.dtype), z_up),
            self._ratio(relevance * (z < 0).to(relevance.dtype), z_down),
        )


class FlatRule(ExplicitRule):
    """Flat rule (Lapuschkin et al. 2019): relevance spread uniformly over each receptive field.

    ``R_i = sum_j 1 / (sum_i' 1) R_j``: weights set to one, inputs to one, no bias.
    """

    def relevance(self, module, inputs, relevance):
        layer = _AffineLayer(module, inputs, self)
        ones = torch.ones_like(layer.x).requires_grad_()
        with torch.enable_grad():
            z = layer(ones, _without_bias(torch.ones_like))
            (grad,) = torch.autograd.grad(z, ones, self._ratio(relevance, z))
        return layer.result(grad)


class WSquareRule(ExplicitRule):
    """w^2 rule (Montavon et al. 2017, eq. 8; zennit's ``WSquare``) for unbounded inputs.

    ``R_i = sum_j w_ij^2 / (sum_i' w_i'j^2 + b_j^2) R_j``: the input values do
    not matter; as in zennit, the squared bias absorbs its share.
    """

    def relevance(self, module, inputs, relevance):
        layer = _AffineLayer(module, inputs, self)
        ones = torch.ones_like(layer.x).requires_grad_()
        with torch.enable_grad():
            z = layer(ones, lambda name, p: p * p)
            (grad,) = torch.autograd.grad(z, ones, self._ratio(relevance, z))
        return layer.result(grad)


class ZBoxRule(ExplicitRule):
    """zB rule (Montavon et al. 2017, eq. 7) for inputs bounded by ``[low, high]``.

    ``R_i = sum_j (x_i w_ij - l_i w_ij^+ - h_i w_ij^-) / z_j R_j`` where ``z_j``
    sums the numerators (the bias cancels, as in zennit's ``ZBox``). ``low``
    and ``high`` broadcast against the input (``(3, 1, 1)`` per channel).
    """

    def __init__(self, low: Union[float, Tensor], high: Union[float, Tensor], epsilon: float = 1e-6) -> None:
        super().__init__(epsilon)
        self.low, self.high = low, high

    def relevance(self, module, inputs, relevance):
        layer = _AffineLayer(module, inputs, self)
        x = layer.x.detach().requires_grad_()
        low = (torch.zeros_like(x) + self.low).requires_grad_()
        high = (torch.zeros_like(x) + self.high).requires_grad_()
        with torch.enable_grad():
            z = (
                layer(x, _without_bias(lambda p: p))
                - layer(low, _without_bias(lambda p: p.clamp(min=0)))
                - layer(high, _without_bias(lambda p: p.clamp(max=0)))
            )
            grads = torch.autograd.grad(z, (x, low, high), self._ratio(relevance, z))
        return layer.result(x * grads[0] + low * grads[1] + high * grads[2])


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
# presets: zennit's composites, as layer maps over kinds of layers
# ---------------------------------------------------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVERAGE_POOLS = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_AVERAGE_FUNCTIONS = frozenset({
    aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d, aten.mean, aten.sum,
})
Factory = Callable[[], PropagationRule]


def layer_kind(module: nn.Module) -> Optional[str]:
    """The kind of layer a preset assigns rules by, whether a torch module or a functional call.

    ``"conv"`` (convolutions, transposed too), ``"linear"``, ``"batch_norm"``,
    ``"average_pool"`` (average and adaptive average pooling, means and sums),
    ``"addition"`` (additions and subtractions), or ``None``. A subclass of a
    torch layer with a ``forward`` of its own is captured through its
    operations, so timm's ``Conv2dSame`` and ``StdConv2d`` are ``"conv"`` calls.
    """
    if isinstance(module, M.LinearFunction):
        op = getattr(module.fn, "overloadpacket", module.fn)
        if op in _CONVOLUTION_FUNCTIONS:
            return "conv"
        if op in _LINEAR_FUNCTIONS:
            return "linear"
        if op is aten.batch_norm:
            return "batch_norm"
        return "average_pool" if op in _AVERAGE_FUNCTIONS else None
    if isinstance(module, (Addition_Module, M.Subtraction)):
        return "addition"
    if not is_torch_layer(module):
        return None
    kinds = (("conv", _CONVS), ("linear", (nn.Linear,)), ("batch_norm", _BATCH_NORMS), ("average_pool", _AVERAGE_POOLS))
    return next((kind for kind, types in kinds if isinstance(module, types)), None)


def layer_kinds(node: fx.Node, module: nn.Module) -> Tuple[str, ...]:
    """The kinds of the layer that ``node`` calls, the most specific first.

    A dense layer applied at every position of a feature map or token sequence
    (ConvNeXt's pointwise layers, a transformer's MLP and projections: its input
    has more rows than the batch has examples) is ``("positionwise_linear",
    "linear")``: a 1x1 convolution in all but name. Otherwise ``(layer_kind,)``.
    """
    kind = layer_kind(module)
    if kind is None:
        return ()
    if kind == "linear" and _applied_at_every_position(node):
        return ("positionwise_linear", "linear")
    return (kind,)


def _applied_at_every_position(node: fx.Node) -> bool:
    value = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    inputs = [p.meta.get("val") for p in node.graph.find_nodes(op="placeholder")]
    batch = next((value.shape[0] for value in inputs if _is_batched(value)), None)
    if not _is_batched(value) or batch is None:
        return False
    rows = sympy.Mul(*(_size_expression(size) for size in value.shape[:-1]))
    return rows != _size_expression(batch)  # sizes may be symbolic (a dynamic batch): compare expressions


def _is_batched(value) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 2


def _size_expression(size) -> "sympy.Expr":
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


@dataclass(frozen=True)
class Preset:
    """A composite of rules: which rule each kind of layer gets (see :func:`layer_kind`).

    Attributes:
        name: shown in rule reports (``preset epsilon-plus-flat``).
        first: the rule of the first layer, in the order the graph runs, whose
            kind is in ``first_kinds``.
        conv: the rule of convolutions (modules and functional calls).
        linear: the rule of dense layers.
        layers: further ``(kind, rule)`` pairs, e.g. ``("addition", ...)``,
            looked at before ``conv`` and ``linear``; the first match wins. A
            kind is a :func:`layer_kinds` name or a tuple of module types.
        first_kinds: the kinds the first layer is looked for among.
        fold_batch_norm: what ``LRP(..., fold_batch_norm=None)`` does with
            this preset.
    """

    name: str
    first: Optional[Factory] = None
    conv: Optional[Factory] = None
    linear: Optional[Factory] = None
    layers: Tuple[Tuple[Union[str, Tuple[type, ...]], Factory], ...] = ()
    first_kinds: Tuple[str, ...] = ("conv", "linear")
    fold_batch_norm: bool = False

    def rule_factory(self, module: nn.Module, kinds: Sequence[str], is_first: bool) -> Optional[Factory]:
        """The factory of the rule for ``module`` of these ``kinds`` (:func:`layer_kinds`), ``None``
        where the defaults decide: ``first``, then ``layers`` in order, then ``conv`` and ``linear``."""
        if is_first and self.first is not None:
            return self.first
        for key, factory in self.layers:
            if key in kinds if isinstance(key, str) else isinstance(module, key):
                return factory
        by_kind = {"conv": self.conv, "linear": self.linear}
        return next((by_kind[kind] for kind in kinds if by_kind.get(kind) is not None), None)


def _zennit_layers(stabilizer: float, positionwise: Optional[Factory]) -> Tuple[Tuple[str, Factory], ...]:
    """zennit's ``layer_map_base``: its ``Norm`` rule (epsilon as a stabiliser) at sums and average
    pooling; batch norms pass relevance on (they are folded first, zennit's canonizers). With a
    ``positionwise`` rule, dense layers applied at every position get it (beyond zennit, which
    matches by module type)."""
    return (() if positionwise is None else (("positionwise_linear", positionwise),)) + (
        ("addition", functools.partial(EpsilonRule, stabilizer)),
        ("average_pool", functools.partial(EpsilonRule, stabilizer)),
        ("batch_norm", PassThroughRule),
    )


#: The suffix of a preset that treats dense layers applied at every position as 1x1 convolutions.
POSITIONWISE = "-positionwise"


def _composite(
    name: str,
    first: Optional[Factory],
    conv: Factory,
    epsilon: float,
    stabilizer: float,
    positionwise: bool,
    first_kinds: Tuple[str, ...] = ("conv", "linear"),
) -> Preset:
    """zennit's composite ``name``; with ``positionwise``, the variant whose position-wise dense layers
    (ConvNeXt's pointwise layers, a transformer's MLP: 1x1 convolutions in all but name) get ``conv``."""
    linear = functools.partial(EpsilonRule, epsilon)
    layers = _zennit_layers(stabilizer, conv if positionwise else None)
    name = name + POSITIONWISE if positionwise else name
    return Preset(name, first, conv, linear, layers, first_kinds, fold_batch_norm=True)


# The builders below take zennit's arguments: ``epsilon`` for the epsilon rule of dense layers,
# ``stabilizer`` for every other rule's denominators (and zennit's Norm at sums and pooling).
def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, positionwise: bool = False) -> Preset:
    """zennit's ``EpsilonPlus``: z+ on convolutions, epsilon on dense layers.

    ``positionwise``: z+ also on dense layers applied at every position (the
    ``-positionwise`` variant; see :data:`POSITIONWISE`).
    """
    return _composite("epsilon-plus", None, functools.partial(ZPlusRule, stabilizer), epsilon, stabilizer, positionwise)


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, positionwise: bool = False) -> Preset:
    """zennit's ``EpsilonPlusFlat``: flat on the first convolution or dense layer, then as :func:`epsilon_plus`."""
    zplus = functools.partial(ZPlusRule, stabilizer)
    flat = functools.partial(FlatRule, stabilizer)
    return _composite("epsilon-plus-flat", flat, zplus, epsilon, stabilizer, positionwise)


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, positionwise: bool = False) -> Preset:
    """zennit's ``EpsilonAlpha2Beta1``: alpha=2, beta=1 on convolutions, epsilon on dense layers."""
    alpha_beta = functools.partial(AlphaBetaRule, 2.0, 1.0, stabilizer)
    return _composite("epsilon-alpha2-beta1", None, alpha_beta, epsilon, stabilizer, positionwise)


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, positionwise: bool = False) -> Preset:
    """zennit's ``EpsilonAlpha2Beta1Flat``: flat on the first layer, then as :func:`epsilon_alpha2_beta1`."""
    return _composite(
        "epsilon-alpha2-beta1-flat",
        functools.partial(FlatRule, stabilizer),
        functools.partial(AlphaBetaRule, 2.0, 1.0, stabilizer),
        epsilon,
        stabilizer,
        positionwise,
    )


def epsilon_gamma_box(
    low: Union[float, Tensor] = -3.0,
    high: Union[float, Tensor] = 3.0,
    gamma: float = 0.25,
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    positionwise: bool = False,
) -> Preset:
    """zennit's ``EpsilonGammaBox(low, high)``: zB on the first convolution, gamma on the others, epsilon on
    dense layers.

    ``low`` and ``high`` bound the input (scalars, or tensors that broadcast
    against it, e.g. ImageNet's normalised 0 and 1 per channel, shaped
    ``(3, 1, 1)``). ``preset="epsilon-gamma-box"`` is this with ``[-3, 3]``.

    Examples::

        >>> mean = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
        >>> std = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)
        >>> LRP(model, preset=epsilon_gamma_box(-mean / std, (1 - mean) / std))
    """
    return _composite(
        "epsilon-gamma-box",
        functools.partial(ZBoxRule, low, high, stabilizer),
        functools.partial(GeneralizedGammaRule, gamma, stabilizer),
        epsilon,
        stabilizer,
        positionwise,
        first_kinds=("conv",),  # zennit's first map: convolutions only
    )


def with_input_bounds(preset: Union[str, Preset], low: Union[float, Tensor], high: Union[float, Tensor]) -> Preset:
    """``preset`` (a name or a :class:`Preset`) with its zB first-layer rule bounded by ``low`` and ``high``.

    The box rule needs the input's range (``epsilon-gamma-box`` assumes
    [-3, 3]); presets without one are returned as they are. ``low`` and
    ``high`` are scalars or tensors that broadcast against the input, e.g.
    ``-mean / std`` and ``(1 - mean) / std`` per channel for normalised images.
    """
    preset = _preset(preset)
    first = preset.first
    if not (isinstance(first, functools.partial) and first.func is ZBoxRule):
        return preset
    return dataclasses.replace(preset, first=functools.partial(ZBoxRule, low, high, *first.args[2:], **first.keywords))


_ZENNIT_BUILDERS: Dict[str, Callable[..., Preset]] = {
    "epsilon-plus": epsilon_plus,
    "epsilon-plus-flat": epsilon_plus_flat,
    "epsilon-alpha2-beta1": epsilon_alpha2_beta1,
    "epsilon-alpha2-beta1-flat": epsilon_alpha2_beta1_flat,
    "epsilon-gamma-box": epsilon_gamma_box,
}

#: The rule presets by name: ``LRP(model, preset="epsilon-plus-flat")``. Those named after
#: zennit's composites equal them with their default arguments where zennit runs (tests/parity;
#: Kohlbrenner et al. 2020, "Towards best practice in explaining neural network decisions with
#: LRP"); each has a ``-positionwise`` variant that gives a dense layer applied at every position
#: the convolutions' rule, where zennit, matching by module type, gives it epsilon.
PRESETS: Dict[str, Preset] = {"epsilon": Preset("epsilon")}
PRESETS.update({name: build() for name, build in _ZENNIT_BUILDERS.items()})
PRESETS.update({name + POSITIONWISE: build(positionwise=True) for name, build in _ZENNIT_BUILDERS.items()})

_SOFTMAXES = (M.Softmax, nn.Softmax)
_PRODUCTS = (M.Product, M.Matmul, M.AttentionMatmul)  # GatedProduct is a Product
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)  # linearised: the standard deviation is a constant

# CP-LRP (Ali et al. 2022): attention probabilities, normalising factors and the activated
# factor of gated linear units are constants; the network is then linear in what carries relevance.
PRESETS["cp-lrp"] = Preset(
    "cp-lrp",
    linear=EpsilonRule,
    layers=(
        (_SOFTMAXES, ConstantRule),
        ((M.Attention, M.AttentionMatmul) + _NORMS, EpsilonRule),
        ((M.GatedProduct,), GateRule),
    ),
)
# AttnLRP (Achtibat et al. 2024): softmax by its own rule, uniform split of products, identity
# on normalisation (its factor constant) and on elementwise activations, epsilon elsewhere.
PRESETS["attn-lrp"] = Preset(
    "attn-lrp",
    linear=EpsilonRule,
    layers=(
        (_SOFTMAXES, SoftmaxRule),
        ((M.Attention,), AttnLRPAttentionRule),
        (_PRODUCTS, UniformSplitRule),
        (_NORMS, EpsilonRule),
    ),
)


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
        """The rule's class name, with epsilon for an ``EpsilonRule`` (``"EpsilonRule(1e-09)"``); ``"-"`` for none."""
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
    first_layer = _first_layer(gm, chosen_preset.first_kinds) if chosen_preset is not None else None
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
            if source.startswith("preset") and _has_input_dependent_weight(node, module, carrying):
                rule, problem = None, _input_dependent_weight_message(node, chosen_preset)
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


def preset_folds_batch_norm(preset: Union[str, Preset, None]) -> bool:
    """Whether batch norms are folded by default under ``preset`` (see :class:`Preset`)."""
    chosen = _preset(preset)
    return chosen is not None and chosen.fold_batch_norm


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
        factory = preset.rule_factory(module, layer_kinds(node, module), is_first)
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


def _first_layer(gm: fx.GraphModule, kinds: Sequence[str]) -> Optional[fx.Node]:
    """The first call (in the order the graph runs) of a layer of one of these kinds."""
    for node in gm.graph.find_nodes(op="call_module"):
        if set(layer_kinds(node, gm.get_submodule(node.target))) & set(kinds):
            return node
    return None


def _has_input_dependent_weight(node: fx.Node, module: nn.Module, carrying) -> bool:
    """A functional convolution or linear layer whose weight or bias carries relevance (a dynamic layer)."""
    if not isinstance(module, M.LinearFunction) or layer_kind(module) not in ("conv", "linear"):
        return False
    return any(isinstance(arg, fx.Node) and arg in carrying for arg in node.args[1:3])


def _input_dependent_weight_message(node: fx.Node, preset: Preset) -> str:
    return (
        f"preset {preset.name!r} has no rule for {describe_node(node)}: its weight or bias depends on the "
        "input, so it is not a layer with constant weights that the preset's rules are defined for.\n"
        "Give it a rule by name (rules={name: EpsilonRule()}) or choose preset='epsilon'."
    )


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
