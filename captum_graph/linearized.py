"""Forward functions that compute the same values with non-linear factors held constant.

Under LRP a normalisation's standard deviation and an attention's
probabilities are constants (CP-LRP, Ali et al. 2022; LXT's identity rule), so
the layer is linear in its input and the epsilon rule applies to it. These
forwards detach exactly those factors; the values are unchanged.
"""
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.overrides import TorchFunctionMode
from torchvision.models.swin_transformer import shifted_window_attention

from . import modules as M

__all__ = ["linearized_forward", "layer_norm", "group_norm", "ConstantSoftmax"]

_SOFTMAXES = (F.softmax, torch.softmax, Tensor.softmax)


class ConstantSoftmax(TorchFunctionMode):
    """Within this mode every softmax result is detached: attention probabilities are constants.

    This linearises attention written as opaque functions (torchvision's
    ``shifted_window_attention``) without re-implementing them.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        return result.detach() if func in _SOFTMAXES else result


def _with_constant_softmax(function: Callable) -> Callable:
    def linearized(*args, **kwargs):
        with ConstantSoftmax():
            return function(*args, **kwargs)

    return linearized


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` with the standard deviation held constant."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    std = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps).detach()
    y = centred / std
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


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


def _layer_norm_module(module: nn.LayerNorm, x: Tensor) -> Tensor:
    return layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _group_norm_module(module: nn.GroupNorm, x: Tensor) -> Tensor:
    return group_norm(x, module.num_groups, module.weight, module.bias, module.eps)


def _multihead_attention(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
    """``nn.MultiheadAttention`` with the attention probabilities held constant."""
    if not module._qkv_same_embed_dim or module.bias_k is not None or key_padding_mask is not None:
        raise NotImplementedError("linearised attention supports packed projections without bias_k / masks")
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    # Project in the layout the inputs come in: on a transposed view F.linear multiplies
    # batched copies of the weight (bmm), several times slower than one matrix product.
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    if module.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    length, batch, embed = q.shape
    heads, head_dim = module.num_heads, embed // module.num_heads

    def split(t: Tensor) -> Tensor:  # (L, N, E) -> (N*H, L, D)
        return t.reshape(t.shape[0], batch * heads, head_dim).transpose(0, 1)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(attn_mask, float("-inf"))
    probabilities = scores.softmax(-1).detach()
    out = (probabilities @ v).transpose(0, 1).reshape(length, batch, embed)
    out = module.out_proj(out)
    if module.batch_first:
        out = out.transpose(0, 1)
    weights = probabilities.reshape(batch, heads, length, -1)
    if need_weights:
        return out, weights.mean(1) if average_attn_weights else weights
    return out, None


_MODULE_FORWARDS = {
    nn.LayerNorm: _layer_norm_module,
    nn.GroupNorm: _group_norm_module,
    nn.MultiheadAttention: _multihead_attention,
}
_FUNCTIONS = {
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    shifted_window_attention: _with_constant_softmax(shifted_window_attention),
}


def linearized_forward(module: nn.Module) -> Optional[Callable]:
    """The linearised forward of ``module``, bound to it, or ``None`` if it is already linear."""
    if isinstance(module, M.Function):
        return _FUNCTIONS.get(module.fn)  # Function.forward adds its own keyword arguments
    for module_type, forward in _MODULE_FORWARDS.items():
        if isinstance(module, module_type):
            return lambda *args, **kwargs: forward(module, *args, **kwargs)
    return None
