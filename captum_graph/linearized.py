"""Forward functions that compute the same values with non-linear factors held constant.

Under LRP a normalisation's standard deviation and an attention's
probabilities are constants (CP-LRP, Ali et al. 2022; LXT's identity rule), so
the layer is linear in its input and the epsilon rule applies to it. These
forwards detach exactly those factors; the values are unchanged up to rounding.
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import PropagationRule
from torch import Tensor, nn

from . import modules as M
from .rules import AttnLRPAttentionRule

__all__ = ["linearized_forward", "layer_norm", "group_norm", "rms_norm", "attention", "attnlrp_attention"]

aten = torch.ops.aten


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` with the standard deviation held constant."""
    return _LayerNormConstantStd.apply(x, tuple(normalized_shape), weight, bias, eps)


class _LayerNormConstantStd(torch.autograd.Function):
    """``F.layer_norm``'s own kernel forward; the backward of ``w * (x - mean(x)) / s + b`` with ``s`` constant.

    ``dx = (w g - mean(w g)) / s`` over the normalised dimensions: three passes
    over the gradient and no copy of the input kept, where differentiating the
    written-out formula keeps the centred input and takes a dozen passes.
    Weight and bias get no gradient (LRP differentiates activations only).
    """

    @staticmethod
    def forward(ctx, x: Tensor, normalized_shape: tuple, weight, bias, eps: float) -> Tensor:
        y, _, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(rstd, weight)
        ctx.dims = tuple(range(-len(normalized_shape), 0))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        rstd, weight = ctx.saved_tensors
        if grad.requires_grad:  # a double backward records the operations
            scaled = grad * weight if weight is not None else grad
            return (scaled - scaled.mean(ctx.dims, keepdim=True)) * rstd, None, None, None, None
        scaled = grad * weight if weight is not None else grad.clone()
        scaled.sub_(scaled.mean(ctx.dims, keepdim=True))
        return scaled.mul_(rstd), None, None, None, None


def group_norm(x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` with the standard deviation held constant."""
    grouped = x.reshape(x.shape[0], num_groups, -1)
    centred = grouped - grouped.mean(-1, keepdim=True)
    std = torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True) + eps).detach()
    y = (centred / std).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight=None, eps: Optional[float] = None) -> Tensor:
    """``F.rms_norm`` with the root mean square held constant."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps).detach()
    return y * weight if weight is not None else y


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` (without dropout) with the probabilities held constant.

    Queries, keys and the mask are detached: the probabilities they make are
    constants, relevance flows through the values, and the fused kernel keeps
    no more for the backward pass than the model's own attention does.
    """
    if dropout_p:
        raise NotImplementedError("attention dropout is random: explain the model in eval mode")
    mask = attn_mask.detach() if isinstance(attn_mask, Tensor) else attn_mask
    return F.scaled_dot_product_attention(
        query.detach(), key.detach(), value, mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def attnlrp_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` (without dropout) whose gradient gives AttnLRP's relevance.

    With the gradient at the output the relevance ratio ``R / z``, input times
    gradient is: for the values half the epsilon share (uniform rule on
    ``p v``); for queries and keys a quarter (the other half of ``p v``'s share
    goes through the softmax, whose own gradient times its input is
    :class:`~captum_graph.rules.SoftmaxRule`, to ``q k^T``, split in half
    again). The mask gets none.
    """
    if dropout_p:
        raise NotImplementedError("attention dropout is random: explain the model in eval mode")
    mask = attn_mask.detach() if isinstance(attn_mask, Tensor) else attn_mask
    return F.scaled_dot_product_attention(
        _ScaleGradient.apply(query, 0.25), _ScaleGradient.apply(key, 0.25), _ScaleGradient.apply(value, 0.5),
        mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa,
    )


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return layer_norm(x, normalized_shape, weight, bias, eps)


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return group_norm(x, num_groups, weight, bias, eps)


_MODULE_FORWARDS = {
    nn.LayerNorm: lambda module, x: layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps),
    nn.GroupNorm: lambda module, x: group_norm(x, module.num_groups, module.weight, module.bias, module.eps),
    nn.RMSNorm: lambda module, x: rms_norm(x, module.normalized_shape, module.weight, module.eps),
}
_FUNCTIONS = {
    aten.layer_norm: _layer_norm,
    aten.group_norm: _group_norm,
    aten.rms_norm: rms_norm,
    aten.scaled_dot_product_attention: attention,
}


def linearized_forward(module: nn.Module, rule: Optional[PropagationRule] = None) -> Optional[Callable]:
    """The linearised forward of ``module`` under ``rule``, bound to it, or ``None`` if it is already linear.

    An attention under :class:`~captum_graph.rules.AttnLRPAttentionRule` gets
    :func:`attnlrp_attention`; under any other rule its probabilities are constants.
    """
    if isinstance(module, M.Attention) and isinstance(rule, AttnLRPAttentionRule):
        return attnlrp_attention
    if isinstance(module, M.Function):
        return _FUNCTIONS.get(getattr(module.fn, "overloadpacket", None))  # Function.forward adds its keyword arguments
    for module_type, forward in _MODULE_FORWARDS.items():
        if isinstance(module, module_type):
            return lambda *args, **kwargs: forward(module, *args, **kwargs)
    return None
