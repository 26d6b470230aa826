"""A slow reference LRP, written straight from the papers' formulas.

Nothing here calls ``captum_graph``, Captum's rules or the layer's ``forward``:
each rule is an einsum over an explicit weight matrix, in float64. A dense layer
is a weight matrix ``W`` (out x in) acting on ``x``; a convolution is the same
matrix acting on every patch of ``x`` (``F.unfold``), and the relevance of the
patches is summed back onto the input (``F.fold``), so padded positions get
nothing.

Every rule redistributes the output relevance ``R_j`` in proportion to
contributions ``c_ij``::

    R_i = sum_j c_ij / stab(z_j) * R_j,    stab(z) = z + eps * sign(z), sign(0) = +1

with these contributions and denominators:

=============  ================================================  =======================
rule           c_ij                                              z_j
=============  ================================================  =======================
epsilon        x_i w_ij                                          sum_i c_ij + b_j
gamma          x_i (w_ij + gamma w_ij^+)                         sum_i c_ij + b_j [#]_
alpha1-beta0   x_i w_ij^+ (Captum's Alpha1_Beta0_Rule)           sum_i c_ij + b_j [#]_
z+             x_i^+ w_ij^+ + x_i^- w_ij^-  (Montavon 2017, 6)   sum_i c_ij + b_j^+ [#]_
alpha-beta     alpha (z+ above) - beta (x_i^+ w_ij^- + x_i^- w_ij^+), each over its own z (+ b^+, + b^-)
gamma, signed  [z_j > 0] (x^+ (w + g w^+) + x^- (w + g w^-)), z + g b^+; [z_j < 0] the same with signs swapped [#]_
flat           1 for every input connected to j                  n_j = sum_i c_ij
w^2            w_ij^2                                            sum_i c_ij + b_j^2 [#]_
zB             x_i w_ij - l_i w_ij^+ - h_i w_ij^- (M. 2017, 7)   sum_i c_ij (no bias)
=============  ================================================  =======================

.. [#] Captum's convention: the bias is kept unless ``set_bias_to_zero``.
.. [#] The bias is a neuron of constant input 1 (Montavon et al. 2019,
   sec. 10.2.2) whose weight the rule transforms like the others, as zennit
   does: z+ keeps ``b^+``, alpha-beta ``b^+`` and ``b^-``, signed gamma
   ``b + g b^+`` and ``b + g b^-``, w^2 ``b^2``.
"""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "stabilize",
    "epsilon",
    "gamma",
    "alpha1_beta0",
    "zplus",
    "alpha_beta",
    "signed_gamma",
    "flat",
    "wsquare",
    "zbox",
    "RULES",
]

Bound = Union[float, Tensor]


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


# ---------------------------------------------------------------------------
# a layer as an explicit matrix acting on patches
# ---------------------------------------------------------------------------
class _Patches:
    """``layer`` as ``W`` (out x patch) applied to every patch of its input.

    ``unfold(t)`` gives patches of shape (N, P, L); ``fold(r)`` sums patch
    relevance (N, P, L) back to the input's shape; outputs are (N, O, L).
    """

    def __init__(self, layer: nn.Module, input_shape: torch.Size) -> None:
        self.input_shape = input_shape
        weight = layer.weight.detach().to(torch.float64)
        bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
        if isinstance(layer, nn.Linear):
            self.weight = weight  # (O, I)
            self.unfold = lambda t: t.reshape(t.shape[0], -1, 1)
            self.fold = lambda r: r.reshape(input_shape)
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise NotImplementedError("reference conv: groups=1, numeric zero padding only")
            geometry = dict(
                kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
            )
            self.weight = weight.reshape(weight.shape[0], -1)  # (O, C*kh*kw)
            self.unfold = lambda t: F.unfold(t, **geometry)
            self.fold = lambda r: F.fold(r, output_size=input_shape[-2:], **geometry)
        else:
            raise NotImplementedError(f"reference LRP for {type(layer).__name__}")
        self.bias = torch.zeros(self.weight.shape[0], dtype=torch.float64) if bias is None else bias


def _redistribute(
    layer: nn.Module,
    x: Tensor,
    relevance: Tensor,
    contributions: Callable[[_Patches, Tensor], Tensor],
    bias: Optional[Callable[[_Patches], Tensor]],
    eps: float,
) -> Tensor:
    """``R_i = sum_j c_ij / stab(z_j) R_j`` with ``z_j = sum_i c_ij (+ b_j)``, summed back over patches."""
    x = x.detach().to(torch.float64)
    p = _Patches(layer, x.shape)
    out_relevance = relevance.detach().to(torch.float64).reshape(x.shape[0], p.weight.shape[0], -1)  # (N, O, L)
    c = contributions(p, x)  # (N, P, O, L)
    z = c.sum(dim=1)  # (N, O, L)
    if bias is not None:
        z = z + bias(p)[None, :, None]
    ratio = out_relevance / stabilize(z, eps)
    patch_relevance = torch.einsum("npol,nol->npl", c, ratio)
    return p.fold(patch_relevance)


def _weighted(xu: Tensor, w: Tensor) -> Tensor:
    """``c[n, p, o, l] = xu[n, p, l] * w[o, p]``."""
    return torch.einsum("npl,op->npol", xu, w)


# ---------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------
def epsilon(layer: nn.Module, x: Tensor, relevance: Tensor, eps: float = 1e-9) -> Tensor:
    """Epsilon rule: ``c_ij = x_i w_ij``, ``z_j = sum_i c_ij + b_j``."""
    return _redistribute(layer, x, relevance, lambda p, x: _weighted(p.unfold(x), p.weight), lambda p: p.bias, eps)


def gamma(
    layer: nn.Module, x: Tensor, relevance: Tensor, gamma: float = 0.25, set_bias_to_zero: bool = False, eps: float = 1e-9
) -> Tensor:
    """Gamma rule with Captum's convention: weights ``w + gamma w^+``, bias kept unless ``set_bias_to_zero``."""
    return _redistribute(
        layer,
        x,
        relevance,
        lambda p, x: _weighted(p.unfold(x), p.weight + gamma * p.weight.clamp(min=0)),
        None if set_bias_to_zero else (lambda p: p.bias),
        eps,
    )


def alpha1_beta0(
    layer: nn.Module, x: Tensor, relevance: Tensor, set_bias_to_zero: bool = False, eps: float = 1e-9
) -> Tensor:
    """Captum's Alpha1_Beta0_Rule: weights ``w^+``, inputs as they are, bias kept unless ``set_bias_to_zero``."""
    return _redistribute(
        layer,
        x,
        relevance,
        lambda p, x: _weighted(p.unfold(x), p.weight.clamp(min=0)),
        None if set_bias_to_zero else (lambda p: p.bias),
        eps,
    )


def _signed(transform_positive: Callable[[Tensor], Tensor], transform_negative: Callable[[Tensor], Tensor]):
    """``c_ij = x_i^+ f(w_ij) + x_i^- g(w_ij)``."""

    def contributions(p: _Patches, x: Tensor) -> Tensor:
        xu = p.unfold(x)
        return _weighted(xu.clamp(min=0), transform_positive(p.weight)) + _weighted(
            xu.clamp(max=0), transform_negative(p.weight)
        )

    return contributions


def _positive(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _negative(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def zplus(layer: nn.Module, x: Tensor, relevance: Tensor, eps: float = 1e-6) -> Tensor:
    """z+ rule (Montavon et al. 2017, eq. 6): ``c_ij = x_i^+ w_ij^+ + x_i^- w_ij^-``, ``z_j = sum_i c_ij + b_j^+``."""
    return _redistribute(layer, x, relevance, _signed(_positive, _negative), lambda p: _positive(p.bias), eps)


def alpha_beta(layer: nn.Module, x: Tensor, relevance: Tensor, alpha: float = 2.0, beta: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Alpha-beta rule (Bach et al. 2015): ``alpha`` times the z+ rule minus ``beta`` times its negative twin."""
    positive = _redistribute(layer, x, relevance, _signed(_positive, _negative), lambda p: _positive(p.bias), eps)
    negative = _redistribute(layer, x, relevance, _signed(_negative, _positive), lambda p: _negative(p.bias), eps)
    return alpha * positive - beta * negative


def signed_gamma(layer: nn.Module, x: Tensor, relevance: Tensor, gamma: float = 0.25, eps: float = 1e-6) -> Tensor:
    """Gamma rule for inputs of any sign (Andeol et al. 2021): positive contributions strengthened where
    ``z_j > 0``, negative ones where ``z_j < 0``."""
    x = x.detach().to(torch.float64)
    p = _Patches(layer, x.shape)
    out = (torch.einsum("npl,op->nol", p.unfold(x), p.weight) + p.bias[None, :, None]).reshape(relevance.shape)

    def up(t: Tensor) -> Tensor:
        return t + gamma * _positive(t)

    def down(t: Tensor) -> Tensor:
        return t + gamma * _negative(t)

    positive = _redistribute(layer, x, relevance * (out > 0), _signed(up, down), lambda p: up(p.bias), eps)
    negative = _redistribute(layer, x, relevance * (out < 0), _signed(down, up), lambda p: down(p.bias), eps)
    return positive + negative


def flat(layer: nn.Module, x: Tensor, relevance: Tensor, eps: float = 1e-6) -> Tensor:
    """Flat rule: ``R_i = sum_j R_j / n_j`` over the outputs ``j`` that input ``i`` is connected to.

    ``n_j`` counts the inputs connected to ``j`` (padding is not an input).
    """
    return _redistribute(
        layer, x, relevance, lambda p, x: _weighted(p.unfold(torch.ones_like(x)), torch.ones_like(p.weight)), None, eps
    )


def wsquare(layer: nn.Module, x: Tensor, relevance: Tensor, eps: float = 1e-6) -> Tensor:
    """w^2 rule (Montavon et al. 2017, eq. 8): ``c_ij = w_ij^2``, ``z_j = sum_i c_ij + b_j^2``."""
    return _redistribute(
        layer, x, relevance, lambda p, x: _weighted(p.unfold(torch.ones_like(x)), p.weight**2), lambda p: p.bias**2, eps
    )


def zbox(layer: nn.Module, x: Tensor, relevance: Tensor, low: Bound, high: Bound, eps: float = 1e-6) -> Tensor:
    """zB rule (Montavon et al. 2017, eq. 7): ``c_ij = x_i w_ij - l_i w_ij^+ - h_i w_ij^-``, ``z_j = sum_i c_ij``."""

    def contributions(p: _Patches, x: Tensor) -> Tensor:
        lo = torch.zeros_like(x) + torch.as_tensor(low, dtype=x.dtype)
        hi = torch.zeros_like(x) + torch.as_tensor(high, dtype=x.dtype)
        return (
            _weighted(p.unfold(x), p.weight)
            - _weighted(p.unfold(lo), p.weight.clamp(min=0))
            - _weighted(p.unfold(hi), p.weight.clamp(max=0))
        )

    return _redistribute(layer, x, relevance, contributions, None, eps)


RULES = {
    "epsilon": epsilon,
    "gamma": gamma,
    "alpha1_beta0": alpha1_beta0,
    "zplus": zplus,
    "alpha_beta": alpha_beta,
    "signed_gamma": signed_gamma,
    "flat": flat,
    "wsquare": wsquare,
    "zbox": zbox,
}
