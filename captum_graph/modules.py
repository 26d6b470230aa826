"""Leaf modules that stand for functional operations in a rewritten graph.

Each one computes exactly what the functional operation did, so the rewritten
graph has the same outputs, and carries a known relevance rule (``rules.py``).
"""
from typing import Any, Callable, Tuple, Union

import torch
from captum.attr._utils.custom_modules import Addition_Module
from torch import Tensor, nn

__all__ = [
    "Addition",
    "Subtraction",
    "Scale",
    "Concatenate",
    "Stack",
    "Function",
    "Activation",
    "Elementwise",
    "LinearFunction",
    "Tap",
    "Gate",
    "Product",
    "GatedProduct",
    "Lookup",
    "Softmax",
    "AttentionMatmul",
    "Attention",
    "Matmul",
    "TokensToGrid",
    "GridToTokens",
]


class Addition(Addition_Module):
    """``a + b (+ c ...)`` with optional ``alpha`` on the last term, as ``torch.add``.

    Relevance is split in proportion to each term's contribution (epsilon rule).
    """

    def __init__(self, num_inputs: int = 2, alpha: float = 1.0) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.alpha = alpha

    def forward(self, *terms: Tensor) -> Tensor:  # type: ignore[override]
        if self.alpha != 1:
            terms = terms[:-1] + (terms[-1] * self.alpha,)
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}" + (f", alpha={self.alpha}" if self.alpha != 1 else "")


class Subtraction(nn.Module):
    """``a - b``: relevance is split like an addition of ``a`` and ``-b`` (epsilon rule)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b


class Scale(nn.Module):
    """``x * c`` or ``x / c`` for a constant or normalising factor ``c``: relevance passes unchanged to ``x``."""

    constant_inputs = (1,)  # relevance never enters the factor

    def __init__(self, divide: bool = False) -> None:
        super().__init__()
        self.divide = divide

    def forward(self, x: Tensor, factor: Union[float, Tensor]) -> Tensor:
        return x / factor if self.divide else x * factor

    def extra_repr(self) -> str:
        return "divide" if self.divide else "multiply"


class Concatenate(nn.Module):
    """``torch.cat(tensors, dim)``: relevance is moved back to each part."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.cat(tensors, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Stack(Concatenate):
    """``torch.stack(tensors, dim)``: relevance is moved back to each part."""

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.stack(tensors, dim=self.dim)


class Function(nn.Module):
    """A call ``fn(*args, **kwargs)``: constant keyword arguments are fixed, the rest given per call."""

    def __init__(self, fn: Callable, **kwargs: Any) -> None:
        super().__init__()
        self.fn = fn
        self.kwargs = kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **self.kwargs, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class Activation(Function):
    """An elementwise activation (``F.relu``, ``F.gelu``, ...): relevance passes unchanged."""


class Elementwise(Activation):
    """An elementwise activation written out in operations (``fn`` is their graph): relevance passes unchanged."""

    def extra_repr(self) -> str:
        return ", ".join(str(n.target).split(".")[-2] for n in self.fn.graph.nodes if n.op == "call_function")


class LinearFunction(Function):
    """A function linear in ``x`` (pooling, mean, ``F.linear``): epsilon rule."""


class Tap(nn.Module):
    """Identity placed after a graph node so layer methods can hook its output."""

    def forward(self, x: Any) -> Any:
        return x


class Gate(nn.Module):
    """``signal * gate`` where ``gate`` is a sigmoid-like gate: the gate is a constant.

    All relevance goes to the signal (squeeze-excitation, gated units).
    """

    constant_inputs = (1,)

    def forward(self, signal: Tensor, gate: Tensor) -> Tensor:
        return signal * gate


class Product(nn.Module):
    """``a * b`` of two input-dependent tensors with no known role.

    Relevance is split in half between the factors (AttnLRP's uniform rule,
    Achtibat et al. 2024, Prop. 3.3); the report warns about it.
    """

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class GatedProduct(Product):
    """``signal * act(gate)``: a gated linear unit (SwiGLU, GeGLU), the activated factor second.

    By default relevance is split in half between the factors (AttnLRP's
    uniform rule); the ``cp-lrp`` preset holds the activated factor constant.
    """


class Lookup(Function):
    """``embedding(table, indices)``: rows of a table looked up by indices (``nn.Embedding``).

    The indices carry no relevance. Relevance reaching the output is moved
    back to the rows looked up, and ends there unless the table itself
    depends on the inputs: with token ids as inputs, the output is where
    relevance per token is read (``LayerLRP`` at the embedding).
    """

    constant_inputs = (1,)


class Softmax(Function):
    """A softmax. By default (CP-LRP) its output (attention probabilities) is a constant
    for relevance; AttnLRP propagates relevance through it (:class:`~captum_graph.rules.SoftmaxRule`)."""

    constant_inputs = "all"


class AttentionMatmul(Function):
    """A product (``matmul``, ``einsum``) of attention probabilities and values.

    The probabilities are constants (CP-LRP): relevance flows to the values
    only, by the epsilon rule.
    """


class Attention(Function):
    """``scaled_dot_product_attention(q, k, v, ...)``: by default the probabilities are constants (CP-LRP).

    Relevance flows to the values only, by the epsilon rule; queries, keys and
    the mask receive none. Under AttnLRP
    (:class:`~captum_graph.rules.AttnLRPAttentionRule`) queries and keys receive
    relevance through the softmax too.
    """

    constant_inputs = (0, 1, 3)


class Matmul(Function):
    """A product (``matmul``, ``einsum``) of two input-dependent tensors with no known role.

    Relevance is split in half between them (AttnLRP's uniform rule).
    """


class TokensToGrid(nn.Module):
    """Patch tokens ``(N, T, C)`` as a feature map ``(N, C, h, w)``.

    ``h, w`` are read from ``reference`` at every call, never hard-coded: from
    its dimensions ``grid_dims``, those of a feature map of the same grid (the
    patch embedding's output) by default, or the patch counts of the reshape
    that cuts the image into patches. The first ``T - h*w`` tokens (class and
    register tokens) are left out.
    """

    def __init__(self, grid_dims: Tuple[int, int] = (-2, -1)) -> None:
        super().__init__()
        self.grid_dims = grid_dims

    def forward(self, tokens: Tensor, reference: Tensor) -> Tensor:
        h, w = (reference.shape[d] for d in self.grid_dims)
        patches = tokens[:, tokens.shape[1] - h * w :, :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class GridToTokens(nn.Module):
    """The inverse of :class:`TokensToGrid`: the grid back in place of the patch tokens."""

    def forward(self, grid: Tensor, tokens: Tensor) -> Tensor:
        extra = tokens.shape[1] - grid.shape[-2] * grid.shape[-1]
        return torch.cat([tokens[:, :extra, :], grid.flatten(2).transpose(1, 2)], dim=1)
