"""Captum's call arguments as the positional arguments of one forward call."""
from typing import Any, Tuple

from torch import Tensor

from captum._utils.common import _format_additional_forward_args, _format_tensor_into_tuples

__all__ = ["call_arguments", "input_aliases"]


def call_arguments(inputs: Any, additional_forward_args: Any = None) -> Tuple[Any, ...]:
    """``inputs`` followed by ``additional_forward_args``, as Captum passes them to the model."""
    additional = _format_additional_forward_args(additional_forward_args)
    return _format_tensor_into_tuples(inputs) + (tuple(additional) if additional is not None else ())


def input_aliases(inputs: Any) -> Any:
    """``inputs`` (a tensor or a tuple) as new tensor objects sharing their storage and ``requires_grad``.

    Captum marks its inputs as requiring gradients during a call and unmarks
    them after; on the caller's own tensors, a call in another thread using the
    same tensors would find them unmarked half-way through.
    """
    if isinstance(inputs, Tensor):
        return inputs.detach().requires_grad_(inputs.requires_grad) if inputs.is_floating_point() else inputs
    if isinstance(inputs, tuple):
        return tuple(input_aliases(x) for x in inputs)
    return inputs
